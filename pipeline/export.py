"""Export a trained CoMa model (embedding with it: :mod:`pipeline.embedder`).

    export_model(model, "runs/stage2/export")                  # LoRA merged, HF dir + processor + coma.json
    export_engine(built, "runs/NAME/export")                   # a training run's engine (collective)
    export_checkpoint("runs/NAME/checkpoints/step-100", out)   # a saved checkpoint, offline
    export_model(model, out, state_dict=gathered)              # ZeRO-3: weights the engine gathered

The export directory is a plain Hugging Face model directory (``from_pretrained`` of the
backbone class loads it with no peft and no project code) plus:

* the tokenizer, with the compression tokens, and ``preprocessor_config.json`` (PIL processor);
* ``coma.json``: K, the compression token strings, pooling, prompt format, instruction, text cap, logit
  scale, family —
  what :class:`Embedder` needs to rebuild the exact ``[X][C]`` inputs.

A stage-1 export is also a valid ``model.init`` for stage 2 (the tokens are found, not re-added).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Optional

import torch

from pipeline.config import LoraConfig, ModelConfig
from pipeline.fileio import atomic_directory
from pipeline.model import DTYPES, CoMaModel

META_FILE = "coma.json"
FORMAT_VERSION = 1
# Image bounds of the authors' evaluation (scripts/eval.sh passes none, so src/arguments.py:46-47's
# defaults apply: 4..1280 visual tokens); their training used 256..1024.
RELEASED_EVAL_PIXELS = (28 * 28 * 4, 28 * 28 * 1280)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _zero3_construction_off():
    """Build plain (unpartitioned) modules even while the engine's ``HfDeepSpeedConfig`` is alive.

    The export runs on rank 0 alone; with ZeRO-3 detected, transformers would partition the
    skeleton and peft would broadcast its trainable-token rows from rank 0 — a collective the
    other ranks never join (a hang).  The weights come in whole as a state dict, so neither is
    wanted here."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def merged_backbone(model: CoMaModel, state_dict: Optional[dict] = None) -> torch.nn.Module:
    """A fresh CPU copy of the HF model holding ``state_dict`` (default: the model's own), with
    any LoRA/DoRA and trainable-token deltas merged into the base weights.

    ``state_dict`` keys are the CoMa model's own names (``backbone.…``, as ``model.state_dict()``
    or DeepSpeed's consolidated ZeRO-3 state dict give them).  The skeleton is built with the
    class constructor, not ``_from_config``, so an active ZeRO-3 context does not partition it.
    """
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not sd:
        raise ValueError("state_dict has no 'backbone.*' keys: pass the CoMa model's (gathered) state dict")
    hf = model.hf
    cfg = copy.deepcopy(hf.config)
    cfg.get_text_config()._attn_implementation = model.base_attn  # the saved model needs no project code
    first = next(iter(sd.values()))
    dtype = first.dtype if first.is_floating_point() else torch.float32
    with _zero3_construction_off():
        with _default_dtype(dtype):
            skel = type(hf)(cfg)
        if model.is_peft:
            from peft import get_peft_model

            peft_cfg = copy.deepcopy(model.backbone.peft_config["default"])
            wrapped = get_peft_model(skel, peft_cfg)
            missing, unexpected = wrapped.load_state_dict(sd, strict=False)
            _check_load(missing, unexpected)
            skel = wrapped.merge_and_unload()
        else:
            missing, unexpected = skel.load_state_dict(sd, strict=False)
            _check_load(missing, unexpected)
    return skel.eval()


def _check_load(missing, unexpected) -> None:
    # tied lm_head may legitimately be absent; anything else means a wrong state dict
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}…, "
                         f"unexpected {list(unexpected)[:5]}… (was it gathered from this model?)")


