"""One config schema for both stages: dataclasses, YAML presets, dotted CLI overrides.

    cfg = load_config("launch/configs/stage1_tiny.yaml", ["--train.max_steps=20", "--model.lora.r=8"])
    save_yaml(cfg, run_dir / "config.yaml")

Every key is validated against the dataclass it belongs to; an unknown key, a value of the
wrong type or a value outside its allowed set raises :class:`ConfigError` naming the dotted
key (and the file it came from) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is unusable; the message names the key and the fix."""


# --------------------------------------------------------------------------------------- schema
def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A config key: its default (or ``factory`` for a mutable one) and the one line of meaning
    that ``launch/stage{1,2}.py --help`` prints for it (:func:`help_text`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraConfig:
    enabled: bool = setting(True, "LoRA on the language model; false = full fine-tuning")
    r: int = setting(16, "LoRA rank")
    alpha: int = setting(64, "LoRA alpha (scaling = alpha / r)")
    dropout: float = setting(0.1, "LoRA dropout")
    target_modules: list[str] = setting(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], help="linear layers that get adapters")
    use_dora: bool = setting(False, "DoRA instead of plain LoRA (the reference code's choice)")
    init: Literal["default", "gaussian"] = setting(
        "default", "adapter A init: peft's default (Kaiming uniform) or gaussian (the reference code's choice)")
    trainable_embeddings: Literal["new_rows", "all"] = setting(
        "new_rows", "input embedding rows that train beside the adapters: the K compression tokens', or all "
        "(the reference code's modules_to_save; a tied output head trains with them)")


@dataclass
class ModelConfig:
    init: str = setting(
        "",
        "Hugging Face VLM directory or hub id, or a previous stage's export/ (stage 2 starts from the stage-1"
        " export)")
    family: Literal["auto", "qwen2_vl", "qwen2_5_vl"] = setting(
        "auto", "VLM family adapter; auto reads model_type from the checkpoint (qwen2_vl, qwen2_5_vl)")
    num_compression_tokens: int = setting(
        32, "K, the number of compression tokens (cmp_0 … cmp_{K-1}) appended after each input (paper: 32)")
    mask_impl: Literal["efficient", "reference", "causal"] = setting(
        "efficient", "stage-1 compression mask: efficient (no L×L mask, flash-attention compatible) or reference; "
        "causal = no compression mask (what the authors' released scripts run)")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = setting(
        "auto", "auto = flash_attention_2 when installed and model.dtype is bfloat16/float16, else sdpa")
    pooling: Literal["mean", "last"] = setting(
        "mean", "embedding = mean of the compression tokens' final states (paper) or the last token's")
    stage1_loss: Literal["answer", "all"] = setting(
        "answer", "stage-1 cross-entropy on answer tokens only (paper) or on all tokens after C (reference code)")
    prompt_format: Literal["chat", "official", "official_eval"] = setting(
        "chat", "chat: X in a chat turn before C (system prompt, user turn, assistant header); official: as the authors' "
        "training code; official_eval: as their evaluation code (official, plus a newline before C on every input "
        "but a text-only candidate; how their released weights are embedded) (docs/fidelity.md)")
    instruction: Optional[str] = setting(
        None,
        "optional instruction placed before the compression tokens, e.g. 'Summarize the above image in a few "
        "words.'")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("bfloat16", "weights/compute dtype (float32 on CPU)")
    freeze_vision: bool = setting(True, "keep the vision tower frozen (paper)")
    gradient_checkpointing: bool = setting(True, "recompute activations in backward to save memory")
    dummy_vision: bool = setting(
        True,
        "run the vision tower on a zero-weighted dummy image for text-only batches, so every ZeRO-3 rank runs"
        " the same modules")
    max_length: Optional[int] = setting(
        None, "stage 1: cap on [X][C][D] tokens; trailing QA turns that do not fit are dropped (null = no cap)")
    # An input's own text (caption, query, passage) cut to this many tokens, its end dropped;
    # the image span, template, instruction and C are not counted, never cut.  None = no cut.
    max_text_tokens: Optional[int] = setting(
        None, "an input's own text (caption, query, passage) is cut to this many tokens (null = no cut)")
    # Image resolution bounds; None = the checkpoint's own preprocessor_config.json (tiny models:
    # digit-sized). The paper's setting (256..1024 visual tokens) is 200704 / 802816.
    min_pixels: Optional[int] = setting(
        None, "smallest image area after resizing; null = the checkpoint's processor setting (paper: 200704)")
    max_pixels: Optional[int] = setting(
        None, "largest image area after resizing; null = the checkpoint's processor setting (paper: 802816)")
    lora: LoraConfig = setting(factory=LoraConfig, help="LoRA / DoRA adapters on the language model")


