"""Checkpoints: ``step-N`` directories, client state, keep-last-k, atomic ``latest``, resume.

Layout under ``runs/NAME/checkpoints/``::

    step-200/                 DeepSpeed's files for tag "step-200" (ZeRO partitions, module,
                              optimizer and lr-scheduler states, common client state)
    step-200/rank{r}.pt       per-rank client state: RNG states and the loader state of rank r
    step-200/config.yaml      the resolved run config
    step-200/COMPLETE         written last, after every rank finished writing: the manifest
                              (JSON: step, world size, every file of the save and its size)
    step-200/universal/       DeepSpeed's universal form of it, made once when a run resumes
                              it at another world size (see :meth:`CheckpointManager.universal`)
    latest                    the name of the newest COMPLETE checkpoint, replaced atomically

Why the marker and our own ``latest``: DeepSpeed's ``save_latest`` rewrites its file in place
before other ranks may have finished.  Here ``latest`` moves only after a barrier, so a job
killed during a save (any rank, any moment) leaves ``latest`` on the previous checkpoint, and
``resume="auto"`` loads that one.  Old checkpoints are pruned only after the new one is
complete.

Why the manifest: a checkpoint can be damaged after it was completed (a bad disk, a truncated
copy back from object storage, a file deleted by hand).  ``auto`` resumes from the newest
checkpoint that is complete *and loads*: every file the manifest lists is there with its size
and every ``.pt`` file opens (:func:`checkpoint_problem`); a damaged one is skipped with a
warning naming the file.  The rank count a checkpoint was saved with is read from the manifest,
never guessed from which ``rank{r}.pt`` files happen to be present.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from pipeline import dist
from pipeline.fileio import atomic_write_text

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"


UNIVERSAL = "universal"


def tag_for(step: int) -> str:
    return f"step-{step}"


class CheckpointError(Exception):
    """No usable checkpoint where one was asked for (the message names each file and why)."""


def read_manifest(path: Path) -> Optional[dict]:
    """The manifest in ``path/COMPLETE``; None for a checkpoint saved before manifests (its
    marker holds only the step number).  Raises CheckpointError when the marker is unreadable."""
    marker = Path(path) / MARKER
    try:
        text = marker.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker} cannot be read ({e})") from None
    if text.strip().isdigit():
        return None
    try:
        manifest = json.loads(text)
        if not isinstance(manifest.get("files"), dict) or int(manifest["world_size"]) < 1:
            raise ValueError("no files or world_size")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{marker} is not a checkpoint manifest ({e})") from None
    return manifest


def saved_world_size(path: Path) -> int:
    """How many ranks saved checkpoint ``path``: from its manifest; for a checkpoint saved
    before manifests, the number of ``rank{r}.pt`` files (each rank wrote one)."""
    manifest = read_manifest(path)
    if manifest is not None:
        return int(manifest["world_size"])
    return sum(1 for _ in Path(path).glob("rank*.pt"))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why checkpoint ``path`` cannot be loaded, naming the file, or None when it can: the
    COMPLETE manifest reads, every file it lists is present with the size it was saved with,
    and every ``.pt`` file opens as a torch archive (memory-mapped: tensors are not read, so
    this costs milliseconds per file, not a read of the checkpoint)."""
    import torch

    path = Path(path)
    if not (path / MARKER).exists():
        return f"{path} has no {MARKER} marker (its save was interrupted)"
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    if manifest is None:  # saved before manifests: at least this run's own rank files must open
        listed = {p.relative_to(path).as_posix(): None for p in path.glob("*.pt")}
    else:
        listed = manifest["files"]
    for rel, size in sorted(listed.items()):
        f = path / rel
        try:
            actual = f.stat().st_size
        except OSError:
            return f"{f} is missing"
        if size is not None and actual != size:
            return f"{f} has {actual} bytes, {size} when it was saved (truncated or overwritten)"
        if f.suffix == ".pt":
            try:
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            except Exception as e:  # noqa: BLE001 - any failure to open is the answer
                return f"{f} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    return None


