"""The writer process of `async_mode: process` does not outlive its worker, even mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# A worker whose writer is stuck in a write: the file it writes is a FIFO nobody reads.
PARENT = textwrap.dedent("""
    import os, sys, time
    import torch
    from orchestrator.checkpoint.layout import RunLayout
    from orchestrator.checkpoint.save_process import SaveProcess, SaveRequest
    from orchestrator.checkpoint.storage import Storage
    if __name__ == "__main__":
        root = sys.argv[1]
        folder = Storage(root).path(*RunLayout(Storage(root), "run").data_dir(1, "save-t"))
        os.makedirs(folder)
        os.mkfifo(os.path.join(folder, "__0_0.distcp"))
        writer = SaveProcess(rank=0, world_size=1, host="127.0.0.1", timeout_s=60)
        writer.start(lambda port: port)
        writer._conn.send(SaveRequest(state={"x": torch.zeros(4)}, storage_url=root,
                                      run_name="run", step=1, data_dir="save-t"))
        print(writer._proc.pid, flush=True)
        time.sleep(600)
""")


def test_the_writer_process_exits_when_its_worker_is_killed_mid_write(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "storage")],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # the child is now blocked opening the FIFO for its write
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        os.kill(parent.pid, signal.SIGKILL)  # as a killed worker dies: no clean-up at all
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not child.is_running() or child.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.1)
        else:
            child.kill()
            raise AssertionError("the writer process outlived its worker")
    finally:
        if parent.poll() is None:
            parent.kill()
