"""A local copy of MMEB-train -> an ``mmeb`` manifest (stage 2, contrastive matching).

    # the paper's recipe: 20 subsets, per-subset caps summing to 1,103,000
    python data_prep/from_mmeb_train.py --input data/MMEB-train --paper-caps \
        --output data/stage2/mmeb.jsonl --shard data/stage2/shards \
        --shard-args "--samples-per-shard 2000 --workers 16"
    # a few subsets, own caps
    python data_prep/from_mmeb_train.py --input data/MMEB-train --subsets ImageNet_1K,MSCOCO_t2i \
        --cap ImageNet_1K=100000 --output data/stage2/small.jsonl

Input layout (``git clone https://huggingface.co/datasets/TIGER-Lab/MMEB-train`` + its
``unzip_file.py``): one folder per subset holding Parquet (or JSON Lines) files whose rows have
``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` and optionally ``neg_text``,
``neg_image_path``; image paths are relative to the images root (``--image-root``, default
the input folder).  ``--split`` picks the files of one split (``original``, the one the paper
and VLM2Vec train on, or ``diverse_instruction``); a folder holding a single split uses it
whatever its name.

Output, one record per usable row::

    {"key": "ImageNet_1K-0000042", "task": "ImageNet_1K",
     "query": {"text": "<image> Represent the given image for classification", "image": "/abs/q.jpg"},
     "positive": {"text": "tench", "image": null},
     "negatives": [{"text": ..., "image": ...}],          # only when neg_* is present
     "meta": {"source": "ImageNet_1K/original-00000-of-00001.parquet:row 43", "subset": "ImageNet_1K"}}

The subset name is the ``task``, which the loader uses for task-homogeneous sub-batches.  The
instruction text stays with the query/positive exactly as MMEB wrote it; only its image
marker ``<|image_1|>`` is rewritten to the canonical ``<image>`` (pipeline/prompts.py), and a
marker on a side with no image is removed.  Rows whose query or positive is empty or whose
image file is missing are skipped; a hard negative with a missing image is dropped (the row is
kept and the drop counted).

Caps: when a subset has more rows than its cap, the rows kept are the first ``cap`` of
``numpy.random.default_rng(seed).permutation(rows)`` with ``--seed 42`` -- the same rows the
reference code selects (``datasets.Dataset.shuffle(seed=42).select(range(cap))``, which draws
exactly that permutation), provided the files are read in the same (sorted) order.
"""
from __future__ import annotations

import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

import numpy as np  # noqa: E402

from data_prep.cli import run_cli  # noqa: E402
from data_prep.convert_common import (  # noqa: E402
    Parser,
    ConversionLog, JSONError, ManifestWriter, UsageError, add_common_args, finish, make_key,
    progress, read_json_records, resolve_image,
)
from pipeline.prompts import has_marker, normalize_placeholders, strip_placeholders  # noqa: E402

# Per-subset caps of the paper's stage-2 run (1,103,000 in all).  Source: the authors'
# released training config, scripts/train_ret.yaml (``num_sample_per_subset``) in
# github.com/Trustworthy-Information-Access/CoMa; the paper's text gives only the total
# (~1.1M pairs).  A subset with fewer rows than its cap contributes all of its rows, so the
# real total is lower: the summary table prints it.
PAPER_CAPS: dict[str, int] = {
    "ImageNet_1K": 100_000,
    "N24News": 50_000,
    "HatefulMemes": 10_000,
    "VOC2007": 10_000,
    "SUN397": 20_000,
    "OK-VQA": 10_000,
    "A-OKVQA": 20_000,
    "DocVQA": 40_000,
    "InfographicsVQA": 25_000,
    "ChartQA": 28_000,
    "Visual7W": 70_000,
    "VisDial": 130_000,
    "CIRR": 30_000,
    "VisualNews_t2i": 100_000,
    "VisualNews_i2t": 100_000,
    "MSCOCO_t2i": 100_000,
    "MSCOCO_i2t": 120_000,
    "NIGHTS": 20_000,
    "WebQA": 20_000,
    "MSCOCO": 100_000,
}
PAPER_SEED = 42  # the reference code's shuffle seed for the caps

REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
OPTIONAL = ("neg_text", "neg_image_path")
DATA_EXTS = (".parquet", ".jsonl", ".json")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