def _manifest(path: Path, step: int, world_size: int) -> str:
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    return json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1) + "\n"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """COMPLETE ``step-N`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and d.is_dir() and (d / MARKER).exists():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume: str, root: str | os.PathLike, what: str = "train.resume") -> Optional[Path]:
    """Which checkpoint to load.

    ``none``: start fresh.  ``auto``: the one ``root/latest`` names, or (if that file is
    missing or points at an incomplete directory) the newest COMPLETE ``step-N``; None when
    there is none yet (a first run).  Anything else is a path: a ``step-N`` directory or a
    checkpoints directory holding ``latest``; it must exist and be complete.  ``what`` names
    the setting in error messages (``--checkpoint`` for launch/export.py).
    """
    if resume in ("none", "", None):
        return None
    root = Path(root)
    if resume == "auto":
        return _newest_loadable(root, what, resume)
    path = Path(resume)
    if (path / "latest").exists() and not (path / MARKER).exists():
        return _newest_loadable(path, what, resume) or _missing(resume, what)
    if not path.is_dir():
        _missing(resume, what)
    if not (path / MARKER).exists():
        hint = "use --train.resume=auto or an earlier step-N" if what == "train.resume" else "pick another step-N"
        raise FileNotFoundError(
            f"{what}={resume}: {path} has no {MARKER} marker, so it is not a finished checkpoint (not a "
            f"step-N or checkpoints directory, or its save was interrupted); {hint}")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"{what}={resume} cannot be loaded: {problem}; pick another step-N"
                              + (" or --train.resume=auto" if what == "train.resume" else ""))
    return path


def _newest_loadable(root: Path, what: str, resume: str) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` that loads (:func:`checkpoint_problem`),
    warning about each newer one skipped; None when there is none (a first run).  Every rank
    decides alone, before any process group exists, from the same files: they agree."""
    latest = root / "latest"
    if latest.exists():
        named = root / latest.read_text(encoding="utf-8").strip()
        if not (named / MARKER).exists():
            log.warning("%s names %s, which is incomplete; falling back to the newest complete checkpoint",
                        latest, named)
    problems = []
    for cand in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(cand)
        if problem is None:
            return cand
        log.warning("skipping checkpoint %s: %s; trying the next older one", cand, problem)
        problems.append(f"{cand.name}: {problem}")
    if problems:
        raise CheckpointError(f"{what}={resume}: none of the {len(problems)} complete checkpoint(s) under {root} "
                              f"loads: " + "; ".join(problems) + "; restore them, or start afresh with "
                              + ("--train.resume=none" if what == "train.resume" else "another checkpoint"))
    return None


def _missing(resume: str, what: str = "train.resume"):
    raise FileNotFoundError(f"{what}={resume}: no such checkpoint directory; use "
                            + ("auto, none, or " if what == "train.resume" else "")
                            + "a step-N directory under runs/NAME/checkpoints, or that checkpoints directory")


# ----------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


def restore_group_settings(engine: Any, universal: Path) -> None:
    """Give each optimizer param group back the settings it was saved with.

    Why: DeepSpeed's ZeRO-3 universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
    copies the settings of saved group 0 onto every group, so after a resume at another world
    size the no-decay group (biases, norms, the compression-token rows: ``pipeline.engine._param_groups``)
    would be decayed with ``optim.weight_decay``.  The universal folder keeps every saved group
    in ``zero/optimizer_state.pt``; ZeRO-1/2's loader already restores them per group, for which
    this changes nothing."""
    import torch

    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    # DeepSpeed's loader has just read (and asserted) this file; mmap: its tensors stay unread
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False,
                       mmap=True).get("param_groups") or []
    if len(saved) != len(groups):
        log.warning("%s holds %d optimizer param groups, this run has %d: their settings are left as "
                    "DeepSpeed loaded them", universal, len(saved), len(groups))
    else:
        for i, (group, old) in enumerate(zip(groups, saved)):
            fixed = {k: v for k, v in old.items() if k != "params" and not _equal(group.get(k), v)}
            if fixed:
                log.info("optimizer param group %d: %s restored as saved (the universal loader had set %s)", i,
                         fixed, {k: group.get(k) for k in fixed})
                group.update(fixed)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):  # tensors of several elements
        return a is b


