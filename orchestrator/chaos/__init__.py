"""Fault injection, in one vocabulary (`FaultPlan`) for the config, the CLI and the tests.

    config.py     the `chaos` config section: FaultSpec, RandomFaults, FAULT_KINDS
    plan.py       FaultPlan (the vocabulary) and Fault (one fault of one job, with its id)
    schedule.py   the driver's side: which faults are pending, due, fired
    inject.py     the worker's side: fires faults at their hook points, writes the markers
    requests.py   `orchestrator chaos` requests to a running job; the markers, read back
"""

from orchestrator.chaos.config import FAULT_KINDS, ChaosConfig, FaultSpec, RandomFaults
from orchestrator.chaos.plan import Fault, FaultPlan

__all__ = ["FAULT_KINDS", "ChaosConfig", "Fault", "FaultPlan", "FaultSpec", "RandomFaults"]
