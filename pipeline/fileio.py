"""Atomic file and directory writes: a killed job (SLURM preemption, OOM, Ctrl-C) never leaves a
truncated config, score file, checkpoint marker or half-written model directory behind — the
reader sees either the previous version or the complete new one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False,
                       skip_unchanged: bool = False) -> bool:
    """Write ``data`` to a temporary name beside ``path`` and rename it over ``path``.

    ``fsync=True`` flushes the bytes to disk before the rename (checkpoint markers: the rename
    must never reach the disk before the data it names).  ``skip_unchanged=True`` leaves a file
    that already holds exactly ``data`` alone, mtime included (idempotent data-prep reruns).
    Returns whether the file was written."""
    path = Path(path)
    if skip_unchanged:
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass  # missing or unreadable: write it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def output_problem(path: str | os.PathLike, *, folder: bool, replace: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (``folder=False``) or a folder, or None.

    ``replace=True``: the folder is written as a whole beside itself and renamed over it
    (:func:`atomic_directory`), so its parent must be writable; otherwise an existing folder is
    written into.  Entry points check their outputs before the work, so a typo'd ``--out`` costs
    a second, not an evaluation or an export that fails at its last step."""
    p = Path(path).expanduser().absolute()
    try:
        if p.exists():
            if p.is_dir() != folder:
                return f"{p} exists and is a {'file' if folder else 'folder'}"
            if folder and not replace:
                return _unwritable(p)
        ancestor = p.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as e:  # a parent we may not enter
        return f"cannot look at {p} ({e.strerror or e})"
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {p} cannot be created"
    return _unwritable(ancestor)


def _unwritable(folder: Path) -> str | None:
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"{folder} is on a read-only file system"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"no permission to write in {folder}"


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block succeeds it replaces
    ``out`` (an older ``out`` is removed first), when it raises ``out`` is left untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
