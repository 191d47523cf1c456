"""Checkpoint bookkeeping (which checkpoint resumes) without DeepSpeed; the real save/load
round trip runs in the 2-rank training test (tests/test_train_e2e.py)."""
import pytest

from pipeline.checkpoint import MARKER, complete_checkpoints, resolve_resume


def _ckpt(root, step, complete=True):
    d = root / f"step-{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / MARKER).write_text(f"{step}\n")
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
