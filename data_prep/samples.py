"""Manifest record → WebDataset sample: validation, image handling and the shard layout.

This is the row→sample half of ``data_prep/shard.py``, importable on its own (converters and
tests call :func:`record_to_sample`).  One manifest record becomes one sample: a dict of
member extension → bytes plus ``__key__``, written as ``{key}.{ext}`` tar members.

Layout per kind (``pipeline.data`` reads exactly this; plain ``webdataset`` can too):

=========  ===================================================================================
``pair``   ``{key}.jpg|png|…`` the image (real format), ``{key}.txt`` the caption,
           ``{key}.json`` ``{"key", "line", "meta"?}``
``qa``     ``{key}.jpg|png|…`` the image, ``{key}.json``
           ``{"conversations": [{"question", "answer"}, …], "key", "line", "meta"?}``
``mmeb``   ``{key}.query.png``, ``{key}.positive.jpg``, ``{key}.negative_0.png`` … (one member
           per side that has an image), ``{key}.json`` ``{"task", "query": {"text", "image"},
           "positive": {…}, "negatives": [{…}, …], "key", "line", "meta"?}`` where a side's
           ``"image"`` names its member extension (``"query.png"``) or is ``null``
=========  ===================================================================================

Texts follow the placeholder contract of ``pipeline/prompts.py``: a side (or QA question)
with an image has its marker normalised to ``<image>``; a text without an image loses any
marker.  Images are validated by decoding; their original bytes are kept unless
``max_side`` asks for a re-encode (JPEG, quality 95, aspect kept, CMYK/P/LA/… → RGB).
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
from typing import Any, Optional

from PIL import Image

from pipeline.imaging import open_image, to_rgb
from pipeline.prompts import normalize_placeholders, strip_placeholders

KINDS = ("pair", "qa", "mmeb")
MIN_SIDE = 8  # px; smaller images are skipped (a ViT patch is 14 px, processors upscale, but
#               a 2-px "image" is a broken thumbnail, not data)
REENCODE_QUALITY = 95

# PIL format → member extension (what webdataset's decoders key on).  Other formats that PIL
# can read (PPM, TGA, …) are re-encoded to PNG so every shard holds only common formats.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
              "BMP": "bmp", "TIFF": "tiff"}

RECORD_FIELDS = {
    "pair": {"image", "text", "key", "meta"},
    "qa": {"image", "conversations", "key", "meta"},
    "mmeb": {"task", "query", "positive", "negatives", "key", "meta"},
}
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")


class BadRow(Exception):
    """A manifest row that is skipped: ``reason`` is a stable category (counted in
    manifest.json), ``detail`` says what exactly is wrong with this row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args: BadRow travels to pool workers by pickle
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def sanitize_key(key: str) -> str:
    """A WebDataset-safe key: ``[A-Za-z0-9_-]+`` (a dot would split key from extension)."""
    return _UNSAFE_KEY.sub("_", key).strip("_")


def record_key(record: Any, line: int, stem: str) -> str:
    """The sample key: the record's ``"key"`` (sanitised) or ``{manifest stem}-{line:09d}``."""
    key = record.get("key") if isinstance(record, dict) else None
    if key not in (None, ""):
        if type(key) is not str or _UNSAFE_KEY.search(key) or key[0] == "_" or key[-1] == "_":
            key = sanitize_key(str(key))  # a key already safe (the usual case) is used as it is
        if key:
            return key
    return f"{_key_stem(stem)}-{line:09d}"


@functools.lru_cache(maxsize=64)
def _key_stem(stem: str) -> str:  # once per manifest, not once per row
    return sanitize_key(stem) or "row"


