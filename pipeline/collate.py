"""Collation: decoded samples (pipeline.data's plain dicts) → model batches.

    proc = Processor.from_pretrained(cfg.model.init, cfg.model.num_compression_tokens)
    collate = Collator(proc, cfg.model, kind="qa")            # stage 1 (mode="stage1")
    collate = Collator(proc, cfg.model, kind="mmeb")          # stage 2 (mode="contrastive")
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate)

Batches (all tensors; move with :func:`to_device`, which handles the nesting):

* **encoded side** (what :meth:`Collator.encode` returns; an *embedding batch* on its own):
  ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long, ``mm_token_type_ids`` [B, L] int32
  (1 on image-pad tokens), and when any row has an image ``pixel_values`` [P, C·T·p·p] float32
  (or the ``pixel_dtype`` asked for) + ``image_grid_thw`` [N_img, 3] long.  Every row is ``[X][C]``.
* **stage-1 batch**: an encoded side whose rows are ``[X][C][D]`` plus ``labels`` [B, L] long
  (the target token id where the token is a target, -100 elsewhere; *unshifted*: the model
  predicts ``labels[:, t]`` from position ``t-1``).
* **contrastive batch**: ``{"query": side, "candidates": side, "num_queries": n}``; candidates
  are the n positives (row i = query i's positive) followed by the hard negatives.

Modes per kind: ``qa`` → ``stage1``; ``pair`` → ``stage1`` (caption as the single answer to
"Describe the image.") or ``contrastive`` (image → caption); ``mmeb`` → ``contrastive``.
Text-only sides carry no pixel tensors; the model runs the dummy-vision guard for them when
``model.dummy_vision`` is on (pipeline/adapters.py).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch

from pipeline.prompts import DEFAULT_IMAGE_INSTRUCTION, DEFAULT_TEXT_INSTRUCTION, IMAGE_PLACEHOLDER
from pipeline.processing import Processor

IGNORE_INDEX = -100
CAPTION_QUESTION = "Describe the image."
_MODES = {"qa": ("stage1",), "pair": ("stage1", "contrastive"), "mmeb": ("contrastive",)}


def to_device(batch: Any, device, dtype: Optional[torch.dtype] = None) -> Any:
    """Move a (nested) batch to ``device``; floating tensors (pixels) optionally cast to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


class Packed:
    """A collated batch (dicts/lists/tuples of tensors, any nesting) flattened into one byte
    buffer for the trip from a DataLoader worker to the trainer; :meth:`unpack` gives the same
    structure back, every tensor a view of that buffer (same dtypes, shapes and values).

    Why: the DataLoader sends each tensor through its own shared-memory segment, and the
    trainer receives each segment's file descriptor over a fresh authenticated socket: a cost
    per tensor, paid in the trainer and counted as data wait, that added up to a noticeable
    share of a tiny-model step (benchmarks/README.md).  One buffer per batch means one segment, and a buffer of at most
    ``INLINE_BYTES`` travels inside the pickle with no segment at all (through the worker
    result pipe, which ``pipeline.data.widen_result_pipe`` sizes for whole batches).  Tensor offsets are
    ``ALIGN``-byte aligned, so every view is aligned for its dtype."""

    INLINE_BYTES = 4 << 20
    ALIGN = 64

    def __init__(self, batch: Any):
        tensors: list[torch.Tensor] = []
        self.tree = _strip(batch, tensors)
        self.layout, end = [], 0
        for t in tensors:
            off = -(-end // self.ALIGN) * self.ALIGN
            end = off + t.numel() * t.element_size()
            self.layout.append((off, t.dtype, tuple(t.shape)))
        buf = torch.empty(end, dtype=torch.uint8)
        for t, (off, dt, _shape) in zip(tensors, self.layout):
            if t.numel():
                buf[off:off + t.numel() * t.element_size()].view(dt).copy_(t.reshape(-1))
        # numpy pickles by value (inside the message); a tensor goes through shared memory
        self.buf = buf.numpy() if end <= self.INLINE_BYTES else buf

    def pin_memory(self) -> "Packed":
        """Called by the DataLoader's pin-memory thread: one pinned copy for the whole batch."""
        buf = torch.from_numpy(self.buf) if not isinstance(self.buf, torch.Tensor) else self.buf
        self.buf = buf.pin_memory()
        return self

    def unpack(self) -> Any:
        buf = self.buf if isinstance(self.buf, torch.Tensor) else torch.from_numpy(self.buf)
        views = []
        for off, dt, shape in self.layout:
            n = math.prod(shape) * dt.itemsize
            views.append(buf[off:off + n].view(dt).view(shape) if n else torch.empty(shape, dtype=dt))
        return _fill(self.tree, views)


class _Slot(int):
    """Where tensor number ``int(self)`` sat in a packed batch."""


def _strip(obj: Any, out: list) -> Any:
    if isinstance(obj, torch.Tensor):
        out.append(obj.detach())
        return _Slot(len(out) - 1)
    if isinstance(obj, dict):
        return {k: _strip(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, out) for v in obj)
    return obj


def _fill(obj: Any, views: list) -> Any:
    if isinstance(obj, _Slot):
        return views[int(obj)]
    if isinstance(obj, dict):
        return {k: _fill(v, views) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, views) for v in obj)
    return obj


