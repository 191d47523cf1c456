"""Fused similarity + InfoNCE losses that never materialise the n×m logits.

    loss = coma_kernels.fused_infonce(q, k, logit_scale, symmetric=True)            # autograd
    loss, dq, dk, ds = coma_kernels.infonce_loss_and_grads(q, k, logit_scale)       # no autograd
    loss = coma_kernels.gathered_infonce(q_local, k_local, logit_scale)             # negatives from every rank

Backends: ``triton`` (fused kernels, :mod:`coma_kernels.infonce_triton`; CPU only under
TRITON_INTERPRET=1), ``cuda`` (cuBLAS logits chunks + fused CUDA epilogues, :mod:`coma_kernels.infonce_cuda`), ``torch``
(chunked torch, the CPU default, :mod:`coma_kernels.infonce_torch`) and ``reference``
(materialised logits, :mod:`coma_kernels.infonce_reference`).  ``auto`` = triton for CUDA tensors,
torch otherwise (:mod:`coma_kernels.backends`).  Importing this package is cheap: triton and the CUDA
build load lazily.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import BACKENDS, get_ops, resolve_backend
from .distributed import gathered_infonce
from .infonce import check_inputs, infonce_forward, infonce_loss_and_grads as _loss_and_grads

__all__ = ["fused_infonce", "infonce_loss_and_grads", "gathered_infonce", "get_ops", "BACKENDS"]


def fused_infonce(query: torch.Tensor, key: torch.Tensor, logit_scale: torch.Tensor, *,
                  positive_index: Optional[torch.Tensor] = None, symmetric: bool = False,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """InfoNCE over logits = logit_scale · query @ keyᵀ without materialising them.

    Args:
        query: [n, D] fp32/fp16/bf16, any device.
        key: [m, D], m ≥ n, same dtype/device.  Rows beyond the positives are extra negatives.
        logit_scale: 0-dim tensor (1/τ); may require grad.
        positive_index: [n] int64 into key rows; default ``arange(n)``.
        symmetric: also the k→q term (column p_i against all n queries, target i); result is
            the mean of both terms.
        reduction: "mean" | "sum" | "none" (per-query [n] losses; symmetric → mean of the two
            terms of each query, so their mean is the "mean" loss).
        backend: "auto" | "triton" | "cuda" | "torch" | "reference".
    Returns:
        0-dim fp32 loss (or [n] in the input dtype).  Gradients flow to query, key (input
        dtype, accumulated in fp32) and logit_scale.
    """
    positive_index = check_inputs(query, key, logit_scale, positive_index, reduction)
    name = resolve_backend(backend, query.device)
    if name == "reference":
        from .infonce_reference import reference_infonce
        return reference_infonce(query, key, logit_scale, positive_index, symmetric, reduction)
    ops = get_ops(name, query.device, query.dtype)
    return infonce_forward(query, key, logit_scale, positive_index, symmetric, reduction, ops)


def infonce_loss_and_grads(query: torch.Tensor, key: torch.Tensor, logit_scale: torch.Tensor, *,
                           positive_index: Optional[torch.Tensor] = None, symmetric: bool = False,
                           backend: str = "auto", grad_scale: Optional[float] = None):
    """Mean InfoNCE loss and its gradients in one call, no autograd (GradCache path of stage 2).

    Same arguments as :func:`fused_infonce` (reduction is always "mean").  Returns
    ``(loss, d_query, d_key, d_logit_scale)``: 0-dim fp32, [n, D] and [m, D] in the input
    dtype, 0-dim in logit_scale's dtype.  ``grad_scale`` multiplies the gradients only (e.g.
    the world size when the loss is this rank's share of a global batch).
    """
    positive_index = check_inputs(query, key, logit_scale, positive_index, "mean")
    name = resolve_backend(backend, query.device)
    if name == "reference":
        raise ValueError("infonce_loss_and_grads: backend='reference' is autograd-only; use fused_infonce "
                         "with backend='reference' and .backward(), or a tiled backend here")
    ops = get_ops(name, query.device, query.dtype)
    return _loss_and_grads(query.detach(), key.detach(), logit_scale.detach(), positive_index, symmetric, ops,
                           grad_scale)
