"""Decoded images → the 8-bit RGB that every path of the project feeds the model.

Torch-free (numpy + PIL), so data_prep's shard writer, the training loader, evaluation and
``pipeline.Embedder`` all convert the same way: a model sees the same pixels for the same file
whether it is being trained, evaluated or used.
"""
from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np
from PIL import Image

# Leading bytes → the PIL plugin that reads them.  ``Image.open`` otherwise asks each plugin in
# registration order (BMP, GIF, JPEG, PPM, PNG, …) whether it accepts the header: ~2.5 µs per
# image before a PNG is recognised, a tenth of shard.py's per-sample overhead on small images.
# Only unambiguous signatures are listed; anything else gets PIL's full probe.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ("PNG",)), (b"\xff\xd8\xff", ("JPEG",)),
               (b"GIF87a", ("GIF",)), (b"GIF89a", ("GIF",)))


def _plugin_for(data: bytes) -> Optional[tuple[str, ...]]:
    """The ``formats`` argument of ``Image.open`` for these bytes (None: let PIL probe all)."""
    for magic, formats in _SIGNATURES:
        if data.startswith(magic):
            return formats
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    return None


# Pillow's block cache (docs: "Block allocator"), off by default: a decoded image's memory goes
# back to malloc when the image is freed, and the images of the next batch get fresh pages from
# the kernel — ~160 page faults per 512 px RGB image in the loader, whose pass over 512 px JPEG
# batches of 32 took 13-15 % longer for it (2-core CPU, paired rounds).  With freed blocks kept,
# batch after batch reuses the same memory.  1 MiB blocks bound the cache in bytes whatever the
# image sizes.
CACHE_BLOCK_BYTES = 1 << 20


def reuse_image_memory(cache_mib: int = 64) -> None:
    """Let Pillow keep up to ``cache_mib`` MiB of freed image memory in this process for the next
    images (loader workers at each epoch's start — the trainer itself with ``data.workers=0`` —
    and the shard writer call it; calling it again changes nothing).  Left alone when the user
    tuned the allocator with Pillow's own ``PILLOW_BLOCK_SIZE`` / ``PILLOW_BLOCKS_MAX``."""
    if "PILLOW_BLOCK_SIZE" in os.environ or "PILLOW_BLOCKS_MAX" in os.environ:
        return
    Image.core.set_block_size(CACHE_BLOCK_BYTES)
    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), cache_mib * (1 << 20) // CACHE_BLOCK_BYTES))


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` on encoded bytes (lazy: ``.load()`` decodes), asking only the plugin that
    the file's signature names.  The same image, format and errors as ``Image.open`` (a JPEG
    that is an MPO still opens as MPO; bytes no plugin accepts raise ``UnidentifiedImageError``)."""
    return Image.open(io.BytesIO(data), formats=_plugin_for(data))


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB, as the VLM's own image processor would make it.

    Why not ``img.convert("RGB")`` alone: it drops alpha, so whatever colour a transparent
    pixel stores shows (a black glyph on a transparent background becomes an all-black
    image), where the Hugging Face processors composite onto white (``convert_to_rgb``); and
    it clips 16-bit greyscale (PNG ``I;16``) at 255 instead of scaling it, turning nearly
    the whole image white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
