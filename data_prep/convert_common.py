"""Shared plumbing of the ``data_prep/from_*.py`` converters.

Every converter reads a public format, writes a manifest that ``data_prep/shard.py`` reads
(JSON Lines, one record per line, see ``issues show 2``) and then either prints the
``shard.py`` command to run next or, with ``--shard DIR``, runs it.  What they share lives here:

* :class:`ConversionLog` -- rows that cannot be converted are skipped, counted by reason and
  listed with their source location (``file:line`` / ``file:row``), exactly like ``shard.py``
  does for manifest lines; ``--strict`` turns the first one into exit status 1.
* :class:`ManifestWriter` -- atomic manifest writing (temporary name, ``os.replace`` once
  complete, so an interrupted conversion never leaves a half manifest that looks finished)
  and unique WebDataset keys.
* :func:`finish` -- the summary table, the skipped-rows list beside the manifest
  (``<manifest>.skipped.jsonl``), the ``shard.py`` command and ``--shard``.
* the CLI conventions (:mod:`data_prep.cli`): an unusable invocation exits 2 with one line
  naming what to fix, ``--strict`` exits 1 at the first skipped row.

Image paths go into the manifest as absolute paths: the manifest then stays valid wherever
it is moved, and ``shard.py`` never has to guess which root a relative path meant.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

from data_prep.cli import OneLineParser, StrictError, UsageError
from data_prep.samples import sanitize_key
from pipeline.fileio import atomic_write_text, output_problem

REPO = Path(__file__).resolve().parent.parent
SHARD_SCRIPT = REPO / "data_prep" / "shard.py"

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

def printable(text: Any) -> Any:
    """``text`` with lone surrogates (undecodable bytes of a file name or a non-UTF-8 input, as
    Python carries them) spelled ``\\udce9``, so that the summary table and the skipped-rows
    list, both UTF-8, can always be written."""
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_unicode_field(obj: Any, where: str = "") -> Optional[tuple[str, str]]:
    """``(field, text)`` of the first field of a record (``image``,
    ``conversations[0].question``) whose text cannot be written as UTF-8, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "value", obj
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = bad_unicode_field(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def make_key(*parts: Any) -> str:
    """A WebDataset-safe key (``[A-Za-z0-9_-]+``) built from source identifiers."""
    raw = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    return sanitize_key(raw) or "sample"


class ConversionLog:
    """Counts rows read / written / skipped per group (a subset, a shard, an input file) and
    keeps every skipped row with its location so the user can find and fix it."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.read: Counter = Counter()
        self.written: Counter = Counter()
        self.skipped_by_group: Counter = Counter()
        self.reasons: Counter = Counter()
        self.notes: Counter = Counter()
        self.note_examples: dict[str, str] = {}
        self.skipped: list[dict] = []

    def saw(self, group: str, n: int = 1) -> None:
        self.read[group] += n

    def wrote(self, group: str) -> None:
        self.written[group] += 1

    def skip(self, group: str, location: str, reason: str, key: Optional[str] = None,
             detail: Optional[str] = None) -> None:
        """Record a row that is left out.  ``reason`` is a short stable category (it is what
        gets counted); ``detail`` says what exactly was wrong with this row."""
        location, key, detail = printable(location), printable(key), printable(detail)
        self.skipped_by_group[group] += 1
        self.reasons[reason] += 1
        entry = {"location": location, "key": key, "reason": reason}
        if detail:
            entry["detail"] = detail
        self.skipped.append(entry)
        if self.strict:
            raise StrictError(f"{location}: {reason}" + (f" ({detail})" if detail else ""))

    def note(self, what: str, location: str, n: int = 1) -> None:
        """Something changed in a row that was still written (e.g. a marker with no image
        was removed, a duplicate key renamed), or rows left out on purpose (a cap): counted,
        first location kept."""
        self.notes[what] += n
        self.note_examples.setdefault(what, printable(location))

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped_by_group.values())

    def table(self) -> str:
        """The end-of-run summary: one row per group, then the skip reasons and notes."""
        groups = sorted(set(self.read) | set(self.written) | set(self.skipped_by_group))
        width = max([len("source"), len("total")] + [len(g) for g in groups])
        lines = [f"{'source':<{width}}  {'read':>9}  {'written':>9}  {'skipped':>9}"]
        lines.append("-" * len(lines[0]))
        for g in groups:
            lines.append(f"{g:<{width}}  {self.read[g]:>9}  {self.written[g]:>9}  {self.skipped_by_group[g]:>9}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'total':<{width}}  {sum(self.read.values()):>9}  {self.total_written:>9}  "
                     f"{self.total_skipped:>9}")
        if self.reasons:
            first = {}
            for s in self.skipped:
                first.setdefault(s["reason"], s["location"])
            lines.append("")
            lines.append("skipped rows by reason (first occurrence):")
            for reason, n in self.reasons.most_common():
                lines.append(f"  {n:>9}  {reason}   e.g. {first[reason]}")
        if self.notes:
            lines.append("")
            lines.append("notes (rows kept but changed, rows left out on purpose):")
            for what, n in self.notes.most_common():
                lines.append(f"  {n:>9}  {what}   e.g. {self.note_examples[what]}")
        return "\n".join(lines)


class ManifestWriter:
    """Writes manifest records to ``path`` atomically and keeps keys unique.

    Records are written to ``path.tmp`` and renamed over ``path`` when the ``with`` block
    ends; an exception inside the block removes the temporary file and leaves any previous
    manifest untouched, and so does a run that wrote no record at all (a rerun whose input
    vanished must not replace a finished manifest with an empty one): ``committed`` says
    which happened.
    """

    def __init__(self, path: str | os.PathLike, log: ConversionLog):
        self.path = Path(path)
        self.log = log
        self.keys: set[str] = set()
        self.per_task: Counter = Counter()
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = None
        self.committed = False

    def __enter__(self) -> "ManifestWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._tmp, "wb")
        return self

    def write(self, record: dict, group: str, location: str) -> Optional[str]:
        """Write one record; returns the key it got (``record['key']`` made unique), or None
        when the record holds text that is not valid Unicode (skipped as ``invalid_unicode``)."""
        key = record.get("key") or make_key(group, self.log.written[group])
        try:
            # A non-UTF-8 file name or input line reaches here as lone surrogates
            # (surrogateescape), and a JSON "\ud83d" escape (an emoji cut in half) as one too:
            # neither can go into a UTF-8 manifest, so the row is skipped, not the run.
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            field, text = bad_unicode_field(record) or ("a field", "")
            self.log.skip(group, location, "invalid_unicode", key,
                          f"{field} {text[:120]!r} is not valid UTF-8 text: "
                          "re-encode the input as UTF-8 (e.g. iconv -f latin1 -t utf-8) or rename the file")
            return None
        if key in self.keys:
            # Public data has duplicate ids (and distinct ids can sanitise to the same key);
            # WebDataset needs unique keys, so the later row gets a suffix instead of being lost.
            n = 1
            while f"{key}_dup{n}" in self.keys:
                n += 1
            key = f"{key}_dup{n}"
            self.log.note("duplicate key renamed", location)
        self.keys.add(key)
        if key != record.get("key"):
            record["key"] = key
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._fh.write(line)
        self.log.wrote(group)
        if "task" in record:
            self.per_task[record["task"]] += 1
        return key

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is None and self.log.total_written:
            os.replace(self._tmp, self.path)
            self.committed = True
        else:
            self._tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- input helpers
def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "row"):
    """A tqdm bar on stderr (rows/s); updated at most every 2 s so it stays readable in SLURM logs."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=2.0, file=sys.stderr,
                disable=os.environ.get("COMA_NO_PROGRESS") == "1")


