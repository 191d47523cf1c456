"""A folder of images with sidecar files or a CSV -> a ``pair`` or ``qa`` manifest (the simplest on-ramp).

    # pair, sidecar captions: photos/a.jpg + photos/a.txt (sub-folders are walked)
    python data_prep/from_folder.py --input photos --output data/mine/pairs.jsonl
    # pair, CSV with columns image,text (or image,caption); image paths relative to --input
    python data_prep/from_folder.py --input photos --csv captions.csv --output data/mine/pairs.jsonl
    # qa, CSV with columns image,question,answer: rows of one image become one multi-turn record
    python data_prep/from_folder.py --input photos --kind qa --csv qa.csv --output data/mine/qa.jsonl
    # qa, sidecar JSON: photos/a.json = [{"question": ..., "answer": ...}, ...]
    python data_prep/from_folder.py --input photos --kind qa --output data/mine/qa.jsonl

Images without a sidecar, sidecars that are empty or malformed, CSV rows with an empty cell or
a missing image are skipped, counted and listed with their location (``file:line N``).
Texts go through the placeholder contract (pipeline/prompts.py): a caption is about the whole
image, so an image marker in it is removed; the same holds for questions and answers.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

from data_prep.cli import run_cli  # noqa: E402
from data_prep.convert_common import (  # noqa: E402
    Parser,
    IMAGE_EXTS, ConversionLog, ManifestWriter, UsageError, add_common_args, finish, make_key,
    progress, resolve_image,
)
from pipeline.prompts import has_marker, strip_placeholders  # noqa: E402


def clean(text: Optional[str], log: ConversionLog, loc: str) -> str:
    text = (text or "").strip()
    if has_marker(text):
        log.note("image marker removed from a caption/turn", loc)
        text = strip_placeholders(text)
    return text


def walk_images(root: Path) -> list[Path]:
    out = []
    # Symlinked sub-folders are followed (``ln -s /data/coco/train2017 photos/coco`` is a common
    # way to assemble a folder; os.walk's default would skip them without a word); a folder
    # reached twice (a link loop, or two links to one folder) is walked once.  A link to a
    # folder inside the root is not followed: that folder is walked under its own name, so keys
    # do not depend on which of the two names sorts first.
    seen = set()
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _link_inside(os.path.join(dirpath, d), real_root))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_EXTS)
    return out


def _link_inside(path: str, real_root: str) -> bool:
    if not os.path.islink(path):
        return False
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def qa_turns(data, log: ConversionLog, loc: str) -> tuple[Optional[list], Optional[str]]:
    """Sidecar JSON -> conversations, or a reason why not."""
    if isinstance(data, dict):
        data = data.get("conversations")
    if not isinstance(data, list) or not data:
        return None, "expected a non-empty list of {question, answer}"
    turns = []
    for i, t in enumerate(data, 1):
        if not isinstance(t, dict) or not isinstance(t.get("question"), str) or not isinstance(t.get("answer"), str):
            return None, f"turn {i} is not {{'question': str, 'answer': str}}"
        q, a = clean(t["question"], log, loc), clean(t["answer"], log, loc)
        if not q or not a:
            return None, f"turn {i} has an empty question or answer"
        turns.append({"question": q, "answer": a})
    return turns, None


def from_sidecars(root: Path, kind: str, log: ConversionLog, writer: ManifestWriter) -> None:
    group = root.name or str(root)
    side_ext = ".txt" if kind == "pair" else ".json"
    for img in progress(walk_images(root), root.name, unit="image"):
        rel = img.relative_to(root)
        loc = rel.as_posix()
        key = make_key(rel.with_suffix("").as_posix())
        log.saw(group)
        side = img.with_suffix(side_ext)
        if not side.is_file():
            log.skip(group, loc, "no_sidecar", key, f"expected {side.relative_to(root).as_posix()}")
            continue
        rec = {"key": key, "image": str(Path(os.path.abspath(img))), "meta": {"source": loc}}
        if kind == "pair":
            # utf-8-sig: Notepad's byte-order mark would otherwise start the caption, unseen.
            text = clean(side.read_text(encoding="utf-8-sig", errors="replace"), log, loc)
            if not text:
                log.skip(group, loc, "empty_text", key, f"{side.name} is empty")
                continue
            rec["text"] = text
        else:
            try:
                data = json.loads(side.read_text(encoding="utf-8-sig"))
            except (ValueError, UnicodeDecodeError) as e:
                log.skip(group, side.relative_to(root).as_posix(), "invalid_json", key, str(e))
                continue
            turns, why = qa_turns(data, log, loc)
            if turns is None:
                log.skip(group, side.relative_to(root).as_posix(), "schema", key, why)
                continue
            rec["conversations"] = turns
        writer.write(rec, group, loc)


def csv_rows(reader: csv.DictReader, csv_path: Path):
    """The rows of ``reader``; a CSV syntax error stops the run naming the line."""
    try:
        yield from reader
    except csv.Error as e:
        # The reader cannot resynchronise after this (typically an unclosed quote that swallowed
        # the rest of the file into one cell), so the run stops; no manifest is written.
        # line_num still counts the lines of the last complete row, so the bad row starts after it.
        raise UsageError(f"{csv_path}:line {reader.line_num + 1}: {e}; check the quoting of the row starting "
                         "there (an unclosed \" joins every following line into one cell)") from None


def from_csv(root: Path, csv_path: Path, kind: str, log: ConversionLog, writer: ManifestWriter) -> None:
    group = csv_path.name
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise glue
    # itself to the first column name.  surrogateescape: a Latin-1 cell skips its row
    # (ManifestWriter.write) instead of stopping the run.
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        text_col = next((c for c in ("text", "caption") if c in cols), None)
        need = ["image", "question", "answer"] if kind == "qa" else ["image", text_col or "text"]
        missing = [c for c in need if c not in cols]
        if missing:
            alt = " (or 'caption')" if kind == "pair" and missing[-1] == "text" else ""
            raise UsageError(f"{csv_path}: no column {missing[0]!r}{alt}; found {cols}; a {kind} CSV needs "
                             f"the header {','.join(need)}")
        groups: dict[str, dict] = {}  # qa: one record per image, in first-appearance order
        for row in progress(csv_rows(reader, csv_path), csv_path.name):
            loc = f"{csv_path.name}:line {reader.line_num}"
            log.saw(group)
            image = (row.get("image") or "").strip()
            path = resolve_image(image, root)
            key = make_key(Path(image).with_suffix("").as_posix()) if image else None
            if path is None:
                log.skip(group, loc, "schema", key, "empty image cell")
                continue
            if not os.path.isfile(path):
                log.skip(group, loc, "missing_image", key, f"{path} does not exist")
                continue
            if kind == "pair":
                text = clean(row.get(text_col), log, loc)
                if not text:
                    log.skip(group, loc, "empty_text", key, "empty caption")
                    continue
                writer.write({"key": key, "image": path, "text": text, "meta": {"source": loc}}, group, loc)
                continue
            q, a = clean(row.get("question"), log, loc), clean(row.get("answer"), log, loc)
            if not q or not a:
                log.skip(group, loc, "empty_text", key, "empty question or answer")
                continue
            rec = groups.setdefault(path, {"key": key, "image": path, "conversations": [],
                                                "meta": {"source": loc}})
            rec["conversations"].append({"question": q, "answer": a})
        for rec in groups.values():
            writer.write(rec, group, rec["meta"]["source"])


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--input", required=True, metavar="DIR", help="the image folder (CSV image paths are relative to it)")
    p.add_argument("--kind", choices=["pair", "qa"], default="pair")
    p.add_argument("--csv", default=None, help="CSV with a header: image,text (pair) or image,question,answer (qa)")
    add_common_args(p)
    args = p.parse_args(argv)

    root = Path(args.input)
    if not root.is_dir():
        raise UsageError(f"--input {root}: no such folder")
    if args.csv and not Path(args.csv).is_file():
        raise UsageError(f"--csv {args.csv}: no such file")
    log = ConversionLog(strict=args.strict)
    with ManifestWriter(args.output, log) as writer:
        if args.csv:
            from_csv(root, Path(args.csv), args.kind, log, writer)
        else:
            from_sidecars(root, args.kind, log, writer)
    return finish(args, log, writer, args.kind, "from_folder")


if __name__ == "__main__":
    sys.exit(run_cli(main))
