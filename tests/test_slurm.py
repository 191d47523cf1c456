"""Render each SLURM script for a fake 2-node allocation and check the commands it would run.

`sbatch --test-only` needs a cluster; instead the scripts run under bash with the SLURM
variables of a 2-node × 8-GPU job and fake `scontrol`, `srun`, `deepspeed` and python on PATH
that record their arguments.  `scontrol show hostnames` is faked with pipeline.dist's expander
(tested against SLURM's notation below)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dist import expand_hostlist, read_env

REPO = Path(__file__).resolve().parent.parent


def _fake(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def _render(tmp_path: Path, script: str, launcher: str, extra_env=None, args=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    rec = f'printf "%s\\0" "$(basename "$0")" "$@" >> {calls}; printf "\\n" >> {calls}\n'
    _fake(bin_dir, "srun", rec)
    _fake(bin_dir, "deepspeed", rec)
    _fake(bin_dir, "fakepython", rec)
    _fake(bin_dir, "scontrol",
          f'[ "$1 $2" = "show hostnames" ] || exit 1\n'
          f'PYTHONPATH={REPO} {sys.executable} -c "import sys; from pipeline.dist import expand_hostlist; '
          f'print(chr(10).join(expand_hostlist(sys.argv[1])))" "$3"\n')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_SUBMIT_DIR": str(REPO),
        "RUN_ROOT": str(tmp_path / "runs"),
        "PYTHON": "fakepython",
        "LAUNCHER": launcher,
    }
    env.update(extra_env or {})
    r = subprocess.run(["bash", str(REPO / "launch/slurm" / script), *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [ln for ln in calls.read_text().split("\n") if ln] if calls.exists() else []
    return [ln.rstrip("\0").split("\0") for ln in lines], r


def test_hostlist_and_slurm_env():
    assert expand_hostlist("gpu[07-08]") == ["gpu07", "gpu08"]
    assert expand_hostlist("a[1-2]b[3-4],login1") == ["a1b3", "a1b4", "a2b3", "a2b4", "login1"]
    assert expand_hostlist("n[098-101,7]") == ["n098", "n099", "n100", "n101", "n7"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_hostlist("gpu[01-02")
    # What srun gives task 9 of a 2×8 job: second node, local rank 1.
    env = read_env({"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "8(x2)"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (9, 1, 16, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu07", 15000 + 4242, "slurm")
    # torchrun/deepspeed variables win over SLURM's (torchrun inside srun).
    env = read_env({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07",
                    "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.master_port, env.launcher) == (3, 16, 1234, "torchrun")
    # ranks per node: torchrun's LOCAL_WORLD_SIZE, or what DeepSpeed's launcher sets (LOCAL_SIZE)
    assert read_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}).local_world_size == 8
    assert read_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_SIZE": "8"}).local_world_size == 8
    assert read_env({}).world_size == 1


def test_stage1_srun(tmp_path):
    calls, r = _render(tmp_path, "stage1.sbatch", "srun", args=["--train.save_every=7"])
    assert len(calls) == 1
    c = calls[0]
    assert c[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert c[4:8] == ["fakepython", "launch/stage1.py", "--config", "launch/configs/stage1_qwen2_5_vl_3b.yaml"]
    assert "--train.resume=auto" in c and "--train.name=coma-stage1" in c and c[-1] == "--train.save_every=7"
    log = tmp_path / "runs/coma-stage1/slurm-4242.log"
    assert "master gpu07:" in log.read_text() and "2 node(s) x 8 GPU(s)" in log.read_text()


def test_stage2_torchrun(tmp_path):
    calls, _ = _render(tmp_path, "stage2.sbatch", "torchrun", {"INIT": "runs/s1/export"})
    (c,) = calls
    assert c[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert c[4:6] == ["fakepython", "-m"] and c[6] == "torch.distributed.run"
    assert "--nnodes=2" in c and "--nproc_per_node=8" in c and "--rdzv_id=4242" in c
    assert f"--rdzv_endpoint=gpu07:{15000 + 4242}" in c
    i = c.index("launch/stage2.py")
    assert "--model.init=runs/s1/export" in c[i:] and "--train.resume=auto" in c[i:]


def test_coma_deepspeed_hostfile(tmp_path):
    calls, _ = _render(tmp_path, "coma.sbatch", "deepspeed", {"RUN_NAME": "r"})
    # stage 1, then export (stage 1's export dir does not exist: the fakes write nothing), then stage 2
    assert [c[0] for c in calls] == ["deepspeed", "fakepython", "deepspeed"]
    s1, ex, s2 = calls
    hostfile = Path(s1[s1.index("--hostfile") + 1])
    assert hostfile.read_text() == "gpu07 slots=8\ngpu08 slots=8\n"
    assert s1[s1.index("--master_addr") + 1] == "gpu07" and "launch/stage1.py" in s1
    root = str(tmp_path / "runs")
    assert ex[1:] == ["launch/export.py", "--checkpoint", f"{root}/r-stage1/checkpoints", "--out",
                      f"{root}/r-stage1/export"]
    assert "launch/stage2.py" in s2 and f"--model.init={root}/r-stage1/export" in s2
    # A requeued job whose stage 1 finished skips it and goes straight to stage 2.
    (tmp_path / "calls.txt").unlink()
    (tmp_path / "runs/r-stage1/export").mkdir(parents=True)
    calls, _ = _render(tmp_path, "coma.sbatch", "deepspeed", {"RUN_NAME": "r"})
    assert len(calls) == 1 and "launch/stage2.py" in calls[0]


def test_bad_launcher(tmp_path):
    bin_dir = tmp_path / "bin"
    with pytest.raises(AssertionError, match="not one of srun, torchrun, deepspeed"):
        _render(tmp_path, "stage1.sbatch", "mpirun")
