"""The CoMa model: a Hugging Face VLM with K compression tokens, the compression attention mask,
C-pooling and both training objectives.

Stable API (the engine, export and evaluation code against it)
--------------------------------------------------------------
``build_model(cfg, *, for_training=True, gather=whole) -> CoMaModel``
    A run's model from its whole config: :func:`load_model` with ``cfg.model`` and the loss's
    temperature / learnable-scale settings.

``load_model(model_cfg, *, for_training=True, temperature=0.03, learnable_scale=False, gather=whole) -> CoMaModel``
    ``from_pretrained(model_cfg.init)`` (a local dir or hub id; how the weights are stored is the
    caller's business: ``pipeline/engine.py`` creates ``HfDeepSpeedConfig`` first so they are
    partitioned at construction, and passes ``gather`` to make a partitioned matrix whole
    while its new rows are set), adds the K
    compression tokens ``<|cmp_0|>..`` to the tokenizer and resizes the embeddings, sets the
    attention implementation (``flash_attention_2`` when importable, else ``sdpa``; wrapped by
    pipeline/masks.py), LoRA/DoRA through ``peft`` with the new tokens' embedding rows trainable
    (``model_cfg.lora.enabled``) or full fine-tuning, frozen vision tower, gradient
    checkpointing.  ``model.processor`` is the matching :class:`pipeline.processing.Processor`.

``CoMaModel.forward(**batch)`` dispatches on what :class:`pipeline.collate.Collator` produced:

* stage-1 batch (has ``labels``)  → :class:`Stage1Output` with ``.loss`` (0-dim fp32), ``.num_targets``
  and ``.num_tokens`` (0-dim long tensors);
* embedding batch                 → ``[B, D]`` float32, L2-normalised;
* contrastive batch (``query`` / ``candidates``) → ``(q [n, D], k [m, D], logit_scale 0-dim)``: q, k
  L2-normalised in fp32 then rounded once to ``model_cfg.dtype`` (bf16 in GPU training), the scale
  fp32; k = the n positives then the hard negatives.  The logit scale is a parameter used inside
  forward (ZeRO-3 gathers parameters only there); the engine calls
  ``coma_kernels.gathered_infonce(q, k, logit_scale)``.

Sequence layout: ``[X][C]`` for embeddings, ``[X][C][Q1 A1 … Qt At]`` for stage 1 (ChatML of the
backbone; an optional instruction ends X).  ``model_cfg.mask_impl`` picks the stage-1 attention:
``reference`` (explicit 4-D mask) or ``efficient`` (split attention, no L×L mask; flash-attention
capable) — pipeline/masks.py explains both; they agree to fp32 rounding.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters import FamilyAdapter
from pipeline.masks import LAYOUT_KWARG, build_layout, reference_mask, register_attention
from pipeline.processing import Processor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# gather(params): a context in which ``params`` are whole, modifiable tensors (see load_model)
Gather = Callable[[list], contextlib.AbstractContextManager]
LM_TARGET_REGEX = r".*language_model.*\.({})$"


@dataclass
class Stage1Output:
    loss: torch.Tensor          # 0-dim fp32: mean CE over target tokens of the micro-batch
    num_targets: torch.Tensor   # 0-dim long: target tokens (for token-weighted averaging)
    num_tokens: torch.Tensor    # 0-dim long: real (non-pad) tokens processed


class CoMaModel(nn.Module):
    """Wraps the (possibly peft-wrapped) HF VLM ``backbone``.  Build it with :func:`load_model`."""

    def __init__(self, backbone: nn.Module, adapter: FamilyAdapter, model_cfg, processor: Processor,
                 base_attn: str, temperature: float = 0.03, learnable_scale: bool = False):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.cfg = model_cfg
        self.processor = processor
        self.base_attn = base_attn
        self.register_buffer("compression_ids", torch.tensor(processor.compression_ids, dtype=torch.long),
                             persistent=False)
        # The logit scale is scale0 · exp(offset).  scale0 = 1/τ is a Python float, so a fixed τ
        # is exact in the forward: DeepSpeed's bf16 mode casts every parameter, and a bf16
        # log-scale rounds ln(1/0.03) = 3.5066 to 3.5 (τ = 0.0302).  A learnable scale trains only
        # the offset, which starts at 0: its fp32 master is what the optimizer updates, and the
        # bf16 copy the forward reads is within 2^-9 of how far it has moved (not of 3.5).
        # Shape [1], not 0-dim: DeepSpeed ZeRO-3 cannot partition a 0-dim parameter created
        # outside zero.Init (it views the data as bytes to broadcast it).
        self.scale0 = 1.0 / temperature
        self.logit_scale_offset = nn.Parameter(torch.zeros(1), requires_grad=learnable_scale)

    # ------------------------------------------------------------------------------ plumbing
    def place_buffers(self, device: torch.device) -> None:
        """Put the wrapper's buffer (the compression ids) on ``device``, rebuilt from the
        processor, its source of truth.  Why: a ZeRO-3 engine places the partitioned parameters
        itself and skips ``module.to(device)``, so a buffer made outside ``zero.Init`` stays
        where it was made (the CPU) and the first GPU forward fails in ``torch.isin``; the engine
        set-up (pipeline/engine.py) calls this with the engine's device."""
        self.compression_ids = torch.tensor(self.processor.compression_ids, dtype=torch.long, device=device)

    @property
    def hf(self) -> nn.Module:
        """The Hugging Face model (inside the peft wrapper when LoRA is on)."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    @property
    def is_peft(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    def logit_scale(self, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """0-dim fp32 1/τ (``offset``: a saved ``logit_scale_offset`` instead of the live one)."""
        offset = self.logit_scale_offset if offset is None else offset
        return (self.scale0 * offset.float().exp()).clamp(max=100.0).reshape(())

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, **_) -> torch.Tensor:
        """inputs_embeds [B, L, D]: token embeddings (new C rows included) + image features."""
        return self.adapter.embed(self.hf, input_ids, pixel_values, image_grid_thw,
                                  dummy_vision=self.cfg.dummy_vision)

    def _positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        return self.adapter.position_ids(self.hf, input_ids, attention_mask, mm_token_type_ids, image_grid_thw)

    def _decode(self, inputs_embeds, position_ids, attention_mask, **kw) -> torch.Tensor:
        lm = self.adapter.language_model(self.hf)
        out = lm(input_ids=None, inputs_embeds=inputs_embeds, position_ids=position_ids,
                 attention_mask=attention_mask, use_cache=False, **kw)
        return out.last_hidden_state

    def _mask_mapping(self, mask):
        """Hand transformers an already-built mask per layer type (skips its own mask building)."""
        types = getattr(self.adapter.language_model(self.hf).config, "layer_types", None) or ["full_attention"]
        return {t: mask for t in set(types)}

    # ------------------------------------------------------------------------------- forward
    def forward(self, **batch):
        if "query" in batch:
            # The loss takes the embeddings in the model's dtype (bf16 in GPU training): rounding
            # unit-norm embeddings to bf16 moves the loss gradients by ~0.5 %, trained regime
            # included (benchmarks/loss_dtype.py), about the precision of the bf16 hidden states
            # they average, while fp32 inputs would run the loss GEMMs as TF32 or FMA.  The fused
            # kernels accumulate in fp32 (coma_kernels/infonce.py); benchmarks/loss.py times bf16.
            dt = DTYPES[self.cfg.dtype]
            q = self.embed(**batch["query"]).to(dt)
            k = self.embed(**batch["candidates"]).to(dt)
            return q, k, self.logit_scale()
        if "labels" in batch:
            return self.stage1(**batch)
        return self.embed(**batch)

    def stage1(self, input_ids, attention_mask, labels, mm_token_type_ids=None, pixel_values=None,
               image_grid_thw=None, inputs_embeds=None, mask_impl: Optional[str] = None, per_row: bool = False,
               **_) -> Stage1Output:
        """Next-token CE on the target tokens of ``[X][C][D]`` under the compression mask.

        input_ids/attention_mask/labels: [B, L] long (labels unshifted, -100 = ignore);
        ``inputs_embeds`` [B, L, D] overrides :meth:`embed_inputs` (probing gradients in tests);
        ``per_row``: ``loss`` is [B] fp32, each row's mean CE over its own targets (the
        compression probe ranks answers with it; NaN for a row without targets)."""
        mask_impl = mask_impl or self.cfg.mask_impl
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos = self._positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
        if mask_impl == "reference":
            if self.base_attn.startswith("flash"):
                raise ValueError("mask_impl='reference' needs an explicit 4-D mask, which flash-attention cannot "
                                 "take: load the model with model.attn_implementation=sdpa (or eager)")
            m = reference_mask(input_ids, attention_mask, self.compression_ids, dtype=inputs_embeds.dtype)
            hidden = self._decode(inputs_embeds, pos, self._mask_mapping(m))
        elif mask_impl == "efficient":
            layout = build_layout(input_ids, attention_mask, self.compression_ids)
            hidden = self._decode(inputs_embeds, pos, self._mask_mapping(None), **{LAYOUT_KWARG: layout})
        elif mask_impl == "causal":  # no compression mask: the authors' released runs, the benchmark's bound
            hidden = self._decode(inputs_embeds, pos, attention_mask)
        else:
            raise ValueError(f"model.mask_impl={mask_impl!r}: use 'efficient', 'reference' or 'causal'")
        # Only target positions go through the LM head: logits for a 150K vocabulary over the
        # whole image span would dominate activation memory.
        tgt = labels[:, 1:]
        sel = tgt != -100
        h = hidden[:, :-1][sel]
        n = sel.sum()
        if h.shape[0] == 0:
            loss = torch.full((sel.shape[0],), float("nan"), device=hidden.device) if per_row else hidden.sum() * 0.0
        else:
            logits = self.adapter.lm_head(self.hf)(h).float()
            loss = F.cross_entropy(logits, tgt[sel], reduction="none" if per_row else "mean")
            if per_row:  # per-token CE summed into its row, over the row's target count
                loss = torch.zeros(sel.shape[0], device=loss.device).index_add_(0, sel.nonzero()[:, 0], loss)
                loss = loss / sel.sum(1).float()
        return Stage1Output(loss=loss, num_targets=n, num_tokens=attention_mask.sum())

    def embed(self, input_ids, attention_mask, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None,
              inputs_embeds=None, **_) -> torch.Tensor:
        """``[X][C]`` rows (left or right padded) → L2-normalised float32 embeddings [B, D]:
        the mean of the final hidden states at the K compression positions (``pooling=mean``)
        or the last real token's (``pooling=last``)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos = self._positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
        hidden = self._decode(inputs_embeds, pos, attention_mask).float()
        am = attention_mask.bool()
        if self.cfg.pooling == "mean":
            cmask = torch.isin(input_ids, self.compression_ids) & am
            counts = cmask.sum(1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError("an embedding row has no compression tokens: build inputs with pipeline.collate")
            pooled = (hidden * cmask.unsqueeze(-1)).sum(1) / counts
        else:
            idx = (torch.arange(am.shape[1], device=am.device) * am).argmax(1)  # last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return F.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------- loading
FLASH_DTYPES = ("bfloat16", "float16")  # flash-attention's kernels: no fp32


def choose_attn(requested: str, mask_impl: str, dtype: str) -> str:
    """``auto`` → flash_attention_2 when importable and ``dtype`` (``model.dtype``) is bf16/fp16,
    else sdpa: flash-attention has no fp32 kernels, and transformers only warns at load time, so
    an fp32 model (the compression probe, an fp32 Embedder) would fail at its first GPU forward.
    An explicit flash_attention_2 with fp32 is a config error.  The reference mask path needs a
    4-D mask, which flash-attention cannot take, so it falls back to sdpa."""
    from transformers.utils import is_flash_attn_2_available

    if requested == "auto":
        requested = "flash_attention_2" if is_flash_attn_2_available() and dtype in FLASH_DTYPES else "sdpa"
    elif requested == "flash_attention_2" and dtype not in FLASH_DTYPES:
        raise ValueError(f"model.attn_implementation=flash_attention_2 needs model.dtype bfloat16 or float16, "
                         f"not {dtype}: flash-attention has no fp32 kernels (set model.attn_implementation=sdpa "
                         "or auto)")
    if requested == "flash_attention_2" and mask_impl == "reference":
        log.warning("model.mask_impl=reference needs an explicit 4-D mask; using sdpa instead of flash_attention_2")
        requested = "sdpa"
    return requested


def _init_new_rows(hf, new_ids: list[int], old_rows: int, gather: Gather) -> None:
    """New token rows (input and output embeddings) = mean of the pre-existing rows, so C starts
    as an 'average token' instead of noise.  ``gather`` makes the matrices whole while they are
    modified (the engine's ZeRO-3 gather; whole already otherwise)."""
    mats = [hf.get_input_embeddings().weight]
    out = hf.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with gather(mats), torch.no_grad():
        for w in mats:
            if w.numel() == 0:  # the gather left this rank without a copy to modify
                continue
            w[new_ids] = w[:old_rows].float().mean(0).to(w.dtype)


def whole(params: list) -> contextlib.AbstractContextManager:
    """The default :data:`Gather`: parameters that are not partitioned are whole already."""
    return contextlib.nullcontext()


def build_model(cfg, *, for_training: bool = True, gather: Gather = whole) -> CoMaModel:
    """The model a run's whole config describes: ``cfg.model`` with the loss's logit-scale
    settings (``loss.temperature``, ``loss.learnable_scale``), the one place the two sections meet."""
    return load_model(cfg.model, for_training=for_training, temperature=cfg.loss.temperature,
                      learnable_scale=cfg.loss.learnable_scale, gather=gather)


def load_model(model_cfg, *, for_training: bool = True, temperature: float = 0.03,
               learnable_scale: bool = False, gather: Gather = whole) -> CoMaModel:
    """Build the CoMa model from ``model_cfg`` (see the module docstring).  ``gather(params)``
    is a context in which ``params`` are whole tensors that may be modified; the model never
    knows how they are stored (``pipeline.engine`` passes ZeRO-3's gather)."""
    from transformers import AutoModelForImageTextToText

    if not model_cfg.init:
        raise ValueError("model.init is empty: set it to a Hugging Face model directory or hub id "
                         "(e.g. --model.init=runs/tiny-qwen2vl from launch/make_tiny_model.py)")
    proc = Processor.from_pretrained(model_cfg.init, model_cfg.num_compression_tokens, model_cfg.family,
                                     model_cfg.min_pixels, model_cfg.max_pixels)
    base_attn = choose_attn(model_cfg.attn_implementation, model_cfg.mask_impl, model_cfg.dtype)
    hf = AutoModelForImageTextToText.from_pretrained(model_cfg.init, dtype=DTYPES[model_cfg.dtype],
                                                     attn_implementation=base_attn)
    old_rows = hf.get_input_embeddings().num_embeddings  # the table's size, however it is stored
    vocab_needed = len(proc.tokenizer)
    if vocab_needed > old_rows:
        hf.resize_token_embeddings(vocab_needed, pad_to_multiple_of=64, mean_resizing=False)
    if proc.added_tokens:
        new_ids = proc.compression_ids[-proc.added_tokens:]
        _init_new_rows(hf, new_ids, min(old_rows, min(new_ids)), gather)  # mean over the rows that existed

    # Our attention wrapper on the language model only (the vision tower keeps the base one).
    lm = proc.adapter.language_model(hf)
    lm.config._attn_implementation = register_attention(base_attn)

    visual = proc.adapter.visual(hf)
    if for_training and model_cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and with kwargs-passed hidden states
        enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False

    backbone = hf
    lc = model_cfg.lora
    if lc.enabled:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_dora=lc.use_dora, bias="none",
            init_lora_weights="gaussian" if lc.init == "gaussian" else True,
            # a regex, so that same-named projections of the vision tower are never adapted
            target_modules=LM_TARGET_REGEX.format("|".join(lc.target_modules)),
            # the K new rows of the input embedding train and the rest of the vocabulary stays
            # frozen; or (trainable_embeddings=all) a trainable copy of the whole table
            **({"modules_to_save": ["embed_tokens"]} if lc.trainable_embeddings == "all"
               else {"trainable_token_indices": {"embed_tokens": list(proc.compression_ids)}}),
        )
        backbone = get_peft_model(hf, peft_cfg)
        if lc.trainable_embeddings == "all" and getattr(hf.config.get_text_config(), "tie_word_embeddings", False):
            # A tied head (Qwen2.5-VL-3B) would keep reading the frozen original: tie it to the
            # trainable copy, so the head trains with it, as the reference code does (model.py:184-187).
            proc.adapter.lm_head(hf).weight = hf.get_input_embeddings().modules_to_save["default"].weight
        if not model_cfg.freeze_vision:
            for p in visual.parameters():
                p.requires_grad_(True)
    else:
        for p in hf.parameters():
            p.requires_grad_(True)
        if model_cfg.freeze_vision:
            for p in visual.parameters():
                p.requires_grad_(False)

    model = CoMaModel(backbone, proc.adapter, model_cfg, proc, base_attn, temperature, learnable_scale)
    if not for_training:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    log.info("CoMa model from %s (%s, attention %s, mask %s, K=%d, %s)", model_cfg.init, proc.adapter.name,
             base_attn, model_cfg.mask_impl, len(proc.compression_ids),
             "LoRA" if lc.enabled else "full fine-tuning")
    return model
