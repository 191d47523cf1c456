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
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is unusable; the message names the key and the fix."""


# --------------------------------------------------------------------------------------- schema
@dataclass
class LoraConfig:
    enabled: bool = True           # False = full fine-tuning of the language model
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_dora: bool = False


@dataclass
class ModelConfig:
    init: str = ""                                  # HF VLM path / hub id, or a previous stage's export dir
    family: Literal["auto", "qwen2_vl", "qwen2_5_vl"] = "auto"
    num_compression_tokens: int = 32                # K
    mask_impl: Literal["efficient", "reference"] = "efficient"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    pooling: Literal["mean", "last"] = "mean"       # mean of C's final states (paper) or last token
    stage1_loss: Literal["answer", "all"] = "answer"  # CE on answers only, or on every token after C
    instruction: Optional[str] = None               # optional instruction placed before C
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    freeze_vision: bool = True
    gradient_checkpointing: bool = True
    dummy_vision: bool = True                       # run the vision tower on text-only batches (ZeRO-3)
    max_length: Optional[int] = None                # stage 1: drop trailing QA turns beyond this many tokens
    # An input's own text (caption, query, passage) cut to this many tokens, its end dropped;
    # the image span, template, instruction and C are not counted, never cut.  None = no cut.
    max_text_tokens: Optional[int] = None
    # Image resolution bounds; None = the checkpoint's own preprocessor_config.json (tiny models:
    # digit-sized). The paper's setting (256..1024 visual tokens) is 200704 / 802816.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataSource:
    shards: str = ""                # brace pattern, e.g. data/train-{000000..000041}.tar
    weight: float = 1.0             # sampling weight in the mixture
    max_samples: Optional[int] = None  # cap per epoch for this source
    name: Optional[str] = None


@dataclass
class DataConfig:
    kind: Literal["pair", "qa", "mmeb"] = "qa"
    sources: list[DataSource] = field(default_factory=list)
    workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False         # infinite resampled stream instead of exact epochs
    task_batch_size: Optional[int] = None  # stage 2: sub-batches of this size from one task
    seed: int = 0


@dataclass
class LossConfig:
    temperature: float = 0.03       # tau; logit scale = 1 / tau
    learnable_scale: bool = False
    symmetric: bool = False
    backend: Literal["auto", "triton", "cuda", "torch", "reference"] = "auto"
    hard_negatives: bool = True


@dataclass
class OptimConfig:
    name: Literal["adamw", "fused_adam", "cpu_adam"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = 1
    name: str = "coma"
    run_root: str = "runs"
    ds_config: str = "ds_configs/zero3_bf16.json"
    global_batch_size: int = 256
    micro_batch_size: int = 8
    epochs: int = 1
    max_steps: Optional[int] = None       # overrides epochs when set
    embedding_cache_chunk: Optional[int] = None  # stage 2: chunk size of the GradCache path
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    resume: str = "auto"                  # auto | none | PATH
    seed: int = 42
    deterministic: bool = False
    max_bad_steps: int = 5                # consecutive NaN/Inf steps before the run stops
    # Python's garbage collector run by the loop every N steps, on every rank at the same step,
    # instead of whenever allocations trigger it (0: Python's automatic GC).  See pipeline/train.py.
    gc_every: int = 50
    dist_timeout_s: int = 1800
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "coma"
    peak_tflops: Optional[float] = None   # per-device peak for MFU when the device is not in pipeline/flops.py
    # Signals that mean "save and exit": any rank receiving one makes every rank checkpoint at
    # the end of the current step and exit with status 4 (SLURM: --signal=USR1@300, preemption)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # Fault injection, for the robustness tests: NaN loss on rank 0 at these steps; SIGKILL of
    # rank fault_kill_rank in the middle of step fault_kill_step.
    fault_nan_steps: list[int] = field(default_factory=list)
    fault_kill_step: Optional[int] = None
    fault_kill_rank: int = 1


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
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(names)}")
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
        raise ConfigError(f"override '{item}' must look like --section.key=value")
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
    for item in overrides:
        keys, value = parse_override(item)
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
