"""The workload preflight `orchestrator run` runs before Ray starts: one ConfigError line for
a bad entrypoint, bad workload arguments or bad data; relative data paths made absolute."""

import os

import pytest

from orchestrator.cli import check_workload
from orchestrator.config import WorkloadConfig
from orchestrator.data.prepare import prepare
from orchestrator.errors import ConfigError


@pytest.mark.parametrize("entrypoint, args, message", [
    ("workloads.gpt:nope", {}, "module 'workloads.gpt' has no function 'nope'"),
    ("workloads.gpt:train", {"n_layr": 2}, "workload.args.n_layr is not an argument"),
    ("workloads.gpt:train", {"steps": "ten"}, "workload.args.steps: expected int"),
    ("workloads.gpt:train", {"data_check": "all"}, "workload.args.data_check: 'all'"),
    ("workloads.gpt:train", {"data_trace": "/tmp/x"}, "data_trace needs workload.args.data"),
    ("workloads.gpt:train", {"data": "/no/such/corpus", "vocab_size": 257},
     "workload.args.data: /no/such/corpus/dataset.json does not exist"),
])
def test_bad_workload_input_is_one_config_error_line(entrypoint, args, message):
    with pytest.raises(ConfigError) as e:
        check_workload(WorkloadConfig(entrypoint=entrypoint, args=args))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_relative_data_path_is_made_absolute_and_other_args_are_kept(tmp_path, monkeypatch):
    prepare(str(tmp_path / "corpus"), max_bytes=3000, chunk_tokens=129, rows_per_shard=8)
    monkeypatch.chdir(tmp_path)
    args = {"data": "corpus", "vocab_size": 257, "seq_len": 32, "steps": 3}
    checked = check_workload(WorkloadConfig(entrypoint="workloads.gpt:train", args=args))
    assert checked.args == {**args, "data": os.path.join(str(tmp_path), "corpus")}
    # A workload with no preflight, and one on synthetic data, run as they are.
    mlp = WorkloadConfig(entrypoint="workloads.mlp:train", args={"steps": 3})
    assert check_workload(mlp) is mlp
    assert check_workload(WorkloadConfig(args={"steps": 3})).args == {"steps": 3}
