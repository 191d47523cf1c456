"""pipeline.dist.init on the CPU accelerator, in real processes under DeepSpeed's launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port

WORKER = """
import os
import torch
import deepspeed.comm as ds_comm
from pipeline import dist

env = dist.init(timeout_s=60)
path = dist.shm_allreduce_path(env.rank)
t = torch.full((4096,), float(env.rank + 1))
ds_comm.inference_all_reduce(t)  # DeepSpeed's shm all-reduce where the CPU has the ISA, else gloo
dist.barrier()
print(f"rank {env.rank}: name left {os.path.exists(path)}, sum {t[0].item()}, uses shm {os.environ.get('LOCAL_SIZE')}")
"""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm on Linux")
def test_cpu_all_reduce_buffers_do_not_outlive_the_run(tmp_path):
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm file per rank and never removes it: every
    CPU run left them behind (18 GB on this machine after a day of tests).  init() removes each
    rank's name once all ranks have mapped it, and a stale file of the same address and port (a
    run killed during set-up) before any rank maps it: a peer reading its stale flags could hang."""
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    stale = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}") for r in range(2)]
    for p in stale:
        p.write_bytes(b"\xff" * 4096)  # garbage flags and a wrong size
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    try:
        r = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                            str(port), str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        for rank in range(2):
            # the shm path was taken (the launcher sets LOCAL_SIZE), the result is right, no name is left
            assert f"rank {rank}: name left False, sum 3.0, uses shm 2" in out, out[-4000:]
        assert not any(p.exists() for p in stale)
    finally:
        for p in stale:
            p.unlink(missing_ok=True)
