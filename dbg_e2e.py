import os, sys, tempfile
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"; os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
from tests.e2e.test_memory_tier import job
from tests.helpers import run_job, events_of, flatten
from orchestrator.checkpoint.consolidate import load_full_state
from orchestrator.chaos import FaultPlan
import torch
d = tempfile.mkdtemp()
variant = sys.argv[1]
ref = run_job(job(d + "/a", variant, "ref", interval=2))[1]
res, lay = run_job(job(d + "/b", variant, "kill", FaultPlan().kill_at(rank=1, step=37), interval=2, memory_interval=int(sys.argv[2])))
print(events_of(lay, "memory_restored"))
for step in (36, 38, 40):
    fa, fb = flatten(load_full_state(ref, step)), flatten(load_full_state(lay, step))
    bad = [k for k in fa if (not torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] != fb[k])]
    print(step, len(bad), bad[:8])
