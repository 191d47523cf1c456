"""Learning-rate schedule: linear warm-up then cosine decay (or constant), as a multiplier of
the base learning rate so it plugs into ``torch.optim.lr_scheduler.LambdaLR`` and therefore
into DeepSpeed (which saves and restores the scheduler with every checkpoint)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float = 0.05, min_lr_ratio: float = 0.0,
                  schedule: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based: the value used by the
    ``step``-th update).

    * warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps = ceil(ratio * total)``
      updates, so the very first update already moves the weights (a 0 lr first step would
      waste a batch);
    * cosine: from 1 after warm-up towards ``min_lr_ratio``, reached at ``total_steps`` (one
      past the last update);
    * constant: 1 after warm-up.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r} (optim.schedule: cosine | constant)")
    # Hugging Face's convention: progress reaches 1 one step after the last update, so the
    # last update still has a (small) non-zero lr instead of being wasted at exactly 0.
    progress = min(max(step - warmup, 0) / max(total_steps - warmup, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler_factory(total_steps: int, warmup_ratio: float, min_lr_ratio: float, schedule: str):
    """A ``Callable[[Optimizer], LambdaLR]``: DeepSpeed calls it with the optimizer it built
    or wrapped, so the schedule always drives the optimizer that actually steps."""
    from torch.optim.lr_scheduler import LambdaLR

    def factory(optimizer):
        return LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, warmup_ratio, min_lr_ratio, schedule))

    return factory
