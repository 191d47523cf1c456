"""One metrics object for training: a console line per log step, ``metrics.jsonl``,
TensorBoard, and Weights & Biases when installed and asked for.

Keys are namespaced (``loss/…``, ``optim/…``, ``throughput/…``, ``memory/…``, ``time/…``,
``data/…``, ``train/…``).  Only rank 0 writes; other ranks construct the object with
``enabled=False`` so call sites need no rank checks.  :meth:`Metrics.log_window` is where the
training loop's numbers are reduced over ranks (``pipeline.dist``: two small all-reduces per log
line) and get their names; :class:`Window` sums them between log lines.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from pipeline import dist
from pipeline.fileio import atomic_write_text
from pipeline.flops import batch_shape_stats
from pipeline.runtime import peak_memory_gib

log = logging.getLogger("coma.train")

# Short console names for the keys worth a glance; everything else goes to the files only.
_CONSOLE = [
    ("loss/train", "loss", "{:.4f}"),
    ("optim/lr", "lr", "{:.2e}"),
    ("optim/grad_norm", "gnorm", "{:.3f}"),
    ("throughput/samples_per_s_per_gpu", "samp/s/gpu", "{:.2f}"),
    ("throughput/tokens_per_s_per_gpu", "tok/s/gpu", "{:.0f}"),
    ("throughput/tflops_per_gpu", "TFLOPs/gpu", "{:.4g}"),
    ("throughput/mfu", "MFU", "{:.1%}"),
    ("memory/peak_gib", "mem", "{:.2f}GiB"),
    ("time/data_wait_share", "data_wait", "{:.1%}"),
    ("data/skipped_samples", "skipped_samples", "{:.0f}"),
    ("train/skipped_steps", "skipped_steps", "{:.0f}"),
]


@dataclass
class Window:
    """Per-rank sums over the steps since the last log line."""
    time: float = 0.0
    data: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    losses: list = field(default_factory=list)
    steps: int = 0
    lr: Optional[float] = None
    gc: float = 0.0

    def add(self, t, d, s, tok, f, loss, g=0.0):
        self.time += t
        self.data += d
        self.gc += g
        self.samples += s
        self.tokens += tok
        self.flops += f
        self.steps += 1
        if loss is not None:
            self.losses.append(loss)


def count_tokens(batches: list) -> tuple[int, list[int], list[int]]:
    seqs, patches = [], []
    for b in batches:
        s, p = batch_shape_stats(b)
        seqs += s
        patches += p
    return sum(seqs), seqs, patches


class Metrics:
    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "coma", run_name: str = "coma",
                 config: Optional[Mapping[str, Any]] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file (steps repeat after a crash, which a
        # reader resolves by keeping the last row of each step).
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is a core dependency; say so if it is gone
                log.warning("TensorBoard disabled (%s); pip install tensorboard", e)
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                log.warning("train.wandb=true but wandb is not installed (pip install -e '.[wandb]'); "
                            "logging to metrics.jsonl and TensorBoard only")
            else:
                self._wandb = _wandb.init(project=wandb_project, name=run_name, dir=str(self.run_dir),
                                          id=self._wandb_id(), config=dict(config or {}), resume="allow")

    def _wandb_id(self) -> str:
        """The W&B run id, kept in the run directory: a resumed run (``--resume auto``, a
        requeued SLURM job) continues the same W&B run instead of starting a new one."""
        path = self.run_dir / "wandb_id.txt"
        try:
            return path.read_text().strip()
        except OSError:
            run_id = secrets.token_hex(6)  # W&B ids: letters/digits, unique per project
            atomic_write_text(path, run_id + "\n")
            return run_id

    def log_window(self, w: Window, state, eng, source, peak: Optional[float]) -> dict:
        """Reduce the window over ranks (collective: every rank calls it, enabled or not), name
        the numbers and log them on rank 0; returns them."""
        t = max(w.time, 1e-9)
        # Two collectives per log line: sums (per-GPU rates are sums / world) and the memory maximum.
        tot = dist.all_reduce_dict({
            "loss": sum(w.losses) / len(w.losses) if w.losses else 0.0, "has_loss": 1.0 if w.losses else 0.0,
            "sps": w.samples / t, "tps": w.tokens / t, "flops": w.flops / t, "wait": w.data / t, "gc": w.gc / t,
            "skipped_samples": float(source.skipped_samples)}, "sum")
        mem = dist.all_reduce_dict({"m": peak_memory_gib()}, "max")["m"]
        world = dist.get_world_size()
        mean = {k: v / world for k, v in tot.items()}
        # mean over the ranks that had a finished step in the window
        loss_g = tot["loss"] / tot["has_loss"] if tot["has_loss"] > 0 else float("nan")
        gn = eng.get_global_grad_norm()
        vals = {
            "loss/train": loss_g,
            "optim/lr": w.lr,
            "optim/grad_norm": float(gn) if gn is not None else None,
            "throughput/samples_per_s_per_gpu": mean["sps"],
            "throughput/tokens_per_s_per_gpu": mean["tps"],
            "throughput/tflops_per_gpu": mean["flops"] / 1e12,
            "throughput/mfu": (mean["flops"] / peak) if peak else None,
            "memory/peak_gib": mem,
            "time/data_wait_share": mean["wait"],
            "time/gc_share": mean["gc"],  # the scheduled collections of train.gc_every
            "time/step_s": w.time / max(w.steps, 1),
            "data/skipped_samples": tot["skipped_samples"],
            "data/samples_seen": float(state.samples_seen),
            "train/skipped_steps": float(state.skipped_steps),
        }
        vals = {k: v for k, v in vals.items() if v is not None}
        self.log(state.step, vals)
        return vals

    def log(self, step: int, values: Mapping[str, float], console: bool = True) -> None:
        """Record ``values`` (namespaced keys → floats) for optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _clean(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=step)
        if console:
            log.info(format_line(step, values))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clean(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf literal


def format_line(step: int, values: Mapping[str, float], total_steps: Optional[int] = None) -> str:
    """``step 120 | loss 1.2345 | lr 5.00e-05 | …`` with the known keys in a fixed order, then
    any other ``loss/…`` keys (stage-specific losses)."""
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    for key, short, fmt in _CONSOLE:
        v = values.get(key)
        if v is not None:
            parts.append(f"{short} {fmt.format(v)}")
    for key in sorted(values):
        if key.startswith("loss/") and key != "loss/train" and values[key] is not None:
            parts.append(f"{key[5:]} {values[key]:.4f}")
    return " | ".join(parts)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl, the last row winning for a step logged twice (resume)."""
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]
