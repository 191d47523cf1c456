"""img2dataset output -> a ``pair`` manifest (image + caption), re-sharded by ``shard.py``.

    python data_prep/from_img2dataset.py --input data/cc3m_img2dataset --output data/cc3m/pairs.jsonl \
        --shard data/cc3m/shards --shard-args "--samples-per-shard 5000 --workers 16"

img2dataset writes, per shard ``NNNNN``, either ``NNNNN.tar`` (``--output_format webdataset``),
a folder ``NNNNN/`` (``files``) or ``NNNNN.parquet`` with the image bytes in a ``jpg``/``png``/
``webp`` column (``parquet``); beside the first two it writes ``NNNNN.parquet`` with one metadata
row per *attempted* URL (``key``, ``status``, ``error_message``, ``url``, ...) and
``NNNNN_stats.json``.  Rows whose ``status`` is not ``success`` (failed downloads and resizes,
which img2dataset lists in the metadata but does not store) are skipped and counted under their status (e.g. ``failed_to_download``)
with their metadata row as location; a ``success`` row whose sample is absent from the shard
is reported as ``missing_from_shard``.  Samples with no image or an empty caption are skipped.

The manifest refers to images by path, so images held inside tars or Parquet files are
extracted to ``--image-dir`` (default ``<manifest folder>/<manifest name>-images/``, one folder
per source shard).  Extraction is resumable: a file already there with the same size is not
rewritten.  Output records::

    {"key": "000010023", "image": "/abs/00001/000010023.jpg", "text": "a caption",
     "meta": {"source": "00001.tar:000010023", "url": ..., "width": ..., "height": ...}}

``shard.py`` then validates every image by decoding it and writes this project's layout with
its stats.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator, Optional

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

from data_prep.cli import RunError, run_cli  # noqa: E402
from data_prep.convert_common import (  # noqa: E402
    Parser,
    IMAGE_EXTS, ConversionLog, ManifestWriter, UsageError, add_common_args, finish, make_key, progress,
)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
META_KEYS = ("url", "width", "height", "original_width", "original_height", "sha256")


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a WebDataset tar as ``(key, {ext: bytes})``; members of one key are adjacent.
    A truncated or corrupt tar raises ``tarfile.TarError`` after the samples read so far."""
    key, files = None, {}
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            k, _, ext = base.partition(".")
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext.lower()] = tf.extractfile(m).read()
    if files:
        yield key, files


