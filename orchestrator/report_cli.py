"""`orchestrator report RUN [--storage ./runs] [--png PATH | --no-png]`

Prints how the run's latest job went and where its time went (goodput, and the time lost by
cause), and draws loss against step and wall time with failures, restarts and checkpoint
commits marked (report.py). RUN is the run's folder (`<storage>/<run name>`, a local path or
a URL) or a run name under `--storage`. Works on a running job too: it reads the log so far.

    orchestrator report ./runs/demo
    orchestrator report s3://bucket/runs/demo --png demo.png

Exit codes: 0 reported, 1 the log cannot be read, 2 bad input (no run there).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    report = sub.add_parser("report", help="how a run went, where its time went, and a plot")
    report.add_argument("run", help="the run's folder (<storage>/<run name>) or a run name")
    report.add_argument("--storage", default="./runs",
                        help="where a run given by name lives (default ./runs)")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--png", help="where to write the plot (default ./<run name>-report.png)")
    where.add_argument("--no-png", action="store_true", help="print the text only")


def main(args: argparse.Namespace) -> int:
    from orchestrator.ckpt_cli import open_existing_run
    from orchestrator.errors import StorageError
    from orchestrator.events import read_events
    from orchestrator.report import RunStory, plot

    try:
        layout = open_existing_run(args.run, args.storage)
        events = read_events(layout)
    except ValueError as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, OSError) as e:
        print(f"orchestrator: the run's event log cannot be read: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_PROBLEM
    story = RunStory.of(events)
    print(story.text())
    if not args.no_png:
        path = plot(story, args.png or f"{layout.run_name}-report.png")
        print(f"plot: {path}")
    return EXIT_OK
