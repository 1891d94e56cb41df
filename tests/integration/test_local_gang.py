"""run_gang forks its ranks from a forkserver started once: each rank must still see the
caller's environment, working directory and sys.path as they are at the call (as a spawned
rank did), not as they were when the server started."""

from __future__ import annotations

import os
import sys

from orchestrator.local_gang import run_gang


def _what_the_rank_sees(rank: int, world: int, groups) -> dict:
    return {"env": os.environ.get("GANG_PROBE"), "gone": os.environ.get("GANG_GONE"),
            "cwd": os.getcwd(), "path_end": sys.path[-1], "pid": os.getpid(),
            "override": os.environ.get("GANG_OVERRIDE")}


def test_each_rank_gets_the_callers_environment_cwd_and_path_at_the_call(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("GANG_GONE", "set before the server started")
    first = run_gang(_what_the_rank_sees, 2, out_dir=str(tmp_path))  # the server is up now
    assert [s["gone"] for s in first] == ["set before the server started"] * 2
    monkeypatch.setenv("GANG_PROBE", "set after the server started")
    monkeypatch.delenv("GANG_GONE")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "last")])
    seen = run_gang(_what_the_rank_sees, 2, out_dir=str(tmp_path),
                    env={"GANG_OVERRIDE": "from env="})
    assert [s["env"] for s in seen] == ["set after the server started"] * 2
    assert [s["gone"] for s in seen] == [None, None]
    assert [s["cwd"] for s in seen] == [str(tmp_path)] * 2
    assert [s["path_end"] for s in seen] == [str(tmp_path / "last")] * 2
    assert [s["override"] for s in seen] == ["from env="] * 2
    assert len({s["pid"] for s in seen}) == 2
