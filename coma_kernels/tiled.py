"""Host-side driver shared by the GPU backends (Triton and CUDA C++).

A backend supplies two tile kernels; this class turns them into the primitives of
:mod:`coma_kernels.infonce` (``stats`` and ``softmax_grads``):

``launch_stats``  grid (row blocks of Q) × (splits of the key columns).  Every program keeps an
    online (max, sum-exp) for its rows over its columns → RMAX/RSUM [splits, n]; when symmetric
    it also writes each tile's per-column (max, sum-exp) over its rows → PMAX/PSUM
    [row blocks, m].  ``merge_lse`` combines the partials.  One pass over Q Kᵀ gives both
    directions; the partials cost 8·(n·splits + m·⌈n/BLOCK_M⌉) bytes, O(n·m/BLOCK_M).

``launch_grad_tiles``  grid (row blocks of a chunk of C rows) × (key tiles).  Recomputes each
    logits tile once and writes the softmax-gradient weights
        G_ij = a_i · exp(S_ij − row_lse_i) + b_j · exp(S_ij − col_lse_j)
    into a [C, m] buffer (the column term only when symmetric), plus Σ G ⊙ (Q Kᵀ) per tile.
    (The positive logit's −w_i is subtracted in the same fp32 tile, before G is rounded.)
    Then dQ_chunk = s·G K and dK += s·Gᵀ Q_chunk are GEMMs (cuBLAS through torch.mm / addmm,
    fp32 accumulation; dK accumulated in place across chunks in fp32).  S is recomputed once in backward (not once
    per direction), with no atomics and no D-wide read-modify-write, deterministically.

Chunk size: C·m ≈ COMA_INFONCE_CHUNK_ELEMS_GPU elements (default 64 Mi: 128 MiB of bf16 G),
so peak extra memory is O(C·m + (n + m)·D).  G is normalised to max |coefficient| = 1 before it
is rounded to fp16/bf16 (the coefficients are O(1/n), below fp16's normal range at large n);
the norm is folded back into the GEMM scale.
"""
from __future__ import annotations

import abc
import os

import torch

