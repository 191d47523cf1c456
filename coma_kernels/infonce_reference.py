"""The materialised InfoNCE: full n×m logits + ``F.cross_entropy``.  Test oracle (run it in
fp64) and the memory/speed baseline of the benchmark (what open_clip's ClipLoss does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .infonce import acc_dtype, combine


def reference_infonce(query, key, logit_scale, positive_index, symmetric=False, reduction="mean") -> torch.Tensor:
    """query [n, D], key [m, D] (same dtype), logit_scale 0-dim, positive_index [n] int64.

    Logits are computed in the input dtype and promoted to fp32 (fp64 for fp64 inputs) before
    the softmax.  Returns the loss (0-dim, or [n] per-query for ``reduction="none"``)."""
    acc = acc_dtype(query.dtype)
    logits = (query @ key.t()).to(acc) * logit_scale.to(acc)                      # [n, m]
    row_loss = F.cross_entropy(logits, positive_index, reduction="none")
    col_loss = None
    if symmetric:
        n = query.shape[0]
        cols = logits.index_select(1, positive_index).t()                           # [n, n]: column p_i vs all queries
        col_loss = F.cross_entropy(cols, torch.arange(n, device=query.device), reduction="none")
    out = combine(row_loss, col_loss, reduction)
    return out.to(query.dtype) if reduction == "none" else out


def trained_regime_inputs(n: int, m: int, d: int, scale: float, miss: float = 1e-3, *, generator=None,
                          device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm fp64 query [n, D] and key [m, D] as a well-trained model produces them: key i
    (i < n) is query i plus random noise, mixed so that the mean softmax probability of the
    positive (q→k, at ``scale``) is 1 − ``miss``.  Test input for the positive-logit fold-in.

    Why a probability target and not a fixed noise level: with p(positive) ≈ 1 − 1e-11 (noise
    0.1 at D=512, scale 33.3) the exact gradients are ~1e-13, below what fp32 logits of size 33
    resolve (one ulp ≈ 4e-6), so every fp32 implementation — the materialised reference
    included — is 100% "wrong" relative to them.  At miss = 1e-3 the gradients are ~1e-3 of
    the untrained ones: fp32 resolves them, while a G rounded to bf16 before the positive term
    is subtracted (bf16 spacing at 1 is 2⁻⁸ ≈ 4e-3) loses them entirely."""
    g = generator
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64, device=device), dim=-1)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64, device=device), dim=-1)
    noise = k[:n].clone()

    def mean_miss(sigma: float) -> float:
        k[:n] = F.normalize(q + sigma * noise, dim=-1)
        p = torch.softmax(scale * q @ k.t(), dim=-1).diagonal()
        return float((1 - p).mean())

    lo, hi = 0.0, 64.0  # the mean miss grows with sigma: bisect (2⁻²⁴ of the bracket)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_miss(mid) < miss else (lo, mid)
    mean_miss(0.5 * (lo + hi))
    return q, k
