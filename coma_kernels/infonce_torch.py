"""Chunked pure-torch InfoNCE statistics and gradients (the CPU default).

Works on query-row chunks of ``chunk`` rows: a chunk's logits [chunk, m] are the only
quadratic-looking buffer, so peak extra memory is O(chunk · m + (n + m) · D), never n × m.
One pass gives the row LSE of the chunk *and* updates a running (max, sum-exp) per column,
so the symmetric statistics cost no second matmul.  Backward recomputes each chunk's logits
once and produces dQ, dK and ds from it.  fp16/bf16 inputs are upcast to fp32 (once, O(N·D))
so every product accumulates in fp32; fp64 stays fp64.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .infonce import acc_dtype

# Elements per chunk of logits: 4 Mi on CPU (16 MiB fp32: cache-friendly, the memory test's
# bound), 64 Mi on GPU (few large GEMMs); COMA_INFONCE_CHUNK_ELEMS overrides both.
_DEFAULT_ELEMS = {"cpu": 1 << 22}
_GPU_ELEMS = 1 << 26


def _chunk_rows(n: int, m: int, device: torch.device) -> int:
    elems = int(os.environ.get("COMA_INFONCE_CHUNK_ELEMS", _DEFAULT_ELEMS.get(device.type, _GPU_ELEMS)))
    return max(16, min(n, elems // max(m, 1)))


class TorchOps:
    """The two tiled primitives of :mod:`coma_kernels.infonce`, in chunked torch."""

    name = "torch"

    def __init__(self, chunk: Optional[int] = None):
        self.chunk = chunk

    def _prep(self, query, key):
        acc = acc_dtype(query.dtype)
        return query.to(acc).contiguous(), key.to(acc).contiguous()

    # (autocast is off around both: coma_kernels.infonce's callers turn it off for every backend)
    def stats(self, query, key, scale: float, col: bool):
        q, k = self._prep(query, key)
        n, m = q.shape[0], k.shape[0]
        step = self.chunk or _chunk_rows(n, m, q.device)
        row_lse = torch.empty(n, dtype=q.dtype, device=q.device)
        if col:
            cmax = torch.full((m,), float("-inf"), dtype=q.dtype, device=q.device)
            csum = torch.zeros(m, dtype=q.dtype, device=q.device)
        kt = k.t()
        for r0 in range(0, n, step):
            s = torch.mm(q[r0:r0 + step], kt).mul_(scale)               # [c, m]
            row_lse[r0:r0 + step] = torch.logsumexp(s, dim=1)
            if col:
                new = torch.maximum(cmax, s.amax(dim=0))
                # rescale the running sums to the new max, then add this chunk (online LSE)
                csum.mul_(torch.exp(cmax - new)).add_(s.sub_(new).exp_().sum(dim=0))
                cmax = new
            del s
        col_lse = cmax + torch.log(csum) if col else None
        return row_lse, col_lse

    def softmax_grads(self, query, key, scale: float, row_lse, row_coef, col_lse=None, col_coef=None,
                      pos_index=None, pos_coef=None):
        q, k = self._prep(query, key)
        n, m = q.shape[0], k.shape[0]
        step = self.chunk or _chunk_rows(n, m, q.device)
        row_lse, row_coef = row_lse.to(q.dtype), row_coef.to(q.dtype)
        has_col = col_lse is not None
        if has_col:
            col_lse, col_coef = col_lse.to(q.dtype), col_coef.to(q.dtype)
        if pos_index is not None:
            pos_coef = pos_coef.to(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        ds = torch.zeros((), dtype=q.dtype, device=q.device)
        kt = k.t()
        for r0 in range(0, n, step):
            qc = q[r0:r0 + step]
            dot = torch.mm(qc, kt)                                        # [c, m] raw q·k
            g = torch.mul(dot, scale).sub_(row_lse[r0:r0 + step, None]).exp_().mul_(row_coef[r0:r0 + step, None])
            if has_col:
                pc = torch.mul(dot, scale).sub_(col_lse[None, :]).exp_().mul_(col_coef[None, :])
                g.add_(pc)
                del pc
            if pos_index is not None:  # − pos_coef_i at (i, p_i)
                local = torch.arange(g.shape[0], device=g.device)
                g[local, pos_index[r0:r0 + step]] -= pos_coef[r0:r0 + step]
            ds += torch.dot(g.view(-1), dot.view(-1))
            del dot
            torch.mm(g, k, out=dq[r0:r0 + step]).mul_(scale)
            dk.addmm_(g.t(), qc, alpha=scale)
            del g
        return dq, dk, ds
