"""Triton kernels for the tiled InfoNCE primitives: the two tile kernels that
:class:`coma_kernels.tiled.TiledOps` drives (the algorithm, chunking and memory bounds are
described there; the maths in :mod:`coma_kernels.infonce`).

``_stats_kernel``: a program owns BLOCK_M rows of Q and a contiguous split of the key columns,
streams its keys in BLOCK_N tiles, builds each tile's logits from BLOCK_K slices of D in an fp32
accumulator (tensor cores for fp16/bf16) that never leaves registers, and keeps the online
(max, sum-exp) per row, m' = max(m, max_j S_ij), l' = l·exp(m − m') + Σ_j exp(S_ij − m'); when
symmetric it also writes each tile's per-column (max, sum-exp) over its rows.

``_grad_tile_kernel``: a program owns one (row block, key tile) of a chunk, recomputes that
logits tile and writes G (the positive's weight subtracted in fp32 before rounding) plus its
share of Σ G ⊙ (Q Kᵀ) for d logit_scale.

Under TRITON_INTERPRET=1 (CPU) bf16 ``tl.dot`` is broken upstream, so bf16 tiles are converted
to fp32 before the dot when interpreting (the ``UPCAST`` constexpr) and G is kept in fp32.
fp32 inputs on a GPU use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import os

import torch

from .tiled import TiledOps, cdiv

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - triton ships with Linux torch wheels
    raise RuntimeError(f"backend='triton' needs the triton package ({exc}); pip install triton, "
                       "or use backend='torch'") from exc

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A[rows] · B[cols]ᵀ, summed over D in BLOCK_K slices."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dmask = (k0 + kk) < D
        a = tl.load(A + rows[:, None] * stride_a + (k0 + kk)[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        bt = tl.load(B + cols[None, :] * stride_b + (k0 + kk)[:, None],          # [BLOCK_K, BLOCK_N]
                     mask=cmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _stats_kernel(Q, K, RMAX, RSUM, PMAX, PSUM, n, m, D, stride_q, stride_k, cols_per_split, scale,
                  COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: row · stride may pass 2³¹
    rmask = rows < n
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_start = split * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, m)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < c_end
        acc = _dot_tile(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        s = acc * scale
        s_r = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_r, axis=1))           # finite: every tile has a valid column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_r - m_new[:, None]), axis=1)
        m_i = m_new
        if COL:
            s_c = tl.where(rmask[:, None], s, float("-inf"))
            c_max = tl.max(s_c, axis=0)                          # finite: every block has a valid row
            c_sum = tl.sum(tl.exp(s_c - c_max[None, :]), axis=0)
            tl.store(PMAX + pid_m.to(tl.int64) * m + cols, c_max, mask=cmask)  # int64: blocks · m may pass 2³¹
            tl.store(PSUM + pid_m.to(tl.int64) * m + cols, c_sum, mask=cmask)
    tl.store(RMAX + split.to(tl.int64) * n + rows, m_i, mask=rmask)
    tl.store(RSUM + split.to(tl.int64) * n + rows, l_i, mask=rmask)


@triton.jit
def _grad_tile_kernel(Q, K, G, DSP, RLSE, RCOEF, CLSE, CCOEF, PIDX, PCOEF, row0, row1, m, D,
                      stride_q, stride_k, stride_g, scale,
                      HAS_COL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    rmask = rows < row1
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < m
    acc = _dot_tile(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                    BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    valid = rmask[:, None] & cmask[None, :]
    s = tl.where(valid, acc * scale, float("-inf"))            # exp(-inf) = 0 on padding: no inf·0
    rlse = tl.load(RLSE + rows, mask=rmask, other=0.0)
    rcoef = tl.load(RCOEF + rows, mask=rmask, other=0.0)
    g = rcoef[:, None] * tl.exp(s - rlse[:, None])
    if HAS_COL:
        clse = tl.load(CLSE + cols, mask=cmask, other=0.0)
        ccoef = tl.load(CCOEF + cols, mask=cmask, other=0.0)
        g += ccoef[None, :] * tl.exp(s - clse[None, :])
    if HAS_POS:  # the positive logit's −w_i, subtracted in fp32 before G is rounded
        pidx = tl.load(PIDX + rows, mask=rmask, other=-1)
        pcoef = tl.load(PCOEF + rows, mask=rmask, other=0.0)
        g -= tl.where(cols[None, :] == pidx[:, None], pcoef[:, None], 0.0)
    tl.store(DSP + pid_m.to(tl.int64) * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * acc, axis=1), axis=0))
    tl.store(G + local[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=valid)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


class TritonOps(TiledOps):
    """Host side of the Triton kernels (chunking and GEMMs in :class:`coma_kernels.tiled.TiledOps`)."""

    name = "triton"

    def __init__(self, interpret: bool, dtype: torch.dtype):
        self.interpret = interpret
        self.upcast = interpret and dtype == torch.bfloat16
        tf32 = dtype == torch.float32 and not interpret and torch.backends.cuda.matmul.allow_tf32
        self.precision = "tf32" if tf32 else "ieee"
        # G in the input dtype feeds tensor-core GEMMs; fp32 when interpreting (CPU bf16 mm is slow)
        self.g_dtype = torch.float32 if interpret else dtype

    @classmethod
    def for_inputs(cls, device: torch.device, dtype: torch.dtype) -> "TritonOps":
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"backend='triton' supports float32/float16/bfloat16 inputs, not {dtype}; "
                               "use backend='torch' for float64")
        interpret = _interpreting()
        if device.type == "cuda":
            if interpret:
                raise RuntimeError("backend='triton' got CUDA tensors while TRITON_INTERPRET=1 is set; "
                                   "unset TRITON_INTERPRET to run the compiled kernels on the GPU")
        elif device.type == "cpu":
            if not interpret:
                raise RuntimeError("backend='triton' on CPU tensors needs the Triton interpreter: set "
                                   "TRITON_INTERPRET=1 before coma_kernels.infonce_triton is imported, or use "
                                   "backend='torch' (the CPU default)")
        else:
            raise RuntimeError(f"backend='triton' cannot run on device {device}; use backend='torch'")
        return cls(interpret, dtype)

    def _config(self, n, m, d, elem):
        forced = os.environ.get("COMA_INFONCE_TRITON_TILES")   # "BM,BN,BK": tests, tuning
        if forced:
            bm, bn, bk = (int(x) for x in forced.split(","))
            return bm, bn, bk, ({} if self.interpret else {"num_warps": 8 if bm * bn >= 128 * 64 else 4,
                                                             "num_stages": 3})
        if self.interpret:
            # the interpreter's cost is per program × per tile: few, large tiles
            return (max(16, min(128, _pow2(n))), max(16, min(128, _pow2(m))), max(16, min(_pow2(d), 256)), {})
        return 128, 128, max(16, min(_pow2(d), 64 if elem <= 2 else 32)), {"num_warps": 8, "num_stages": 3}

    def tiles(self, n, m, d, elem):
        return self._config(n, m, d, elem)[:2]

    def default_splits(self, row_blocks, col_blocks, device):
        if self.interpret:
            return 1
        return cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, row_blocks)

    def launch_stats(self, q, k, scale, col, cols_per_split, rmax, rsum, pmax, psum):
        (n, d), m = q.shape, k.shape[0]
        bm, bn, bk, kw = self._config(n, m, d, q.element_size())
        _stats_kernel[(cdiv(n, bm), rmax.shape[0])](q, k, rmax, rsum, pmax, psum, n, m, d, q.stride(0), k.stride(0),
                                                    cols_per_split, scale, COL=col, BLOCK_M=bm, BLOCK_N=bn,
                                                    BLOCK_K=bk, UPCAST=self.upcast, PRECISION=self.precision, **kw)

    def launch_grad_tiles(self, q, k, g, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale):
        (n, d), m = q.shape, k.shape[0]
        bm, bn, bk, kw = self._config(n, m, d, q.element_size())
        has_col, has_pos = clse is not None, pidx is not None
        cl, cc = (clse, ccoef) if has_col else (rlse, rcoef)      # pointer slots unused without the term
        pi, pc = (pidx, pcoef) if has_pos else (rlse, rcoef)
        _grad_tile_kernel[(cdiv(row1 - row0, bm), cdiv(m, bn))](
            q, k, g, dsp, rlse, rcoef, cl, cc, pi, pc, row0, row1, m, d, q.stride(0), k.stride(0), g.stride(0),
            scale, HAS_COL=has_col, HAS_POS=has_pos, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=self.upcast,
            PRECISION=self.precision, **kw)
