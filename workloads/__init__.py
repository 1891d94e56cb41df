"""Training programs written against the orchestrator's TrainContext API."""