def read_metadata(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    cols = [c for c in ("key", "status", "error_message", "caption") if c in names]
    return pq.read_table(path, columns=cols).to_pylist()


def write_image(dst: Path, data: bytes) -> None:
    """Atomic and resumable: a complete file of the same size is kept as it is."""
    if dst.is_file() and dst.stat().st_size == len(data):
        return
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    except OSError as e:
        # Not the row's fault (disk full, quota, permissions): stop instead of counting every
        # following sample as skipped.  The images extracted so far are kept for the rerun.
        raise RunError(f"cannot write {dst}: {e.strerror or e}; fix that (or pass --image-dir) and rerun, "
                       "images already extracted are kept") from None


def image_file_name(key: str, ext: str) -> str:
    """The extracted image's file name: the key made path-safe (a key is data: it may hold
    ``/`` or ``..``), cut to a length every file system takes, with room for ``.tmp``."""
    name = make_key(key)
    if len(name) > 200:
        name = name[:150] + "-" + hashlib.sha1(name.encode()).hexdigest()[:16]
    return f"{name}.{ext}"


class Converter:
    def __init__(self, log: ConversionLog, writer: ManifestWriter, image_dir: Path):
        self.log, self.writer, self.image_dir = log, writer, image_dir
        self.extracted: set[Path] = set()  # image files written by this run

    def sample(self, group: str, loc: str, key: str, files: dict, image_path: Optional[Path] = None) -> None:
        """One stored sample: ``files`` maps extensions to bytes (``image_path`` = already on disk)."""
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (ValueError, UnicodeDecodeError):
                meta = {}
            if not isinstance(meta, dict):  # "null", a list: no metadata to use
                meta = {}
        status = meta.get("status", "success")
        if status != "success":
            self.log.skip(group, loc, str(status), key, meta.get("error_message"))
            return
        ext = next((e for e in IMAGE_FIELDS if e in files), None)
        if image_path is None and ext is None:
            self.log.skip(group, loc, "no_image", key, f"sample has {sorted(files)}")
            return
        if image_path is None and not isinstance(files[ext], (bytes, bytearray)):
            self.log.skip(group, loc, "schema", key, f"the {ext!r} column holds {type(files[ext]).__name__}, "
                                                     "expected the image bytes")
            return
        caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            self.log.skip(group, loc, "empty_text", key, "empty caption")
            return
        if image_path is None:
            image_path = self.image_dir / group / image_file_name(key, ext)
            n = 0
            while image_path in self.extracted:
                # Two samples with one key (a hand-made tar, null keys in a Parquet file) would
                # otherwise share one file, and the first record would show the second image.
                n += 1
                image_path = self.image_dir / group / image_file_name(f"{key}_dup{n}", ext)
            self.extracted.add(image_path)
            write_image(image_path, files[ext])
        rec = {"key": make_key(key), "image": str(Path(os.path.abspath(image_path))), "text": caption.strip(),
               "meta": {"source": loc, **{k: meta[k] for k in META_KEYS if meta.get(k) is not None}}}
        self.writer.write(rec, group, loc)

    def failed_rows(self, group: str, meta_path: Path, seen: set[str]) -> None:
        """Metadata rows of attempts that produced no sample: counted as skipped."""
        if not meta_path.is_file():
            return
        try:
            rows = read_metadata(meta_path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            self.log.skip(group, meta_path.name, "unreadable_metadata", None,
                          f"{' '.join(str(e).split())}; failed downloads of this shard are not counted")
            return
        for i, row in enumerate(rows):
            key = str(row.get("key"))
            if key in seen:
                continue
            self.log.saw(group)
            loc = f"{meta_path.name}:row {i + 1}"
            status = row.get("status") or "unknown"
            if status != "success":
                self.log.skip(group, loc, str(status), key, row.get("error_message"))
            else:
                self.log.skip(group, loc, "missing_from_shard", key, "metadata says success, no sample stored")

    def webdataset(self, tar: Path) -> None:
        group = tar.stem
        seen: set[str] = set()
        samples = iter_tar(tar)
        while True:
            # Only reading the tar is guarded: an error while writing an extracted image (disk
            # full) is not this shard's fault and must not pass for a truncated tar.
            try:
                key, files = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, OSError) as e:
                # Keep what was read; the rest of this shard is reported, the other shards go on.
                self.log.skip(group, f"{tar.name}", "unreadable_tar", None, f"{e}; the rest of this shard is lost")
                break
            seen.add(key)
            self.log.saw(group)
            self.sample(group, f"{tar.name}:{key}", key, files)
        self.failed_rows(group, tar.with_suffix(".parquet"), seen)

    def files(self, folder: Path) -> None:
        group = folder.name
        by_key: dict[str, dict] = {}
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.endswith(".tmp"):
                k, _, ext = f.name.partition(".")
                by_key.setdefault(k, {})[ext.lower()] = f
        for key, paths in by_key.items():
            self.log.saw(group)
            files = {e: p.read_bytes() for e, p in paths.items() if e in ("txt", "json")}
            img = next((paths[e] for e in IMAGE_FIELDS if e in paths), None)
            self.sample(group, f"{folder.name}/{key}", key, files, image_path=img)
        self.failed_rows(group, folder.with_suffix(".parquet"), set(by_key))

    def parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        group = path.stem
        i = 0
        batches = None
        while True:
            # Only reading is guarded (like a truncated tar: keep what was read, report the rest,
            # go on with the other shards); pyarrow raises several types for a bad file.
            try:
                if batches is None:
                    batches = pq.ParquetFile(path).iter_batches(batch_size=256)
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                self.log.skip(group, f"{path.name}:row {i + 1}", "unreadable_parquet", None,
                              f"{' '.join(str(e).split())}; the rest of this shard is lost")
                break
            for row in batch.to_pylist():
                i += 1
                self.log.saw(group)
                # A null key would turn into "None", the same for every such row.
                key = str(row["key"]) if row.get("key") is not None else f"{group}{i:05d}"
                files = {e: row[e] for e in IMAGE_FIELDS if row.get(e)}
                if row.get("caption") is not None:
                    files["txt"] = str(row["caption"]).encode()
                files["json"] = json.dumps({k: v for k, v in row.items()
                                            if k not in IMAGE_FIELDS and isinstance(v, (str, int, float))}).encode()
                self.sample(group, f"{path.name}:row {i}", key, files)


def detect_format(root: Path) -> str:
    if any(root.glob("*.tar")):
        return "webdataset"
    if any(d.is_dir() and any(f.suffix.lower() in IMAGE_EXTS for f in d.iterdir()) for d in root.iterdir()):
        return "files"
    import pyarrow.parquet as pq

    for f in sorted(root.glob("*.parquet")):
        try:
            names = pq.read_schema(f).names
        except Exception:  # noqa: BLE001 - a broken file decides nothing; it is reported when read
            continue
        if any(c in names for c in IMAGE_FIELDS):
            return "parquet"
    raise UsageError(f"--input {root}: no img2dataset output found (expected NNNNN.tar shards, NNNNN/ folders of "
                     f"images, or NNNNN.parquet files with a jpg column)")


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--input", required=True, metavar="DIR", help="img2dataset's output folder")
    p.add_argument("--format", choices=["auto", "webdataset", "files", "parquet"], default="auto",
                   help="img2dataset --output_format used (default: detected)")
    p.add_argument("--image-dir", default=None,
                   help="where images held in tars/Parquet are extracted (default: <manifest>-images/ beside it)")
    add_common_args(p)
    args = p.parse_args(argv)

    root = Path(args.input)
    if not root.is_dir():
        raise UsageError(f"--input {root}: no such folder (expected img2dataset's output folder)")
    fmt = detect_format(root) if args.format == "auto" else args.format
    out = Path(args.output)
    image_dir = Path(args.image_dir) if args.image_dir else out.with_name(out.stem + "-images")
    log = ConversionLog(strict=args.strict)
    with ManifestWriter(out, log) as writer:
        conv = Converter(log, writer, image_dir)
        if fmt == "webdataset":
            items = sorted(root.glob("*.tar"))
            handle = conv.webdataset
        elif fmt == "files":
            items = sorted(d for d in root.iterdir() if d.is_dir() and d.resolve() != image_dir.resolve())
            handle = conv.files
        else:
            items = sorted(root.glob("*.parquet"))
            handle = conv.parquet
        if not items:
            raise UsageError(f"--input {root}: no {fmt} shards found")
        for item in progress(items, f"{fmt} shards", unit="shard"):
            handle(item)
    return finish(args, log, writer, "pair", f"from_img2dataset ({fmt})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