def subset_files(folder: Path, split: str) -> list[Path]:
    """The data files of ``split`` in a subset folder, sorted (the order ``datasets`` reads them).

    Files are grouped by split name, ``original-00000-of-00002.parquet`` -> ``original``.  A
    folder holding a single split (e.g. older copies' ``train-*.parquet``) uses it whatever its
    name; a folder with several splits but not the requested one is an error rather than a
    silent mix of splits."""
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in DATA_EXTS:
            groups.setdefault(_SHARD_SUFFIX.sub("", f.stem), []).append(f)
    if split in groups:
        return groups[split]
    if len(groups) == 1:
        return next(iter(groups.values()))
    raise UsageError(f"{folder}: no {split!r} split among {sorted(groups)}; choose one with --split")


def discover_subsets(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and d.name != "images" and any(f.suffix in DATA_EXTS for f in d.iterdir()))


def read_rows(files: list[Path], root: Path) -> list[tuple[str, Any]]:
    """All rows of one subset as ``(location, dict | JSONError)``, files in sorted order."""
    rows: list[tuple[str, Any]] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise UsageError(f"{f}: not a readable Parquet file ({e})")
            missing = [c for c in REQUIRED if c not in schema.names]
            if missing:
                raise UsageError(f"{f}: no column {missing[0]!r} (has {schema.names}); MMEB-train rows need "
                                 f"{list(REQUIRED)}")
            cols = [c for c in REQUIRED + OPTIONAL if c in schema.names]
            try:
                table = pq.read_table(f, columns=cols).to_pylist()
            except Exception as e:  # noqa: BLE001 - a readable footer does not mean readable pages
                raise UsageError(f"{f}: not a readable Parquet file ({' '.join(str(e).split())}); "
                                 "download it again")
            rows.extend((f"{rel}:row {i + 1}", r) for i, r in enumerate(table))
        else:
            for loc, rec in read_json_records(f):
                rows.append((f"{f.parent.name}/{loc}", rec))
    return rows


def make_side(text: Any, image: Any, image_root: Path, what: str, loc: str, log: ConversionLog
              ) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """One MMEB side -> ``{"text", "image"}`` or a skip reason."""
    text = text if isinstance(text, str) and text.strip() else None
    path = resolve_image(image, image_root) if isinstance(image, str) else None
    if path is not None and not os.path.isfile(path):
        return None, ("missing_image", f"{what}: {path} does not exist")
    if text is not None:
        if path is not None:
            text = normalize_placeholders(text)
        elif has_marker(text):
            text = strip_placeholders(text) or None
            log.note(f"image marker without an image removed ({what})", loc)
    if text is None and path is None:
        return None, (f"empty_{what}", f"the {what} has neither text nor image")
    return {"text": text, "image": path}, None


def as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def convert_row(row: Any, task: str, image_root: Path, loc: str, log: ConversionLog
                ) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    if not isinstance(row, dict):
        return None, ("schema", f"a row must be a JSON object, got {type(row).__name__}")
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        return None, ("schema", f"no field {missing[0]!r}")
    for c in REQUIRED:
        # A number where a path or text belongs would otherwise read as "no image" / "no text":
        # the row would be kept with its image silently dropped.
        if row[c] is not None and not isinstance(row[c], str):
            return None, ("schema", f"{c!r} is {type(row[c]).__name__} {str(row[c])[:60]!r}, expected text")
    query, why = make_side(row["qry"], row["qry_image_path"], image_root, "query", loc, log)
    if query is None:
        return None, why
    pos, why = make_side(row["pos_text"], row["pos_image_path"], image_root, "positive", loc, log)
    if pos is None:
        return None, why
    out = {"task": task, "query": query, "positive": pos}
    texts, images = as_list(row.get("neg_text")), as_list(row.get("neg_image_path"))
    negatives = []
    for i in range(max(len(texts), len(images))):
        t = texts[i] if i < len(texts) else None
        im = images[i] if i < len(images) else None
        if not (isinstance(t, str) and t.strip()) and not (isinstance(im, str) and im.strip()):
            continue  # MMEB fills absent negatives with empty strings
        neg, why = make_side(t, im, image_root, "negative", loc, log)
        if neg is None:
            log.note(f"hard negative dropped ({why[0]})", loc)
            continue
        negatives.append(neg)
    if negatives:
        out["negatives"] = negatives
    return out, None