def export_model(model: CoMaModel, out_dir: str | os.PathLike, state_dict: Optional[dict] = None,
                 dtype: Optional[str] = None) -> Path:
    """Write the merged model, tokenizer, image processor and ``coma.json`` to ``out_dir``.

    Built in a temporary sibling directory and renamed into place at the end, so an
    interrupted export never leaves a directory that looks complete.  ``dtype`` ("bfloat16",
    "float32", …) casts the saved weights; default: as trained.  Call it on one rank.
    """
    out = Path(out_dir).resolve()
    hf = merged_backbone(model, state_dict)
    if dtype is not None:
        hf = hf.to(DTYPES[dtype])
    offset = state_dict.get("logit_scale_offset") if state_dict is not None else None
    scale = float(model.logit_scale(offset).detach())
    meta = {
        "format": FORMAT_VERSION,
        "family": model.adapter.name,
        "num_compression_tokens": model.processor.num_compression_tokens,
        "compression_tokens": model.processor.tokenizer.convert_ids_to_tokens(model.processor.compression_ids),
        "pooling": model.cfg.pooling,
        "prompt_format": model.cfg.prompt_format,
        "instruction": model.cfg.instruction,
        "max_text_tokens": model.cfg.max_text_tokens,
        "logit_scale": scale,
        "dtype": str(next(hf.parameters()).dtype).replace("torch.", ""),
        "source": model.cfg.init,
    }
    with atomic_directory(out) as tmp:
        hf.save_pretrained(tmp)
        model.processor.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """``coma.json`` of an export; for a plain Hugging Face VLM directory (no ``coma.json``, e.g.
    ``launch/make_tiny_model.py``'s output) the defaults an untrained model is evaluated with:
    fresh compression tokens as stage 1 would add them, mean pooling, τ = the loss default."""
    f = Path(path) / META_FILE
    if not f.exists():
        if (Path(path) / "config.json").exists():
            return _meta_of_plain_directory(path)
        raise FileNotFoundError(f"{f} not found: {path} is neither an exported CoMa model nor a Hugging Face "
                                "model directory (export one with launch/export.py or pipeline.export.export_model)")
    meta = json.loads(f.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{f}: format {meta.get('format')!r} is not supported (expected {FORMAT_VERSION})")
    return meta


def inference_config(path: str | os.PathLike, meta: dict, **overrides) -> ModelConfig:
    """The ``ModelConfig`` that rebuilds the inputs ``meta`` (:func:`read_meta` of ``path``)
    describes, for inference: no LoRA, no gradient checkpointing, no dummy vision pass.
    ``overrides`` set any other field (dtype, pooling, the stage-1 settings of the probe)."""
    fields = dict(init=str(path), family=meta["family"], num_compression_tokens=meta["num_compression_tokens"],
                  pooling=meta["pooling"], instruction=meta["instruction"],
                  min_pixels=meta.get("min_pixels"), max_pixels=meta.get("max_pixels"),
                  max_text_tokens=meta.get("max_text_tokens"),  # absent: exported before the key
                  prompt_format=meta.get("prompt_format", "chat"),
                  gradient_checkpointing=False, dummy_vision=False, lora=LoraConfig(enabled=False))
    return ModelConfig(**{**fields, **overrides})


def _meta_of_plain_directory(path) -> dict:
    """What :func:`read_meta` says of a model directory without ``coma.json``: the config
    defaults (an untrained model), except for the authors' released checkpoints
    (404-not-founds/CoMa-3B, -7B, recognised by their ``<|ctoken_pad_i|>`` tokens), which are
    embedded as their evaluation does (scripts/eval.sh: --pooling eos, i.e. the last compression
    token; the official input format; their eval's image bounds)."""
    from transformers import AutoTokenizer

    from pipeline.config import LossConfig
    from pipeline.processing import released_compression_tokens

    d = ModelConfig()
    meta = {"format": FORMAT_VERSION, "family": "auto", "num_compression_tokens": d.num_compression_tokens,
            "pooling": d.pooling, "prompt_format": d.prompt_format, "instruction": d.instruction,
            "max_text_tokens": d.max_text_tokens, "logit_scale": 1.0 / LossConfig().temperature}
    try:
        k = released_compression_tokens(AutoTokenizer.from_pretrained(str(path)))
    except (OSError, ValueError):
        k = 0
    if k:
        return {**meta, "released": True, "num_compression_tokens": k, "pooling": "last", "prompt_format": "official_eval",
                "min_pixels": RELEASED_EVAL_PIXELS[0], "max_pixels": RELEASED_EVAL_PIXELS[1]}
    return {**meta, "untrained": True}


# ------------------------------------------------------------------- exporting a training run
def export_engine(built, out_dir: Path) -> Path:
    """Gather the (ZeRO-3-partitioned) weights and write the Hugging Face export on rank 0.
    Collective: every rank must call it."""
    from pipeline import dist
    from pipeline.engine import zero_stage

    eng = built.engine
    if zero_stage(built.ds_config) == 3:
        sd = eng._zero3_consolidated_16bit_state_dict()  # full weights on rank 0, None elsewhere
    else:
        sd = {k: v.detach().cpu() for k, v in built.model.state_dict().items()} if dist.is_main() else None
    # ZeRO-3's construction hook would partition the CPU skeleton export builds: switch it off
    # now that training is over (the weights are already gathered).
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if dist.is_main():
        export_model(built.model, out_dir, state_dict=dict(sd))
    dist.barrier()
    return out_dir


def export_checkpoint(checkpoint: str, out_dir: str, dtype: Optional[str] = None) -> Path:
    """Offline export of a saved checkpoint, one CPU process, no DeepSpeed engine:
    ``checkpoint`` is a ``step-N`` directory or a checkpoints directory (its ``latest``).  The
    ZeRO partitions are merged into full fp32 weights by DeepSpeed's ``zero_to_fp32``, put
    into the model rebuilt from the config stored in the checkpoint, LoRA merged, written as
    a Hugging Face directory (``dtype`` default: the run's ``model.dtype``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.checkpoint import resolve_resume
    from pipeline.config import load_config
    from pipeline.model import build_model

    path = resolve_resume(checkpoint, checkpoint, what="--checkpoint")
    if path is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint there")
    cfg = load_config(path / "config.yaml")
    model = build_model(cfg, for_training=False)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return export_model(model, out_dir, state_dict=dict(sd), dtype=dtype or cfg.model.dtype)
