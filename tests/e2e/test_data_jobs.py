"""GPT on a prepared Parquet corpus, end to end on a real local Ray: a worker SIGKILLed
mid-epoch resumes with exactly the samples (and so exactly the weights) of an uninterrupted
run; a 4-worker checkpoint resumes at 2 and 3 workers with the global sample order unchanged;
the same on S3; bad data is exit 2 and one line naming the file, before anything starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from orchestrator.chaos import FaultPlan
from orchestrator.data.prepare import prepare
from tests.helpers import assert_same_final_state, events_of, make_config, run_job

pytestmark = pytest.mark.e2e

STEPS = 30
# A corpus of 31 rows of 129 tokens, 4 samples of 32 tokens each: 124 samples, so 30 steps
# of 8 cross into the second epoch (at step 16) and the kill at step 12 is mid-epoch.
CORPUS = {"max_bytes": 4000, "chunk_tokens": 129, "rows_per_shard": 8, "row_group_rows": 4}
GPT = {"steps": STEPS, "seed": 1, "dropout": 0.1, "n_layer": 2, "n_embd": 32, "seq_len": 32,
       "vocab_size": 257, "batch_size": 8}
VARIANTS = {"ddp": {"parallelism": "ddp"},
            "fsdp_ac": {"parallelism": "fsdp", "activation_checkpointing": "full"}}


# The storage path is what these tests are about: the memory tier, on by default, would resume
# from memory instead (tests/e2e/test_memory_tier.py covers that).
def data_job(storage, name, data_url, trace: Path, *, workers=2, variant="ddp", chaos=None,
             steps=STEPS, batch=8, **checkpoint):
    trace.mkdir(parents=True, exist_ok=True)
    args = {**GPT, **VARIANTS[variant], "steps": steps, "batch_size": batch, "data": data_url,
            "data_trace": str(trace)}
    return make_config(str(storage), name,
                       workload={"entrypoint": "workloads.gpt:train", "args": args},
                       scaling={"num_workers": workers},
                       checkpoint={"interval_steps": 5, "memory_interval_steps": 0, **checkpoint},
                       failure={"max_restarts": 3}, chaos=chaos or {})


def traced(trace: Path) -> dict[tuple[int, int], list[list[int]]]:
    """(rank, step) -> the sample ids read at that step, once per time the step was run."""
    out: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
    for path in sorted(trace.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[(rank, record["step"])].append(record["samples"])
    return out


def per_step_union(trace: Path) -> dict[int, list[int]]:
    union: dict[int, list[int]] = defaultdict(list)
    for (rank, step), runs in traced(trace).items():
        union[step].extend(runs[-1])
    return {step: sorted(ids) for step, ids in union.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("corpus") / "stdlib")
    prepare(url, **CORPUS)
    return url


@pytest.fixture(scope="module")
def reference(ray_cluster, corpus, tmp_path_factory):
    """The uninterrupted run of each variant, computed once on first use."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"ref-{variant}")
            result, layout = run_job(data_job(root, "ref", corpus, root / "trace",
                                              variant=variant))
            assert result.succeeded, result.message
            assert result.summary["restarts"] == 0
            cache[variant] = (layout, traced(root / "trace"))
        return cache[variant]

    return get


def assert_same_samples(trace: dict, ref: dict) -> None:
    """Every step each rank ran, including those run again after the restart, read the samples
    the uninterrupted run read at that step on that rank."""
    assert set(trace) == set(ref)
    for key, runs in trace.items():
        assert all(run == ref[key][0] for run in runs), (key, runs, ref[key])


@pytest.mark.parametrize("variant", ["ddp", "fsdp_ac"])
def test_a_worker_killed_mid_epoch_resumes_with_the_same_samples_and_weights(
        ray_cluster, corpus, reference, tmp_path, variant):
    config = data_job(tmp_path, "kill", corpus, tmp_path / "trace", variant=variant,
                      chaos=FaultPlan().kill_at(rank=1, step=12).config())
    result, layout = run_job(config)

    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [10]
    ref_layout, ref_trace = reference(variant)
    trace = traced(tmp_path / "trace")
    assert len(trace[(0, 11)]) == 2  # steps 11 and 12 were run twice, with the same samples
    assert_same_samples(trace, ref_trace)
    # The run crossed an epoch: 124 samples, 8 a step; each epoch visits every sample once.
    epoch0 = [s for step in range(1, 16) for r in (0, 1) for s in ref_trace[(r, step)][0]]
    assert len(set(epoch0)) == len(epoch0) == 120
    assert_same_final_state(layout, ref_layout, STEPS)