@dataclass
class DataSource:
    shards: str = setting("", "brace pattern of a shard set, e.g. data/stage2/shards/train-{000000..000575}.tar")
    weight: float = setting(1.0, "sampling weight of this source in the mixture")
    max_samples: Optional[int] = setting(None, "cap of samples per epoch from this source")
    name: Optional[str] = setting(None, "label used in logs and metrics")


@dataclass
class DataConfig:
    kind: Literal["pair", "qa", "mmeb"] = setting(
        "qa", "sample kind of the shards: qa (stage 1), mmeb (stage 2), pair")
    sources: list[DataSource] = setting(factory=list, help="list of shard sources forming the mixture (keys below)")
    workers: int = setting(2, "DataLoader workers per rank (shards are split over ranks × workers)")
    shuffle_buffer: int = setting(1000, "sample shuffle buffer per worker")
    resampled: bool = setting(False, "infinite resampled stream (with train.max_steps) instead of exact epochs")
    epoch_samples: Optional[int] = setting(
        None, "resampled or uniform sampling: samples in an epoch over all ranks (default: the sources' total)")
    task_sampling: Literal["proportional", "uniform"] = setting(
        "proportional", "stage 2: tasks in proportion to their samples (one stream), or uniform: each block of "
        "task_batch_size from one source drawn by weight, whatever its size (the authors'; one source per task)")
    batch_composition: Literal["per_rank", "shared"] = setting(
        "per_rank", "uniform sampling: each rank draws its own block sequence, or shared: every rank the same "
        "one, so a global step holds few tasks (the authors')")
    task_batch_size: Optional[int] = setting(
        None,
        "stage 2: sub-batches of this size drawn from a single task, so in-batch negatives share a task "
        "(paper: 64)")
    seed: int = setting(0, "seed of the shard order and sample shuffle (per epoch)")


@dataclass
class LossConfig:
    temperature: float = setting(0.03, "InfoNCE temperature τ; logit scale = 1/τ")
    learnable_scale: bool = setting(False, "learn the logit scale (inside the model's forward, ZeRO-3 safe)")
    symmetric: bool = setting(False, "add the target→query direction to the loss")
    backend: Literal["auto", "triton", "cuda", "torch", "reference"] = setting(
        "auto", "InfoNCE implementation: auto = triton on a GPU, torch on the CPU; reference = plain PyTorch")
    hard_negatives: bool = setting(
        True, "use the samples' own hard negatives as extra candidates (false: in-batch negatives only)")


