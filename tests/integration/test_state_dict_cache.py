"""TrainState keeps torch's get_state_dict result between calls (3 ms a call, paid by the
memory tier after every step it copies); what it returns must be what torch would return,
tensor for tensor, at every step."""

from __future__ import annotations

import pytest

from orchestrator.local_gang import run_gang
from tests.integration import memory_scenarios as sc


@pytest.mark.parametrize("parallelism,ac", [("ddp", "none"), ("fsdp", "full")])
def test_kept_state_dicts_equal_torchs_at_every_step(tmp_path, parallelism, ac):
    results = run_gang(sc.kept_state_dicts_match_torch, 2, parallelism, ac, out_dir=str(tmp_path))
    for found in results:
        assert "after load_state_dict" in found
        assert {when: diff for when, diff in found.items() if diff} == {}
