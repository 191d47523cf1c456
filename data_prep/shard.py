"""Manifest → validated, deterministic, resumable WebDataset shards.

    python data_prep/shard.py --input data/cc3m/pairs.jsonl --output data/cc3m/shards --kind pair \\
        --samples-per-shard 5000 --workers 16 --max-image-side 1024
    python data_prep/shard.py --input data/stage1/qa.jsonl --output data/stage1/shards --kind qa
    python data_prep/shard.py --input data/stage2/mmeb.jsonl --output data/stage2/shards --kind mmeb \\
        --shuffle-seed 0 --prefix train

Manifest: JSON Lines (CSV and Parquet too for ``pair``, columns ``image``/``text`` or as named by
``--image-column``/``--text-column``; a ``key`` column is the key, other columns go to ``meta``).
Image paths are absolute or relative to the manifest's folder.  Record schemas and the sample
layout in the tars: ``data_prep/samples.py``.

Output in ``--output``:

* ``{prefix}-000000.tar`` … WebDataset shards; ``{prefix}-NNNNNN_stats.json`` per shard
  (samples, skipped rows with reasons, bytes, the fingerprint a rerun compares);
* ``sizes.json`` shard file name → sample count (open_clip's convention; ``pipeline.data``
  plans exact epochs from it; entries of other prefixes in the folder are kept);
* ``manifest.json`` brace pattern, totals, skipped rows by reason, arguments, tool version;
* ``errors.jsonl`` one line per skipped row: manifest line, key, reason, detail.

Behaviour:

* Rows are assigned to shards before validation (row ``i`` of the manifest, or of its
  permutation by ``--shuffle-seed``, goes to shard ``i // N``), so a shard's content depends only
  on its rows: shards are written in parallel, the tars are byte-identical whatever
  ``--workers`` is (fixed member mtime/uid/gid/mode, members sorted), and a shard with bad
  rows simply holds fewer than ``N`` samples.
* Bad rows (missing/unreadable/undecodable image, image under 8 px, empty text, schema
  violation, invalid JSON, text that is not UTF-8, duplicate key) are skipped and counted; ``--strict`` turns the
  first one into exit status 1 with the same message.  An unusable invocation (no such
  manifest, unknown column, unknown kind, …) exits 2 with one line.
* Each tar is written to a temporary name and renamed; its stats file is written last and
  marks it complete.  A rerun skips complete shards whose rows and settings are unchanged
  and redoes missing or partial ones (delete a ``_stats.json`` to force one shard again).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from queue import Empty
from typing import Any, Iterator, Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

import pipeline  # noqa: E402
from data_prep.cli import OneLineParser, RunError, StrictError, UsageError, run_cli  # noqa: E402
from data_prep.samples import KINDS, BadRow, record_to_sample  # noqa: E402
from data_prep.manifest import Row, read_manifest  # noqa: E402
from data_prep.tar_writer import TarOut  # noqa: E402
from pipeline.fileio import atomic_write_bytes  # noqa: E402
from pipeline.fileio import output_problem  # noqa: E402
from pipeline.imaging import reuse_image_memory  # noqa: E402
from pipeline.procs import exit_with_parent  # noqa: E402

FORMAT_VERSION = 1
# Common world sizes are powers of two up to 8 GPUs per node (times the node count); a shard
# count that is a multiple of 8 splits evenly over all of them.
WORLD_MULTIPLE = 8


# -------------------------------------------------------------------------------- shard work
@dataclass
class Settings:
    kind: str
    base_dir: str
    out_dir: str
    max_side: Optional[int]
    strict: bool
    manifest: str


@dataclass
class ShardTask:
    index: int
    name: str                 # "{prefix}-NNNNNN.tar"
    rows: list[Row]
    fingerprint: str


def shard_fingerprint(rows: list[Row], settings: Settings) -> str:
    """What a shard's content is a function of (besides the image files themselves): the
    settings, then per row its line, key, read-time verdict and raw text (unit/record
    separators keep the fields apart; raw rows are single lines)."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, settings.kind, settings.max_side, settings.base_dir]).encode())
    h.update("".join(f"{r.line}\x1f{r.key}\x1f{r.record.reason if isinstance(r.record, BadRow) else ''}"
                     f"\x1f{r.raw}\x1e" for r in rows).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def stats_path(out_dir: str, tar_name: str) -> str:
    return os.path.join(out_dir, tar_name[: -len(".tar")] + "_stats.json")


def is_complete(task: ShardTask, out_dir: str) -> bool:
    """A shard is complete when its stats file (written last) matches this run's rows and
    settings and the tar on disk has the size the stats recorded."""
    try:
        with open(stats_path(out_dir, task.name), encoding="utf-8") as f:
            stats = json.load(f)
        return (stats.get("fingerprint") == task.fingerprint
                and os.path.getsize(os.path.join(out_dir, task.name)) == stats.get("bytes"))
    except (OSError, ValueError):
        return False


_SETTINGS: Optional[Settings] = None
_PROGRESS = None  # callable(n) in-process, or a multiprocessing queue in pool workers


def _init_worker(settings: Settings, queue, parent_pid: Optional[int] = None) -> None:
    global _SETTINGS, _PROGRESS
    if parent_pid is not None:  # a pool worker: die with the main process (kill -9, the OOM killer)
        exit_with_parent(parent_pid)
    _SETTINGS, _PROGRESS = settings, queue
    reuse_image_memory()  # image after image is decoded here: keep Pillow's freed blocks


def _tick(n: int) -> None:
    if _PROGRESS is None or n == 0:
        return
    if callable(_PROGRESS):
        _PROGRESS(n)
    else:
        _PROGRESS.put(n)


def write_shard(task: ShardTask) -> dict:
    """Validate and convert a shard's rows, write the tar (tmp name → rename), then its stats."""
    s = _SETTINGS
    tar_path = os.path.join(s.out_dir, task.name)
    tmp = f"{tar_path}.tmp{os.getpid()}"
    errors, skipped, samples, pending = [], Counter(), 0, 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:  # few large writes, not one per sample
            tw = TarOut(f)
            for row in task.rows:
                try:
                    if isinstance(row.record, BadRow):
                        raise row.record
                    sample = record_to_sample(row.record, s.kind, row.key, row.line, s.base_dir, s.max_side)
                except BadRow as e:
                    if s.strict:
                        raise StrictError(f"{s.manifest}:{row.line}: {e.reason}: {e.detail}") from None
                    errors.append({"line": row.line, "key": row.key, "reason": e.reason,
                                   "detail": e.detail, "shard": task.name})
                    skipped[e.reason] += 1
                else:
                    tw.write(sample)
                    samples += 1
                pending += 1
                if pending == 32:
                    _tick(pending)
                    pending = 0
            tw.close()
        os.replace(tmp, tar_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _tick(pending)
    stats = {"shard": task.name, "index": task.index, "rows": len(task.rows), "samples": samples,
             "skipped": dict(sorted(skipped.items())), "errors": errors, "bytes": tw.size,
             "fingerprint": task.fingerprint, "format": FORMAT_VERSION}
    write_json_atomic(stats_path(s.out_dir, task.name), stats)
    return stats


def write_atomic(path: str | os.PathLike, data: bytes) -> bool:
    """Write via a temporary name + rename, unless the file already holds exactly ``data``
    (so a rerun leaves unchanged files, and their mtimes, alone).  True when written."""
    return atomic_write_bytes(path, data, skip_unchanged=True)


def json_utf8(text: str) -> bytes:
    """JSON text as UTF-8.  A lone surrogate (a manifest's ``"\\ud83d"``, half an emoji, quoted in
    an error detail) has no UTF-8 form: it is written as the JSON escape ``\\ud83d``, which
    reads back as the same string."""
    return text.encode("utf-8", "backslashreplace")


def write_json_atomic(path: str, obj: Any) -> bool:
    return write_atomic(path, json_utf8(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"))


def _run_tasks(tasks: list[ShardTask], settings: Settings, workers: int, bar) -> dict[str, dict]:
    """Write ``tasks`` in this process or a pool; returns each written shard's stats by name."""
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(settings, bar.update)
        return {t.name: write_shard(t) for t in tasks}
    # fork where available: workers inherit the parsed rows' module state and start at once.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    stop = threading.Event()

    # Progress ticks travel worker → main over `queue`.  The main process only ever reads it:
    # a main-side put would start a feeder thread that the interpreter joins at exit, and that
    # join hangs forever if a worker was terminated while holding the queue's write lock.
    def drain():  # until told to stop *and* nothing is left to read
        while True:
            try:
                # A short poll: the run's end waits for this thread's last one (a 50 ms poll
                # was a fifth of a 1,500-image run with --workers 2); 100 wake-ups/s cost nothing.
                bar.update(queue.get(timeout=0.01))
            except Empty:
                if stop.is_set():
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    # A ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (the OOM killer, a
    # segfault in an image library) Pool silently replaces it and waits forever for the lost
    # shard; the executor raises BrokenProcessPool, and the run stops with a message instead.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                               initargs=(settings, queue, os.getpid()))
    try:
        # Ordered: with --strict the error surfacing first is that of the earliest shard.
        written = {st["shard"]: st for st in pool.map(write_shard, tasks)}
        # Normal end: workers exit on their own, so their queued ticks are flushed.
        pool.shutdown(wait=True)
    except BrokenProcessPool:
        done = sum(is_complete(t, settings.out_dir) for t in tasks)
        raise RunError(f"a shard worker process died (killed by the system, e.g. out of memory?) after "
                       f"{done} of {len(tasks)} shard(s) were complete; they are kept: rerun the same "
                       f"command to write the rest (fewer --workers use less memory)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop.set()
        reader.join(timeout=5)  # daemon: a reader stuck on a half-written tick never blocks exit
    return written


# ------------------------------------------------------------------------------------ output
def brace_pattern(prefix: str, n: int) -> str:
    return f"{prefix}-000000.tar" if n == 1 else f"{prefix}-{{000000..{n - 1:06d}}}.tar"


def shard_count_advice(rows: int, n_shards: int) -> Optional[str]:
    """A warning when ``n_shards`` is not a multiple of :data:`WORLD_MULTIPLE`, with the
    ``--samples-per-shard`` that fixes it; None when it is fine."""
    if n_shards % WORLD_MULTIPLE == 0:
        return None
    msg = (f"{n_shards} shard(s) is not a multiple of {WORLD_MULTIPLE}: on 2, 4 or 8 GPUs per node "
           f"(x nodes) x DataLoader workers, ranks get unequal numbers of whole shards "
           f"(pipeline.data balances samples by reading partial shards; plain webdataset "
           f"split_by_node would not)")
    for m in sorted({WORLD_MULTIPLE * max(1, math.ceil(n_shards / WORLD_MULTIPLE)),
                     WORLD_MULTIPLE * max(1, n_shards // WORLD_MULTIPLE)}):
        spp = math.ceil(rows / m)
        if spp >= 1 and math.ceil(rows / spp) == m:
            return f"{msg}; --samples-per-shard {spp} gives {m} shards"
    return msg + f"; with {rows} rows no --samples-per-shard gives a multiple of {WORLD_MULTIPLE}"


def _merge_sizes(out_dir: str, prefix: str, sizes: dict[str, int]) -> dict[str, int]:
    path = os.path.join(out_dir, "sizes.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    ours = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    merged = {k: v for k, v in old.items() if not ours.match(k)}
    merged.update(sizes)
    return dict(sorted(merged.items()))


# -------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="manifest: .jsonl (any kind), .csv / .parquet (pair)")
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument("--kind", default="pair", choices=KINDS)
    p.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="K")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--shuffle-seed", type=int, default=None, metavar="S",
                   help="permute rows with this seed before cutting shards (default: manifest order)")
    p.add_argument("--max-image-side", type=int, default=None, metavar="PX",
                   help="re-encode images whose longer side exceeds PX (JPEG q95, aspect kept)")
    p.add_argument("--strict", action="store_true", help="exit 1 at the first row that would be skipped")
    p.add_argument("--image-column", default="image", help="CSV/Parquet image column (default: image)")
    p.add_argument("--text-column", default="text", help="CSV/Parquet caption column (default: text)")
    args = p.parse_args(argv)
    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.max_image_side is not None and args.max_image_side < 8:
        raise UsageError(f"--max-image-side must be >= 8 px, got {args.max_image_side}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", args.prefix):
        raise UsageError(f"--prefix {args.prefix!r}: use letters, digits, '_', '-', '.'")
    return args


def run(args: argparse.Namespace) -> int:
    manifest = Path(args.input)
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--output {out_dir} exists and is not a folder")
    if problem := output_problem(out_dir, folder=True):  # a read-only file system, a path under a file
        raise RunError(f"--output {out_dir} cannot be written: {problem}")
    rows = read_manifest(manifest, args.kind, args.image_column, args.text_column)
    settings = Settings(kind=args.kind, base_dir=str(manifest.resolve().parent), out_dir=out_dir,
                        max_side=args.max_image_side, strict=args.strict, manifest=str(manifest))

    order = list(range(len(rows)))
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(order)
    n = args.samples_per_shard
    tasks = []
    for i in range(0, len(order), n):
        chunk = [rows[j] for j in order[i:i + n]]
        tasks.append(ShardTask(i // n, f"{args.prefix}-{i // n:06d}.tar", chunk,
                               shard_fingerprint(chunk, settings)))

    # The parsed rows live until the end: move them out of the cyclic GC's generations so its
    # full passes stop re-walking millions of long-lived dicts, and forked workers don't dirty
    # (copy-on-write) the pages that hold them.
    gc.freeze()
    try:
        return _write(args, rows, tasks, settings, manifest, out_dir)
    except OSError as e:  # the disk filled up, the file system went read-only, ...: in this process or a worker
        where = e.filename or out_dir
        raise RunError(f"cannot write {where}: {e.strerror or e}; the shards already complete are kept: free space "
                       f"(or fix the output folder) and rerun the same command to write the rest") from None
    finally:
        gc.unfreeze()


def _image_paths(record: Any) -> Iterator[str]:
    """The image paths a manifest record names (``image`` keys at any depth)."""
    if isinstance(record, dict):
        for k, v in record.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from _image_paths(v)
    elif isinstance(record, list):
        for v in record:
            yield from _image_paths(v)


def warn_if_disk_too_small(todo: list[ShardTask], settings: Settings) -> None:
    """Estimate the shards' size from the image files of up to 256 rows spread over the run (the
    tars hold the original bytes, or fewer with --max-image-side) and warn when the output
    folder's file system has less free space: better now than a full disk hours later."""
    rows = [r for t in todo for r in t.rows]
    if not rows:
        return
    sample = rows[:: max(1, len(rows) // 256)]
    total = 0
    for r in sample:
        for p in _image_paths(r.record):
            with contextlib.suppress(OSError, ValueError):  # missing, or a name no file system can hold
                total += os.path.getsize(p if os.path.isabs(p) else os.path.join(settings.base_dir, p))
    expected = int(total / len(sample) * len(rows) * 1.02) + 3 * 512 * len(rows)  # + tar headers
    free = shutil.disk_usage(settings.out_dir).free
    if expected > free:
        print(f"warning: the shards will take about {expected / 2**30:.1f} GiB, but {settings.out_dir} has "
              f"{free / 2**30:.1f} GiB free; the run stops when the disk is full (what is complete is kept)",
              file=sys.stderr)


def _write(args, rows, tasks, settings, manifest, out_dir) -> int:
    """Write the shards not yet complete, then sizes.json, errors.jsonl and manifest.json."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # leftovers of an interrupted run
        if name.startswith(f"{args.prefix}-") and ".tmp" in name:
            os.unlink(os.path.join(out_dir, name))
    todo = [t for t in tasks if not is_complete(t, out_dir)]
    warn_if_disk_too_small(todo, settings)
    advice = shard_count_advice(len(rows), len(tasks))
    if advice:
        print(f"warning: {advice}", file=sys.stderr)

    t0 = time.perf_counter()
    with tqdm(total=len(rows), unit="sample", desc=f"shard {args.prefix}", disable=None,
              mininterval=0.5, smoothing=0.1) as bar:
        bar.update(sum(len(t.rows) for t in tasks) - sum(len(t.rows) for t in todo))
        written = _run_tasks(todo, settings, args.workers, bar)
    elapsed = time.perf_counter() - t0

    all_stats = []
    for t in tasks:  # this run's shards from memory, the ones a previous run completed from disk
        if t.name not in written:
            with open(stats_path(out_dir, t.name), encoding="utf-8") as f:
                written[t.name] = json.load(f)
        all_stats.append(written[t.name])
    sizes = {s["shard"]: s["samples"] for s in all_stats}
    skipped = Counter()
    for s in all_stats:
        skipped.update(s["skipped"])
    errors = sorted((e for s in all_stats for e in s["errors"]), key=lambda e: e["line"])
    total = sum(sizes.values())
    stale = sorted(f for f in os.listdir(out_dir)
                   if re.fullmatch(rf"{re.escape(args.prefix)}-\d{{6}}\.tar", f) and f not in sizes)

    write_atomic(os.path.join(out_dir, "errors.jsonl"),
                 json_utf8("".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors)))
    if total == 0:  # every row bad: no empty tars and no manifest pointing at them, only the reasons
        for t in tasks:
            for f in (os.path.join(out_dir, t.name), stats_path(out_dir, t.name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"error: no usable row in {manifest} ({reasons}); see {os.path.join(out_dir, 'errors.jsonl')}",
              file=sys.stderr)
        return 1
    write_json_atomic(os.path.join(out_dir, "sizes.json"), _merge_sizes(out_dir, args.prefix, sizes))
    write_json_atomic(os.path.join(out_dir, "manifest.json"), {
        "tool": "data_prep/shard.py", "version": pipeline.__version__, "format": FORMAT_VERSION,
        "kind": args.kind, "pattern": brace_pattern(args.prefix, len(tasks)), "shards": len(tasks),
        "samples": total, "rows": len(rows), "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()), "sizes": "sizes.json", "errors": "errors.jsonl",
        "args": {k: v for k, v in vars(args).items()},
    })

    done = len(todo)
    rate = sum(len(t.rows) for t in todo) / elapsed if done and elapsed > 0 else 0.0
    print(f"{total} {args.kind} samples in {len(tasks)} shards -> {out_dir}/{brace_pattern(args.prefix, len(tasks))} "
          f"({done} written at {rate:.0f} rows/s, {len(tasks) - done} already complete)")
    if skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} of {len(rows)} rows ({reasons}); "
              f"see {os.path.join(out_dir, 'errors.jsonl')}")
    if stale:
        print(f"warning: {len(stale)} older shard(s) beyond this run's {len(tasks)} remain in {out_dir} "
              f"(e.g. {stale[0]}); they are not in sizes.json, delete them", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 --strict or nothing usable, 2 usage)."""
    return run_cli(lambda a: run(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
