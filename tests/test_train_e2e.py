"""Both stages end to end through the real entry points, 2 CPU ranks over gloo, ZeRO-3, the tiny
Qwen2-VL and the bundled digits shards (data_prep/builtin.py).

Stage 1 (``launch/stage1.py``, LoRA): under ``torchrun`` rank 1 is SIGKILLed in the middle of
step 6 (tests/faults.py ``--fault.kill_step``); the job must exit non-zero well within the distributed
timeout.  The same run under ``deepspeed --num_gpus 2`` resumes (``--train.resume=auto``) from
step-3, the newest complete checkpoint, and must reproduce the killed run's losses for steps 4
and 5 exactly
(deterministic mode; tolerance 1e-6 relative), then finish, keep the last 2 checkpoints and
export a model that ``pipeline.Embedder`` loads; ``launch/export.py`` on the final checkpoint
gives the same weights.  Loss decreases over the 8 steps.

Stage 2 (``torchrun``, full fine-tuning, from the stage-1 export, embedding cache in chunks of
4): a NaN loss injected at step 4 is skipped and counted; the loss decreases; the export embeds.

The 2-rank stage-1 checkpoint resumes on 1 rank (converted once to DeepSpeed's universal
format): the same weights, and training goes on.

SIGTERM to every process of a running job (ranks and loader workers, as SLURM sends it) makes
the ranks save the current step and exit 4; the rerun resumes there.

DeepSpeed's CPU Adam with ZeRO-3 optimizer offload trains the same as torch AdamW (per-step losses).

Config errors exit 2 with the offending key named, before any process group exists.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60  # train.dist_timeout_s of these runs


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def _raw_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from pipeline.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("e2e")
    tiny = make_tiny_model(root / "tiny", family="qwen2_vl")
    r = subprocess.run([sys.executable, str(REPO / "data_prep/builtin.py"), "--output", str(root / "builtin"),
                        "--workers", "2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "tiny": tiny, "qa": root / "builtin/shards/qa", "mmeb": root / "builtin/shards/mmeb"}


def _stage1_cmd(assets, port, launcher, *extra, script=REPO / "launch/stage1.py"):
    if launcher == "deepspeed":
        head = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return head + [str(script), "--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
            f"--model.init={assets['tiny']}", f"--data.sources=[{{shards: '{assets['qa']}'}}]",
            f"--train.run_root={assets['root'] / 'runs'}", f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json",
            "--train.max_steps=8", "--train.save_every=3", "--train.keep_last=2", "--train.log_every=1",
            "--train.deterministic=true", f"--train.dist_timeout_s={TIMEOUT_S}", "--optim.lr=3e-3",
            "--train.gc_every=2", *extra]  # scheduled collections inside the resumed range (identical losses)


@pytest.fixture(scope="module")
def stage1(assets):
    from conftest import free_port

    killed = subprocess.run(_stage1_cmd(assets, free_port(), "torchrun", "--fault.stage=1", "--fault.kill_step=5",
                                        script=REPO / "tests/faults.py"), cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=400)
    t_exit = time.time()
    resumed = subprocess.run(_stage1_cmd(assets, free_port(), "deepspeed"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=400)
    return {"killed": killed, "t_exit": t_exit, "resumed": resumed, "run": assets["root"] / "runs/stage1_tiny"}


@pytest.mark.slow
def test_stage1_kill_resume_export(stage1):
    k, r, run = stage1["killed"], stage1["resumed"], stage1["run"]
    out = k.stdout + k.stderr
    assert k.returncode != 0, out[-3000:]
    m = re.search(r"(\d\d):(\d\d):(\d\d) \[rank1\] WARNING coma.train: fault kill_step=5", out)
    assert m, out[-3000:]
    lt = time.localtime(stage1["t_exit"])
    t_kill = time.mktime(lt[:3] + tuple(int(x) for x in m.groups()) + lt[6:])
    assert stage1["t_exit"] - t_kill < TIMEOUT_S, "the surviving rank did not exit within the distributed timeout"

    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from" in r.stdout and "step-3" in r.stdout
    rows = _raw_rows(run)
    first = {x["step"]: x for x in rows[:5]}            # the killed run: steps 1..5
    second = {x["step"]: x for x in rows[5:]}           # the resumed run: steps 4..8
    assert sorted(first) == list(range(1, 6)) and sorted(second) == [4, 5, 6, 7, 8]
    for s in (4, 5):
        a, b = first[s]["loss/train"], second[s]["loss/train"]
        assert abs(a - b) <= 1e-6 * abs(a), (s, a, b)
    losses = [x["loss/train"] for x in sorted(rows[:3] + rows[5:], key=lambda x: x["step"])]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    for key in ("optim/lr", "throughput/tokens_per_s_per_gpu", "throughput/tflops_per_gpu", "memory/peak_gib",
                "time/data_wait_share", "data/skipped_samples", "train/skipped_steps"):
        assert key in rows[-1], key
    # train.gc_every=2 under manual_gc: a scheduled collection in (only) every even step's line
    assert all((x["time/gc_share"] > 0) == (x["step"] % 2 == 0) for x in rows), [
        (x["step"], x["time/gc_share"]) for x in rows]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-6", "step-8"] and (run / "checkpoints/latest").read_text().strip() == "step-8"
    assert (run / "checkpoints/step-8/config.yaml").exists() and (run / "config.yaml").exists()
    assert list((run / "tensorboard").iterdir()) and (run / "train.log").stat().st_size > 0

    from pipeline import Embedder

    emb = Embedder.from_pretrained(run / "export")
    v = emb.encode([{"text": "a handwritten seven"}])
    assert v.shape == (1, 64) and math.isclose(float(v.norm()), 1.0, rel_tol=1e-4)

    # Offline export of the same final checkpoint (zero_to_fp32 merge, one CPU process) gives
    # the weights the run gathered from its ZeRO-3 partitions at its end.
    from conftest import load_script

    export_cli = load_script(REPO / "launch" / "export.py")
    from safetensors.torch import load_file

    assert export_cli.main(["--checkpoint", str(run / "checkpoints"), "--out", str(run / "export-offline")]) == 0
    a, b = load_file(run / "export/model.safetensors"), load_file(run / "export-offline/model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k].float() - b[k].float()).abs().max()) == 0.0 for k in a)
    assert export_cli.main(["--checkpoint", str(run / "nope"), "--out", str(run / "x")]) == 2


@pytest.mark.slow
def test_stage2_torchrun_cache_nan_skip(assets, stage1):
    from conftest import free_port

    from pipeline import Embedder

    init = stage1["run"] / "export"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/faults.py"), "--fault.stage=2", "--fault.nan_steps=[3]",
           "--config", str(REPO / "launch/configs/stage2_tiny.yaml"),
           f"--model.init={init}", f"--data.sources=[{{shards: '{assets['mmeb']}'}}]",
           f"--train.run_root={assets['root'] / 'runs'}", f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json",
           "--train.max_steps=8", "--train.log_every=1", "--train.save_every=100",
           "--model.lora.enabled=false", "--optim.lr=1e-3", "--optim.schedule=constant",
           "--data.task_batch_size=null", f"--train.dist_timeout_s={TIMEOUT_S}"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "embedding cache chunks of 4" in r.stdout
    run = assets["root"] / "runs/stage2_tiny"
    rows = _raw_rows(run)
    assert [x["step"] for x in rows] == list(range(1, 9))
    assert rows[3]["loss/train"] == "nan" and rows[-1]["train/skipped_steps"] == 1.0
    losses = [x["loss/train"] for x in rows if isinstance(x["loss/train"], float)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    items = [{"text": "a handwritten digit seven"}, {"text": "a handwritten digit two"}]
    before = Embedder.from_pretrained(init).encode(items)
    after = Embedder.from_pretrained(run / "export").encode(items)
    assert after.shape == (2, 64) and float((after - before).abs().max()) > 1e-3


@pytest.mark.slow
def test_resume_at_another_world_size_through_the_universal_checkpoint(assets, stage1):
    """A SLURM requeue onto fewer GPUs: the 2-rank stage-1 run's last checkpoint, resumed by 1
    rank.  ZeRO-3 partitions of 2 ranks do not load into 1 (it was a size-mismatch traceback);
    the trainer converts the checkpoint once to DeepSpeed's universal format and loads that.
    With nothing left to train, the export equals the 2-rank run's own export exactly; one more
    step trains from there and reuses the conversion."""
    from safetensors.torch import load_file

    from conftest import free_port

    ckpt = stage1["run"] / "checkpoints" / "step-8"

    def resume_with_one_rank(*extra):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
               str(REPO / "launch/stage1.py"), "--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
               f"--model.init={assets['tiny']}", f"--data.sources=[{{shards: '{assets['qa']}'}}]",
               f"--train.run_root={assets['root'] / 'runs'}", f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json",
               "--train.name=stage1_tiny_world1", f"--train.resume={ckpt}", "--train.save_every=100",
               "--train.log_every=1", "--optim.lr=3e-3", f"--train.dist_timeout_s={TIMEOUT_S}", *extra]
        r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r

    r = resume_with_one_rank("--train.max_steps=8")
    assert "was saved by 2 ranks, this run has 1" in r.stdout and (ckpt / "universal" / "COMPLETE").exists()
    a = load_file(stage1["run"] / "export/model.safetensors")
    b = load_file(assets["root"] / "runs/stage1_tiny_world1/export/model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k].float() - b[k].float()).abs().max()) == 0.0 for k in a)

    r = resume_with_one_rank("--train.max_steps=9", "--train.name=stage1_tiny_world1_more")
    assert "converting" not in r.stdout  # the universal form made above is reused
    (row,) = _raw_rows(assets["root"] / "runs/stage1_tiny_world1_more")
    assert row["step"] == 9 and math.isfinite(row["loss/train"])


@pytest.mark.slow
def test_auto_resume_skips_a_damaged_checkpoint_and_reproduces_the_run(assets, stage1):
    """A bad disk or a truncated copy from object storage: the newest checkpoint's rank-0 model
    states are random bytes.  `auto` used to stop with DeepSpeed's UnpicklingError; now it warns
    naming the file, resumes from the previous checkpoint, and retrains the same steps with the
    same losses as the undamaged run."""
    import shutil

    from conftest import free_port

    run = assets["root"] / "runs/stage1_tiny_damaged"
    shutil.copytree(stage1["run"] / "checkpoints", run / "checkpoints",
                    ignore=shutil.ignore_patterns("universal", "latest_universal"))
    victim = run / "checkpoints/step-8/zero_pp_rank_0_mp_rank_00_model_states.pt"
    victim.write_bytes(os.urandom(victim.stat().st_size))
    r = subprocess.run(_stage1_cmd(assets, free_port(), "torchrun", "--train.name=stage1_tiny_damaged"), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"skipping checkpoint {victim.parent}: {victim} does not load" in out, out[-4000:]
    assert "resumed from" in out and "step-6" in out
    original = {x["step"]: x for x in _raw_rows(stage1["run"])}
    rows = _raw_rows(run)
    assert [x["step"] for x in rows] == [7, 8]
    for x in rows:
        a, b = original[x["step"]]["loss/train"], x["loss/train"]
        assert abs(a - b) <= 1e-6 * abs(a), (x["step"], a, b)
        assert x["optim/lr"] == original[x["step"]]["optim/lr"]


@pytest.mark.slow
def test_samples_lost_in_damaged_shards_stop_the_run_naming_them(assets):
    """Tars cut short (a copy that died half-way): the samples sizes.json lists but no rank can
    read used to go uncounted (the run ended "0 skipped"); now they count in
    data/skipped_samples and past train.max_skipped_fraction the run stops with exit 3, naming
    the worst shards."""
    import shutil

    from conftest import free_port

    shards = assets["root"] / "qa-damaged"
    shutil.copytree(assets["qa"], shards)
    tars = sorted(shards.glob("*.tar"))
    for t in tars:
        with open(t, "r+b") as f:
            f.truncate(t.stat().st_size // 4)
    r = subprocess.run(_stage1_cmd(assets, free_port(), "deepspeed", "--train.name=stage1_tiny_lost",
                                   f"--data.sources=[{{shards: '{shards}'}}]", "--train.max_steps=40",
                                   "--train.save_every=100"),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-4000:]
    assert "train.max_skipped_fraction=0.01" in out and "lost in truncated or unreadable shards" in out, out[-4000:]
    assert re.search(r"worst shards: \S+/qa-damaged/train-\d{6}\.tar \(\d+ lost\)", out), out[-4000:]
    rows = _raw_rows(assets["root"] / "runs/stage1_tiny_lost")
    assert rows[-1]["data/skipped_samples"] > 0.01 * max(rows[-1]["data/samples_seen"], 1)
    # allowed to go on, the run ends with the count and the shards in its last line (it said "0 skipped")
    r = subprocess.run(_stage1_cmd(assets, free_port(), "deepspeed", "--train.name=stage1_tiny_lost_ok",
                                   f"--data.sources=[{{shards: '{shards}'}}]", "--train.max_steps=8",
                                   "--train.save_every=100", "--train.max_skipped_fraction=1.0"),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    m = re.search(r"done: 8 steps \(0 skipped as non-finite\), (\d+) samples skipped as undecodable or lost "
                  r"\(data/skipped_samples; worst shards: \S+/qa-damaged/train-\d{6}\.tar \(\d+ lost\)", out)
    assert m and int(m.group(1)) > 0, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_every_process_saves_and_the_rerun_continues(assets):
    """What SLURM does at preemption or the time limit: SIGTERM to every process of the job step,
    ranks and DataLoader workers alike (then SIGKILL after KillWait).  Every rank finishes its
    step, saves that step's checkpoint and exits 4 leaving runs/NAME/STOPPED; the workers ignore
    the signal (one dying of it made its rank raise mid-save).  The same command resumes there."""
    import signal

    from conftest import free_port

    name = "stage1_sigterm"
    run = assets["root"] / "runs" / name
    log_path = assets["root"] / f"{name}.log"

    def cmd(*extra):
        return _stage1_cmd(assets, free_port(), "torchrun", f"--train.name={name}", "--train.save_every=100",
                           "--data.workers=1", *extra)

    with open(log_path, "w") as log_f:
        p = subprocess.Popen(cmd("--train.max_steps=60"), cwd=REPO, env=_env(), stdout=log_f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while "step 2 |" not in log_path.read_text() and time.time() < deadline and p.poll() is None:
                time.sleep(0.2)
            ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            workers = [w for r in ranks for w in
                       subprocess.run(["pgrep", "-P", r], capture_output=True, text=True).stdout.split()]
            assert len(ranks) == 2 and len(workers) >= 2, (ranks, workers, log_path.read_text()[-3000:])
            for pid in ranks + workers:
                os.kill(int(pid), signal.SIGTERM)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert "killed by signal" not in out, out[-4000:]
    m = re.search(r"\[rank0\] WARNING coma.train: stopped: .* during step (\d+): checkpoint (\S+) saved", out)
    assert m, out[-4000:]
    step = int(m.group(1))
    assert Path(m.group(2)).name == f"step-{step}" and (Path(m.group(2)) / "COMPLETE").exists()
    assert f"step {step}" in (run / "STOPPED").read_text() and not (run / "export").exists()

    r = subprocess.run(cmd(f"--train.max_steps={step + 2}"), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{step}'}" in r.stdout
    assert not (run / "STOPPED").exists() and (run / "export").exists()


@pytest.mark.slow
def test_stop_signal_during_setup_exits_4_without_a_checkpoint(assets):
    """SLURM's warning can come while the model loads (minutes for a 7B): the rank must not die
    of it (SIGUSR1's default action) but stop with exit 4 and STOPPED before the first step."""
    import signal

    run = assets["root"] / "runs" / "stage1_setup_signal"
    cmd = [sys.executable, str(REPO / "launch/stage1.py"), "--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
           f"--model.init={assets['tiny']}", f"--data.sources=[{{shards: '{assets['qa']}'}}]",
           f"--train.run_root={run.parent}", f"--train.name={run.name}", "--train.max_steps=3",
           "--data.workers=0"]
    run.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.parent / "setup_signal.log"
    with open(log_path, "w") as log_f:
        p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log_f, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "CoMa model from" not in log_path.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)  # the model is loaded, the engine not yet built
        assert p.wait(timeout=300) == 4, log_path.read_text()[-3000:]
    out = log_path.read_text()
    assert "got SIGUSR1 before step 1 (during set-up): no checkpoint yet" in out, out[-3000:]
    assert (run / "STOPPED").exists() and not (run / "checkpoints").exists()


