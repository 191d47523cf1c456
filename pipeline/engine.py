"""DeepSpeed setup: the DeepSpeed JSON filled from the run config, ZeRO-3 partitioning at model
construction, optimizer and schedule, ``deepspeed.initialize``.

Order matters under ZeRO-3: ``HfDeepSpeedConfig`` must exist (and stay referenced) *before*
the Hugging Face model is built, so ``from_pretrained`` creates every parameter already
partitioned (``p.numel() == 0``, full size in ``p.ds_numel``) instead of materialising a 7B
model on every rank first.  :func:`build` therefore owns the whole sequence:

    ds_cfg = build_ds_config(cfg, world_size)          # batch fields from the run config
    hf_ds = HfDeepSpeedConfig(ds_cfg)                  # before the model exists
    model = pipeline.model.build_model(cfg, gather=gathered)  # partitioned at construction
    cast_to_engine_dtype(model, ds_cfg)                # what zero.Init did not create: LoRA, scale
    engine, ... = deepspeed.initialize(model, optimizer, lr_scheduler, config=ds_cfg)
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"


# ------------------------------------------------------------------------------- batch fields
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split.

    global_batch: samples per optimizer step over all ranks.
    per_rank: samples per rank per step (global_batch / world).
    micro: samples per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu).
    accumulation: DeepSpeed gradient_accumulation_steps (stage 1: per_rank / micro; stage 2: 1).
    cache_chunk: stage 2 embedding-cache chunk size, None when the per-rank batch is one forward.
    """
    global_batch: int
    per_rank: int
    micro: int
    accumulation: int
    cache_chunk: Optional[int]


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Derive the batch split from ``train.*``; errors name the keys and the fix.

    Stage 1 (cross-entropy) accumulates gradients over micro-batches.  Stage 2 (contrastive)
    must not: accumulation would shrink the in-batch negatives to one micro-batch.  Its
    per-rank batch is one DeepSpeed micro-batch; when it exceeds ``train.micro_batch_size`` (or
    ``train.embedding_cache_chunk`` is set) it is processed by the embedding cache in chunks.
    """
    t = cfg.train
    g, m = t.global_batch_size, t.micro_batch_size
    if g <= 0 or m <= 0:
        raise ConfigError(f"train.global_batch_size ({g}) and train.micro_batch_size ({m}) must be positive")
    if g % world_size:
        raise ConfigError(f"train.global_batch_size={g} is not divisible by the world size {world_size}; "
                          f"use a multiple of {world_size}")
    per_rank = g // world_size
    if t.stage == 1:
        if per_rank % m:
            raise ConfigError(
                f"train.global_batch_size={g} over {world_size} ranks is {per_rank} per rank, not a multiple of "
                f"train.micro_batch_size={m}; choose global_batch_size = micro_batch_size × accumulation × "
                f"{world_size}")
        return BatchPlan(g, per_rank, m, per_rank // m, None)
    chunk = t.embedding_cache_chunk
    if chunk is None and per_rank > m:
        chunk = m
    if chunk is not None:
        if chunk <= 0:
            raise ConfigError(f"train.embedding_cache_chunk must be positive, got {chunk}")
        if chunk >= per_rank:
            chunk = None  # the per-rank batch fits in one forward: no cache needed
    return BatchPlan(g, per_rank, per_rank, 1, chunk)


def _fill(ds: dict, key: str, value: Any, where: str, source: str) -> None:
    """Set ``ds[key]`` unless the user wrote a different explicit value."""
    cur = ds.get(key, AUTO)
    if cur == AUTO or cur is None:
        ds[key] = value
    elif cur != value:
        raise ConfigError(f"{where}: '{key}' is {cur!r} but {source} gives {value!r}; set it to \"auto\" "
                          f"(filled from the run config) or make the two agree")


def _ds_config_path(where: str) -> str:
    """``train.ds_config`` as given when it exists; otherwise a relative path is looked up in the
    checkout the package is installed from (``pip install -e .``), so the presets'
    ``ds_configs/zero3_bf16.json`` works from any working directory."""
    if os.path.isabs(where) or os.path.exists(where):
        return where
    shipped = Path(__file__).resolve().parent.parent / where
    return str(shipped) if shipped.exists() else where


def build_ds_config(cfg: Config, world_size: int, ds_json: Optional[dict] = None) -> dict:
    """The DeepSpeed config for this run: ``train.ds_config`` (or ``ds_json``) with its
    ``"auto"`` fields filled from the run config (see ds_configs/README.md)."""
    where = _ds_config_path(cfg.train.ds_config)
    if ds_json is None:
        if not os.path.exists(where):
            raise ConfigError(f"train.ds_config={where}: file not found (see ds_configs/README.md)")
        try:
            with open(where, encoding="utf-8") as f:
                ds_json = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from None
    ds = copy.deepcopy(ds_json)
    plan = plan_batches(cfg, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", plan.micro, where, "the run config's train.micro_batch_size"
          if cfg.train.stage == 1 else "train.global_batch_size / world size (stage 2)")
    _fill(ds, "gradient_accumulation_steps", plan.accumulation, where,
          "train.global_batch_size / (micro × world size)")
    _fill(ds, "train_batch_size", plan.global_batch, where, "train.global_batch_size")
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), where, "optim.grad_clip")

    dtype = cfg.model.dtype
    for key, want in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        sec = ds.setdefault(key, {"enabled": AUTO})
        cur = sec.get("enabled", AUTO)
        if cur == AUTO:
            sec["enabled"] = want
        elif bool(cur) != want:
            raise ConfigError(f"{where}: '{key}.enabled' is {cur!r} but model.dtype={dtype} implies {want}; "
                              f"set it to \"auto\" or change model.dtype")
    if ds["fp16"]["enabled"]:
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage}; this pipeline supports ZeRO-2 and ZeRO-3 "
                          f"(see ds_configs/README.md)")
    offload = str(zero.get("offload_optimizer", {}).get("device", "none")) not in ("none", "None")
    opt = cfg.optim
    if opt.name == "adamw" and offload:
        raise ConfigError(f"optim.name=adamw with {where} (optimizer offload): DeepSpeed needs its own CPU "
                          f"Adam there; use --optim.name=cpu_adam or --optim.name=fused_adam")
    if opt.name == "fused_adam":
        want_opt = {"type": "AdamW", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                                 "weight_decay": opt.weight_decay}}
        if "optimizer" in ds and ds["optimizer"] != want_opt:
            raise ConfigError(f"{where}: has an 'optimizer' section; with optim.name=fused_adam the optimizer is "
                              f"written from optim.* — remove it from the JSON")
        ds["optimizer"] = want_opt
    elif "optimizer" in ds:
        raise ConfigError(f"{where}: has an 'optimizer' section but optim.name={opt.name} builds the optimizer "
                          f"in code; remove the section or use --optim.name=fused_adam")
    if "scheduler" in ds:
        raise ConfigError(f"{where}: the lr schedule comes from optim.schedule/warmup_ratio; remove 'scheduler'")
    if cfg.train.embedding_cache_chunk is not None and cfg.train.stage == 1:
        raise ConfigError("train.embedding_cache_chunk is a stage-2 option; unset it for stage 1")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ------------------------------------------------------------------------------------- engine
def make_optimizer(cfg: Config, params: list):
    """Client optimizer for DeepSpeed, or None when the DeepSpeed JSON defines it (fused_adam).

    adamw: ``torch.optim.AdamW`` (no build step: what CPU tests use).
    cpu_adam: DeepSpeed's CPU Adam (optimizer offload; JIT-built on first use, ~45 s).
    fused_adam: declared in the DeepSpeed config so DeepSpeed picks FusedAdam on GPU.
    """
    import torch

    o = cfg.optim
    groups = _param_groups(params, o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    return None


def _param_groups(named: list, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and (compression-token) embeddings: decaying the new
    token rows towards zero would fight what stage 1 teaches them."""
    decay, no_decay = [], []
    for name, p in named:
        nd = name.endswith(".bias") or "norm" in name.lower() or "embed" in name
        (no_decay if nd else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _peft_trainable_tokens_off_cuda() -> None:
    """peft's trainable-token rows under ZeRO-3 (``TrainableTokensLayer._collect_token_weights``)
    allocate their receive buffer with ``torch.cuda.current_device()`` ("right now, only CUDA
    is implemented"), which fails on the CPU accelerator.  Inside ``GatheredParameters`` with
    ``modifier_rank=None`` every rank already holds the full embedding, so each rank can copy
    its rows locally; the result is the same on every rank without the broadcast.  Installed
    only when CUDA is absent; on GPUs peft's own code runs."""
    import torch

    if torch.cuda.is_available():
        return
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        from peft.utils.integrations import gather_params_ctx
    except ImportError:
        return
    if getattr(TrainableTokensLayer, "_coma_cpu_patch", False):
        return

    def _collect_token_weights(self, weight, rows, embed_dim):
        with gather_params_ctx([weight], modifier_rank=None):
            return weight[rows].clone()

    TrainableTokensLayer._collect_token_weights = _collect_token_weights
    TrainableTokensLayer._coma_cpu_patch = True


# ------------------------------------------------------------------------- ZeRO-3 parameters
def gathered(params: list):
    """A context in which ``params`` are whole on every rank and rank 0's changes are kept:
    ZeRO-3's ``GatheredParameters`` when any of them is partitioned, nothing otherwise.  The
    model's ``gather`` hook (``pipeline.model.load_model``)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def full_numel(p) -> int:
    """Elements of a parameter, whole: a ZeRO-3-partitioned one holds an empty local tensor
    and its full size in ``ds_numel``."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model, partitioned or not."""
    tr = tot = 0
    for p in model.parameters():
        n = full_numel(p)
        tot += n
        tr += n if p.requires_grad else 0
    return tr, tot


def engine_dtype(ds: dict):
    """The dtype a DeepSpeed engine with this config trains the module in: bf16, fp16 or fp32."""
    import torch

    if ds.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def cast_to_engine_dtype(model, ds: dict) -> list[str]:
    """Cast the parameters that ``zero.Init`` did not create to the engine's dtype; returns their
    names.  Why: DeepSpeed's bf16/fp16 modes keep the fp32 master weights in the optimizer and
    train the module's low-precision copies, and ZeRO-3 flattens every trainable partition into
    one buffer of one dtype (``defragment`` in deepspeed/runtime/zero/stage3.py asserts it).
    DeepSpeed casts a module itself only when none of its parameters is partitioned yet; under
    ZeRO-3 ``from_pretrained`` partitions the backbone in the model dtype, while peft's adapters
    (fp32: ``autocast_adapter_dtype``) and the wrapper's logit-scale offset are made afterwards,
    outside ``zero.Init``, so ``deepspeed.initialize`` would stop on the mixed dtypes.  The
    learnable scale is still updated in fp32 (the master weights); its offset parameterisation
    keeps the forward's τ exact while the offset is 0 (pipeline/model.py)."""
    import torch

    dtype = engine_dtype(ds)
    cast = []
    for name, p in model.named_parameters():
        if not hasattr(p, "ds_id") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast.append(name)
    return cast


@dataclass
class Built:
    engine: Any             # deepspeed.DeepSpeedEngine; engine.module is the CoMa model
    model: Any              # the CoMa model (same object as engine.module)
    ds_config: dict
    plan: BatchPlan
    hf_ds_config: Any       # keep alive: transformers consults it while ZeRO-3 is active


def build(cfg: Config, world_size: int, total_steps: int, model_loader=None,
          ds: Optional[dict] = None, plan: Optional[BatchPlan] = None) -> Built:
    """Build the model under ZeRO and wrap it in a DeepSpeed engine.  ``model_loader`` (takes
    ``cfg.model``, returns the CoMa ``nn.Module``) replaces ``pipeline.model.build_model(cfg)``.  ``total_steps`` sizes the schedule.
    ``ds`` / ``plan``: what :func:`build_ds_config` / :func:`plan_batches` already returned for
    this config (the trainer validates them before starting the process group)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.schedule import make_scheduler_factory

    ds = ds if ds is not None else build_ds_config(cfg, world_size)
    plan = plan if plan is not None else plan_batches(cfg, world_size)
    hf_ds = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None
    if hf_ds is not None:
        _peft_trainable_tokens_off_cuda()
    if model_loader is None:
        from pipeline.model import build_model

        model = build_model(cfg, gather=gathered)
    else:
        model = model_loader(cfg.model)
    cast = cast_to_engine_dtype(model, ds)
    if cast:
        log.info("%d parameters made outside zero.Init cast to the engine's %s (e.g. %s)", len(cast),
                 str(engine_dtype(ds)).split(".")[-1], cast[0])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("no trainable parameters: check model.lora.* / model.freeze_vision")
    optimizer = make_optimizer(cfg, named)
    sched = make_scheduler_factory(total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio,
                                   cfg.optim.schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=[p for _, p in named] if optimizer is None else None,
        lr_scheduler=sched,
        config=ds,
        dist_init_required=False,
    )
    tr, tot = count_parameters(model)
    log.info("%.2fM of %.2fM parameters trainable", tr / 1e6, tot / 1e6)
    if hasattr(engine.module, "place_buffers"):  # ZeRO-3 does not move a zero.Init model's buffers
        engine.module.place_buffers(engine.device)
    log.info("DeepSpeed ZeRO-%d engine: global batch %d = %d per rank (micro %d × accumulation %d)%s",
             zero_stage(ds), plan.global_batch, plan.per_rank, plan.micro, plan.accumulation,
             f", embedding cache chunks of {plan.cache_chunk}" if plan.cache_chunk else "")
    return Built(engine=engine, model=engine.module, ds_config=ds, plan=plan, hf_ds_config=hf_ds)
