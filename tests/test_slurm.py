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


def _setup(tmp_path: Path, launcher: str, extra_env=None, srun_extra: str = ""):
    """Fake commands on PATH that record their arguments into calls.txt, and the SLURM
    environment of a 2-node × 8-GPU job; returns (env, calls file).  ``srun_extra``: more bash
    for the fake srun after it recorded its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    rec = f'printf "%s\\0" "$(basename "$0")" "$@" >> {calls}; printf "\\n" >> {calls}\n'
    _fake(bin_dir, "srun", rec + srun_extra)
    _fake(bin_dir, "deepspeed", rec)
    _fake(bin_dir, "fakepython", rec)
    _fake(bin_dir, "scontrol",
          f'if [ "$1" = requeue ]; then {rec} exit 0; fi\n'
          f'[ "$1 $2" = "show hostnames" ] || exit 1\n'
          f'{sys.executable} -c "import sys; from pipeline.dist import expand_hostlist; '
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
    return env, calls


def _calls(calls: Path) -> list[list[str]]:
    lines = [ln for ln in calls.read_text().split("\n") if ln] if calls.exists() else []
    return [ln.rstrip("\0").split("\0") for ln in lines]


def _render(tmp_path: Path, script: str, launcher: str, extra_env=None, args=()):
    env, calls = _setup(tmp_path, launcher, extra_env)
    r = subprocess.run(["bash", str(REPO / "launch/slurm" / script), *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    return _calls(calls), r


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
    with pytest.raises(AssertionError, match="not one of srun, torchrun, deepspeed"):
        _render(tmp_path, "stage1.sbatch", "mpirun")


@pytest.mark.parametrize("requeue", [True, False])
def test_usr1_warning_checkpoints_and_requeues(tmp_path, requeue):
    """SLURM's early warning (--signal=B:USR1@300) reaches the batch shell while the ranks train:
    coma_train forwards SIGUSR1 to the processes running launch/stage1.py on every node (a
    pattern that spares the launchers), and once the run has stopped with its checkpoint
    (runs/NAME/STOPPED, written by the trainer) it requeues the job; COMA_REQUEUE=0 exits 4."""
    import signal
    import time

    run_dir = tmp_path / "runs" / "coma-stage1"
    # The fake srun plays both parts: the training launch waits for the stop, the pkill step
    # stands for the ranks saving and stopping.
    srun_extra = (f'if [[ " $* " == *" coma-stop "* ]]; then mkdir -p {run_dir}; echo "saved step-7" > {run_dir}/STOPPED; '
                  f'touch {tmp_path}/stopped; exit 0; fi\n'
                  f'for i in $(seq 1 200); do [ -f {tmp_path}/stopped ] && exit 4; sleep 0.05; done; exit 9\n')
    env, calls = _setup(tmp_path, "srun", {"COMA_REQUEUE": "1" if requeue else "0"}, srun_extra)
    (run_dir).mkdir(parents=True)
    (run_dir / "STOPPED").write_text("a stale marker of an earlier job\n")  # must not requeue by itself
    p = subprocess.Popen(["bash", str(REPO / "launch/slurm/stage1.sbatch")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for _ in range(200):  # until the training launch runs
        if any("launch/stage1.py" in c for c in _calls(calls)):
            break
        time.sleep(0.05)
    assert not (run_dir / "STOPPED").exists()
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == (0 if requeue else 4), out
    launch, stop, *rest = _calls(calls)
    assert launch[0] == "srun" and "launch/stage1.py" in launch
    assert stop[:6] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", "bash", "-c"]
    assert stop[7:] == ["coma-stop", "^[^ ]+ (-u )?launch/stage1.py( |$)", "4242"]
    assert rest == ([["scontrol", "requeue", "4242"]] if requeue else [])
    assert "saved step-7" in out

    # the pattern: ranks under srun, torchrun or deepspeed match; the launchers do not
    import re

    pat = re.compile(stop[8])
    for cmdline, hit in [("python launch/stage1.py --config x", True),
                         ("/opt/py/bin/python3.11 -u launch/stage1.py --local_rank=3 --config x", True),
                         ("/opt/py/bin/python3.11 -m torch.distributed.run --nnodes=2 launch/stage1.py --config x", False),
                         ("python -u -m deepspeed.launcher.launch --world_info=x launch/stage1.py", False)]:
        assert bool(pat.search(cmdline)) == hit, cmdline

    # what runs on each node, for real: only this job's rank gets the signal, not the same
    # user's other job running the same script on the node
    fake = tmp_path / "node"
    (fake / "launch").mkdir(parents=True)
    (fake / "launch/stage1.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[1], 'w').close())\n"
        "time.sleep(30)\n")
    procs = {job: subprocess.Popen([sys.executable, "launch/stage1.py", str(tmp_path / f"got-{job}")], cwd=fake,
                                   env={**os.environ, "SLURM_JOB_ID": job}) for job in ("4242", "777")}
    try:
        time.sleep(1.0)  # both installed their handler
        subprocess.run(["bash", "-c", stop[6], *stop[7:]], check=True, timeout=30)
        for _ in range(100):
            if (tmp_path / "got-4242").exists():
                break
            time.sleep(0.05)
        time.sleep(0.3)
        assert (tmp_path / "got-4242").exists() and not (tmp_path / "got-777").exists()
    finally:
        for p in procs.values():
            p.kill()


def test_usr1_between_stages_requeues_before_the_next_one(tmp_path):
    """coma.sbatch: SLURM's warning during the stage-1 export (no training running to forward it
    to) is noted; the export finishes and the job requeues instead of starting stage 2 with
    minutes left."""
    import signal
    import time

    env, calls = _setup(tmp_path, "deepspeed", {"RUN_NAME": "r"})
    _fake(tmp_path / "bin", "fakepython",
          f'printf "%s\\0" "$(basename "$0")" "$@" >> {calls}; printf "\\n" >> {calls}\n'
          f'touch {tmp_path}/exporting; sleep 1.5\n')
    p = subprocess.Popen(["bash", str(REPO / "launch/slurm/coma.sbatch")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        if (tmp_path / "exporting").exists():
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert [c[0] for c in _calls(calls)] == ["deepspeed", "fakepython", "scontrol"], out
    assert _calls(calls)[-1] == ["scontrol", "requeue", "4242"] and "next stage waits" in out
