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