# --------------------------------------------------------------------------------- save / load
class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, engine: Any, step: int, client_state: dict, rank_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it.  ``client_state`` (same on all ranks: step, samples
        seen, config …) goes into DeepSpeed's files; ``rank_state`` (RNG, loader position) into
        ``rank{r}.pt``."""
        import torch

        tag = tag_for(step)
        path = self.root / tag
        rank = dist.get_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # leftovers of an interrupted save of the same step
                shutil.rmtree(path)
        dist.barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            tmp = path / f".rank{rank}.pt.tmp"
            torch.save(rank_state, tmp)
            os.replace(tmp, path / f"rank{rank}.pt")
            if rank == 0:
                atomic_write_text(path / "config.yaml", config_yaml, fsync=True)
        except (OSError, RuntimeError) as e:  # a full disk, a read-only mount (torch.save raises RuntimeError)
            raise CheckpointError(f"cannot write checkpoint {path} ({e}); the previous complete checkpoint is kept: "
                                  f"free space and rerun with --train.resume=auto") from None
        dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if rank == 0:
            atomic_write_text(path / MARKER, _manifest(path, step, dist.get_world_size()), fsync=True)
            atomic_write_text(self.root / "latest", tag + "\n", fsync=True)
            self._prune(keep=path)
        dist.barrier()
        return path

    def _prune(self, keep: Path) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(len(done) - self.keep_last, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        # Incomplete directories older than the newest complete one are dead saves.
        newest = int(_TAG.match(keep.name).group(1))
        for d in self.root.iterdir():
            m = _TAG.match(d.name)
            if m and int(m.group(1)) < newest and not (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)

    def universal(self, path: Path) -> Path:
        """Collective.  ``path`` in DeepSpeed's universal checkpoint format (``path/universal``),
        which any world size can load (the engine needs ``checkpoint.load_universal``): ZeRO
        partitions are stored per rank count, so a SLURM requeue onto fewer or more GPUs cannot
        load them as saved.  Rank 0 converts once with DeepSpeed's ``ds_to_universal`` (a child
        process: it forks workers, which a rank holding a process group should not) into a
        temporary folder renamed when complete; the other ranks wait at a barrier, so a very
        large checkpoint may need a longer ``train.dist_timeout_s``."""
        out = path / UNIVERSAL
        if dist.get_rank() == 0 and not (out / MARKER).exists():
            tmp = path / f".{UNIVERSAL}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            log.info("converting %s to DeepSpeed's universal format (once; kept in %s)", path, out)
            r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(path), "--output_folder", str(tmp), "--num_extract_workers", "1",
                                "--num_merge_workers", "1",
                                # ZeRO-1/2 checkpoints of a plain HF model carry no universal info
                                # (Megatron writes it): the version marker is all the loader needs
                                "--inject_missing_state"], capture_output=True, text=True)
            (path / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer: unused
            if r.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"converting {path} to a universal checkpoint failed "
                                   f"(exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
            atomic_write_text(tmp / MARKER, "universal\n", fsync=True)
            os.replace(tmp, out)
        dist.barrier()
        return out

    def load(self, engine: Any, path: Path, load_optimizer_states: bool = True,
             universal: Optional[Path] = None) -> tuple[dict, dict]:
        """Collective.  Restores module, optimizer and scheduler through DeepSpeed; returns
        (common client state, this rank's state).  ``universal``: load from that universal form
        of ``path`` (another world size saved it); then only the loader position carries over
        (the same in every rank file; the loader maps it onto the new world size), not the
        per-rank RNG streams (the trainer reseeds them per rank)."""
        import torch

        src = universal or path
        load_path, client = engine.load_checkpoint(str(src.parent), tag=src.name,
                                                   load_optimizer_states=load_optimizer_states,
                                                   load_lr_scheduler_states=load_optimizer_states)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {src}")
        if universal is not None and load_optimizer_states:
            restore_group_settings(engine, universal)
        rank_file = path / f"rank{dist.get_rank()}.pt"
        if universal is not None:
            state = torch.load(path / "rank0.pt", map_location="cpu", weights_only=False)
            rank_state = {"loader": state["loader"]} if "loader" in state else {}
        elif rank_file.exists():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        else:
            log.warning("%s missing (checkpoint from another world size?): RNG and loader position not restored",
                        rank_file)
            rank_state = {}
        return client or {}, rank_state
