"""What a user watching a run sees: the progress display, Ray's banner made one line, and
`orchestrator report`'s text and plot, from events (no Ray job)."""

import io
import logging


from orchestrator import ray_logs
from orchestrator.goodput import GoodputLedger
from orchestrator.progress import BarProgress, PlainProgress, progress_display
from orchestrator.report import RunStory, plot

from tests.unit.test_goodput import a_job_with_one_failure


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(display, events):
    for e in events:
        display(e)


def test_off_a_terminal_each_progress_event_is_one_plain_line(caplog):
    ledger = GoodputLedger()
    display = progress_display(io.StringIO(), total_steps=20, goodput=ledger)
    assert isinstance(display, PlainProgress)
    with caplog.at_level(logging.INFO, logger="orchestrator.progress"):
        for e in a_job_with_one_failure():
            ledger.add(e)
            display(e)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # one per progress event, nothing for the others
    assert lines[0].startswith("step 10/20 loss=1 | 1 steps/s | committed - | restarts 0")
    assert "goodput" in lines[0] and lines[0].endswith("eta 10s")
    assert lines[-1].startswith("step 20/20 ") and "restarts 1" in lines[-1]
    assert all("\x1b" not in line and "\r" not in line for line in lines)


def test_on_a_terminal_a_tqdm_bar_shows_step_total_loss_committed_and_restarts():
    terminal = Terminal()
    display = progress_display(terminal, total_steps=20)
    assert isinstance(display, BarProgress)
    events = a_job_with_one_failure()
    events.insert(2, {"kind": "checkpoint_committed", "time": 116.5, "rank": 0, "step": 10})
    feed(display, events)
    display.close()
    out = terminal.getvalue()
    assert "\r" in out  # redrawn in place
    last = out.split("\r")[-1]
    assert "20/20" in last and "loss=1" in last and "committed 10" in last
    assert "restarts 1" in last and "1 steps/s" in last and "eta 0s" in last


BANNER = ("A worker died or was killed while executing a task by an unexpected system error. "
          "To troubleshoot the problem, check the logs for the dead worker. Lease ID: 0100 "
          "Worker ID: 77f5 Node ID: b67b Worker IP address: 127.0.0.1 Worker port: 37337 "
          "Worker PID: 6436 Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
          "unexpectedly exits with a connection error code 2. End of file. Some common causes "
          "include: (1) the process was killed by the OOM killer due to high memory usage")


def test_rays_worker_death_banner_becomes_one_line():
    assert ray_logs.shorten(BANNER) == (
        "Ray: worker process 6436 exited (SYSTEM_ERROR: Worker unexpectedly exits with a "
        "connection error code 2. End of file.); the orchestrator handles it")
    assert ray_logs.shorten("(raylet) something else") is None


def test_the_driver_prints_the_short_line_instead_of_the_banner(capsys, caplog, monkeypatch):
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    assert ray_logs.quiet_worker_deaths()
    with caplog.at_level(logging.INFO, logger="orchestrator.ray"):
        ray_worker.print_to_stdstream({"lines": [BANNER, "another raylet line"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "A worker died" not in out and "another raylet line" in out
    assert [r.getMessage() for r in caplog.records] == [ray_logs.shorten(BANNER)]


def test_the_report_says_where_the_time_went_and_draws_it(tmp_path):
    events = a_job_with_one_failure()
    events[0]["run"] = "demo"
    events.insert(2, {"kind": "checkpoint_committed", "time": 116.5, "rank": 0, "step": 10})
    events.insert(7, {"kind": "first_step", "time": 126.5, "attempt": 1, "step": 11,
                      "step_end_time": 126.0})
    story = RunStory.of([{"kind": "job_start", "time": 1.0, "job_id": "older"}] + events)
    text = story.text()
    assert text.splitlines()[0] == "run demo (job j): ended, 20 steps in 36.0 s"
    assert "failures: 1 (worker_died 1)" in text
    assert "restarts: 1, from steps 10; steps lost and recomputed: 4" in text
    assert "checkpoints committed: 1, the last at step 10" in text
    assert "goodput: 0.56 (productive 20.0 s of 36.0 s)" in text
    assert "recovery (detection, replacement, restore)" in text and "13.9%" in text
    path = plot(story, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (900, 1000)
    # Drawn from the events: two attempts' lines, the failure, the restart, the commit.
    assert [a for a, *_ in story.loss] == [0, 0, 1]
    assert len(story.failures) == len(story.restarts) == len(story.commits) == 1


def test_a_report_of_garbage_events_still_reports(tmp_path):
    story = RunStory.of([None, "x", {"kind": "progress", "time": 3.0, "metrics": "no"},
                         {"kind": "job_start", "time": "t"}])
    assert "goodput: 0.00" in story.text()
    assert plot(story, tmp_path / "g.png").exists()
