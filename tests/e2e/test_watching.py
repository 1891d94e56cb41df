"""Watching a run as a user does: `orchestrator run` in a terminal (a pseudo-terminal here)
with an injected kill shows a live progress bar; its metrics are on the embedded Ray's
Prometheus endpoint while it runs; `orchestrator report` then says where the time went and
draws it. Real processes, a real embedded Ray, real files."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from tests.helpers import events_of

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper(threading.Thread):
    """Reads the Prometheus endpoint once a second; keeps the latest body with our metrics."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.body = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                body = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue  # not up yet, or already gone
            if "ray_orchestrator_steps_total" in body:
                self.body = body

    def value(self, name: str, **labels: str) -> float | None:
        for line in self.body.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                                    for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None


def run_in_terminal(args: list[str], env: dict, timeout_s: float) -> tuple[int, str]:
    """Run a command with its stdout and stderr on a pseudo-terminal, as in a user's shell."""
    master, slave = pty.openpty()
    # A terminal of 160 columns: a fresh pty has 0, and a bar in 0 columns is empty.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other end closed: the process is gone
                data = b""
            if not data and proc.poll() is not None:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_a_run_in_a_terminal_shows_a_bar_serves_metrics_and_reports_where_its_time_went(
        tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_metrics_report_interval_ms"] = "1000"  # Ray's default is 10 s: a short job
    scraper = Scraper(port)
    scraper.start()
    code, out = run_in_terminal(
        [sys.executable, "-m", "orchestrator", "run", "--metrics-export-port", str(port),
         "--set", f"run.storage={tmp_path}", "--set", "run.name=watched",
         "--set", "workload.entrypoint=workloads.mlp:train",
         "--set", "workload.args={steps: 150, step_time_s: 0.05}",
         "--set", "checkpoint.interval_steps=10",
         "--set", "chaos.faults=[{kind: kill, rank: 1, at_step: 40}]"], env, timeout_s=300)
    scraper.stop.set()
    scraper.join()
    assert code == 0, out[-3000:]

    # 1. The bar: tqdm's, redrawn in place, with step/total, loss, committed and restarts.
    frames = [f for f in re.split(r"[\r\n]", out) if f.startswith("training: ")]
    assert frames, out[-3000:]
    last = [f for f in frames if "150/150" in f]
    assert last and "committed 150" in last[-1] and "restarts 1" in last[-1], frames[-3:]
    assert re.search(r"training: +\d+%\|", out)  # tqdm's own bar, not plain lines
    assert " steps/s" in last[-1] and "eta 0s" in last[-1] and "goodput" in last[-1]
    restart = re.search(r"attempt 1: replacing rank\(s\) 1, resuming from the memory tier if the "
                        r"gang still holds every rank's state, else the checkpoint of step (\d+)",
                        out)
    assert restart, out[-3000:]
    assert "A worker died or was killed" not in out

    # 2. The metrics, on the embedded Ray's Prometheus endpoint during the run.
    assert scraper.body, "no scrape of the metrics endpoint had the job's metrics"
    steps = scraper.value("ray_orchestrator_steps_total", run="watched")
    assert steps is not None and steps >= 40
    assert scraper.value("ray_orchestrator_restarts_total", run="watched",
                         kind="worker_died") == 1.0
    goodput = scraper.value("ray_orchestrator_goodput", run="watched")
    assert goodput is not None and 0 < goodput < 1
    assert scraper.value("ray_orchestrator_checkpoint_save_seconds_count", run="watched") >= 1
    assert scraper.value("ray_orchestrator_checkpoint_commit_seconds_count", run="watched") >= 1
    assert scraper.value("ray_orchestrator_training_stall_seconds_total", run="watched") > 0

    # 3. The summary places every second of the job once, and says the same as the events.
    layout = RunLayout(Storage(str(tmp_path)), "watched")
    summary = json.loads(layout.storage.read_bytes(*layout.summary))
    assert sum(summary["time_s"].values()) == pytest.approx(summary["wall_s"], rel=0.02)
    assert summary["time_s"]["recovery"] > 0 and summary["time_s"]["startup"] > 0
    assert summary["restarts"] == len(events_of(layout, "restart")) == 1

    # 4. The report: text with the breakdown, and a PNG drawn from the run's events.
    png = tmp_path / "watched.png"
    report = subprocess.run(
        [sys.executable, "-m", "orchestrator", "report", str(tmp_path / "watched"),
         "--png", str(png)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert "run watched (job " in text and "succeeded, 150 steps" in text
    assert "failures: 1 (worker_died 1)" in text
    assert f"restarts: 1, from steps {restart.group(1)}" in text
    assert f"goodput: {summary['goodput']:.2f}" in text
    for cause in ("start-up", "recovery", "recomputed steps", "checkpoint stall"):
        assert cause in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (900, 1000)
