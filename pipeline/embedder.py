"""The inference API: embed text, images or both with an exported model.

    emb = pipeline.Embedder.from_pretrained("runs/stage2/export")
    vecs = emb.encode([{"text": "a dog"}, {"image": "cat.jpg"}, {"text": "<image> what is it?", "image": pil}])

``from_pretrained`` takes an export (``coma.json`` says how its inputs were built), a released
CoMa checkpoint, or a plain VLM directory (the untrained baseline); :func:`pipeline.export.read_meta`
tells them apart.  The MMEB harness (pipeline/mmeb.py), the shard evaluation
(pipeline/evaluate.py) and the mteb wrapper (pipeline/mteb_model.py) all embed through it.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

from pipeline.collate import Collator, to_device
from pipeline.export import META_FILE, inference_config, read_meta
from pipeline.model import DTYPES, CoMaModel, load_model


class Embedder:
    """Inference API over an exported model: ``encode(items) -> float32 [N, D]``, L2-normalised."""

    def __init__(self, model: CoMaModel, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.collator = Collator(model.processor, model.cfg, kind="mmeb")
        self.logit_scale = float(model.logit_scale())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, pooling: Optional[str] = None
                        ) -> "Embedder":
        """``path``: an export, a released CoMa checkpoint, or a plain VLM directory (the
        untrained baseline; see :func:`read_meta`).  ``pooling`` overrides the stored one
        (``mean`` | ``last``; the released weights were trained with mean, evaluated with last)."""
        meta = read_meta(path)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        name = {v: k for k, v in DTYPES.items()}[dtype]
        cfg = inference_config(path, meta, dtype=name, pooling=pooling or meta["pooling"])
        model = load_model(cfg, for_training=False, temperature=1.0 / meta["logit_scale"])
        if model.processor.added_tokens and not meta.get("untrained"):
            raise ValueError(f"{path}: the tokenizer lacks the compression tokens listed in {META_FILE}")
        return cls(model.to(device), device, dtype)

    @staticmethod
    def _load_image(img):
        """A path or PIL image → RGB as training and evaluation see it (pipeline/imaging.py:
        alpha on white, 16-bit scaled), so an embedding does not depend on which path read the file."""
        from pipeline.imaging import to_rgb

        if img is None:
            return None
        if isinstance(img, (str, os.PathLike)):
            from PIL import Image

            with Image.open(img) as im:
                im.load()
                return to_rgb(im).copy() if im.mode == "RGB" else to_rgb(im)
        return to_rgb(img)

    @torch.no_grad()
    def encode(self, items: Sequence[dict] | Iterable[dict], batch_size: int = 32,
               instruction: Optional[str] = None) -> torch.Tensor:
        """items: dicts with ``"text"`` (may hold the ``<image>`` marker), ``"image"`` (PIL image or
        path) or both, and optionally ``"role"`` (``"query"`` | ``"candidate"``: only the
        ``official_eval`` format, the released weights', tells them apart) → float32 [N, D] on
        CPU, L2-normalised."""
        items = list(items)
        outs = []
        for i in range(0, len(items), batch_size):
            chunk = [{"text": it.get("text"), "image": self._load_image(it.get("image")), "role": it.get("role")}
                     for it in items[i:i + batch_size]]
            batch = to_device(self.collator.encode(chunk, instruction=instruction), self.device, self.dtype)
            outs.append(self.model.embed(**batch).float().cpu())
        if not outs:
            return torch.zeros(0, self.model.hf.config.get_text_config().hidden_size)
        return torch.cat(outs)