@dataclass
class OptimConfig:
    name: Literal["adamw", "fused_adam", "cpu_adam"] = setting(
        "adamw", "adamw (torch), fused_adam (DeepSpeed FusedAdam) or cpu_adam (with optimizer offload)")
    lr: float = setting(5e-5, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], help="Adam betas")
    eps: float = setting(1e-8, "Adam epsilon")
    schedule: Literal["cosine", "constant"] = setting("cosine", "cosine decay after warm-up, or constant")
    warmup_ratio: float = setting(0.05, "share of the steps used for linear warm-up")
    min_lr_ratio: float = setting(0.0, "final learning rate as a fraction of optim.lr")
    grad_clip: float = setting(1.0, "gradient norm clipping (DeepSpeed gradient_clipping)")


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = setting(
        1, "1 = compression pre-training, 2 = contrastive matching (must match the entry point)")
    name: str = setting("coma", "run name: the run directory is train.run_root/train.name")
    run_root: str = setting("runs", "folder holding run directories")
    ds_config: str = setting(
        "ds_configs/zero3_bf16.json", "DeepSpeed JSON with engine knobs (batch fields are filled from this config)")
    global_batch_size: int = setting(256, "samples per optimizer step over all GPUs")
    micro_batch_size: int = setting(8, "samples per GPU per forward/backward; accumulation = global / (micro × GPUs)")
    epochs: int = setting(1, "passes over the data (ignored when train.max_steps is set)")
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps")
    embedding_cache_chunk: Optional[int] = setting(
        None, "stage 2: chunk size of the embedding cache (GradCache), so the per-GPU batch can exceed memory")
    log_every: int = setting(10, "steps between console/metrics lines")
    save_every: int = setting(500, "steps between checkpoints")
    keep_last: int = setting(3, "complete checkpoints kept")
    resume: str = setting("auto", "auto (newest complete checkpoint), none, or a checkpoint path")
    seed: int = setting(42, "seed of model init, dropout and data order")
    deterministic: bool = setting(
        False, "torch.use_deterministic_algorithms (warn-only), for resumes that reproduce the uninterrupted losses")
    max_bad_steps: int = setting(5, "consecutive NaN/Inf steps (skipped) before the run stops with a message")
    # Samples listed in sizes.json that the loader could not deliver (undecodable, or lost in a
    # truncated / unreadable shard), as a share of those trained (at least one epoch's), above
    # which the run stops (exit 3) naming the worst shards.
    max_skipped_fraction: float = setting(
        0.01,
        "share of the samples trained that may be undecodable or lost in damaged shards before the run stops "
        "(exit 3)")
    # Python's garbage collector run by the loop every N steps, on every rank at the same step,
    # instead of whenever allocations trigger it (0: Python's automatic GC).  See pipeline/runtime.py.
    gc_every: int = setting(
        50, "Python's GC runs every this many steps on every rank at once, not at random (0 = automatic GC)")
    dist_timeout_s: int = setting(1800, "collective timeout: a dead rank makes the others exit instead of hanging")
    tensorboard: bool = setting(True, "write TensorBoard events to RUN/tensorboard")
    wandb: bool = setting(False, "log to Weights & Biases when installed")
    wandb_project: str = setting("coma", "W&B project name")
    peak_tflops: Optional[float] = setting(
        None, "per-device peak TFLOPs for MFU when the device is not known to pipeline/flops.py")
    # Signals that mean "save and exit": any rank receiving one makes every rank checkpoint at
    # the end of the current step and exit with status 4 (SLURM: --signal=USR1@300, preemption)
    stop_signals: list[str] = setting(
        factory=lambda: ["SIGUSR1", "SIGTERM"], help=
        "a rank receiving one makes all ranks save the current step and exit 4")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------- machinery
def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    tp, optional = _strip_optional(tp)
    if isinstance(value, CliScalar):
        value = str(value) if tp is str else value.parsed
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a and type(value) is type(a):
                return a
            if isinstance(a, int) and isinstance(value, str) and value.isdigit() and int(value) == a:
                return a
        raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(allowed)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # schema bug, not user input


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(key)}; valid keys here: {sorted(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config) -> Any:
    return _from_dict(cls, data or {})


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class CliScalar(str):
    """A command-line override's text with its YAML reading in ``parsed``: the schema decides.
    A string key keeps the text as typed (``--train.name=off`` is the run "off", not False;
    ``--train.name=007`` is "007", not 7); any other key gets the parsed value."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any):
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``--a.b=value`` or ``a.b=value`` → (["a", "b"], parsed value).  Values are parsed as YAML
    (so ``8``, ``1e-4``, ``true``, ``null``, ``[q_proj, v_proj]`` all work); a scalar comes as a
    :class:`CliScalar`, so a string key keeps the text."""
    s = item[2:] if item.startswith("--") else item
    if "=" not in s:
        raise ConfigError(f"override '{item}' must look like --section.key=value{did_you_mean(s)}")
    key, raw = s.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
    if isinstance(value, str) and raw.strip() == "":
        value = ""
    elif isinstance(value, (bool, int, float)):
        value = CliScalar(raw.strip(), value)
    return key.split("."), value


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] | tuple = (),
                cls: type = Config) -> Any:
    """Load a YAML preset (optional; may ``include:`` another preset relative to itself) and
    apply dotted overrides.  Returns a validated ``cls`` instance."""
    data: dict = {}
    if path is not None:
        data = _read_yaml(path)
    known = None
    for item in overrides:
        keys, value = parse_override(item)
        if cls is Config:  # a typo gets the closest key, with the value typed
            known = known or {k.rsplit(".", n)[0] for k, _, _ in schema_keys() if "[]" not in k
                              for n in range(k.count(".") + 1)}
            if ".".join(keys) not in known:
                raise ConfigError(f"unknown config key '{'.'.join(keys)}' in override '{item}'"
                                  f"{did_you_mean('.'.join(keys), item.split('=', 1)[1])} (--help lists every key)")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    try:
        return from_dict(data, cls)
    except ConfigError as e:
        where = f" (from {path} and command-line overrides)" if path else ""
        raise ConfigError(f"{e}{where}") from None


