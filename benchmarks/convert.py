"""Converter throughput beside a bare baseline in the same run.

    python benchmarks/convert.py                 # 20,000 MMEB rows + 20,000 LLaVA records (~30 s on 2 cores)
    python benchmarks/convert.py --rows 200000   # closer to a real subset

The converters' work per row is reading the row, checking its image file(s) exist, rewriting
the placeholder and writing one JSON line.  The baseline does only the unavoidable part of that
(read the rows, ``os.path.isfile`` each image path, ``json.dumps`` a dict per row to a file), so
the ratio says what the converter's bookkeeping (skip log, keys, placeholder contract, atomic
manifest) costs on top.  The images are 1-byte files: file-system metadata cost is what matters.

Prints a table and writes ``benchmarks/results/convert.csv`` and ``convert.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")
os.environ.setdefault("COMA_NO_PROGRESS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data_prep import from_llava, from_mmeb_train  # noqa: E402


def build_fixture(root: Path, rows: int, n_images: int) -> None:
    img_dir = root / "MMEB-train" / "images" / "Sub"
    img_dir.mkdir(parents=True)
    for i in range(n_images):
        (img_dir / f"{i}.jpg").write_bytes(b"x")
    sub = root / "MMEB-train" / "Sub"
    sub.mkdir()
    pq.write_table(pa.table({
        "qry": ["<|image_1|> Represent the given image for classification"] * rows,
        "qry_image_path": [f"images/Sub/{i % n_images}.jpg" for i in range(rows)],
        "pos_text": [f"class {i % 1000}" for i in range(rows)],
        "pos_image_path": [""] * rows,
        "neg_text": [""] * rows,
        "neg_image_path": [""] * rows}), sub / "original-00000-of-00001.parquet")
    recs = [{"id": f"r{i}", "image": f"images/Sub/{i % n_images}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"thing {i}"},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "red"}]} for i in range(rows)]
    with open(root / "llava.jsonl", "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def bare_mmeb(root: Path, out: Path) -> int:
    table = pq.read_table(root / "MMEB-train" / "Sub" / "original-00000-of-00001.parquet").to_pylist()
    base = root / "MMEB-train"
    n = 0
    with open(out, "w") as fh:
        for r in table:
            p = os.path.join(base, r["qry_image_path"])
            if os.path.isfile(p):
                fh.write(json.dumps({"query": {"text": r["qry"], "image": p},
                                     "positive": {"text": r["pos_text"], "image": None}}) + "\n")
                n += 1
    return n


def bare_llava(root: Path, out: Path) -> int:
    base = root / "MMEB-train"
    n = 0
    with open(root / "llava.jsonl") as src, open(out, "w") as fh:
        for line in src:
            r = json.loads(line)
            p = os.path.join(base, r["image"])
            if os.path.isfile(p):
                c = r["conversations"]
                fh.write(json.dumps({"image": p, "conversations": [
                    {"question": c[i]["value"], "answer": c[i + 1]["value"]} for i in range(0, len(c), 2)]}) + "\n")
                n += 1
    return n


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--images", type=int, default=5_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_fixture(root, args.rows, args.images)
        devnull = open(os.devnull, "w")
        stdout = sys.stdout

        def quiet(fn):
            def run():
                sys.stdout = devnull
                try:
                    assert fn() == 0
                finally:
                    sys.stdout = stdout
            return run

        cases = [
            ("from_mmeb_train", quiet(lambda: from_mmeb_train.main(
                ["--input", str(root / "MMEB-train"), "--output", str(root / "m.jsonl")])),
             lambda: bare_mmeb(root, root / "bm.jsonl")),
            ("from_llava", quiet(lambda: from_llava.main(
                ["--input", str(root / "llava.jsonl"), "--image-root", str(root / "MMEB-train"),
                 "--output", str(root / "l.jsonl")])),
             lambda: bare_llava(root, root / "bl.jsonl")),
        ]
        for name, conv, bare in cases:
            t_bare = timed(bare, args.repeats)
            t_conv = timed(conv, args.repeats)
            results.append({"converter": name, "rows": args.rows,
                            "converter_rows_per_s": round(args.rows / t_conv),
                            "baseline_rows_per_s": round(args.rows / t_bare),
                            "ratio": round(t_bare / t_conv, 3)})

    print(f"{'converter':<18} {'rows':>8} {'converter rows/s':>17} {'bare loop rows/s':>17} {'ratio':>6}")
    for r in results:
        print(f"{r['converter']:<18} {r['rows']:>8} {r['converter_rows_per_s']:>17} {r['baseline_rows_per_s']:>17} "
              f"{r['ratio']:>6.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "convert.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    (out / "convert.json").write_text(json.dumps({"results": results, "env": meta}, indent=2) + "\n")
    print(f"wrote {out / 'convert.csv'} and {out / 'convert.json'}")


if __name__ == "__main__":
    main()
