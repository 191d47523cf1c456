"""Checkpoint bookkeeping (which checkpoint resumes) without DeepSpeed, and a real one-rank
ZeRO-3 save → universal → load for the optimizer settings; the full save/load round trips run
in the 2-rank training tests (tests/test_train_e2e.py)."""
import logging
import os

import pytest
import torch

from pipeline.checkpoint import (MARKER, CheckpointError, _manifest, complete_checkpoints, resolve_resume,
                                 saved_world_size)


def _ckpt(root, step, complete=True, world=2):
    """A checkpoint as CheckpointManager.save leaves it (real torch archives, the manifest)."""
    d = root / f"step-{step}"
    d.mkdir(parents=True)
    for r in range(world):
        torch.save({"param": torch.arange(64.0) * r}, d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"rng": r}, d / f"rank{r}.pt")
    (d / "config.yaml").write_text("train: {}\n")
    if complete:
        (d / MARKER).write_text(_manifest(d, step, world))
    return d


def test_resume_auto_none_path(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None          # first run: nothing to resume
    assert resolve_resume("none", root) is None
    s10, s20 = _ckpt(root, 10), _ckpt(root, 20)
    (root / "latest").write_text("step-20\n")
    assert resolve_resume("auto", root) == s20
    assert resolve_resume(str(s10), root) == s10
    assert resolve_resume(str(root), root) == s20        # a checkpoints dir: its latest
    # step-100 sorts after step-20 numerically, not as text
    assert [d.name for d in complete_checkpoints(root)] == ["step-10", "step-20"]


def test_crash_during_save_leaves_previous(tmp_path):
    root = tmp_path / "checkpoints"
    s10 = _ckpt(root, 10)
    (root / "latest").write_text("step-10\n")
    partial = _ckpt(root, 20, complete=False)             # killed mid-save: no marker, latest untouched
    assert resolve_resume("auto", root) == s10
    # even if `latest` had been moved to an incomplete directory, auto picks the newest complete one
    (root / "latest").write_text("step-20\n")
    assert resolve_resume("auto", root) == s10
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        resolve_resume(str(partial), root)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), root)


def _damage(f, how):
    if how == "random bytes, same size":
        f.write_bytes(os.urandom(f.stat().st_size))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "deleted":
        f.unlink()


@pytest.mark.parametrize("victim,how", [("zero_pp_rank_0_mp_rank_00_model_states.pt", "random bytes, same size"),
                                        ("zero_pp_rank_1_mp_rank_00_model_states.pt", "truncated"),
                                        ("rank1.pt", "deleted"), ("config.yaml", "truncated"),
                                        (MARKER, "random bytes, same size")])
def test_auto_skips_a_damaged_newest_checkpoint(tmp_path, caplog, victim, how):
    """`auto` = the newest checkpoint that is complete and loads: a damaged one is skipped with a
    warning naming the file, the next older one is used."""
    root = tmp_path / "checkpoints"
    s9, s10 = _ckpt(root, 9), _ckpt(root, 10)
    (root / "latest").write_text("step-10\n")
    _damage(s10 / victim, how)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert resolve_resume("auto", root) == s9
    assert f"skipping checkpoint {s10}" in caplog.text and victim in caplog.text, caplog.text
    # asked for by name, it is refused naming the file (exit 2 in the trainer)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        resolve_resume(str(s10), root)


def test_auto_with_no_loadable_checkpoint_names_each(tmp_path):
    root = tmp_path / "checkpoints"
    s9, s10 = _ckpt(root, 9), _ckpt(root, 10)
    _damage(s9 / "rank0.pt", "deleted")
    _damage(s10 / "rank1.pt", "truncated")
    with pytest.raises(CheckpointError) as e:
        resolve_resume("auto", root)
    msg = str(e.value)
    assert "step-9" in msg and "rank0.pt is missing" in msg and "step-10" in msg and "rank1.pt has" in msg, msg


def test_world_size_is_what_was_saved_not_what_is_present(tmp_path):
    """Deleting step-9/rank1.pt used to read as "saved by 1 rank": a silent reshard and reseed."""
    s = _ckpt(tmp_path, 9, world=2)
    (s / "rank1.pt").unlink()
    assert saved_world_size(s) == 2
    legacy = _ckpt(tmp_path, 10, world=3, complete=False)
    (legacy / MARKER).write_text("10\n")  # saved before manifests: the rank files are all there is
    assert saved_world_size(legacy) == 3 and resolve_resume(str(legacy), tmp_path) == legacy


UNIVERSAL_GROUPS = r'''
import json, sys
from pathlib import Path

import deepspeed
import torch

from pipeline.checkpoint import CheckpointManager
from pipeline.engine import _param_groups

deepspeed.init_distributed(dist_backend="gloo")
root, stage = Path(sys.argv[1]), int(sys.argv[2])


def engine(weight_decay, universal):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(_param_groups(list(model.named_parameters()), weight_decay), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "checkpoint": {"load_universal": universal}}
    return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]


eng = engine(0.1, False)
loss = eng(torch.randn(2, 8)).square().mean()
eng.backward(loss)
eng.step()
ckpt = CheckpointManager(root)
path = ckpt.save(eng, 1, {"step": 1}, {}, "")
# built from a config whose weight decay differs: the saved settings are the ones that count
resumed = engine(0.0, True)
ckpt.load(resumed, path, universal=ckpt.universal(path))
groups = resumed.optimizer.optimizer.param_groups
print("GROUPS", json.dumps([{"weight_decay": g["weight_decay"], "lr": g["lr"]} for g in groups]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_universal_load_keeps_each_param_groups_settings(tmp_path, stage):
    """DeepSpeed's ZeRO-3 universal loader gives every param group the settings of group 0: the
    no-decay group (norms, biases, compression-token rows) came back with weight decay 0.1
    after a resume at another world size.  A real single-rank ZeRO engine saves, converts and
    loads here; each group must keep what it was saved with (ZeRO-2's loader already did)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, free_port

    script = tmp_path / "groups.py"
    script.write_text(UNIVERSAL_GROUPS)
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(stage)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("GROUPS "))
    groups = json.loads(line[len("GROUPS "):])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0], groups