def resolve_image(path: Any, root: Path | str) -> Optional[str]:
    """``path`` (absolute, or relative to ``root``) as an absolute path string, None if empty.
    Plain ``os.path`` on purpose: this runs once per image of a million-row input, and
    ``pathlib`` objects cost a third of a converter's time there (benchmarks/convert.py)."""
    if path is None:
        return None
    path = str(path).strip()
    if not path:
        return None
    return os.path.abspath(os.path.join(root, os.path.expanduser(path)))


def read_json_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, record)`` from a JSON list file or a JSON Lines file.

    A JSON Lines line that does not parse is yielded as ``(location, JSONError)`` so the caller
    can skip and count it; a ``.json`` file that does not parse at all is a usage error (there
    is no row to skip, the whole input is unusable).

    Bytes that are not UTF-8 (a Latin-1 caption in a 200,000-line file) come through as lone
    surrogates, so only the records holding them are skipped (:meth:`ManifestWriter.write`),
    not the whole run; a leading byte-order mark (Windows tools write one) is dropped.
    """
    name = path.name
    enc = dict(encoding="utf-8-sig", errors="surrogateescape")
    with open(path, "r", **enc) as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("[") or (path.suffix != ".jsonl" and not _holds_json_lines(path, enc)):
        try:
            with open(path, "r", **enc) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             "expected a JSON list of records or a .jsonl file with one record per line")
        if isinstance(data, dict):
            # A few releases wrap the list: {"data": [...]} / {"annotations": [...]}.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UsageError(f"{path}: expected a JSON list of records, found an object with keys "
                                 f"{sorted(data)[:8]}")
            data = lists[0]
        if not isinstance(data, list):
            raise UsageError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
        for i, rec in enumerate(data, 1):
            yield f"{name}:record {i}", rec
        return
    with open(path, "r", **enc) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{name}:line {lineno}", JSONError(e.msg)
                continue
            yield f"{name}:line {lineno}", rec


def read_records(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, record)`` from a Parquet file (one record per row, nested columns as
    lists and dicts; how the Hugging Face Hub stores and converts data sets) or, for any other
    suffix, from JSON / JSON Lines (:func:`read_json_records`)."""
    if path.suffix != ".parquet":
        yield from read_json_records(path)
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UsageError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path.name}:row {row}", rec


