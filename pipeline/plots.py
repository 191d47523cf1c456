"""PNG charts for a run directory: loss curves per stage, Precision@1 per task (matplotlib, Agg).

    from pipeline.plots import plot_run, plot_precision_per_task
    plot_run("runs/coma-stage1")                        # -> runs/coma-stage1/loss.png
    plot_precision_per_task({"stage 1 + 2": scores}, "runs/x/precision_at_1.png")

Inputs are the files the pipeline already writes: ``metrics.jsonl`` (one JSON object per log step,
namespaced keys such as ``loss/train``; the step under ``step`` or ``train/step``) and the dict
returned by :func:`pipeline.evaluate.evaluate` (``{"tasks": {task: {"precision@1": …}}}``).
Nothing here imports pyplot at module import time: the backend must be forced to Agg first so
that plotting works on headless nodes and inside SLURM jobs.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Mapping, Optional, Sequence

from pipeline.fileio import atomic_write_bytes

STEP_KEYS = ("step", "train/step", "global_step")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never try to open a display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a run directory is accepted too).  A torn last line, as left by
    a job killed mid-write, is ignored; a bad line elsewhere is an error naming the line."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
    return rows


def loss_series(rows: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """``{loss key: (steps, values)}`` for every numeric key whose name starts with ``loss``
    (``loss``, ``loss/train``, ``loss/eval``, …), sorted by step.  A step logged twice (a resumed
    run appends to the same file) keeps its last value; rows without a step use their position."""
    acc: dict[str, dict[float, float]] = {}
    for i, r in enumerate(rows):
        step = next((r[k] for k in STEP_KEYS if isinstance(r.get(k), (int, float))), i)
        for k, v in r.items():
            if k.split("/")[0] == "loss" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                acc.setdefault(k, {})[step] = float(v)
    return {k: ([s for s in sorted(d)], [d[s] for s in sorted(d)]) for k, d in acc.items()}


def _stage_label(run_dir: str) -> str:
    """``stage N`` from the run's resolved config.yaml when present, else the folder name."""
    cfg = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg):
        import yaml

        with open(cfg, encoding="utf-8") as f:
            stage = ((yaml.safe_load(f) or {}).get("train") or {}).get("stage")
        if stage is not None:
            return f"stage {stage} ({os.path.basename(os.path.normpath(run_dir))})"
    return os.path.basename(os.path.normpath(run_dir))


def plot_loss_curves(stages: Mapping[str, str], out_png: str) -> str:
    """One panel per stage: every loss series of that stage's ``metrics.jsonl`` against the step.

    ``stages``: label → run directory or metrics.jsonl path.  Returns ``out_png``.
    """
    plt = _pyplot()
    stages = {k: v for k, v in stages.items()}
    if not stages:
        raise ValueError("no stages to plot")
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, (label, path) in zip(axes[0], stages.items()):
        series = loss_series(read_metrics(path))
        for key, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=key)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return out_png


def plot_precision_per_task(results: Mapping[str, dict], out_png: str, metric: str = "precision@1",
                            title: Optional[str] = None, chance: Optional[float] = None) -> str:
    """Grouped bars of ``metric`` (percent) per task, one bar per model.

    ``results``: model label → the dict returned by :func:`pipeline.evaluate.evaluate` (or any
    ``{"tasks": {task: {metric: fraction}}}``); the overall mean is drawn as the last group.
    ``chance`` (a fraction) draws the random-guess level as a dashed line.
    """
    plt = _pyplot()
    if not results:
        raise ValueError("no results to plot")
    tasks: list[str] = []
    for r in results.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    groups = tasks + ["overall"]
    n = len(results)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, n) / 2 + 2), 3.8))
    for j, (label, r) in enumerate(results.items()):
        vals = [100 * r["tasks"][t][metric] if t in r["tasks"] else float("nan") for t in tasks]
        vals.append(100 * r["overall"][metric])
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, vals, width=width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"{metric} per task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return out_png


def plot_run(run_dir: str, out_png: Optional[str] = None) -> Optional[str]:
    """Loss chart of one training run: ``run_dir/metrics.jsonl`` → ``run_dir/loss.png``.
    Returns the path, or None when the run has no metrics file yet."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return None
    return plot_loss_curves({_stage_label(run_dir): run_dir}, out_png or os.path.join(run_dir, "loss.png"))


def _save(fig, path: str) -> None:
    """Atomic: a reader (or a requeued job) never sees a half-written PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