def test_config_errors_in_process(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.cli import main, parse_cli

    with pytest.raises(ConfigError, match=r"train\.stage=1 .*stage-2 entry point"):
        parse_cli(2, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml")])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.nope'"):
        parse_cli(1, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"), "--train.nope=1"])
    assert main(1, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"), "--model.init="]) == 2
    # a typo'd path or a folder without a model: one line, before any rank loads anything
    from pipeline.config import check_model_init

    with pytest.raises(ConfigError, match=r"model.init=/no/such/export: no such directory"):
        check_model_init("/no/such/export")
    with pytest.raises(ConfigError, match=r"has no config.json"):
        check_model_init(str(tmp_path))
    check_model_init("Qwen/Qwen2.5-VL-3B-Instruct")  # a Hub id: left to from_pretrained
    assert main(1, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"), f"--model.init={tmp_path}"]) == 2
    assert main(1, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
                    f"--train.resume={tmp_path / 'missing'}", "--model.init=x",
                    f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json", f"--train.run_root={tmp_path}"]) == 2


def test_missing_shards_are_a_config_error_before_any_process_group(tmp_path, capsys, monkeypatch):
    """A range typo (10 shards named, 8 written) used to train on 80% of the data with warnings
    and exit 0; a pattern matching nothing was reported only after DeepSpeed's set-up."""
    from data_prep import shard
    from datagen import dataset
    from pipeline import dist
    from pipeline.cli import main
    from tests.tiny_models import tiny_model_dir

    def no_process_group(*a, **k):
        raise AssertionError("a process group was started before the shards were checked")

    monkeypatch.setattr(dist, "init", no_process_group)
    out = tmp_path / "shards"
    assert shard.main(["--input", str(dataset(tmp_path, "qa", 16)), "--output", str(out), "--kind", "qa",
                       "--samples-per-shard", "2", "--workers", "1"]) == 0
    base = ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"), f"--model.init={tiny_model_dir()}",
            f"--train.run_root={tmp_path / 'runs'}"]
    capsys.readouterr()
    assert main(1, base + [f"--data.sources=[{{shards: '{out}/train-{{000000..000009}}.tar'}}]"]) == 2
    err = capsys.readouterr().err
    assert "names 10 shards, 2 of which do not exist" in err and "train-000008.tar" in err, err
    assert f"{out}/manifest.json says the shards there are {out}/train-{{000000..000007}}.tar" in err, err
    assert main(1, base + [f"--data.sources=[{{shards: '{tmp_path}/nope-{{0..3}}.tar'}}]"]) == 2
    assert "matches no shard on disk" in capsys.readouterr().err


def test_an_unwritable_run_directory_is_named_before_any_process_group(tmp_path, capsys, monkeypatch):
    from pipeline import dist
    from pipeline.cli import main
    from tests.tiny_models import tiny_model_dir

    monkeypatch.setattr(dist, "init", lambda *a, **k: pytest.fail("a process group was started"))
    (tmp_path / "file").write_text("x")
    assert main(1, ["--config", str(REPO / "launch/configs/stage1_tiny.yaml"), f"--model.init={tiny_model_dir()}",
                    f"--train.run_root={tmp_path / 'file'}"]) == 2
    err = capsys.readouterr().err
    assert f"the run directory {tmp_path / 'file' / 'stage1_tiny'} cannot be written" in err and "is a file" in err


@pytest.mark.slow
def test_config_error_two_ranks_exit_2():
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch/stage1.py"), "--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
           "--train.global_batch_size=15", f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "config error: train.global_batch_size=15 is not divisible by the world size 2" in r.stderr
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_cpu_adam_with_optimizer_offload_matches_adamw(assets):
    """``--optim.name=cpu_adam`` with ``ds_configs/zero3_bf16_offload.json`` (ZeRO-3, optimizer
    states on the CPU, DeepSpeed's CPU Adam, JIT-built on first use: ~1 min) trains the same
    as torch AdamW on the same engine: per-step losses equal to 1e-5 relative (fp32 tiny model)."""
    from conftest import free_port

    losses = {}
    for name, ds in (("adamw", "zero3_bf16"), ("cpu_adam", "zero3_bf16_offload")):
        cmd = _stage1_cmd(assets, free_port(), "torchrun", f"--optim.name={name}",
                          f"--train.ds_config={REPO}/ds_configs/{ds}.json", f"--train.name=opt_{name}",
                          "--train.max_steps=4", "--train.save_every=100", "--train.resume=none")
        r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        losses[name] = [x["loss/train"] for x in _raw_rows(assets["root"] / "runs" / f"opt_{name}")]
    assert len(losses["adamw"]) == 4
    for a, b in zip(losses["adamw"], losses["cpu_adam"]):
        assert abs(a - b) <= 1e-5 * abs(a), losses
