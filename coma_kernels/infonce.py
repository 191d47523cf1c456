"""InfoNCE from log-sum-exp statistics: the maths every tiled backend shares.

Notation (all backends):  S = s · Q Kᵀ,  Q [n, D] queries,  K [m, D] keys (m ≥ n),
s = logit_scale,  p_i = positive_index[i].

    row_lse_i  = log Σ_j exp S_ij             (over the m keys)
    col_lse_j  = log Σ_i exp S_ij             (over the n queries; symmetric only)
    pos_i      = S_{i, p_i}
    q→k loss_i = row_lse_i − pos_i
    k→q loss_i = col_lse_{p_i} − pos_i        (column p_i against all queries, target i)

A tiled backend only provides two primitives over the *softmax* part (positives are
O(n·D) and handled here):

    stats(Q, K, s, col)  -> row_lse [n] f32, col_lse [m] f32 | None
    softmax_grads(Q, K, s, row_lse, row_coef, col_lse, col_coef, pos_index, pos_coef)
                         -> dQ f32, dK f32, ds f32
        with  G_ij = row_coef_i · exp(S_ij − row_lse_i) + col_coef_j · exp(S_ij − col_lse_j)
                     − pos_coef_i · [j = pos_index_i]
              dQ = s · G K,   dK = s · Gᵀ Q,   ds = Σ_ij G_ij (q_i · k_j)

which is the vector–Jacobian product of Σ_i w_i · loss_i for row_coef = α·w, col_coef_j =
Σ_{i: p_i = j} α·w_i (α = ½ if symmetric else 1) and pos_coef = w.  The positive term is
subtracted inside the tile, in fp32, *before* G is rounded to the input dtype for the
tensor-core GEMMs: for a well-trained model exp(S_{i,p_i} − row_lse_i) ≈ 1 and the gradient
is the small difference of two O(1) numbers, which a bf16 G would otherwise destroy.
Backends recompute chunks or tiles of S instead of storing
them, so nothing of size n×m is kept (torch: chunks of a fixed element count,
:mod:`coma_kernels.infonce_torch`; Triton: :mod:`coma_kernels.tiled`, and CUDA: cuBLAS chunks and
fused epilogues, :mod:`coma_kernels.infonce_cuda`, chunks within the gradients' own O((n + m)·D) bytes).  :class:`FusedInfoNCE` is the whole loss as one autograd Function;
:func:`infonce_loss_and_grads` is the same maths without autograd (embedding cache);
:mod:`coma_kernels.distributed` reuses :func:`loss_grads` with all-reduced column statistics.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------ validation
def check_inputs(query, key, logit_scale, positive_index, reduction) -> torch.Tensor:
    """Validate the public arguments; return positive_index as an int64 tensor on query's device."""
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise TypeError("fused_infonce: query and key must be torch.Tensors")
    if query.dim() != 2 or key.dim() != 2:
        raise ValueError(f"fused_infonce: query must be [n, D] and key [m, D]; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    n, d = query.shape
    m, dk = key.shape
    if d != dk:
        raise ValueError(f"fused_infonce: query and key must share the embedding size D; got {d} and {dk}")
    if query.dtype != key.dtype:
        raise ValueError(f"fused_infonce: query and key must have the same dtype; got {query.dtype} and {key.dtype}")
    if query.dtype not in _DTYPES:
        raise ValueError(f"fused_infonce: dtype {query.dtype} unsupported; use float32, float16 or bfloat16")
    if query.device != key.device:
        raise ValueError(f"fused_infonce: query on {query.device} but key on {key.device}")
    if n == 0 or d == 0:
        raise ValueError(f"fused_infonce: empty input (n={n}, D={d})")
    if m < n:
        raise ValueError(f"fused_infonce: need at least as many keys as queries (m >= n); got n={n}, m={m}")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.dim() != 0:
        raise ValueError("fused_infonce: logit_scale must be a 0-dim tensor (1/temperature), e.g. torch.tensor(33.3)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fused_infonce: reduction={reduction!r}; use one of {_REDUCTIONS}")
    if positive_index is None:
        return torch.arange(n, device=query.device)
    if not isinstance(positive_index, torch.Tensor) or positive_index.shape != (n,):
        raise ValueError(f"fused_infonce: positive_index must be an int64 tensor of shape [{n}]")
    if positive_index.dtype != torch.int64:
        raise ValueError(f"fused_infonce: positive_index must be int64; got {positive_index.dtype}")
    positive_index = positive_index.to(query.device)
    lo, hi = int(positive_index.min()), int(positive_index.max())
    if lo < 0 or hi >= m:
        raise ValueError(f"fused_infonce: positive_index values must lie in [0, {m}); got range [{lo}, {hi}]")
    return positive_index


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype, fp64 stays fp64 (test references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ autograd
def combine(row_loss, col_loss, reduction):
    """Per-query losses → requested reduction.  Symmetric: the per-query loss is the mean of
    the q→k and k→q terms, so ``mean`` of the ``none`` output is the ``mean`` loss."""
    per_query = row_loss if col_loss is None else 0.5 * (row_loss + col_loss)
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query


def _autocast_off(fn):
    """The loss computes in its own dtypes: under an outer autocast (a training step's bf16 region)
    torch.mm in the host loops (tiled.py, infonce_torch.py) would run its fp32 GEMMs in bf16."""
    @functools.wraps(fn)
    def wrapper(query, *args, **kwargs):
        with torch.autocast(device_type=query.device.type, enabled=False):
            return fn(query, *args, **kwargs)
    return wrapper


@_autocast_off
def per_query_losses(query, key, scale: float, positive_index, symmetric, ops, reduce_col=None):
    """Forward without a graph: (per-query losses [n], row_lse [n], col_lse [m] | None, dots [n])
    in the accumulation dtype; dots_i = q_i · k_{p_i}.  ``reduce_col`` (coma_kernels.distributed)
    turns the column LSE over these queries into the global one before it is used."""
    row_lse, col_lse = ops.stats(query, key, scale, symmetric)
    acc = acc_dtype(query.dtype)
    row_lse = row_lse.to(acc)
    col_lse = col_lse.to(acc) if symmetric else None
    if symmetric and reduce_col is not None:
        col_lse = reduce_col(col_lse)
    dots = (query.to(acc) * key.index_select(0, positive_index).to(acc)).sum(-1)
    pos = scale * dots
    row_loss = row_lse - pos
    col_loss = col_lse.index_select(0, positive_index) - pos if symmetric else None
    return combine(row_loss, col_loss, "none"), row_lse, col_lse, dots


@_autocast_off
def loss_grads(query, key, scale: float, positive_index, symmetric, ops, row_lse, col_lse, weight,
               reduce_col=None):
    """Gradients of Σ_i weight_i · loss_i w.r.t. (query, key, logit_scale), in the accumulation
    dtype (the caller rounds to the input dtype once).

    Per query i the loss is row_lse_i − pos_i (q→k) or ½(row_lse_i + col_lse_{p_i}) − pos_i
    (symmetric), so: row coefficient a_i = α·w_i, column coefficient b_j = Σ_{i: p_i = j} α·w_i
    (α = ½ if symmetric else 1), and the positive logit of query i has weight −w_i (folded into
    the tiles, see the module docstring).  ``col_lse`` may be any column statistic the caller
    owns (coma_kernels.distributed passes the all-reduced global one, and a ``reduce_col`` that sums
    the column coefficients over ranks: a key's positive query may live on another rank)."""
    acc = row_lse.dtype
    alpha = 0.5 if symmetric else 1.0
    w = weight.to(acc).contiguous()
    row_coef = alpha * w
    col_coef = None
    if symmetric:
        col_coef = torch.zeros(key.shape[0], dtype=acc, device=key.device).index_add_(0, positive_index, row_coef)
        if reduce_col is not None:
            col_coef = reduce_col(col_coef)
    return tile_grads(query, key, scale, positive_index, ops, row_lse, row_coef, col_lse, col_coef, w)


def tile_grads(query, key, scale, positive_index, ops, row_lse, row_coef, col_lse, col_coef, pos_coef):
    """``ops.softmax_grads`` with every result in the accumulation dtype of ``row_lse``."""
    acc = row_lse.dtype
    dq, dk, ds = ops.softmax_grads(query, key, scale, row_lse, row_coef, col_lse, col_coef, positive_index, pos_coef)
    return dq.to(acc), dk.to(acc), ds.to(acc)


def _weights(grad_out, n, reduction, dtype):
    if reduction == "mean":
        return grad_out.to(dtype).expand(n) / n
    if reduction == "sum":
        return grad_out.to(dtype).expand(n)
    return grad_out.to(dtype)


class FusedInfoNCE(torch.autograd.Function):
    """The whole loss as one Function: forward keeps only the LSE statistics; backward recomputes
    the tiles (positive term included), so each gradient is rounded to the input dtype once."""

    @staticmethod
    def forward(ctx, query, key, logit_scale, positive_index, symmetric, reduction, ops):
        scale = float(logit_scale)
        per_query, row_lse, col_lse, _ = per_query_losses(query, key, scale, positive_index, symmetric, ops)
        ctx.save_for_backward(query, key, positive_index, row_lse, col_lse if symmetric else row_lse[:0])
        ctx.cfg = (scale, symmetric, reduction, ops, logit_scale.dtype, logit_scale.device)
        out = combine(per_query, None, reduction)
        return out.to(query.dtype) if reduction == "none" else out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, pidx, row_lse, col_lse = ctx.saved_tensors
        scale, symmetric, reduction, ops, s_dtype, s_device = ctx.cfg
        w = _weights(grad_out, query.shape[0], reduction, row_lse.dtype)
        dq, dk, ds = loss_grads(query, key, scale, pidx, symmetric, ops, row_lse,
                                col_lse if symmetric else None, w)
        return dq.to(query.dtype), dk.to(key.dtype), ds.to(device=s_device, dtype=s_dtype), None, None, None, None


def infonce_forward(query, key, logit_scale, positive_index, symmetric, reduction, ops) -> torch.Tensor:
    """The autograd path of ``fused_infonce`` for a tiled backend (``ops``)."""
    return FusedInfoNCE.apply(query, key, logit_scale, positive_index, symmetric, reduction, ops)


# ------------------------------------------------------------------------------ no autograd
@torch.no_grad()
def infonce_loss_and_grads(query, key, logit_scale, positive_index, symmetric, ops,
                           grad_scale: Optional[float] = None):
    """Mean loss and its gradients in one call, without building an autograd graph.

    Returns (loss 0-dim f32, d_query [n, D] in query.dtype, d_key [m, D] in key.dtype,
    d_logit_scale 0-dim in logit_scale.dtype).  ``grad_scale`` multiplies the gradients
    (not the loss); default 1.  This is the GradCache path: embeddings are computed without
    a graph, the loss gradient w.r.t. the embeddings comes from here, and the encoder is
    re-run chunk by chunk with ``emb.backward(d_emb)``.
    """
    n = query.shape[0]
    scale = float(logit_scale)
    per_query, row_lse, col_lse, _ = per_query_losses(query, key, scale, positive_index, symmetric, ops)
    w = torch.full((n,), (1.0 if grad_scale is None else float(grad_scale)) / n, dtype=row_lse.dtype,
                   device=query.device)
    dq, dk, ds = loss_grads(query, key, scale, positive_index, symmetric, ops, row_lse, col_lse, w)
    return per_query.mean(), dq.to(query.dtype), dk.to(key.dtype), ds.to(device=logit_scale.device,
                                                                          dtype=logit_scale.dtype)