class PackedCollate:
    """``collate_fn`` wrapper for DataLoader workers: ``collate(samples)`` packed (see :class:`Packed`);
    the consumer calls ``.unpack()`` on what the loader yields."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        return Packed(self.collate(samples))


class ChunkCollate:
    """Stage-2 collate_fn: a rank's per-step samples → list of contrastive chunk batches of
    ``chunk`` samples (one element when the batch is one forward).  Runs in the DataLoader
    workers, so collation overlaps the step."""

    def __init__(self, collator, chunk: int):
        self.collator, self.chunk = collator, chunk

    def __call__(self, samples: list) -> list:
        return [self.collator(samples[i:i + self.chunk]) for i in range(0, len(samples), self.chunk)]


def _instruction(instruction: Optional[str], text: Optional[str], has_image: bool) -> Optional[str]:
    """The instruction placed before C: the configured one, else the default one when the input
    has no text of its own (an image alone, or a marker alone)."""
    if instruction is None and not (text or "").replace(IMAGE_PLACEHOLDER, "").strip():
        return DEFAULT_IMAGE_INSTRUCTION if has_image else DEFAULT_TEXT_INSTRUCTION
    return instruction


class Collator:
    """Callable ``collate_fn``: list of decoded samples → batch (see the module docstring)."""

    def __init__(self, processor: Processor, model_cfg, kind: str = "qa", mode: Optional[str] = None,
                 padding_side: str = "right", max_negatives: Optional[int] = None,
                 pixel_dtype: torch.dtype = torch.float32):
        """``pixel_dtype``: the dtype ``pixel_values`` travel in.  The vision tower casts them to
        its own dtype first thing (pipeline/adapters.py), so for a bf16/fp16 model its dtype
        gives bit-identical results with half the bytes to hand over from the loader workers,
        pin and copy to the GPU (~5 MB per 448 px image in float32).  Pass it only when the
        model really is in that dtype (training builds it so); float32 otherwise."""
        if kind not in _MODES:
            raise ValueError(f"data.kind={kind!r}: the collator handles {sorted(_MODES)}")
        mode = mode or _MODES[kind][0]
        if mode not in _MODES[kind]:
            raise ValueError(f"collator mode {mode!r} does not apply to kind {kind!r}; choose from {_MODES[kind]}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if processor.num_compression_tokens != model_cfg.num_compression_tokens:
            raise ValueError(f"processor has K={processor.num_compression_tokens} compression tokens but "
                             f"model.num_compression_tokens={model_cfg.num_compression_tokens}")
        if model_cfg.max_text_tokens is not None and model_cfg.max_text_tokens < 1:
            raise ValueError(f"model.max_text_tokens must be >= 1 (or null: no cut), got {model_cfg.max_text_tokens}")
        self.proc, self.cfg, self.kind, self.mode = processor, model_cfg, kind, mode
        self.padding_side = padding_side
        fmt = getattr(model_cfg, "prompt_format", "chat")
        self.official = fmt in ("official", "official_eval")
        # the authors' evaluation (not their training) ends queries and image inputs with "\n"
        self.eval_newline = fmt == "official_eval"
        self.max_negatives = max_negatives
        self.pixel_dtype = pixel_dtype

    # ------------------------------------------------------------------------------- public
    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        for s in samples:
            if s.get("kind", self.kind) != self.kind:
                raise ValueError(f"sample {s.get('__key__')!r} has kind {s.get('kind')!r} but the collator "
                                 f"was built for {self.kind!r} (data.kind)")
        if self.mode == "stage1":
            if self.kind == "qa":
                rows = [(s.get("text"), s["image"], s["conversations"], s.get("__key__")) for s in samples]
            else:
                rows = [(None, s["image"], [{"question": CAPTION_QUESTION, "answer": s["text"]}], s.get("__key__"))
                        for s in samples]
            return self.stage1(rows)
        if self.kind == "pair":
            queries = [{"text": None, "image": s["image"]} for s in samples]
            cands = [{"text": s["text"], "image": None} for s in samples]
        else:
            queries = [s["query"] for s in samples]
            cands = [s["positive"] for s in samples]
            negs = [n for s in samples for n in s.get("negatives", [])[: self.max_negatives]]
            cands = cands + negs
        return {"query": self.encode(queries), "candidates": self.encode(cands), "num_queries": len(samples)}

    def encode(self, items: Iterable[dict], instruction: Optional[str] = None) -> dict:
        """Items ``{"text": str|None, "image": PIL|None}`` → an embedding batch of ``[X][C]`` rows.

        ``instruction`` (else ``model.instruction``) goes before C; an item with no text of its
        own gets the default "Summarize the above image/sentence in a few words.".  An item's
        optional ``"role"`` (``"query"`` | ``"candidate"``) matters only to ``official_eval``:
        a text-only candidate gets no newline before C; an optional ``"newline"`` (bool)
        overrides that rule (the authors' evaluation leaves it off some image candidates)."""
        seqs = []
        instruction = instruction if instruction is not None else self.cfg.instruction
        items = list(items)
        pil = [it.get("image") for it in items if it.get("image") is not None]
        pv, grid, ntok = self.proc.images(pil) if pil else (None, None, [])
        it_tok = iter(ntok)
        for i, it in enumerate(items):
            text, img = it.get("text"), it.get("image")
            if not text and img is None:
                raise ValueError(f"item {i} has neither text nor image")
            n = next(it_tok) if img is not None else None
            if self.official:
                rule = img is not None or it.get("role") != "candidate"
                newline = self.eval_newline and (rule if it.get("newline") is None else bool(it["newline"]))
                x = self.proc.official_input_ids(text, n, False, instruction, self.cfg.max_text_tokens,
                                                 suffix="\n" if newline else "")
            else:
                x = self.proc.input_ids(text, n, _instruction(instruction, text, img is not None),
                                        self.cfg.max_text_tokens)
            seqs.append(x + self.proc.compression_ids)
        return self._pad(seqs, None, pv, grid)

    def stage1(self, rows: Sequence[tuple]) -> dict:
        """Rows ``(text, image, conversations, key)`` → a stage-1 batch ``[X][C][D]`` + labels."""
        pv, grid, ntok = self.proc.images([r[1] for r in rows])
        seqs, targets = [], []
        loss_on = self.cfg.stage1_loss
        for (text, _img, conv, key), n in zip(rows, ntok):
            if not conv:
                raise ValueError(f"sample {key!r}: stage 1 needs at least one question/answer turn")
            if self.official:
                x = self.proc.official_input_ids(text, n, True) + self.proc.compression_ids
            else:
                x = self.proc.input_ids(text, n, _instruction(self.cfg.instruction, text, has_image=True),
                                        self.cfg.max_text_tokens) + self.proc.compression_ids
            try:
                d, t = self._fit_dialogue(conv, loss_on, len(x), key)
            except ValueError as e:
                raise ValueError(f"sample {key!r}: {e}") from None
            seqs.append(x + d)
            targets.append([False] * len(x) + t)
        return self._pad(seqs, targets, pv, grid)

    def _fit_dialogue(self, conv, loss_on: str, x_len: int, key) -> tuple[list[int], list[bool]]:
        """The dialogue's ids/targets, keeping whole turns while ``[X][C][D]`` fits
        ``model.max_length``; a first turn that alone is too long is cut at the limit."""
        max_len = self.cfg.max_length
        pieces = self.proc.dialogue_pieces(conv, loss_on, head=not self.official)  # [head, turn_1, …]
        total = sum(len(p) for p, _ in pieces)
        if max_len is not None and x_len + total > max_len:
            if x_len >= max_len:
                raise ValueError(f"its image + compression tokens alone take {x_len} tokens >= model.max_length="
                                 f"{max_len}: raise model.max_length or lower model.max_pixels")
            keep, used = 2, len(pieces[0][0]) + len(pieces[1][0])  # at least the first turn (cut below)
            while keep < len(pieces) and x_len + used + len(pieces[keep][0]) <= max_len:
                used += len(pieces[keep][0])
                keep += 1
            pieces = pieces[:keep]
        d = [i for p, _ in pieces for i in p]
        t = [f for _, ts in pieces for f in ts]
        if max_len is not None:
            d, t = d[: max_len - x_len], t[: max_len - x_len]  # a first turn alone too long is cut
        return d, t

    # ------------------------------------------------------------------------------ padding
    def _pad(self, seqs, targets, pv, grid) -> dict:
        L = max(len(s) for s in seqs)
        right = self.padding_side == "right"

        def padded(rows, fill):  # one tensor from padded lists, not one tensor per row
            return [r + [fill] * (L - len(r)) if right else [fill] * (L - len(r)) + r for r in rows]

        ids = torch.tensor(padded(seqs, self.proc.pad_id), dtype=torch.long)
        am = torch.tensor(padded([[1] * len(s) for s in seqs], 0), dtype=torch.long)
        labels = None
        if targets is not None:
            labels = torch.where(torch.tensor(padded(targets, False), dtype=torch.bool), ids, IGNORE_INDEX)
        out = {"input_ids": ids, "attention_mask": am,
               "mm_token_type_ids": (ids == self.proc.image_token_id).to(torch.int32) * am.to(torch.int32)}
        if pv is not None:
            out["pixel_values"], out["image_grid_thw"] = pv.to(self.pixel_dtype), grid
        if labels is not None:
            out["labels"] = labels
        return out
