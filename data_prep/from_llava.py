"""LLaVA-style conversation JSON / JSONL -> a ``qa`` manifest (stage 1, compression pre-training).

    python data_prep/from_llava.py --input data/coma_stage1_qa.jsonl \
        --image-root data/vlm2vec_train/MMEB-train --output data/stage1/qa.jsonl
    python data_prep/from_llava.py ... --shard data/stage1/shards --shard-args "--samples-per-shard 1000 --workers 16"

Input: a JSON list, JSON Lines (whatever the suffix) or Parquet file of records (the format of the
paper's released stage-1 QA data, 404-not-founds/CoMa_{3B,7B}_SFT, and of LLaVA's instruction data)::

    {"id": "...", "image": "sub/dir/a.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt",   "value": "A cat."}, ...]}

Output: one ``qa`` record per usable input record (see ``issues show 2``)::

    {"key": ..., "image": "/abs/a.jpg", "conversations": [{"question": ..., "answer": ...}, ...],
     "meta": {"source": "file:line N", "id": ...}}

Rules (the placeholder contract is pipeline/prompts.py): in a ``qa`` sample the image is the
input X that gets compressed, and the dialogue only ever sees it through the compression
tokens, so the ``<image>`` marker has no place in a question and is removed from every turn.
Human turns become questions, the gpt turn that follows becomes the answer; a record whose
turns do not alternate human, gpt, human, gpt, ... (or ends on a question) is skipped, as are
records without exactly one image, with a missing image file, or with an empty turn.
``"user"``/``"assistant"`` are accepted as synonyms of ``"human"``/``"gpt"``, and the
``{"message": [{"from", "content"}]}`` spelling written by the reference code's QA-generation
scripts (data_prepare/auto_a.py) as a synonym of ``conversations``/``value``.
"""
from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

from data_prep.cli import run_cli  # noqa: E402
from data_prep.convert_common import (  # noqa: E402
    Parser,
    ConversionLog, JSONError, ManifestWriter, UsageError, add_common_args, finish, make_key,
    progress, read_records, resolve_image,
)
from pipeline.prompts import has_marker, strip_placeholders  # noqa: E402

_ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def convert_record(rec: Any, image_root: Path) -> tuple[Optional[dict], Optional[tuple[str, str]], list[str]]:
    """One LLaVA record -> ``(qa record, None, notes)`` or ``(None, (reason, detail), [])``."""
    if not isinstance(rec, dict):
        return None, ("schema", f"a record must be a JSON object, got {type(rec).__name__}"), []
    image = rec.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            return None, ("multiple_images", f"{len(image)} images; a qa sample holds one"), []
        image = image[0]
    if image is None or (isinstance(image, str) and not image.strip()):
        return None, ("no_image", "text-only record"), []
    if not isinstance(image, str):
        return None, ("schema", f"'image' is {type(image).__name__}, expected a path"), []
    path = resolve_image(image, image_root)
    if not os.path.isfile(path):
        return None, ("missing_image", f"{path} does not exist"), []

    turns = rec.get("conversations", rec.get("message", rec.get("messages")))
    if not isinstance(turns, list) or not turns:
        return None, ("schema", "'conversations' missing or empty"), []
    notes: list[str] = []
    values = []
    for i, t in enumerate(turns):
        value = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if not isinstance(value, str):
            return None, ("schema", f"turn {i + 1} has no string 'value'"), []
        role = _ROLE.get(str(t.get("from", "")).lower())
        if role is None:
            return None, ("turns_not_alternating", f"turn {i + 1} is from {t.get('from')!r}"), []
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            return None, ("turns_not_alternating", f"turn {i + 1} is from {t.get('from')!r}, expected {expected!r}"), []
        if has_marker(value):
            if i != 0:
                notes.append("image marker outside the first question removed")
            value = strip_placeholders(value)
        values.append(value.strip())
    if len(turns) % 2:
        return None, ("turns_not_alternating", f"{len(turns)} turns: the last question has no answer"), []
    for i, v in enumerate(values):
        if not v:
            return None, ("empty_text", f"turn {i + 1} is empty"), []
    conversations = [{"question": values[i], "answer": values[i + 1]} for i in range(0, len(values), 2)]
    out = {"image": path, "conversations": conversations}
    return out, None, notes


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="LLaVA-style .json (a list), .jsonl or .parquet file(s) (the released CoMa_*_SFT data)")
    p.add_argument("--image-root", default=None,
                   help="folder relative image paths are resolved against (default: the input's folder)")
    add_common_args(p)
    args = p.parse_args(argv)

    inputs = [Path(x) for x in args.input]
    for i, f in enumerate(inputs):
        if not f.is_file():
            raise UsageError(f"--input {f}: no such file")
        if f.resolve() in [g.resolve() for g in inputs[:i]]:  # its records would all be in twice
            raise UsageError(f"--input {f}: given twice")
    log = ConversionLog(strict=args.strict)
    with ManifestWriter(args.output, log) as writer:
        for f in inputs:
            root = Path(args.image_root) if args.image_root else f.parent
            if not root.is_dir():
                raise UsageError(f"--image-root {root}: no such folder")
            group = f.name
            for n, (loc, rec) in enumerate(progress(read_records(f), f.name)):
                log.saw(group)
                rid = rec.get("id") if isinstance(rec, dict) else None
                key = make_key(rid) if rid is not None else make_key(f.stem, n)
                if isinstance(rec, JSONError):
                    log.skip(group, loc, "invalid_json", None, rec.msg)
                    continue
                out, why, notes = convert_record(rec, root)
                if out is None:
                    log.skip(group, loc, why[0], key, why[1])
                    continue
                for what in notes:
                    log.note(what, loc)
                out["key"] = key
                out["meta"] = {"source": loc, "id": rid}
                writer.write(out, group, loc)
    return finish(args, log, writer, "qa", "from_llava")


if __name__ == "__main__":
    sys.exit(run_cli(main))
