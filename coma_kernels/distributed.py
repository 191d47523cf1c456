"""InfoNCE with the keys of every rank as negatives (the only torch.distributed user in kernels/).

What travels, per step (M = Σ_r m_r keys, D the embedding size):

forward   1. all_gather of the local batch sizes (2 ints per rank).
          2. all_gather of ``key_local`` (padded to the largest m_r): every rank gets all M keys.
             Queries are *not* gathered.
          3. symmetric only: each rank computes, for every one of the M keys, the log-sum-exp of
             its column over the *local* queries; these partial column statistics are combined
             with an all_reduce(MAX) of the maxima and an all_reduce(SUM) of the rescaled sums
             (2 floats per key) into the global column LSE over all N queries.
backward  4. symmetric only: all_reduce(SUM) of d loss / d column-LSE (1 float per key), so that
             each rank learns how much every key's column term weighs (a key's positive query
             may live on another rank) and back-propagates it into its own queries.
          5. reduce_scatter(SUM) of d loss / d gathered keys ([M, D], in fp32): each rank receives
             the sum over ranks of its own rows only, half the traffic of an all_reduce.  This is
             gather-with-gradient: key_local receives the gradient of *every* rank's loss.

Loss scaling: each rank returns  Σ_{local i} ℓ_i · W / N  (W ranks, N global queries), i.e. its
local mean when batches are equal.  DeepSpeed averages gradients over ranks, so the averaged
gradients are exactly those of the single-process mean loss over the concatenated global batch
(without the W factor they would be W times too small; averaging *local* means over unequal
batches would weight queries unequally).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .backends import get_ops, resolve_backend
from .infonce import check_inputs, loss_grads, per_query_losses


class _GatherRows(torch.autograd.Function):
    """All ranks' [m_r, D] tensors concatenated in rank order → [M, D]; backward sums the gradient
    of every rank's loss (each depends on every key) into this rank's rows with a reduce-scatter."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        pad = max(sizes)
        buf = local.new_zeros(pad, local.shape[1])
        buf[: local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(parts, buf.contiguous(), group=group)   # all_gather needs equal shapes: pad
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        # reduce_scatter needs equal blocks: rank r's rows at block r, padded to the largest m_r.
        # At least fp32 whatever the gradient's dtype: a bf16 sum of W ranks' terms drops low bits.
        sizes, pad = ctx.sizes, max(ctx.sizes)
        acc = torch.promote_types(grad.dtype, torch.float32)
        blocks = grad.new_zeros(len(sizes) * pad, grad.shape[1], dtype=acc)
        start = 0
        for r, m in enumerate(sizes):
            blocks[r * pad: r * pad + m] = grad[start: start + m]
            start += m
        mine = blocks.new_empty(pad, grad.shape[1])
        _reduce_scatter(mine, blocks, group=ctx.group)
        return mine[: sizes[ctx.rank]].to(grad.dtype), None, None, None


# torch >= 2.12 names it reduce_scatter_single (the old name warns); older GPU images have only the old one
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce_lse(partial: torch.Tensor, group) -> torch.Tensor:
    """Global LSE from per-rank partial LSEs: log Σ_r exp(partial_r), 2 floats per entry."""
    gmax = partial.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(partial - gmax)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return gmax + torch.log(total)


class _LocalQueries(torch.autograd.Function):
    """Per-query losses [n_r] of this rank's queries against the gathered keys.

    Forward: tile statistics over (local queries × all keys); for the symmetric term the
    per-column partial LSEs over the local queries are all-reduced into the global column LSE.
    Backward: with w = d loss / d per-query loss, the column coefficient of key j is
    Σ_{i: p_i = j} ½ w_i over the queries of *every* rank (all-reduced, 1 float per key), so each
    rank back-propagates every column term into its own queries; then the same tile gradients
    as the single-process loss (:func:`coma_kernels.infonce.loss_grads`, positives included).
    """

    @staticmethod
    def forward(ctx, query, keys, logit_scale, pidx, symmetric, ops, group):
        scale = float(logit_scale)
        per_query, row_lse, col_lse, _ = per_query_losses(
            query, keys, scale, pidx, symmetric, ops, reduce_col=lambda part: _all_reduce_lse(part, group))
        ctx.save_for_backward(query, keys, pidx, row_lse, col_lse if symmetric else row_lse[:0])
        ctx.cfg = (scale, symmetric, ops, group, logit_scale.dtype, logit_scale.device)
        return per_query

    @staticmethod
    def backward(ctx, w):
        query, keys, pidx, row_lse, col_lse = ctx.saved_tensors
        scale, symmetric, ops, group, s_dtype, s_device = ctx.cfg

        def sum_over_ranks(col_coef):
            dist.all_reduce(col_coef, op=dist.ReduceOp.SUM, group=group)
            return col_coef

        dq, dk, ds = loss_grads(query, keys, scale, pidx, symmetric, ops, row_lse,
                                col_lse if symmetric else None, w, reduce_col=sum_over_ranks)
        return (dq.to(query.dtype), dk.to(keys.dtype), ds.to(device=s_device, dtype=s_dtype),
                None, None, None, None)


def gathered_infonce(query_local: torch.Tensor, key_local: torch.Tensor, logit_scale: torch.Tensor, *,
                     symmetric: bool = False, group: Optional[dist.ProcessGroup] = None,
                     backend: str = "auto") -> torch.Tensor:
    """This rank's share of the global-batch InfoNCE loss, negatives gathered from every rank.

    Args:
        query_local: [n_r, D] this rank's queries (fp32/fp16/bf16); n_r may differ between ranks.
        key_local: [m_r, D], m_r ≥ n_r; row i (< n_r) is the positive of query i, extra rows are
            hard negatives.  Every rank's keys are negatives for every query.
        logit_scale: 0-dim tensor (1/τ), replicated on all ranks; may require grad.
        symmetric: add the k→q term: column of query i's positive against *all* N queries.
        group: process group (default: the world).
        backend: as for :func:`coma_kernels.fused_infonce` ("reference" is not tiled: rejected).
    Returns:
        0-dim fp32: Σ_{local i} ℓ_i · W / N.  Differentiable w.r.t. query_local, key_local
        (through the gather, see the module docstring) and logit_scale; averaging gradients
        over ranks gives the gradients of the single-process mean loss on the global batch.
    Every rank must call this (it runs collectives), each with n_r ≥ 1.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gathered_infonce needs torch.distributed initialised (pipeline/dist.py); "
                           "for one process use coma_kernels.fused_infonce")
    if key_local.dim() != 2 or query_local.dim() != 2 or key_local.shape[0] < query_local.shape[0]:
        raise ValueError(f"gathered_infonce: need query_local [n_r, D] and key_local [m_r >= n_r, D]; got "
                         f"{tuple(query_local.shape)} and {tuple(key_local.shape)}")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n_local, m_local = query_local.shape[0], key_local.shape[0]

    sizes = torch.tensor([n_local, m_local], dtype=torch.int64, device=key_local.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    n_sizes = [int(s[0]) for s in all_sizes]
    m_sizes = [int(s[1]) for s in all_sizes]
    n_global = sum(n_sizes)
    if min(n_sizes) == 0:
        # every rank sees the same sizes, so every rank raises here: no rank is left in a collective
        raise ValueError(f"gathered_infonce: local query counts per rank are {n_sizes}; every rank needs at "
                         "least one query (drop the last incomplete global batch, or pad it)")

    keys = _GatherRows.apply(key_local, m_sizes, rank, group)                      # [M, D]
    offset = sum(m_sizes[:rank])
    pidx = torch.arange(offset, offset + n_local, device=key_local.device)
    share = float(world) / n_global

    name = resolve_backend(backend, query_local.device)
    if name == "reference":
        raise ValueError("gathered_infonce: backend='reference' is not supported; use 'torch', 'triton' or 'cuda'")
    # pidx is an arange inside the gathered keys by construction: validate shapes and dtypes only
    # (passing it would cost two host syncs per step for a range check that cannot fail)
    check_inputs(query_local, keys, logit_scale, None, "sum")
    ops = get_ops(name, query_local.device, query_local.dtype)
    per_query = _LocalQueries.apply(query_local, keys, logit_scale, pidx, symmetric, ops, group)
    return per_query.sum() * share
