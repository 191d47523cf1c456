"""Small manifests and images for the data tests (real PNG/JPEG files, a few KB in all)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size=(16, 12), fmt: str = "PNG", seed: int = 0) -> list[str]:
    """``n`` distinct random RGB images; returns their file names (relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for i in range(n):
        px = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        name = f"img{i:03d}.{ext}"
        Image.fromarray(px).save(folder / name, format=fmt)
        names.append(name)
    return names


def records(kind: str, images: list[str], prefix: str = "images/") -> list[dict]:
    """One valid record per image (mmeb: alternating t2i / i2t tasks with negatives)."""
    out = []
    n = len(images)
    for i, im in enumerate(images):
        if kind == "pair":
            out.append({"image": prefix + im, "text": f"caption {i}", "meta": {"i": i}})
        elif kind == "qa":
            out.append({"image": prefix + im, "conversations": [
                {"question": f"<|image_1|> what is {i}?", "answer": f"answer {i}"},
                {"question": "and then?", "answer": "done"}]})
        else:
            task = "t2i" if i % 2 == 0 else "i2t"
            if task == "t2i":
                out.append({"task": task, "query": {"text": f"find {i}", "image": None},
                            "positive": {"text": None, "image": prefix + im},
                            "negatives": [{"image": prefix + images[(i + 1) % n]}]})
            else:
                out.append({"task": task, "query": {"text": "<image> describe", "image": prefix + im},
                            "positive": {"text": f"caption {i}"},
                            "negatives": [{"text": f"caption {i + 1}"}, {"text": "nothing"}]})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def dataset(root: Path, kind: str, n: int, **kw) -> Path:
    """``root/images/*`` + ``root/{kind}.jsonl`` with ``n`` valid records; returns the manifest."""
    images = make_images(root / "images", n, **kw)
    return write_jsonl(root / f"{kind}.jsonl", records(kind, images))


def write_tar(path, samples) -> None:
    """A plain WebDataset tar (what another tool could write): samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def png_bytes(w: int, h: int, mode: str = "RGB", color=(90, 140, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else None).save(buf, format="PNG")
    return buf.getvalue()
