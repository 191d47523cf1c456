"""Triton kernels for the two tiled InfoNCE primitives (see :mod:`kernels.infonce`).

Two kernels, each used twice (once with the roles of Q and K swapped):

``_lse_kernel(A, B)``   one program per BLOCK_M rows of A; streams B in BLOCK_N tiles, each
    tile's logits  s · A_blk B_tileᵀ  built from BLOCK_K slices of D (fp32 accumulator), and
    keeps an online (max, sum-exp) per row:
        m' = max(m, max_j S_ij),   l' = l · exp(m − m') + Σ_j exp(S_ij − m')
    → row_lse = m + log l.  Called as (Q, K) for the per-row and, when symmetric, as (K, Q)
    for the per-column statistics.  Nothing of size n×m is written.

``_grad_kernel(A, B)``  one program per BLOCK_M rows of A; for every tile of B it recomputes
    the logits and the softmax weights
        G_ij = a_i · exp(S_ij − lse_i) + b_j · exp(S_ij − lse'_j)
    (either term optional) and accumulates  dA_blk += s · G B_tile  into an fp32 buffer that
    only this program owns (D is processed in BLOCK_K slices, so any D fits: no atomics, the
    result is deterministic).  Called as (Q, K) → dQ and ds partials, and (K, Q) → dK.
    G is normalised to max |coef| = 1 before the low-precision tensor-core dot (coefficients
    are O(1/n), tiny for fp16) and the norm is folded back into the output scale.

Under TRITON_INTERPRET=1 (CPU) bf16 ``tl.dot`` is broken upstream, so bf16 tiles are
converted to fp32 before the dot when interpreting (the ``UPCAST`` constexpr).  fp32 inputs
on a GPU use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import os

import torch

from .infonce import RowKernelOps

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
def _lse_kernel(A, B, LSE, n_rows, n_cols, D, stride_a, stride_b, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: row · stride may pass 2³¹
    rmask = rows < n_rows
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_cols
        acc = _dot_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        s = tl.where(cmask[None, :], acc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))           # finite: every tile has a valid column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=rmask)


@triton.jit
def _grad_kernel(A, B, DA, DS, RLSE, RCOEF, CLSE, CCOEF, n_rows, n_cols, D,
                 stride_a, stride_b, stride_da, scale, out_scale,
                 HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, WANT_DS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: row · stride may pass 2³¹
    rmask = rows < n_rows
    kk = tl.arange(0, BLOCK_K)
    if HAS_ROW:
        rlse = tl.load(RLSE + rows, mask=rmask, other=0.0)
        rcoef = tl.load(RCOEF + rows, mask=rmask, other=0.0)
    ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_cols
        acc = _dot_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        valid = rmask[:, None] & cmask[None, :]
        s = tl.where(valid, acc * scale, float("-inf"))     # exp(-inf) = 0 on padding: no inf·0
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_ROW:
            g += rcoef[:, None] * tl.exp(s - rlse[:, None])
        if HAS_COL:
            clse = tl.load(CLSE + cols, mask=cmask, other=0.0)
            ccoef = tl.load(CCOEF + cols, mask=cmask, other=0.0)
            g += ccoef[None, :] * tl.exp(s - clse[None, :])
        if WANT_DS:
            ds_acc += tl.sum(g * acc, axis=1)
        if UPCAST:
            gd = g
        else:
            gd = g.to(A.dtype.element_ty)
        for k0 in range(0, D, BLOCK_K):
            dmask = (k0 + kk) < D
            b = tl.load(B + cols[:, None] * stride_b + (k0 + kk)[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            upd = tl.dot(gd, b, input_precision=PRECISION)
            ptr = DA + rows[:, None] * stride_da + (k0 + kk)[None, :]
            omask = rmask[:, None] & dmask[None, :]
            tl.store(ptr, tl.load(ptr, mask=omask, other=0.0) + upd * out_scale, mask=omask)
    if WANT_DS:
        tl.store(DS + rows, ds_acc, mask=rmask)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


class TritonOps(RowKernelOps):
    """Host side of the Triton kernels: tile choice and launches (maths in the module docstring)."""

    name = "triton"

    def __init__(self, interpret: bool, dtype: torch.dtype):
        self.interpret = interpret
        self.upcast = interpret and dtype == torch.bfloat16
        tf32 = dtype == torch.float32 and not interpret and torch.backends.cuda.matmul.allow_tf32
        self.precision = "tf32" if tf32 else "ieee"

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
                                   "TRITON_INTERPRET=1 before kernels.infonce_triton is imported, or use "
                                   "backend='torch' (the CPU default)")
        else:
            raise RuntimeError(f"backend='triton' cannot run on device {device}; use backend='torch'")
        return cls(interpret, dtype)

    def _blocks(self, n_rows: int, n_cols: int, D: int, grad: bool):
        bk = max(16, min(_pow2(D), 64))
        if self.interpret:
            # The interpreter's cost is per program × per tile: few, large tiles.
            bm = max(16, min(128, _pow2(n_rows)))
            bn = max(16, min(128, _pow2(n_cols)))
            return bm, bn, max(16, min(_pow2(D), 256)), {}
        if grad:
            return 128, 64, bk, {"num_warps": 8, "num_stages": 2}
        return 128, 128 if bk <= 32 else 64, bk, {"num_warps": 8, "num_stages": 3}

    def row_lse(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """lse_i = log Σ_j exp(scale · a_i·b_j); a [r, D], b [c, D] contiguous → [r] fp32."""
        r, c, d = a.shape[0], b.shape[0], a.shape[1]
        out = torch.empty(r, dtype=torch.float32, device=a.device)
        bm, bn, bk, kw = self._blocks(r, c, d, grad=False)
        _lse_kernel[(triton.cdiv(r, bm),)](a, b, out, r, c, d, a.stride(0), b.stride(0), float(scale),
                                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=self.upcast,
                                          PRECISION=self.precision, **kw)
        return out

    def launch_grad(self, a, b, da, ds, scale, out_scale, rlse, rcoef, clse, ccoef, want_ds):
        r, c, d = a.shape[0], b.shape[0], a.shape[1]
        has_row, has_col = rlse is not None, clse is not None
        rl, rc = (rlse, rcoef) if has_row else (da, da)      # pointer slots unused when a term is absent
        cl, cc = (clse, ccoef) if has_col else (da, da)
        bm, bn, bk, kw = self._blocks(r, c, d, grad=True)
        _grad_kernel[(triton.cdiv(r, bm),)](a, b, da, ds, rl, rc, cl, cc, r, c, d,
                                           a.stride(0), b.stride(0), da.stride(0), scale, out_scale,
                                           HAS_ROW=has_row, HAS_COL=has_col, WANT_DS=want_ds,
                                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                           UPCAST=self.upcast, PRECISION=self.precision, **kw)
