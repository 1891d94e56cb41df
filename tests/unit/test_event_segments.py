"""The event log on an object store (memory:// here, as s3fs: no appends) is numbered
segments: each flush rewrites only the current one, and every reader sees one log."""

import uuid

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.events import SEGMENT_LINES, EventLog, read_events


def recording_layout():
    layout = RunLayout(Storage(f"memory://events-{uuid.uuid4().hex}"), "run")
    assert not layout.storage.is_local
    writes: list[int] = []
    real = layout.storage.write_atomic

    def write_atomic(data, *parts):
        writes.append(data.count(b"\n"))
        real(data, *parts)

    layout.storage.write_atomic = write_atomic
    return layout, writes


def test_each_event_rewrites_one_bounded_segment_and_readers_see_one_log():
    layout, writes = recording_layout()
    log = EventLog(layout)
    n = 2 * SEGMENT_LINES + 34
    for i in range(n):
        log.emit("restart", i=i)  # not buffered: one flush per event
    assert len(writes) == n
    assert max(writes) <= SEGMENT_LINES  # O(1) per event, whatever the run's length
    names = [f.name for f in layout.storage.list_dir(*layout.events_segments)]
    assert names == ["000000001.jsonl", "000000002.jsonl", "000000003.jsonl"]
    assert [e["i"] for e in read_events(layout)] == list(range(n))

    # A resumed driver keeps the history and appends in a segment of its own.
    again = EventLog(layout)
    assert len(again.events()) == n
    again.emit("driver_resumed")
    assert len(layout.storage.list_dir(*layout.events_segments)) == 4
    assert [e["kind"] for e in read_events(layout)][-2:] == ["restart", "driver_resumed"]


def test_progress_is_buffered_and_goes_out_with_the_next_other_event():
    layout, writes = recording_layout()
    log = EventLog(layout)
    for step in range(50):
        log.emit("progress", step=step)
    assert writes == []  # within FLUSH_INTERVAL_S of the last flush (here: the creation)...
    log.emit("checkpoint_committed", step=50)
    assert writes == [51]  # ...they go out with the next other event, in order
    assert [e.get("step") for e in read_events(layout)] == list(range(51))
