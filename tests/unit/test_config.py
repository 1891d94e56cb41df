import pytest

from orchestrator.config import JobConfig, load_config
from orchestrator.errors import ConfigError

ISSUE_EXAMPLE = """
run:        {name: demo, storage: ./runs}
workload:   {entrypoint: "workloads.gpt:train", args: {steps: 40, seed: 0}}
scaling:    {num_workers: 2, resources_per_worker: {CPU: 1}}
checkpoint: {interval_steps: 5}
failure:    {max_restarts: 3}
chaos:      {faults: [{kind: kill, rank: 1, at_step: 12}, {kind: kill_during_save, rank: 0, at_step: 20}]}
"""


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_the_documented_example_loads_into_typed_sections(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert isinstance(config, JobConfig)
    assert config.scaling.num_workers == 2 and config.scaling.resources_per_worker == {"CPU": 1.0}
    kill, during_save = config.chaos.faults
    assert (kill.kind, kill.rank, kill.at_step) == ("kill", 1, 12)
    assert (during_save.kind, during_save.at_step) == ("kill_during_save", 20)
    assert config.workload.args == {"steps": 40, "seed": 0}


def test_set_overrides_nested_keys_with_yaml_values(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), [
        "scaling.num_workers=4", "workload.args.parallelism=fsdp", "chaos.faults=[]",
        "failure.failure_grace_s=2"])
    assert config.scaling.num_workers == 4
    assert config.workload.args["parallelism"] == "fsdp"
    assert config.chaos.faults == []
    assert config.failure.failure_grace_s == 2.0


@pytest.mark.parametrize("text, overrides, names", [
    (ISSUE_EXAMPLE, ["scaling.num_wokers=2"], "scaling.num_wokers"),
    ("runn: {name: x}", [], "runn"),
    (ISSUE_EXAMPLE, ["scaling.num_workers=0"], "scaling.num_workers"),
    (ISSUE_EXAMPLE, ["scaling.num_workers=two"], "scaling.num_workers"),
    (ISSUE_EXAMPLE, ["run.storage=ftp://host/x"], "run.storage"),
    (ISSUE_EXAMPLE, ["run.name=a/b"], "run.name"),
    (ISSUE_EXAMPLE, ["checkpoint.interval_steps=-1"], "checkpoint.interval_steps"),
    (ISSUE_EXAMPLE, ["checkpoint.async_mode=fast"], "checkpoint.async_mode"),
    (ISSUE_EXAMPLE, ["checkpoint.restore=newest"], "checkpoint.restore"),
    (ISSUE_EXAMPLE, ["checkpoint.restore=-3"], "checkpoint.restore"),
    (ISSUE_EXAMPLE, ["checkpoint.keep_best=2"], "checkpoint.best_metric"),
    (ISSUE_EXAMPLE, ["checkpoint.restore=best"], "checkpoint.best_metric"),
    (ISSUE_EXAMPLE, ["checkpoint.best_mode=lowest"], "checkpoint.best_mode"),
    (ISSUE_EXAMPLE, ["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    (ISSUE_EXAMPLE, ["checkpoint.interval_s=-5"], "checkpoint.interval_s"),
    (ISSUE_EXAMPLE, ["checkpoint.memory_interval_steps=often"], "checkpoint.memory_interval_steps"),
    (ISSUE_EXAMPLE, ["checkpoint.memory_interval_steps=-2"], "checkpoint.memory_interval_steps"),
    (ISSUE_EXAMPLE, ["checkpoint.memory_interval_steps=1.5"], "checkpoint.memory_interval_steps"),
    (ISSUE_EXAMPLE, ["checkpoint.restore_parts=train.model"], "checkpoint.restore_parts"),
    (ISSUE_EXAMPLE, ["failure.max_restarts=-1"], "failure.max_restarts"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{kind: kill, rank: 5, at_step: 3}]"], "chaos.faults.rank"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{rank: 1}]"], "chaos.faults[0]"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{kind: explode}]"], "chaos.faults.kind"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{kind: kill, at_step: 3, at_s: 5}]"], "not both"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{kind: delay_reads, count: 2}]"], "chaos.faults.delay_s"),
    (ISSUE_EXAMPLE, ["chaos.faults=[{kind: raise, repeat: true}]"], "chaos.faults.repeat"),
    (ISSUE_EXAMPLE, ["chaos.random={rate_per_min: 2, kinds: [teleport]}"], "chaos.random.kinds"),
    (ISSUE_EXAMPLE, ["chaos.kill=[{rank: 1, step: 3}]"], "write chaos.faults"),
    (ISSUE_EXAMPLE, ["workload.entrypoint=no_such_module:train"], "workload.entrypoint"),
    (ISSUE_EXAMPLE, ["workload.entrypoint=workloads.gpt"], "workload.entrypoint"),
    (ISSUE_EXAMPLE, ["scaling.placement_strategy=RANDOM"], "scaling.placement_strategy"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


def test_unknown_key_message_lists_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match="allowed here: num_workers, resources_per_worker"):
        load_config(write(tmp_path, ISSUE_EXAMPLE), ["scaling.gpus=1"])


def test_storage_urls_of_known_schemes_are_accepted(tmp_path):
    for url in ("s3://bucket/prefix", "file:///tmp/x", "memory://runs", "relative/dir"):
        assert load_config(write(tmp_path, ISSUE_EXAMPLE), [f"run.storage={url}"])


def test_local_storage_is_made_absolute(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), ["run.storage=rel"])
    assert config.run.storage_url.startswith("/")


def test_a_local_storage_naming_variables_is_expanded_by_each_process(tmp_path, monkeypatch):
    """The variables stay as written in the config (the workers are other processes, maybe
    on other nodes), and each Storage expands them in its own environment."""
    from orchestrator.checkpoint.storage import Storage

    config = load_config(write(tmp_path, ISSUE_EXAMPLE), ["run.storage=${SCRATCH}/runs/"])
    assert config.run.storage_url == "${SCRATCH}/runs"
    monkeypatch.setenv("SCRATCH", str(tmp_path / "node_a"))
    assert Storage(config.run.storage_url).url == f"{tmp_path}/node_a/runs"
    assert Storage("file://$SCRATCH/r").url == f"file://{tmp_path}/node_a/r"
    assert Storage("s3://bucket/$SCRATCH").url == "s3://bucket/$SCRATCH"  # a key, not a path
    monkeypatch.setenv("SCRATCH", "relative")
    with pytest.raises(ConfigError, match="not an absolute path"):
        Storage("$SCRATCH/runs")
    monkeypatch.delenv("SCRATCH")
    with pytest.raises(ConfigError, match=r"names \$SCRATCH, which is not set on .*set it on "
                                          "every node"):
        Storage("$SCRATCH/runs")


def test_the_memory_tier_paces_itself_unless_given_a_number(tmp_path):
    assert load_config(write(tmp_path, ISSUE_EXAMPLE), []).checkpoint.memory_interval_steps == "auto"
    for given, expected in (("3", 3), ("0", 0), ("auto", "auto")):
        config = load_config(write(tmp_path, ISSUE_EXAMPLE),
                             [f"checkpoint.memory_interval_steps={given}"])
        assert config.checkpoint.memory_interval_steps == expected