def _holds_json_lines(path: Path, enc: dict) -> bool:
    """Whatever the suffix (a ``.json`` file often holds JSON Lines, which the authors' loader,
    ``datasets``' json builder, reads as such): JSON Lines when the first non-empty line is a
    whole JSON object and more lines follow; else one JSON document (a list, a wrapper object,
    pretty-printed or minified)."""
    with open(path, "r", **enc) as fh:
        lines = (line for line in fh if line.strip())
        first = next(lines, "").strip()
        if not first.startswith("{"):
            return False
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return False
        return next(lines, None) is not None


class JSONError:
    """A JSON Lines line that did not parse (yielded instead of raising)."""

    def __init__(self, msg: str):
        self.msg = msg


# ------------------------------------------------------------------------------------- CLI
class Parser(OneLineParser):
    """shard.py's convention (data_prep/cli.py), plus the --shard-args check."""

    def __init__(self, doc: str):
        super().__init__(description=doc.strip().split("\n")[0], epilog=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        try:  # checked before converting anything, not after an hour of work
            shlex.split(getattr(ns, "shard_args", "") or "")
        except ValueError as e:
            raise UsageError(f"--shard-args {ns.shard_args!r}: {e}") from None
        out = getattr(ns, "output", None)
        if out is not None:
            out = Path(out)
            if out.is_dir():
                raise UsageError(f"--output {out}: is a folder; --output names the manifest file to write, "
                                 f"e.g. {out / 'manifest.jsonl'}")
            if problem := output_problem(out, folder=False):
                raise UsageError(f"--output {out}: {problem}; choose another path")
            sources = getattr(ns, "input", None)
            sources = (sources if isinstance(sources, list) else [sources]) + [getattr(ns, "csv", None)]
            for src in sources:
                # The manifest replaces --output at the end: it would replace the input itself.
                if src is not None and Path(src).is_file() and Path(src).resolve() == out.resolve():
                    raise UsageError(f"--output {out}: is the input file; write the manifest elsewhere")
        shard = getattr(ns, "shard", None)
        if shard is not None and (problem := output_problem(shard, folder=True)):
            raise UsageError(f"--shard {shard}: {problem}; --shard names the folder the shards are written to")
        return ns


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, metavar="MANIFEST",
                   help="manifest to write (JSON Lines), the --input of data_prep/shard.py")
    p.add_argument("--strict", action="store_true",
                   help="stop with exit status 1 at the first row that cannot be converted")
    p.add_argument("--shard", metavar="DIR", default=None,
                   help="run data_prep/shard.py on the manifest right away, writing shards to DIR")
    p.add_argument("--shard-args", default="", metavar="'ARGS'",
                   help="extra shard.py arguments, one quoted string, e.g. "
                        "\"--samples-per-shard 2000 --workers 16\"")


def shard_command(manifest: Path, out_dir: str, kind: str, extra: str = "") -> list[str]:
    try:
        extra_args = shlex.split(extra)
    except ValueError as e:
        raise UsageError(f"--shard-args {extra!r}: {e}") from None
    return [sys.executable, str(SHARD_SCRIPT), "--input", str(manifest), "--output", str(out_dir),
            "--kind", kind] + extra_args


def finish(args: argparse.Namespace, log: ConversionLog, writer: ManifestWriter, kind: str,
           title: str) -> int:
    """Print the summary, write the skipped-rows list, print / run the shard.py command."""
    manifest = writer.path
    skipped_path = manifest.with_name(manifest.name + ".skipped.jsonl")
    # A run that wrote nothing keeps an earlier run's manifest, and the skipped list that goes with it.
    kept = not writer.committed and manifest.exists()
    if not kept:
        atomic_write_text(skipped_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in log.skipped))

    print(f"\n{title}: {log.total_written} {kind} records -> {manifest if writer.committed else 'no manifest written'}")
    print(log.table())
    if writer.per_task and len(writer.per_task) > 1:
        print("\nrecords per task: " + ", ".join(f"{t}={n}" for t, n in sorted(writer.per_task.items())))
    if log.skipped and not kept:
        print(f"\n{log.total_skipped} skipped rows listed in {skipped_path}")
    if not writer.committed:
        inputs = " ".join(map(str, args.input)) if isinstance(args.input, list) else args.input
        print(f"error: no record could be converted from {inputs}; see the reasons above"
              + (f"; the manifest of an earlier run, {manifest}, is left as it was" if kept else ""), file=sys.stderr)
        return 1

    out_dir = args.shard or str(manifest.with_name(manifest.stem + "-shards"))
    cmd = shard_command(manifest, out_dir, kind, args.shard_args)
    rel = os.path.relpath(SHARD_SCRIPT)
    shown = ["python", str(SHARD_SCRIPT) if rel.startswith("..") else rel] + cmd[2:]
    if not args.shard:
        print("\nnext, write the shards:\n  " + shlex.join(shown))
        return 0
    print("\nrunning: " + shlex.join(shown), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"error: shard.py exited with status {rc}; the manifest {manifest} is complete, "
              f"rerun the command above to resume (finished shards are kept)", file=sys.stderr)
    return rc