def parse_caps(items: list[str], subsets: list[str]) -> dict[str, int]:
    caps = {}
    for item in items:
        name, sep, n = item.partition("=")
        if not sep or not n.strip().lstrip("-").isdigit():
            raise UsageError(f"--cap {item!r}: expected SUBSET=N, e.g. --cap ImageNet_1K=100000")
        if name not in subsets:
            raise UsageError(f"--cap {item!r}: {name!r} is not among the selected subsets ({', '.join(subsets)})")
        if int(n) < 0:
            raise UsageError(f"--cap {item!r}: the cap must be >= 0")
        caps[name] = int(n)
    return caps


def select_rows(n_rows: int, cap: Optional[int], seed: int) -> list[int]:
    """Indices of the rows kept: all, or the reference code's seeded permutation cut to ``cap``."""
    if cap is None or cap >= n_rows:
        return list(range(n_rows))
    return np.random.default_rng(seed).permutation(n_rows)[:cap].tolist()


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--input", required=True, metavar="DIR", help="the MMEB-train folder (one folder per subset)")
    p.add_argument("--image-root", default=None, help="root of the image paths (default: --input)")
    p.add_argument("--subsets", default=None,
                   help="comma-separated subset names (default: the paper's 20 with --paper-caps, "
                        "otherwise every subset folder found)")
    p.add_argument("--cap", action="append", default=[], metavar="SUBSET=N",
                   help="keep at most N rows of SUBSET (repeatable); overrides --paper-caps for that subset")
    p.add_argument("--paper-caps", action="store_true",
                   help="the paper's per-subset caps (20 subsets, 1,103,000 rows at most)")
    p.add_argument("--split", default="original", help="file-name prefix of the split to read (default: original)")
    p.add_argument("--seed", type=int, default=PAPER_SEED, help="seed of the capped row selection (default: 42)")
    p.add_argument("--no-negatives", action="store_true", help="ignore neg_text / neg_image_path")
    add_common_args(p)
    args = p.parse_args(argv)

    root = Path(args.input)
    if not root.is_dir():
        raise UsageError(f"--input {root}: no such folder (expected the MMEB-train folder, one folder per subset)")
    image_root = Path(args.image_root) if args.image_root else root
    if not image_root.is_dir():
        raise UsageError(f"--image-root {image_root}: no such folder")
    found = discover_subsets(root)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0 (numpy's generator takes no negative seed)")
    if args.subsets:
        subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
        twice = next((s for i, s in enumerate(subsets) if s in subsets[:i]), None)
        if twice:  # converted twice, every row of it would be in the manifest twice
            raise UsageError(f"--subsets: {twice!r} is listed twice")
    elif args.paper_caps:
        subsets = list(PAPER_CAPS)
    else:
        subsets = found
    if not subsets:
        raise UsageError(f"--input {root}: no subset folder with {'/'.join(DATA_EXTS)} files")
    absent = [s for s in subsets if s not in found]
    if absent:
        raise UsageError(f"subset {absent[0]!r} has no folder with data files under {root} "
                         f"(found: {', '.join(found) or 'none'}); pass --subsets to choose among them")
    caps = {s: PAPER_CAPS[s] for s in subsets if args.paper_caps and s in PAPER_CAPS}
    caps.update(parse_caps(args.cap, subsets))

    log = ConversionLog(strict=args.strict)
    with ManifestWriter(args.output, log) as writer:
        for task in subsets:
            rows = read_rows(subset_files(root / task, args.split), root)
            keep = select_rows(len(rows), caps.get(task), args.seed)
            log.saw(task, len(keep))
            for idx in progress(keep, task):
                loc, row = rows[idx]
                key = make_key(task, f"{idx:07d}")
                if isinstance(row, JSONError):
                    log.skip(task, loc, "invalid_json", key, row.msg)
                    continue
                if args.no_negatives and isinstance(row, dict):
                    row = {k: v for k, v in row.items() if k not in OPTIONAL}
                out, why = convert_row(row, task, image_root, loc, log)
                if out is None:
                    log.skip(task, loc, why[0], key, why[1])
                    continue
                out["key"] = key
                out["meta"] = {"source": loc, "subset": task}
                writer.write(out, task, loc)
            if len(keep) < len(rows):
                log.note("rows beyond a subset's cap (not read)", f"{task}: kept {len(keep)} of {len(rows)}",
                         len(rows) - len(keep))
            elif caps.get(task) is not None and len(rows) < caps[task]:
                log.note("subsets smaller than their cap (all rows kept)", f"{task}: {len(rows)} < {caps[task]}")
    return finish(args, log, writer, "mmeb", "from_mmeb_train")


if __name__ == "__main__":
    sys.exit(run_cli(main))
