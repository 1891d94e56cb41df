"""Every bad config is exit 2 and one line naming the key, before anything starts; every
documented one loads as written.

These go through `orchestrator run --check`, the CLI's real path (YAML file, overrides,
config tree, the workload's declared arguments and preflight), in-process: an exception
escaping `main` fails the test, so "never a traceback" is what is checked. The hypothesis
tests generate invalid configs of every kind the issue names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import cli
from orchestrator.config import JobConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def check(tmp_path: Path, text: str | bytes, *overrides: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `orchestrator run --check` on `text`, with the run's
    storage under tmp_path unless the config names one."""
    path = tmp_path / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["run", "--check", str(path), *overrides])
    return code, out.getvalue(), err.getvalue()


def assert_refused(tmp_path: Path, text: str | bytes, names: str, *overrides: str) -> str:
    storage = tmp_path / "runs"
    code, out, err = check(tmp_path, text, *overrides)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orchestrator: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err
    assert not storage.exists(), "nothing may be written for a refused config"
    return lines[0]


STORAGE = "run: {storage: %s}\n"


@pytest.mark.parametrize("text, names", [
    # The broken configs the issue found, each once.
    ('workload: {entrypoint: ".x:train"}', "workload.entrypoint"),
    ("run: {1: a, b: c}", "run"),
    ('run: {storage: "s3://"}', "run.storage"),
    ('run: {storage: "memory://runs"}', "run.storage"),
    ("run: {name: a}\nrun: {name: b}", "written twice"),
    ("checkpoint: {interval_steps: 2, interval_steps: 3}", "interval_steps"),
    ("workload: {entrypoint: 'workloads.gpt:train', args: {n_layr: 3}}", "workload.args.n_layr"),
    ("workload: {entrypoint: 'workloads.mlp:train', args: {n_layr: 3}}", "workload.args.n_layr"),
    ("workload: {entrypoint: 'workloads.gpt:train', args: {n_layer: '3'}}",
     "workload.args.n_layer"),
    ("workload: {entrypoint: 'workloads.gpt:train', args: {parallelism: tp}}",
     "workload.args.parallelism"),
    ("workload: {entrypoint: 'workloads.mlp:train', args: {parallelism: tp}}",
     "workload.args.parallelism"),
    ("workload: {entrypoint: 'workloads.gpt:train', args: {n_embd: 65, n_head: 4}}",
     "workload.args.n_embd"),
    ("workload: {entrypoint: 'workloads.gpt:train', args: {activation_checkpointing: most}}",
     "workload.args.activation_checkpointing"),
    ("workload: {entrypoint: 'workloads.gpt:nothere'}", "workload.entrypoint"),
    ("workload: {entrypoint: 'workloads.nothere:train'}", "workload.entrypoint"),
    ("scaling: {num_workers: 99999999999999999999}", "scaling.num_workers"),
    ("scaling: {num_workers: 1000000}", "scaling.num_workers"),
    ("scaling: {resources_per_worker: {CPU: true}}", "scaling.resources_per_worker.CPU"),
    ("failure: {hang_timeout_s: .inf}", "failure.hang_timeout_s"),
    ("failure: {hang_timeout_s: 1e300}", "failure.hang_timeout_s"),
    ("checkpoint: {interval_s: .nan}", "checkpoint.interval_s"),
    ("run: {name: 2026-12-02}", "run.name"),
    ("workload: {args: {when: !!binary aGVsbG8=}}", "workload.args.when"),
    ("[1, 2", "not valid YAML"),
    ("- run\n- scaling", "mapping of sections"),
    ("checkpoint: {overwrite: maybe}", "checkpoint.overwrite"),
])
def test_a_broken_config_is_exit_2_and_one_line_naming_it(tmp_path, text, names):
    overrides = () if "storage" in text else ("--set", f"run.storage={tmp_path / 'runs'}")
    assert_refused(tmp_path, text, names, *overrides)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    line = assert_refused(tmp_path, b"run: {name: \xff\xfe}\n", "not UTF-8")
    assert "job.yaml" in line


def test_a_bad_override_is_one_line(tmp_path):
    code, _, err = check(tmp_path, STORAGE % (tmp_path / "runs"), "--set", "a..b=1")
    assert code == 2 and "section.key=value" in err
    code, _, err = check(tmp_path, STORAGE % (tmp_path / "runs"), "--set",
                         "workload.args={1: x}")
    assert code == 2 and "workload.args" in err and len(err.splitlines()) == 1


