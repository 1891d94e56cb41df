"""Values under keys that look secret never reach events.jsonl."""

import uuid

from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.events import REDACTED, EventLog, read_event_lines, read_events, redact
from tests.helpers import make_config


def test_secret_looking_keys_are_redacted_at_any_depth_and_the_rest_kept():
    value = {"api_key": "k1", "lr": 0.1, "nested": {"HF_TOKEN": "t1", "items": [
        {"db_password": "p1", "name": "x"}]}, "aws_secret_access_key": "s1", 3: "three"}
    assert redact(value) == {"api_key": REDACTED, "lr": 0.1, "nested": {
        "HF_TOKEN": REDACTED, "items": [{"db_password": REDACTED, "name": "x"}]},
        "aws_secret_access_key": REDACTED, 3: "three"}


def test_job_start_with_secrets_in_the_workload_args_writes_none_of_them():
    layout = RunLayout(Storage(f"memory://redact-{uuid.uuid4().hex}"), "run")
    config = make_config("memory://x", workload={
        "entrypoint": "workloads.mlp:train",
        "args": {"steps": 3, "wandb_api_key": "hunter2-key", "auth": {"token": "hunter2-tok"}}})
    log = EventLog(layout)
    log.emit("job_start", run="run", config=config.to_dict())
    log.emit("failure", message="boom", extra={"password": "hunter2-pw"})
    written = "\n".join(read_event_lines(layout))
    assert "hunter2" not in written
    (start, _) = read_events(layout)
    assert start["config"]["workload"]["args"]["steps"] == 3
    assert start["config"]["workload"]["args"]["wandb_api_key"] == REDACTED