# ------------------------------------------------------------------------------------ images
def load_image(value: Any, base_dir: str, max_side: Optional[int] = None) -> tuple[str, bytes]:
    """Read, validate (full decode) and possibly shrink one image.

    Returns ``(extension, bytes)``: the original bytes and their real format unless the image
    is larger than ``max_side`` (or in a format outside :data:`FORMAT_EXT`), in which case the
    re-encoded bytes.  Raises :class:`BadRow` for a missing/unreadable/undecodable/tiny image.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadRow("schema", f"image must be a non-empty path string, got {value!r}")
    path = _resolve(base_dir, value)
    try:
        data = read_file(path)
    except FileNotFoundError:
        raise BadRow("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise BadRow("unreadable_image", f"{path}: {e.strerror or e}") from None
    try:
        img = open_image(data)
        fmt = img.format
        w, h = img.size
        shrink = bool(max_side) and max(w, h) > max_side
        if shrink and fmt in ("JPEG", "MPO"):
            # Decode at a reduced DCT scale (≥ the target size): far cheaper for big photos.
            img.draft("RGB", _target_size(w, h, max_side))
        img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, …)
        raise BadRow("undecodable_image", f"{path}: {type(e).__name__}: {e}") from None
    if min(w, h) < MIN_SIDE:
        raise BadRow("image_too_small", f"{path} is {w}x{h} px; both sides must be >= {MIN_SIDE}")
    ext = FORMAT_EXT.get(fmt)
    if shrink or ext is None:
        return _reencode(img, max_side if shrink else None, jpeg=shrink)
    return ext, data


if os.sep == "/" and not os.altsep:
    def _resolve(base_dir: str, value: str) -> str:
        """``os.path.join(base_dir, value)`` for a manifest path, without posixpath's generic
        code (~1 µs of shard.py's ~25 µs per-sample overhead on small images)."""
        if value[0] == "/" or not base_dir:
            return value
        return f"{base_dir}{value}" if base_dir[-1] == "/" else f"{base_dir}/{value}"
else:
    def _resolve(base_dir: str, value: str) -> str:
        return os.path.join(base_dir, value)


def read_file(path: str) -> bytes:
    """A file's bytes in as few system calls as Python allows (``open().read()`` costs a third
    as much again on a 3 KB image, where shard.py's per-image overhead matters)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # a regular file: all of it in one call; +1 sees growth
        if len(data) != size:  # short read, or the file changed under us: read to EOF
            parts = [data]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def _target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _reencode(img: Image.Image, max_side: Optional[int], jpeg: bool) -> tuple[str, bytes]:
    if img.mode not in ("RGB", "L"):
        # CMYK, P, LA, RGBA, I;16 … → RGB (JPEG has no alpha) the way the loader converts the
        # images it was not asked to shrink: alpha onto white, 16-bit scaled, not clipped
        img = to_rgb(img)
    if max_side and max(img.size) > max_side:
        img = img.resize(_target_size(*img.size, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if jpeg:
        img.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


# ----------------------------------------------------------------------------------- records
def _text(value: Any, what: str, allow_none: bool = False) -> Optional[str]:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise BadRow("schema", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_text", f"{what} is empty")
    return value.strip()


def _check_fields(record: Any, kind: str) -> dict:
    if not isinstance(record, dict):
        raise BadRow("schema", f"a record must be a JSON object, got {type(record).__name__}")
    if not RECORD_FIELDS[kind].issuperset(record):
        unknown = record.keys() - RECORD_FIELDS[kind]
        raise BadRow("schema", f"unknown field(s) {sorted(unknown)} for kind {kind}; "
                               f"allowed: {sorted(RECORD_FIELDS[kind])}")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise BadRow("schema", f"meta must be an object, got {type(meta).__name__}")
    return record


def _side(value: Any, name: str, base_dir: str, max_side: Optional[int],
          members: dict) -> dict:
    """One mmeb side → ``{"text", "image"}`` (image = member extension); image bytes go into
    ``members`` under ``{name}.{ext}``."""
    if not isinstance(value, dict):
        raise BadRow("schema", f"{name} must be an object with text and/or image")
    unknown = sorted(set(value) - {"text", "image"})
    if unknown:
        raise BadRow("schema", f"{name} has unknown field(s) {unknown}; allowed: image, text")
    text, image = value.get("text"), value.get("image")
    if text is None and image in (None, ""):
        raise BadRow("schema", f"{name} has neither text nor image")
    member = None
    if image not in (None, ""):
        ext, data = load_image(image, base_dir, max_side)
        member = f"{name}.{ext}"
        members[member] = data
        if text is not None and not isinstance(text, str):
            raise BadRow("schema", f"{name}.text must be a string or null")
        text = normalize_placeholders(text.strip()) if text and text.strip() else None
    else:
        text = strip_placeholders(_text(text, f"{name}.text"))
        if not text:
            raise BadRow("empty_text", f"{name}.text holds only an image marker and {name} has no image")
    return {"text": text, "image": member}


_SAMPLE_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _sample_encoder():
    """The sample JSON encoder: compact, sorted keys, UTF-8 text.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs as much as the
    encoding itself on a ``{"key", "line"}`` record (~1.3 µs of shard.py's ~25 µs per-sample
    overhead on small images); the C encoder is built once here.  Where ``json`` has no C
    accelerator, or it disagrees with ``JSONEncoder`` on a probe record, ``JSONEncoder`` is used.
    Records come from parsed JSON/CSV/Parquet (never cyclic), so no cycle check (``markers``)."""
    from json import encoder as je

    enc = _SAMPLE_JSON
    c_make = getattr(je, "c_make_encoder", None)
    if c_make is not None:
        try:
            c = c_make(None, enc.default, je.encode_basestring, enc.indent, enc.key_separator,
                       enc.item_separator, enc.sort_keys, enc.skipkeys, enc.allow_nan)
            probe = {"z": [1, 2.5, None, True], "a": {"é": "\u2028\"x\""}, "m": float("nan")}
            if "".join(c(probe, 0)) == enc.encode(probe):
                return lambda obj: "".join(c(obj, 0))
        except Exception:  # a C signature this Python doesn't have: the portable path
            pass
    return enc.encode


_ENCODE_SAMPLE = _sample_encoder()


def _json_bytes(obj: dict) -> bytes:
    return _ENCODE_SAMPLE(obj).encode("utf-8")


def record_to_sample(record: Any, kind: str, key: str, line: int, base_dir: str,
                     max_side: Optional[int] = None) -> dict:
    """Validate one manifest record and build its sample: ``{"__key__": key, ext: bytes, …}``.

    ``line`` is the manifest line (kept in the sample's JSON so a sample can be traced back);
    image paths are resolved against ``base_dir``.  Raises :class:`BadRow`.
    """
    try:
        return _record_to_sample(record, kind, key, line, base_dir, max_side)
    except UnicodeError as e:
        # JSON may escape a lone surrogate ("\ud83d": half an emoji, cut by a truncating
        # exporter): a str with no UTF-8 form, so neither a path nor tar text can hold it
        bad = e.object[e.start:e.end] if isinstance(e.object, str) else e.object[e.start:e.end].decode("latin-1")
        raise BadRow("invalid_unicode", f"{bad.encode('unicode_escape').decode()!s} has no UTF-8 form "
                                        f"(half of a UTF-16 surrogate pair?); fix the text in the manifest") from None


def _record_to_sample(record: Any, kind: str, key: str, line: int, base_dir: str,
                      max_side: Optional[int]) -> dict:
    record = _check_fields(record, kind)
    info: dict[str, Any] = {"key": key, "line": line}
    if record.get("meta") is not None:
        info["meta"] = record["meta"]
    sample: dict[str, Any] = {"__key__": key}
    if kind == "pair":
        text = _text(record.get("text"), "text")
        ext, data = load_image(record.get("image"), base_dir, max_side)
        sample[ext] = data
        sample["txt"] = text.encode("utf-8")
    elif kind == "qa":
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise BadRow("schema", "conversations must be a non-empty list of {question, answer}")
        turns = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or set(turn) - {"question", "answer"}:
                raise BadRow("schema", f"conversations[{i}] must be {{'question': str, 'answer': str}}")
            turns.append({"question": normalize_placeholders(_text(turn.get("question"), f"conversations[{i}].question")),
                          "answer": _text(turn.get("answer"), f"conversations[{i}].answer")})
        ext, data = load_image(record.get("image"), base_dir, max_side)
        sample[ext] = data
        info["conversations"] = turns
    elif kind == "mmeb":
        task = record.get("task")
        if not isinstance(task, str) or not task.strip():
            raise BadRow("schema", "task must be a non-empty string")
        negatives = record.get("negatives") or []
        if not isinstance(negatives, list):
            raise BadRow("schema", "negatives must be a list of sides")
        members: dict[str, bytes] = {}
        info["task"] = task.strip()
        info["query"] = _side(record.get("query"), "query", base_dir, max_side, members)
        info["positive"] = _side(record.get("positive"), "positive", base_dir, max_side, members)
        info["negatives"] = [_side(n, f"negative_{i}", base_dir, max_side, members)
                             for i, n in enumerate(negatives)]
        sample.update(members)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    sample["json"] = _json_bytes(info)
    return sample
