"""Decoded images → the 8-bit RGB that every path of the project feeds the model.

Torch-free (numpy + PIL), so data_prep's shard writer, the training loader, evaluation and
``pipeline.Embedder`` all convert the same way: a model sees the same pixels for the same file
whether it is being trained, evaluated or used.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


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
