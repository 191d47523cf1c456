"""Reading a manifest for data_prep/shard.py: JSON Lines, CSV or Parquet → one :class:`Row` per
record, each either parsed or already a ``BadRow`` (invalid JSON, text that is not UTF-8, a
duplicate key), so a bad row is counted and skipped instead of ending the run.  An unusable file
(missing, a folder, an unknown column, binary Parquet columns) is a ``UsageError`` naming it.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.cli import UsageError
from data_prep.samples import BadRow, record_key


@dataclass(slots=True)
class Row:
    line: int                 # 1-based manifest line (CSV: line where the row ends; Parquet: row)
    record: Any               # the parsed record, or a BadRow found while reading (JSON, duplicate)
    raw: str                  # the row as read: what a shard's fingerprint covers
    key: str


def read_manifest(path: Path, kind: str, image_column: str = "image", text_column: str = "text") -> list[Row]:
    """Parse every row of a JSON Lines / CSV / Parquet manifest (see module docstring)."""
    if not path.exists():
        raise UsageError(f"--input {path}: no such manifest")
    if path.is_dir():
        raise UsageError(f"--input {path} is a folder; pass the manifest file (.jsonl/.csv/.parquet)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        if kind != "pair":
            raise UsageError(f"--input {path}: CSV/Parquet manifests hold --kind pair only; "
                             f"write {kind} records as JSON Lines")
        rows = _read_table(path, image_column, text_column)
    else:
        rows = _read_jsonl(path)
    if not rows:
        raise UsageError(f"--input {path}: the manifest has no records")
    seen: dict[str, int] = {}
    for r in rows:  # keys must be unique: WebDataset groups tar members by key
        if isinstance(r.record, BadRow):
            continue
        if r.key in seen:
            r.record = BadRow("duplicate_key", f"key {r.key!r} already used on line {seen[r.key]}")
        else:
            seen[r.key] = r.line
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON Lines file.  A line that is not UTF-8 (a Latin-1 byte from an old export)
    is one bad row, not the end of the run (surrogateescape keeps its bytes, the regex finds
    them); a byte-order mark (Windows editors, Excel) does not make line 1 invalid; any newline
    convention reads (text mode)."""
    rows, stem = [], path.stem
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line, text in enumerate(f, 1):
            text = text.strip()
            if not text:
                continue
            bad = None if text.isascii() else _UNDECODABLE.search(text)  # isascii: a flag, O(1)
            if bad:
                record = BadRow("invalid_unicode", f"byte 0x{ord(bad.group()) - 0xDC00:02x} at column "
                                                   f"{bad.start() + 1} is not UTF-8; re-save the manifest as UTF-8")
            else:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    record = BadRow("invalid_json", f"{e.msg} (column {e.colno})")
            rows.append(Row(line, record, text, record_key(record, line, stem)))
    return rows


def _read_table(path: Path, image_column: str, text_column: str) -> list[Row]:
    if path.suffix.lower() == ".csv":
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark; surrogateescape: a cell that
        # is not UTF-8 becomes one bad row (below) instead of stopping the run
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            try:
                columns = list(reader.fieldnames or [])
                _check_columns(path, columns, image_column, text_column)
                table = [(reader.line_num, row) for row in reader]
            except csv.Error as e:
                raise UsageError(f"--input {path}:{reader.line_num + 1}: not readable as CSV ({e}); "
                                 f"check the quoting around that line") from None
    else:
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
        except Exception as e:
            raise UsageError(f"--input {path}: not a readable Parquet file ({e})") from None
        columns = list(t.column_names)
        _check_columns(path, columns, image_column, text_column)
        _check_parquet_meta(path, t.schema, (image_column, text_column, "key"))
        table = list(enumerate(t.to_pylist(), 1))
    rows = []
    for line, row in table:
        bad = [c for c, v in row.items() if isinstance(v, str) and _UNDECODABLE.search(v)]
        if bad:
            record = BadRow("invalid_unicode", f"column(s) {bad} are not UTF-8; re-save the manifest as UTF-8")
            raw = json.dumps(row, sort_keys=True, default=str)  # ASCII: the fingerprint still covers it
            rows.append(Row(line, record, raw, record_key(None, line, path.stem)))
            continue
        record = {"image": row[image_column], "text": row[text_column]}
        if row.get("key") not in (None, ""):
            record["key"] = str(row["key"])
        meta = {c: row[c] for c in columns if c not in (image_column, text_column, "key")}
        if meta:
            # Parquet columns arrive as Python objects (datetime, Decimal, timedelta): the sample
            # JSON holds them as text, timestamps as ISO 8601.
            record["meta"] = json.loads(json.dumps(meta, default=_json_scalar, ensure_ascii=False))
        raw = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
        rows.append(Row(line, record, raw, record_key(record, line, path.stem)))
    return rows


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under surrogateescape


def _json_scalar(value: Any) -> str:
    """A Parquet value JSON has no type for: dates and times as ISO 8601, the rest as ``str``."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _check_parquet_meta(path: Path, schema, used: tuple) -> None:
    """Every extra column becomes sample metadata (JSON): a binary column (embedded image or
    feature bytes, often megabytes per row) would bloat every sample, so it is refused up front."""
    import pyarrow as pa

    def is_binary(t) -> bool:
        if pa.types.is_dictionary(t):  # dictionary-encoded: the values' type is what lands in meta
            t = t.value_type
        return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
                or getattr(pa.types, "is_binary_view", lambda _: False)(t))

    binary = [f.name for f in schema if f.name not in used and is_binary(f.type)]
    if binary:
        raise UsageError(f"--input {path}: column(s) {binary} hold binary data, which cannot go into a "
                         f"sample's JSON metadata; write the manifest without them (images are read "
                         f"from the paths in the image column)")


def _check_columns(path: Path, columns: list[str], image_column: str, text_column: str) -> None:
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise UsageError(f"--input {path}: unknown column(s) {missing}; the file has {columns} "
                         f"(name the right ones with --image-column/--text-column)")
