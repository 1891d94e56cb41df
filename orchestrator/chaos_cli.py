"""`orchestrator chaos RUN KIND [--rank R] [--at-step S | --at-s T] [--count N] [--delay-s D]`

Sends one fault into a running job, from another terminal, as a chaos tester or a cluster
scheduler would: the request goes into the run's storage (`chaos-requests/`), where the
running driver picks it up within about a second (chaos/requests.py). RUN is the run's folder
(`<storage>/<run name>`, a local path or a URL) or a run name under `--storage`.

    orchestrator chaos ./runs/demo kill --rank 1
    orchestrator chaos demo hang --rank 0 --at-step 30 --wait
    orchestrator chaos s3://bucket/runs/demo fail_writes --rank 1 --count 3

Exit codes: 0 sent (with --wait: and fired), 1 --wait ran out before it fired, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from orchestrator.errors import ConfigError, StorageError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    from orchestrator.chaos.config import FAULT_KINDS

    chaos = sub.add_parser(
        "chaos", help="inject a fault into a running job",
        description="Inject a fault into a running job. Kinds: " + "; ".join(
            f"{k}: {what}" for k, what in FAULT_KINDS.items()))
    chaos.add_argument("run", help="the run's folder (<storage>/<run name>) or a run name")
    chaos.add_argument("kind", help=f"one of: {', '.join(FAULT_KINDS)}")
    chaos.add_argument("--storage", default="./runs",
                       help="where a run given by name lives (default ./runs)")
    chaos.add_argument("--rank", type=int, default=0, help="the rank to strike (default 0)")
    when = chaos.add_mutually_exclusive_group()
    when.add_argument("--at-step", type=int, default=0,
                      help="when the rank finishes this step (default: at once)")
    when.add_argument("--at-s", type=float, default=0.0,
                      help="this many seconds after the job started")
    chaos.add_argument("--count", type=int, default=1, help="storage faults: how many operations")
    chaos.add_argument("--delay-s", type=float, default=0.0,
                       help="delay_reads, delay_writes: seconds added to each operation")
    chaos.add_argument("--wait", action="store_true",
                       help="wait until the fault fired (exit 1 after --wait-timeout-s)")
    chaos.add_argument("--wait-timeout-s", type=float, default=300.0)


def main(args: argparse.Namespace) -> int:
    from orchestrator.chaos.config import FaultSpec
    from orchestrator.chaos.requests import fired_markers, request_fault
    from orchestrator.ckpt_cli import open_existing_run

    try:
        spec = FaultSpec(kind=args.kind, rank=args.rank, at_step=args.at_step,
                         at_s=args.at_s, count=args.count, delay_s=args.delay_s)
        layout = open_existing_run(args.run, args.storage)
        fault = request_fault(layout, spec)
    except (ConfigError, ValueError) as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, OSError) as e:
        print(f"orchestrator: the request cannot be written: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_PROBLEM
    print(f"orchestrator: sent {fault.describe()} to {layout.storage.url_of(layout.run_name)} "
          f"as {fault.id}; the running driver carries it out within about a second "
          f"(events: fault_requested, fault_fired)")
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.wait_timeout_s
    while time.monotonic() < deadline:
        if fault.id in fired_markers(layout):
            print(f"orchestrator: {fault.id} fired")
            return EXIT_OK
        time.sleep(0.5)
    print(f"orchestrator: {fault.id} did not fire within {args.wait_timeout_s:g} s (is a job "
          f"running this run? it fires when one does)", file=sys.stderr)
    return EXIT_PROBLEM