def test_a_4_worker_checkpoint_resumes_at_2_and_3_workers_with_the_same_global_order(
        ray_cluster, corpus, tmp_path):
    steps, batch = 8, 12  # 12 divides over 4, 3 and 2 workers
    result, four = run_job(data_job(tmp_path, "four", corpus, tmp_path / "trace4", workers=4,
                                    steps=steps, batch=batch, interval_steps=4))
    assert result.succeeded, result.message
    union4 = per_step_union(tmp_path / "trace4")
    assert sorted(union4) == list(range(1, steps + 1))
    assert all(len(ids) == batch for ids in union4.values())

    for workers in (2, 3):
        name = f"resume{workers}"
        shutil.copytree(Path(four.storage.path(four.run_name)), tmp_path / name)
        trace = tmp_path / f"trace{workers}"
        result, layout = run_job(data_job(tmp_path, name, corpus, trace, workers=workers,
                                          steps=steps, batch=batch, interval_steps=4,
                                          restore=4, overwrite=True))
        assert result.succeeded, result.message
        (restored,) = events_of(layout, "checkpoint_restored")
        assert (restored["step"], restored["saved_world_size"], restored["world_size"]) == (
            4, 4, workers)
        union = per_step_union(trace)
        assert sorted(union) == list(range(5, steps + 1))  # continued after step 4
        for step in union:
            assert union[step] == union4[step], (workers, step)


def test_on_s3_a_killed_worker_resumes_with_the_same_samples_and_weights(
        ray_cluster, corpus, reference, s3_bucket, tmp_path):
    data = f"{s3_bucket}/corpus"
    prepare(data, **CORPUS)  # the same bytes as the local corpus, so the same samples
    config = data_job(f"{s3_bucket}/runs", "s3kill", data, tmp_path / "trace",
                      chaos=FaultPlan().kill_at(rank=0, step=7).config())
    result, layout = run_job(config)

    assert result.succeeded, result.message
    assert [e["from_step"] for e in events_of(layout, "restart")] == [5]
    ref_layout, ref_trace = reference("ddp")
    assert_same_samples(traced(tmp_path / "trace"), ref_trace)
    assert_same_final_state(layout, ref_layout, STEPS)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


def test_bad_data_is_exit_2_and_one_line_naming_the_file_before_anything_starts(tmp_path):
    good = tmp_path / "good"
    prepare(str(good), **CORPUS)

    def broken(name: str, damage) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        return folder

    def flip_byte(folder: Path) -> None:
        path = folder / "shard-00001.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    def other_schema(folder: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = json.loads((folder / "dataset.json").read_text())
        pq.write_table(pa.table({"text": ["not tokens"] * 8}), folder / "shard-00002.parquet")
        data = (folder / "shard-00002.parquet").read_bytes()
        import xxhash

        manifest["shards"][2].update(bytes=len(data), xxh3_64=xxhash.xxh3_64_hexdigest(data))
        (folder / "dataset.json").write_text(json.dumps(manifest))

    cases = [
        (broken("missing", lambda f: (f / "shard-00003.parquet").unlink()),
         "shard-00003.parquet is missing"),
        (broken("flipped", flip_byte), "shard-00001.parquet: checksum"),
        (broken("schema", other_schema), "shard-00002.parquet has schema (text: string"),
        (broken("truncated", lambda f: (f / "shard-00000.parquet").write_bytes(b"PAR1")),
         "shard-00000.parquet is 4 bytes"),
        (tmp_path / "nothing", "dataset.json does not exist"),
        (broken("crafted", lambda f: (f / "dataset.json").write_text(
            (f / "dataset.json").read_text().replace("shard-00000", "../../etc/passwd"))),
         "is not a plain file name"),
    ]
    runs = tmp_path / "runs"
    for folder, message in cases:
        out = run_cli("run", "--set", "workload.entrypoint=workloads.gpt:train",
                      "--set", f"run.storage={runs}",
                      "--set", f"workload.args={{data: '{folder}', vocab_size: 257, "
                               "seq_len: 32, steps: 4}")
        assert out.returncode == 2, (message, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("orchestrator: workload.args.data: "), out.stderr
        assert message in out.stderr, (message, out.stderr)
    assert not runs.exists() or not any(runs.rglob("events.jsonl"))  # nothing started

    # Arguments that do not fit the data are caught just as early.
    for args, message in [("{vocab_size: 64}", "vocab_size=64 is smaller than the vocabulary"),
                          ("{vocab_size: 257, seq_len: 200}", "seq_len=200 needs rows of")]:
        out = run_cli("run", "--set", f"run.storage={runs}", "--set",
                      f"workload.args={{data: '{good}', {args[1:]}")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert message in out.stderr, out.stderr