def test_a_config_file_that_does_not_exist(tmp_path, capsys):
    assert cli.main(["run", "--check", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read config file" in err


def test_what_yaml_11_misreads_is_read_as_users_mean_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"run: {{name: off, storage: {tmp_path / 'runs'}}}\n"
                    "checkpoint: {async_mode: off, overwrite: yes}\n"
                    "workload: {entrypoint: 'workloads.gpt:train', args: {lr: 1e-3}}\n")
    config = load_config(path)
    assert config.run.name == "off" and config.checkpoint.async_mode == "off"
    assert config.checkpoint.overwrite is True
    assert config.workload.args["lr"] == 0.001
    assert load_config(path, ["run.name=no"]).run.name == "no"


def test_a_good_config_passes_the_check_and_names_what_would_run(tmp_path):
    code, out, err = check(tmp_path, STORAGE % (tmp_path / "runs")
                           + "workload: {entrypoint: 'workloads.mlp:train', args: {steps: 3}}")
    assert code == 0, err
    assert "workloads.mlp:train" in out and "2 workers" in out


def _documented_defaults() -> list[tuple[str, str, str]]:
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| `([^`]*)` \|",
                      (ROOT / "docs" / "config.md").read_text(), flags=re.M)
    sections = {f.name for f in dataclasses.fields(JobConfig)}
    return [row for row in rows if row[0] in sections]


@pytest.mark.parametrize("section, key, written", _documented_defaults())
def test_every_documented_default_loads_as_written(tmp_path, section, key, written):
    path = tmp_path / "job.yaml"
    path.write_text(f"{section}:\n  {key}: {written}\n")
    config = load_config(path)
    assert getattr(getattr(config, section), key) == getattr(getattr(JobConfig(), section), key)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_examples_load(example):
    load_config(example)


# --- property-based: every invalid config, whatever it is, is exit 2 and one line -----------

KEYS = {
    "run": {"name": "demo", "lease_timeout_s": 30.0},
    "scaling": {"num_workers": 2, "spare_workers": 0, "min_workers": 0,
                "placement_timeout_s": 120.0, "placement_strategy": "PACK"},
    "checkpoint": {"interval_steps": 10, "interval_s": 0.0, "async_mode": "off",
                   "keep_last": 0, "overwrite": False, "restore": "latest",
                   "best_mode": "min"},
    "failure": {"max_restarts": 3, "hang_timeout_s": 300.0, "backoff_multiplier": 2.0,
                "crash_loop_limit": 3, "drain_timeout_s": 5.0},
}
GPT = {"steps": 40, "n_layer": 2, "n_embd": 64, "n_head": 4, "lr": 0.003,
       "parallelism": "ddp", "data_check": "checksum", "data_prefetch": 2}

wrong_scalar = st.one_of(st.text(max_size=12), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _wrong_for(default):
    """Values that a key with this default refuses: another type, or out of range."""
    if isinstance(default, bool):
        return st.one_of(st.integers(), st.text(min_size=1, max_size=8).filter(
            lambda s: s.lower() not in ("true", "false", "yes", "no", "on", "off")))
    if isinstance(default, int):
        return st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8), st.booleans())
    if isinstance(default, float):
        return st.one_of(st.floats(max_value=-1e-9, allow_infinity=False),
                         st.floats(min_value=1e8, allow_infinity=False),
                         st.text(max_size=8), st.booleans(), st.none())
    return wrong_scalar.filter(lambda v: not isinstance(v, str)) | st.text(
        alphabet="!/ @#", min_size=1, max_size=8)


@st.composite
def invalid_configs(draw) -> tuple[dict, str]:
    """(config, the key its error must name), with exactly one thing wrong."""
    kind = draw(st.sampled_from(["value", "unknown", "mixed_keys", "url", "args", "section"]))
    config = {"run": {}, "workload": {"entrypoint": "workloads.gpt:train", "args": {}}}
    if kind == "value":
        section = draw(st.sampled_from(sorted(KEYS)))
        key = draw(st.sampled_from(sorted(KEYS[section])))
        config.setdefault(section, {})[key] = draw(_wrong_for(KEYS[section][key]))
        return config, f"{section}.{key}"
    if kind == "unknown":
        section = draw(st.sampled_from(sorted(KEYS)))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
                   .filter(lambda k: k not in _field_names(section)))
        config.setdefault(section, {})[key] = draw(st.integers() | st.text(max_size=5))
        return config, f"{section}.{key}"
    if kind == "mixed_keys":
        section = draw(st.sampled_from(sorted(KEYS)))
        config.setdefault(section, {})[draw(st.integers())] = "a"
        config[section]["zz_unknown"] = "b"
        return config, section
    if kind == "url":
        url = draw(st.sampled_from(["s3://", "s3:///x", "s3://A_B/x", "ftp://host/x",
                                    "memory://x", "gs://b/x", "file://", "", " ", "s3://x"]))
        config["run"]["storage"] = url
        return config, "run.storage"
    if kind == "args":
        key = draw(st.sampled_from(sorted(GPT)))
        default = GPT[key]
        wrong = (st.integers(max_value=-1) | st.integers(min_value=2**63) | st.floats(
            allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
            | st.booleans() | st.text(max_size=8) if isinstance(default, int) else
            st.floats(max_value=0, allow_infinity=False) | st.booleans() | st.none()
            | st.text(max_size=8) if isinstance(default, float) else
            st.text(alphabet="!/ @#", min_size=1, max_size=8) | st.integers() | st.none())
        config["workload"]["args"][key] = draw(wrong)
        return config, f"workload.args.{key}"
    section = draw(st.sampled_from(sorted(set(KEYS) - {"run"})))  # run holds the storage
    config[section] = draw(st.integers() | st.text(max_size=5) | st.lists(st.integers()))
    return config, section


def _field_names(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(type(getattr(JobConfig(), section)))}


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


@SETTINGS
@given(case=invalid_configs())
def test_any_invalid_config_is_exit_2_one_line_naming_the_key(tmp_path, case):
    config, names = case
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    storage = tmp_path / "runs"
    config["run"].setdefault("storage", str(storage))
    code, out, err = check(tmp_path, yaml.safe_dump(config))
    assert code == 2, (config, out, err)
    assert err.count("\n") == 1 and err.startswith("orchestrator: "), err
    assert names in err, (names, err)
    assert not storage.exists()


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_config_or_one_line(tmp_path, data):
    """Arbitrary bytes and broken YAML: a one-line refusal or, if they happen to be a valid
    config, a pass, never a traceback, never a write outside the test's folder."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    storage = tmp_path / "runs"
    code, out, err = check(tmp_path, data, "--set", f"run.storage={storage}")
    assert code in (0, 2), (data, out, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("orchestrator: "), err
        assert not storage.exists()
