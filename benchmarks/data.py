"""Data throughput: shard writing and loading, each beside a bare baseline in the same run.

    python benchmarks/data.py                          # bundled digits + 300 synthetic 512x512 JPEGs
    python benchmarks/data.py --synthetic 1000 --repeats 5 --work-dir /tmp/bench-data

Rows (one process unless ``workers`` says otherwise): samples/s from the best of ``--repeats``
interleaved rounds; ``ratio`` = the median over rounds of the baseline's time / the row's time
in the same round (paired, so a slow spell of a shared machine cancels; ``ratio_of_best`` in the
JSON is the ratio of the two best times, for comparison):

* ``decode_loop``   bare baseline: read each image file and decode it with PIL
* ``shard.py``      ``data_prep/shard.py --workers 1`` on the same images (read, decode-validate,
                    tar write, stats); target >= 80% of ``decode_loop`` per worker
* ``shard.py x2``   ``--workers 2`` (ratio per worker, for information)
* ``webdataset``    bare baseline: ``webdataset.WebDataset(shards).decode("pil")`` iteration
* ``loader``        ``pipeline.data.open_shards`` (plan, shuffle buffer, decode to RGB PIL,
                    batches of 32), ``num_workers=0``; target >= 90% of ``webdataset``
* ``loader x2``     the same with 2 DataLoader workers (for information)
* ``webdataset_tarwriter``  bare baseline: ``webdataset.TarWriter`` writing the shards' samples
                    (already in memory) to an in-memory file
* ``tar_writer``    data_prep/tar_writer.py's ``TarOut`` writing the same samples: why shard.py
                    keeps its own writer (a ratio above 1 is the margin)

Datasets: the bundled digits (``pair`` set: 1,498 56x56 PNGs, per-sample overhead dominates)
and synthetic 512x512 JPEGs (decode dominates).  Results: a table on stdout,
``benchmarks/results/data.json`` and ``data.csv`` (with the machine and versions).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_jpegs(folder: Path, n: int, side: int = 512, seed: int = 0) -> Path:
    """``n`` photo-like JPEGs (smooth random colour fields + grain, quality 90) and their
    ``pair`` manifest; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "pairs.jsonl"
    if manifest.exists() and len(manifest.read_text().splitlines()) == n:
        return manifest
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        px = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(folder / f"syn{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"syn{i:05d}.jpg", "text": f"synthetic image {i}"}))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def image_paths(manifest: Path) -> list[str]:
    return [str(manifest.parent / json.loads(line)["image"]) for line in manifest.read_text().splitlines()]


def round_times(fns: dict, repeats: int) -> dict:
    """Wall times of each callable per round, in interleaved rounds (baseline, candidates, then
    the next round) so that load from other processes hits every side alike; the order within a
    round rotates so no side always runs right after the heaviest one."""
    times: dict = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order[r % len(order):] + order[: r % len(order)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict, what: str, base: str) -> float:
    """Median over rounds of (baseline time / candidate time) within each round: a slow spell
    of this shared machine lands on both sides of one round and cancels, where a ratio of two
    best-of times can pair one side's lucky round with the other's unlucky one (it read 0.73
    and 1.04 for the same code)."""
    return statistics.median(b / c for b, c in zip(times[base], times[what]))


def bench_dataset(name: str, manifest: Path, work: Path, repeats: int) -> list[dict]:
    import contextlib

    import webdataset as wds

    from data_prep import shard
    from pipeline.data import open_shards

    paths = image_paths(manifest)
    n = len(paths)
    out = work / f"shards-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"shards-{name}-x2", ignore_errors=True)

    def decode_loop():
        for p in paths:
            with open(p, "rb") as f:
                Image.open(io.BytesIO(f.read())).load()

    def run_shard(workers, dest):
        rounds = iter(range(10**6))

        def go():  # a fresh output folder each round; deleting the last one is not timed
            d = dest / f"r{next(rounds)}"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = shard.main(["--input", str(manifest), "--output", str(d), "--kind", "pair",
                                 "--samples-per-shard", str(max(1, n // 8)), "--workers", str(workers)])
            assert rc == 0
        return go

    write = round_times({"decode_loop": decode_loop, "shard.py": run_shard(1, out),
                        "shard.py x2": run_shard(2, work / f"shards-{name}-x2")}, repeats)
    urls = sorted(str(p) for p in (out / "r0").glob("train-*.tar"))

    def plain_wds():
        for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
            pass

    def ours(workers):
        def go():
            for _ in open_shards(urls, kind="pair", batch_size=32, rank=0, world_size=1,
                                  num_workers=workers, drop_last=False):
                pass
        return go

    read = round_times({"webdataset": plain_wds, "loader": ours(0), "loader x2": ours(2)}, repeats)
    tar = round_times(tar_writers(urls), repeats)
    rows = []
    for stage, times, base, workers in (("write", write, "decode_loop", {"shard.py x2": 2}),
                                        ("read", read, "webdataset", {"loader x2": 2}),
                                        ("tar", tar, "webdataset_tarwriter", {})):
        for what, t in times.items():
            w = workers.get(what, 1 if stage != "read" else 0)
            per = w if stage == "write" else 1  # shard.py's ratio is per worker
            rows.append({"dataset": name, "stage": stage, "what": what, "workers": w, "samples": n,
                         "samples_per_s": n / min(t), "ratio": paired_ratio(times, what, base) / per,
                         "ratio_of_best": min(times[base]) / min(t) / per, "rounds": len(t)})
    return rows


def tar_writers(urls: list[str]) -> dict:
    """The two tar writers over the same samples, read into memory first (not timed): members
    grouped by key as ``{"__key__": key, ext: bytes}``, in the shards' order."""
    import tarfile

    import webdataset as wds

    from data_prep.tar_writer import TarOut

    samples: list[dict] = []
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tf.extractfile(m).read()

    def theirs():
        w = wds.TarWriter(io.BytesIO(), encoder=False, mtime=0)
        for s in samples:
            w.write(s)
        w.close()

    def ours():
        out = TarOut(io.BytesIO())
        for s in samples:
            out.write(s)
        out.close()

    return {"webdataset_tarwriter": theirs, "tar_writer": ours}


def machine() -> dict:
    import PIL
    import torch
    import webdataset

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "platform": platform.platform(), "pillow": PIL.__version__, "webdataset": webdataset.__version__,
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", type=int, default=300, help="number of synthetic 512x512 JPEGs")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)

    from data_prep.builtin import build

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="coma-bench-data-"))
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        build(work / "builtin", workers=2)
    datasets = {"digits-56px-png": work / "builtin" / "pair.jsonl",
                f"synthetic-{args.synthetic}x512px-jpeg": synthetic_jpegs(work / "synthetic", args.synthetic)}
    rows = []
    for name, manifest in datasets.items():
        rows += bench_dataset(name, manifest, work, args.repeats)

    print(f"{'dataset':<30} {'stage':<6} {'what':<20} {'samples/s':>10} {'ratio':>7}  target")
    for r in rows:
        target = {"shard.py": ">= 0.80 per worker", "loader": ">= 0.90", "tar_writer": "> 1 to keep it"}.get(
            r["what"], "")
        print(f"{r['dataset']:<30} {r['stage']:<6} {r['what']:<20} {r['samples_per_s']:>10.0f} "
              f"{r['ratio']:>7.2f}  {target}")
    info = machine()
    print(f"\n{info['cpus']} CPUs, load average {info['load_avg_1m']:.1f} at the end; "
          f"torch {info['torch']}, webdataset {info['webdataset']}, pillow {info['pillow']}")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "data.json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    with open(RESULTS / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(info))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **info})
    print(f"results: {RESULTS / 'data.json'}, {RESULTS / 'data.csv'}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