def _read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: include cycle {list(_seen)}")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    inc = data.pop("include", None)
    if inc:
        base = _read_yaml(os.path.join(os.path.dirname(path), inc), _seen + (path,))
        data = _merge(base, data)
    return data


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Atomic write of the resolved config."""
    from pipeline.fileio import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


# ------------------------------------------------------------------------------- reference / help
def schema_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, meaning)`` for every leaf of the schema, in declaration order; a
    list of dataclasses (``data.sources``) also contributes its item's keys as
    ``data.sources[].key``.  The README's config reference and ``--help`` are checked against /
    generated from this."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.extend(schema_keys(type(default), key + "."))
            continue
        out.append((key, default, f.metadata.get("help", "")))
        args = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and args and dataclasses.is_dataclass(args[0]):
            out.extend(schema_keys(args[0], key + "[]."))
    return out


def format_value(v: Any) -> str:
    """A default as it is written on the command line or in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v if v else '""'
    return repr(v)


def did_you_mean(key: str, value: str = "VALUE") -> str:
    """'; did you mean --train.resume=…?' for a mistyped or unqualified key ('resume',
    'train.resum', 'lora.r'), or '' when nothing is close."""
    import difflib

    key = key.split("=", 1)[0].lstrip("-")
    keys = [k for k, _, _ in schema_keys() if "[]" not in k]
    tails = [k for k in keys if k.endswith("." + key)]
    close = tails or difflib.get_close_matches(key, keys, n=1, cutoff=0.75) or difflib.get_close_matches(
        key, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.8)
    if not close:
        return ""
    best = close[0] if "." in close[0] else next(k for k in keys if k.endswith("." + close[0]))
    return f"; did you mean --{best}={value}?"


def help_text() -> str:
    """Every config section and key with its default and meaning, from the schema itself."""
    lines, section = [], None
    for key, default, meaning in schema_keys():
        top = key.split(".", 1)[0]
        if top != section:
            section = top
            lines.append(f"\n{section}:")
        flag = f"  --{key}={format_value(default)}"
        lines.append(f"{flag:<46} {meaning}" if len(flag) < 46 else f"{flag}\n{'':<46} {meaning}")
    return "\n".join(lines).lstrip("\n")


def check_model_init(init: str) -> None:
    """``model.init`` must be a model directory (one with ``config.json``) or a Hub id
    (``org/name``).  A path that does not exist or holds no model is a config error here, on
    every rank before anything loads, instead of a transformers traceback per rank."""
    path = Path(init).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.init={init} has no config.json, so it is not a Hugging Face model "
                              f"directory: use a VLM directory, a Hub id, or a stage's export (runs/NAME/export)")
        return
    if init.startswith(("/", ".", "~")) or init.count("/") > 1 or "\\" in init:
        raise ConfigError(f"model.init={init}: no such directory (a Hub id looks like org/name); "
                          f"a previous stage's export is runs/NAME/export")
