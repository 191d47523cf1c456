"""The bundled real dataset: scikit-learn's handwritten digits → pair / qa / mmeb / eval shards.

    python data_prep/builtin.py --output data/builtin          # a few seconds; rerun = no-op

scikit-learn ships 1,797 scans of handwritten digits (8x8 px, 16 grey levels) inside the
package, so this needs no download.  Each scan is upscaled to a 56x56 RGB PNG (dark-blue ink on
white; 56 px = 4x4 patches of 14 px, so a Qwen2-VL processor gives a handful of tokens).  A
fixed-seed, per-digit (stratified) split sends 1/6 of the images to evaluation; no image is
in both splits, and train records only ever name train images (negatives included).

Written to ``--output``::

    images/digit-0000.png …          the images (index = scikit-learn's)
    pair.jsonl  qa.jsonl  mmeb.jsonl  eval.jsonl     the manifests (data_prep/shard.py's input)
    shards/{pair,qa,mmeb}/train-{000000..000007}.tar  shards/eval/eval-{000000..000007}.tar
    builtin.json                     what is where (patterns, counts, tasks, the split)

Manifests (texts are templated from the labels):

* ``pair``  image + "a handwritten digit seven"
* ``qa``    image + 3 turns: "Which digit is written here?" / "seven", "Is the digit even or
  odd?" / "odd", and one of: greater than four? / as a numeral / the digit after it
* ``mmeb``  per train image three tasks: ``digits_t2i`` (caption → image, one hard-negative image
  of another digit), ``digits_i2t`` (image → caption, one negative caption) and ``digits_cls``
  (image + question → the digit's name, the other 9 names as negatives)
* ``eval``  the same three tasks (``mmeb`` kind) on the held-out images, each with 9 negatives
  (one per other digit), so positive + negatives is the full 10-way candidate set

A rerun rewrites nothing that is unchanged (images and manifests are compared byte for byte,
shard.py skips complete shards).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep import shard  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 56
EVAL_FRACTION = 1 / 6
SHARDS_PER_SET = 8           # a multiple of the common world sizes (shard.py warns otherwise)
INK = np.array([20, 40, 120], dtype=np.float32)  # dark blue on white: real RGB, still legible
T2I_TEMPLATES = ["A handwritten digit {}.", "Find the image of the handwritten number {}.",
                 "A scanned digit: {}."]
I2T_QUERY = "<image> Represent the given handwritten digit for retrieving its caption."
CLS_QUERY = "<image> Which digit is written here? Answer with its name."
# name → (shard.py --kind, shard prefix)
SETS = {"pair": ("pair", "train"), "qa": ("qa", "train"), "mmeb": ("mmeb", "train"),
        "eval": ("mmeb", "eval")}


def render(scan: np.ndarray, size: int = IMAGE_SIZE) -> bytes:
    """One 8x8 scan (values 0..16) → PNG bytes of a ``size``x``size`` RGB image."""
    a = (scan.astype(np.float32) / 16.0)[..., None]
    rgb = (255.0 * (1.0 - a) + INK * a).round().astype(np.uint8)
    img = Image.fromarray(rgb, mode="RGB").resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def split(labels: np.ndarray, seed: int) -> tuple[list[int], list[int]]:
    """Stratified train / eval indices (each sorted): 1/6 of every digit's images to eval."""
    rng = random.Random(seed)
    train, ev = [], []
    for d in range(10):
        idx = [int(i) for i in np.flatnonzero(labels == d)]
        rng.shuffle(idx)
        n_eval = round(len(idx) * EVAL_FRACTION)
        ev += idx[:n_eval]
        train += idx[n_eval:]
    return sorted(train), sorted(ev)


def image_path(i: int) -> str:
    return f"images/digit-{i:04d}.png"


