"""`orchestrator run CONFIG.yaml [--address ADDR] [--set section.key=value ...]`
`orchestrator ckpt ls|show|verify|gc|export|import ...` (ckpt_cli.py)
`orchestrator data prepare|verify ...` (data_cli.py)
`orchestrator chaos RUN KIND ...` (chaos_cli.py): inject a fault into a running job
`orchestrator report RUN ...` (report_cli.py): how a run went and where its time went

The entry point is the only place that reads the environment (RAY_ADDRESS).
Exit codes: 0 the job succeeded, 1 it failed, 2 the configuration or the command was wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from orchestrator import chaos_cli, ckpt_cli, data_cli, report_cli
from orchestrator.errors import CheckpointError, ConfigError, StorageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator",
                                     description="Fault-tolerant distributed training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a training job")
    run.add_argument("config", nargs="?", help="job config YAML (defaults apply without one)")
    run.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, or start "
                                       "an embedded local Ray)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    run.add_argument("--metrics-export-port", type=int, default=None, metavar="PORT",
                     help="the embedded Ray serves the job's metrics for Prometheus on "
                          "127.0.0.1:PORT (orchestrator/metrics.py); with --address, the "
                          "cluster's own metrics ports serve them")
    run.add_argument("--check", action="store_true",
                     help="check the config, the workload's arguments and data, and the "
                          "storage, then exit (0: it would start) without starting anything")
    ckpt_cli.add_parser(sub)
    data_cli.add_parser(sub)
    chaos_cli.add_parser(sub)
    report_cli.add_parser(sub)
    args = parser.parse_args(argv)
    # Our own progress at INFO; libraries (botocore, Ray) only when they warn.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    if args.command == "run":
        return _run(args)
    if args.command == "ckpt":
        return ckpt_cli.main(args)
    if args.command == "data":
        return data_cli.main(args)
    if args.command == "chaos":
        return chaos_cli.main(args)
    if args.command == "report":
        return report_cli.main(args)
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.config import load_config

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # An embedded cluster serves this machine only: keep Ray on loopback (otherwise it
        # binds the machine's external address). Ray reads this when it is imported, which
        # may be as early as the preflight's import of the workload.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        config = load_config(args.config, args.overrides)
        if config.run.storage.startswith("memory://"):
            raise ConfigError("run.storage: memory:// lives in one process and the workers "
                              "are others; give a local path, file:// or s3://")
        storage = Storage(config.run.storage_url)
        config = preflight(config, RunLayout(storage, config.run.name))
    except (ConfigError, StorageError, CheckpointError) as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        print(f"orchestrator: {args.config or 'the default config'} is good: run "
              f"{config.run.name!r} in {config.run.storage_url}, "
              f"{config.scaling.num_workers} workers of {config.workload.entrypoint}")
        return EXIT_OK

    from orchestrator.lease import Holder, LeaseHeld, RunLease

    layout = RunLayout(storage, config.run.name)
    lease = RunLease(layout, config.run.lease_timeout_s)
    try:
        # One driver per run: taken before anything starts, so a second driver of a live
        # run is refused at once (a scheduler that restarted a job it thought dead).
        lease.acquire(Holder.this_process(os.environ.get("RAY_JOB_ID", "")))
    except LeaseHeld as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"orchestrator: the run's lease cannot be taken: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_USAGE

    import ray

    from orchestrator.driver import Driver
    from orchestrator.worker_group import RayWorkerGroup

    if address:
        ray.init(address=address)
    else:
        # "local": always a new instance, even if `ray start` left a cluster on this machine.
        ray.init(address="local", include_dashboard=False,
                 _metrics_export_port=args.metrics_export_port)
        short = _beyond_this_machine(config.scaling, ray.cluster_resources())
        if short:
            # An embedded Ray cannot grow: waiting out the placement timeout helps nobody.
            ray.shutdown()
            lease.release()
            print(f"orchestrator: {short}", file=sys.stderr)
            return EXIT_USAGE
    from orchestrator.metrics import RunMetrics
    from orchestrator.progress import progress_display
    from orchestrator.ray_logs import quiet_worker_deaths

    quiet_worker_deaths()
    driver = Driver(config, RayWorkerGroup(config), layout, lease=lease)
    steps = config.workload.args.get("steps")
    display = progress_display(sys.stderr, steps if isinstance(steps, int) else None,
                               driver.goodput)
    driver.events.subscribe(display)
    driver.events.subscribe(RunMetrics(config.run.name, driver.goodput))
    try:
        result = driver.run()
    finally:
        display.close()
        ray.shutdown()
    stream = sys.stdout if result.succeeded else sys.stderr
    print(f"orchestrator: {result.message}", file=stream)
    s = result.summary
    print(f"orchestrator: steps={s['steps_completed']} restarts={s['restarts']} "
          f"lost_steps={s['lost_steps']} goodput={s['goodput']:.2f} wall={s['wall_s']:.1f}s "
          f"final_checkpoint_step={s['final_checkpoint_step']}", file=stream)
    lost = sorted(((v, k) for k, v in s["time_s"].items() if k != "productive"), reverse=True)
    print("orchestrator: time lost: " + ", ".join(f"{k} {v:.1f}s" for v, k in lost[:4] if v)
          + f" (orchestrator report {layout.storage.url_of(layout.run_name)})", file=stream)
    if result.succeeded:
        return EXIT_OK
    return EXIT_USAGE if result.config_error else EXIT_FAILED


def _beyond_this_machine(scaling, cluster: dict) -> str:
    """Why even the smallest gang cannot be placed on this (embedded) cluster, or ''."""
    for name, amount in scaling.resources_per_worker.items():
        need = amount * scaling.smallest_world
        if need > cluster.get(name, 0) + 1e-9:
            return (f"scaling.num_workers: {scaling.smallest_world} workers of {amount:g} "
                    f"{name} need {need:g} {name}, and the embedded Ray on this machine has "
                    f"{cluster.get(name, 0):g}; use fewer workers, smaller "
                    "scaling.resources_per_worker, or --address of a larger cluster")
    return ""


def preflight(config, layout):
    """What can be known wrong before anything starts: the workload's arguments and data,
    storage that cannot be written, and a `checkpoint.restore` the run's checkpoints cannot
    satisfy. Reads and probes only. Returns the config with the workload's arguments as its
    preflight normalised them."""
    import dataclasses

    from orchestrator.checkpoint.commit import committed_checkpoints
    from orchestrator.checkpoint.selection import plan_restore

    config = dataclasses.replace(config, workload=check_workload(config.workload))
    layout.storage.check_writable(layout.run_name)
    candidates, rejected = committed_checkpoints(layout)
    plan_restore(config.checkpoint, candidates, rejected,
                 layout.storage.url_of(layout.run_name))
    return config


def check_workload(workload):
    """Import the entrypoint's module, find its function, and run the module's own
    `preflight(args)` if it has one: it validates the arguments and the data they name, and
    may return them normalised (a relative data path made absolute, so that workers with
    another working directory agree on it). Its ValueErrors become a ConfigError: one line,
    exit 2. Arguments the module declares as a dataclass `ARGS` are checked before that
    (orchestrator/workload_args.py). Returns the workload config to run."""
    import dataclasses
    import importlib

    from orchestrator.workload_args import parse_args

    module_name, _, func = workload.entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- whatever the import raised, say so in one line
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"workload.entrypoint: importing {module_name!r} failed: "
                          f"{type(e).__name__}: {reason}") from e
    if not callable(getattr(module, func, None)):
        raise ConfigError(f"workload.entrypoint: module {module_name!r} has no function "
                          f"{func!r}")
    declared = getattr(module, "ARGS", None)
    if declared is not None:
        if not dataclasses.is_dataclass(declared):
            raise ConfigError(f"workload.entrypoint: {module_name}.ARGS must be a dataclass "
                              "of the workload's arguments")
        parse_args(declared, dict(workload.args))
    check = getattr(module, "preflight", None)
    if check is None:
        return workload
    try:
        args = check(dict(workload.args))
    except ValueError as e:
        raise ConfigError(" ".join(str(e).split())) from e
    except Exception as e:  # noqa: BLE001 -- a workload's bug is still one line, not a traceback
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"workload.args: {module_name}.preflight failed: "
                          f"{type(e).__name__}: {reason}") from e
    return workload if args is None else dataclasses.replace(workload, args=args)
