"""S3 faults at the protocol level: a proxy of ours on 127.0.0.1, in front of moto's server,
answers 503 SlowDown or drops the connection for chosen requests. Saves, commits and restores
through it end with the weights of a run without faults (botocore's retries, for every
request, DCP's shard reads and writes included); reads that keep failing make the restore
fall back without marking the newest checkpoint, and a later restore finds it."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.checkpoint import commit
from orchestrator.checkpoint.layout import RunLayout
from orchestrator.checkpoint.storage import Storage
from orchestrator.local_gang import run_gang
from tests.faultproxy import FaultProxy, Rule
from tests.integration import ckpt_scenarios as sc


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(upstream=os.environ["AWS_ENDPOINT_URL"]) as p:
        yield p


def through(proxy: FaultProxy) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": proxy.url}


def test_saves_commits_and_restores_through_503s_and_drops_end_with_equal_weights(
        s3_bucket, proxy, tmp_path):
    ref, faulty = f"{s3_bucket}/ref", f"{s3_bucket}/faulty"
    for url, env in ((ref, {}), (faulty, through(proxy))):
        if url == faulty:
            proxy.add(Rule(method="PUT", action="503", every=3, times=8))  # shards, manifests
            proxy.add(Rule(method="GET", path=r"distcp|metadata|manifest", action="drop",
                           every=4, times=8))
            proxy.add(Rule(action="503", every=7, times=8))  # and any other request
        # Train to 6 saving at 2, 4, 6; then a new gang restores 6 and trains on to 8.
        run_gang(sc.train_and_save, 2, url, {}, 6, {2, 4, 6}, out_dir=str(tmp_path), env=env)
        results = run_gang(sc.train_and_save, 2, url, {}, 8, {8}, out_dir=str(tmp_path),
                           env=env)
        assert [r["start"] for r in results] == [6, 6]
        assert not [e for e in results[0]["events"] if e["kind"] == "checkpoint_failed"]
    assert proxy.faults >= 10, proxy.faults  # up to 8 of each kind, 24 in all
    a, b = sc.committed_model(ref, 8), sc.committed_model(faulty, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_that_keep_failing_fall_back_and_leave_the_newest_checkpoint_unmarked(
        s3_bucket, proxy, tmp_path):
    url = f"{s3_bucket}/run"
    run_gang(sc.train_and_save, 2, url, {}, 4, {2, 4}, out_dir=str(tmp_path))
    # Every read of step 4's shards is throttled, for good.
    proxy.add(Rule(method="GET", path=r"step_000000004/save-.*distcp", action="503"))
    results = run_gang(sc.with_s3_attempts, 2, 2, sc.restore_newest_through_faults, url,
                       out_dir=str(tmp_path), env=through(proxy))
    assert [r["first"] for r in results] == [2, 2]
    (unreadable,) = [e for e in results[0]["events"] if e["kind"] == "checkpoint_unreadable"]
    assert unreadable["step"] == 4
    layout = RunLayout(Storage(url), sc.RUN)
    assert not layout.storage.exists(*layout.invalid_marker(4))
    assert [c.step for c in commit.committed_checkpoints(layout)[0]] == [4, 2]

    proxy.clear()  # the storage answers again: a later run restores the newest
    results = run_gang(sc.restore_newest_through_faults, 2, url, out_dir=str(tmp_path),
                       env=through(proxy))
    assert [r["first"] for r in results] == [4, 4]