def manifests(labels: np.ndarray, train: list[int], ev: list[int], seed: int) -> dict[str, list[dict]]:
    """The four manifests' records (see module docstring)."""
    rng = random.Random(seed + 1)
    by_digit_train = {d: [i for i in train if labels[i] == d] for d in range(10)}
    by_digit_eval = {d: [i for i in ev if labels[i] == d] for d in range(10)}
    out: dict[str, list[dict]] = {"pair": [], "qa": [], "mmeb": [], "eval": []}

    for i in train:
        d = int(labels[i])
        name, meta = NAMES[d], {"label": d, "index": i}
        out["pair"].append({"key": f"digits-pair-{i:04d}", "image": image_path(i),
                            "text": f"a handwritten digit {name}", "meta": meta})
        extra = [("Is the digit greater than four?", "yes" if d > 4 else "no"),
                 ("Write the digit as a numeral.", str(d)),
                 ("Which digit comes right after this one?", NAMES[d + 1] if d < 9 else "ten")][i % 3]
        out["qa"].append({"key": f"digits-qa-{i:04d}", "image": image_path(i), "meta": meta,
                          "conversations": [
                              {"question": "Which digit is written here?", "answer": name},
                              {"question": "Is the digit even or odd?", "answer": "odd" if d % 2 else "even"},
                              {"question": extra[0], "answer": extra[1]}]})
        other = rng.choice([x for x in range(10) if x != d])
        out["mmeb"] += [
            {"key": f"digits-t2i-{i:04d}", "task": "digits_t2i", "meta": meta,
             "query": {"text": T2I_TEMPLATES[i % 3].format(name), "image": None},
             "positive": {"text": None, "image": image_path(i)},
             "negatives": [{"text": None, "image": image_path(rng.choice(by_digit_train[other]))}]},
            {"key": f"digits-i2t-{i:04d}", "task": "digits_i2t", "meta": meta,
             "query": {"text": I2T_QUERY, "image": image_path(i)},
             "positive": {"text": f"A handwritten digit {name}.", "image": None},
             "negatives": [{"text": f"A handwritten digit {NAMES[other]}.", "image": None}]},
            {"key": f"digits-cls-{i:04d}", "task": "digits_cls", "meta": meta,
             "query": {"text": CLS_QUERY, "image": image_path(i)},
             "positive": {"text": name, "image": None},
             "negatives": [{"text": n, "image": None} for n in NAMES if n != name]},
        ]

    for i in ev:
        d = int(labels[i])
        name, meta = NAMES[d], {"label": d, "index": i}
        others = [x for x in range(10) if x != d]
        out["eval"] += [
            {"key": f"digits-eval-t2i-{i:04d}", "task": "digits_t2i", "meta": meta,
             "query": {"text": T2I_TEMPLATES[0].format(name), "image": None},
             "positive": {"text": None, "image": image_path(i)},
             "negatives": [{"text": None, "image": image_path(rng.choice(by_digit_eval[x]))} for x in others]},
            {"key": f"digits-eval-i2t-{i:04d}", "task": "digits_i2t", "meta": meta,
             "query": {"text": I2T_QUERY, "image": image_path(i)},
             "positive": {"text": f"A handwritten digit {name}.", "image": None},
             "negatives": [{"text": f"A handwritten digit {NAMES[x]}.", "image": None} for x in others]},
            {"key": f"digits-eval-cls-{i:04d}", "task": "digits_cls", "meta": meta,
             "query": {"text": CLS_QUERY, "image": image_path(i)},
             "positive": {"text": name, "image": None},
             "negatives": [{"text": NAMES[x], "image": None} for x in others]},
        ]
    return out


def build(output: str | os.PathLike, workers: int = 2, seed: int = 0) -> dict:
    """Write images, manifests and shards under ``output``; return the ``builtin.json`` summary
    (paths in it are relative to ``output``; :func:`sources` makes them absolute)."""
    from sklearn.datasets import load_digits

    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    labels = digits.target
    for i, scan in enumerate(digits.images):
        shard.write_atomic(out / image_path(i), render(scan))
    train, ev = split(labels, seed)
    records = manifests(labels, train, ev, seed)

    summary = {"dataset": "scikit-learn load_digits", "image_size": IMAGE_SIZE, "seed": seed,
               "train_images": len(train), "eval_images": len(ev), "sets": {}}
    for name, (kind, prefix) in SETS.items():
        rows = records[name]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        shard.write_atomic(out / f"{name}.jsonl", text.encode("utf-8"))
        shard_dir = out / "shards" / name
        spp = -(-len(rows) // SHARDS_PER_SET)
        argv = ["--input", str(out / f"{name}.jsonl"), "--output", str(shard_dir), "--kind", kind,
                "--prefix", prefix, "--samples-per-shard", str(spp), "--workers", str(workers)]
        if prefix == "train":
            argv += ["--shuffle-seed", str(seed)]  # mix tasks/digits across shards
        rc = shard.main(argv)
        if rc != 0:
            raise RuntimeError(f"data_prep/shard.py {' '.join(argv)} exited with status {rc}")
        with open(shard_dir / "manifest.json", encoding="utf-8") as f:
            m = json.load(f)
        tasks = sorted({r["task"] for r in rows if "task" in r})
        summary["sets"][name] = {"kind": kind, "manifest": f"{name}.jsonl",
                                 "shards": f"shards/{name}/{m['pattern']}", "samples": m["samples"],
                                 "num_shards": m["shards"], **({"tasks": tasks} if tasks else {})}
    shard.write_atomic(out / "builtin.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    return summary


def sources(output: str | os.PathLike) -> dict[str, dict]:
    """``{set name: {"kind", "shards" (absolute brace pattern), "samples", …}}`` of a built
    folder, for ``pipeline.data.open_shards``."""
    out = Path(output)
    with open(out / "builtin.json", encoding="utf-8") as f:
        summary = json.load(f)
    return {name: dict(s, shards=str(out / s["shards"])) for name, s in summary["sets"].items()}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="folder to write (created; a rerun is a no-op)")
    ap.add_argument("--workers", type=int, default=2, help="shard.py worker processes")
    ap.add_argument("--seed", type=int, default=0, help="train/eval split and negatives")
    args = ap.parse_args(argv)
    summary = build(args.output, workers=args.workers, seed=args.seed)
    print(f"builtin digits: {summary['train_images']} train / {summary['eval_images']} eval images -> {args.output}")
    for name, s in summary["sets"].items():
        print(f"  {name:<5} {s['kind']:<5} {s['samples']:>5} samples  {s['shards']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
