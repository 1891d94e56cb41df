"""A fault-tolerant distributed training orchestrator on Ray."""

__version__ = "0.1.0"