DEFAULT_CHUNK_ELEMS = 1 << 26


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def merge_lse(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """LSE from partials along dim 0: M + log Σ_p psum_p · exp(pmax_p − M), fp32 [*]."""
    top = pmax.max(dim=0).values
    return top + torch.log((psum * torch.exp(pmax - top)).sum(dim=0))


_OUT_DTYPE_MM = [True]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result.  cuBLAS accumulates fp16/bf16 products in fp32 anyway;
    ``out_dtype`` (torch ≥ 2.8, CUDA) keeps that sum unrounded, older torch rounds it once."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return torch.mm(a, b).float()
    if _OUT_DTYPE_MM[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _OUT_DTYPE_MM[0] = False
    return torch.mm(a, b).float()


_OUT_DTYPE_ADDMM = [True]


def addmm_f32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """out += alpha · (a @ b) in place, ``out`` fp32.  On CUDA with fp16/bf16 operands the
    product is accumulated straight into ``out`` (``out_dtype``, torch ≥ 2.8): no [m, D] fp32
    temporary per chunk, no read-modify-write pass over it (dK over 16 chunks at N = 32k,
    D = 2048 moved ~16 GiB that way).  Elsewhere: the fp32 product, then one add."""
    if a.is_cuda and a.dtype != torch.float32 and _OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_ADDMM[0] = False
    if a.is_cuda and a.dtype != torch.float32:
        out.add_(mm_f32(a, b), alpha=alpha)
    else:  # fp32, or the CPU (interpreter runs), where a bf16 product would be rounded to bf16
        out.addmm_(a.float(), b.float(), alpha=alpha)


class TiledOps(abc.ABC):
    """Bookkeeping around two tile kernels (see the module docstring)."""

    name = "tiled"
    g_dtype: torch.dtype  # dtype of the G chunk buffer (the GEMM operands)

    @abc.abstractmethod
    def tiles(self, n: int, m: int, d: int, elem: int) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) the kernels use for these sizes."""

    @abc.abstractmethod
    def default_splits(self, row_blocks: int, col_blocks: int, device: torch.device) -> int:
        """How many column splits the stats grid gets (fills the GPU when n is small)."""

    @abc.abstractmethod
    def launch_stats(self, q, k, scale, col, cols_per_split, rmax, rsum, pmax, psum) -> None:
        """Grid (⌈n/BLOCK_M⌉, splits); fills rmax/rsum [splits, n] and, if col, pmax/psum [⌈n/BLOCK_M⌉, m]."""

    @abc.abstractmethod
    def launch_grad_tiles(self, q, k, g, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale) -> None:
        """Grid (⌈(row1−row0)/BLOCK_M⌉, ⌈m/BLOCK_N⌉); g [row1−row0, m] (g_dtype) ← G of those rows,
        dsp [grid size] fp32 ← per-tile Σ G ⊙ (Q Kᵀ); row-major over the grid.  clse/ccoef and
        pidx/pcoef are None when the column / positive term is absent."""

    # ---- the primitives of coma_kernels.infonce
    def stats(self, query, key, scale: float, col: bool):
        q, k = query.contiguous(), key.contiguous()
        (n, d), m = q.shape, k.shape[0]
        bm, bn = self.tiles(n, m, d, q.element_size())
        row_blocks, col_blocks = cdiv(n, bm), cdiv(m, bn)
        forced = os.environ.get("COMA_INFONCE_SPLITS")             # tests force a split count
        splits = int(forced) if forced else self.default_splits(row_blocks, col_blocks, q.device)
        splits = max(1, min(splits, col_blocks))
        cols_per_split = cdiv(cdiv(m, splits), bn) * bn             # whole tiles per split
        splits = cdiv(m, cols_per_split)                            # no empty split
        f32 = dict(dtype=torch.float32, device=q.device)
        rmax, rsum = torch.empty(splits, n, **f32), torch.empty(splits, n, **f32)
        pmax = torch.empty(row_blocks, m, **f32) if col else rmax
        psum = torch.empty(row_blocks, m, **f32) if col else rsum
        self.launch_stats(q, k, float(scale), col, cols_per_split, rmax, rsum, pmax, psum)
        return merge_lse(rmax, rsum), (merge_lse(pmax, psum) if col else None)

    def softmax_grads(self, query, key, scale, row_lse, row_coef, col_lse=None, col_coef=None,
                      pos_index=None, pos_coef=None):
        q, k = query.contiguous(), key.contiguous()
        (n, d), m = q.shape, k.shape[0]
        has_col = col_lse is not None
        dq = torch.zeros(n, d, dtype=torch.float32, device=q.device)
        dk = torch.zeros(m, d, dtype=torch.float32, device=q.device)
        has_pos = pos_index is not None
        # one host sync (not one per coefficient): the normaliser keeps G's tiles in range
        norm = float(torch.stack([x.abs().max() for x in (row_coef, col_coef, pos_coef) if x is not None]).max())
        if norm == 0.0:
            return dq, dk, dq.new_zeros(())
        f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
        rl, rc = f32(row_lse), f32(row_coef / norm)
        cl, cc = (f32(col_lse), f32(col_coef / norm)) if has_col else (None, None)
        pi, pc = (pos_index.to(torch.int64).contiguous(), f32(pos_coef / norm)) if has_pos else (None, None)
        bm, bn = self.tiles(n, m, d, q.element_size())
        budget = int(os.environ.get("COMA_INFONCE_CHUNK_ELEMS_GPU", DEFAULT_CHUNK_ELEMS))
        chunk = min(cdiv(n, bm) * bm, max(bm, budget // max(m, 1) // bm * bm))
        gbuf = torch.empty(chunk, m, dtype=self.g_dtype, device=q.device)
        qg, kg = q.to(self.g_dtype), k.to(self.g_dtype)            # no-ops except when interpreting
        out_scale = float(scale) * norm
        ds = torch.zeros((), dtype=torch.float32, device=q.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            dsp = torch.empty(cdiv(r1 - r0, bm) * cdiv(m, bn), dtype=torch.float32, device=q.device)
            g = gbuf[: r1 - r0]
            self.launch_grad_tiles(q, k, g, dsp, rl, rc, cl, cc, pi, pc, r0, r1, float(scale))
            ds += dsp.sum()
            torch.mul(mm_f32(g, kg), out_scale, out=dq[r0:r1])
            addmm_f32_(dk, g.t(), qg[r0:r1], out_scale)
        return dq, dk, ds * norm
