"""CUDA backend: cuBLAS GEMMs for every O(n·m·D) product, fused CUDA epilogues for the rest.

The primitives of :mod:`coma_kernels.infonce` over chunks of C query rows:

``stats``          S = Q_c Kᵀ (fp32 [C, m], one GEMM with bf16/fp16 operands and an fp32 result),
                   then ``row_lse`` (each row's LSE, whole rows in the chunk: nothing to merge)
                   and, when symmetric, ``col_partials`` (each column's (max, sum-exp) over groups
                   of ``rows_per_group`` rows, merged over all groups at the end).
``softmax_grads``  S again (recomputed once for both directions), ``grad_weights`` writes G in
                   the input dtype, then dQ_c = s·G K and dK += s·Gᵀ Q_c (GEMMs, fp32
                   accumulation; dK overwritten by the first chunk) and d logit_scale from the
                   dQ product (:func:`coma_kernels.tiled.chunked_grads`).

Against the Triton backend's fused tiles (:mod:`coma_kernels.tiled`) this spends memory traffic
(S is written once and read once or twice, 4 bytes an element) to run every product at
cuBLAS speed; the epilogues are bandwidth-bound and vectorised (csrc/infonce_kernels.cu).
Chunks are sized as the Triton backend's (:func:`coma_kernels.tiled.chunk_rows`: within the bytes
of the fp32 gradients and a share of free memory; 4 bytes per element of S in the forward, 6 of
S and G in the backward).

:class:`TorchEpilogue` states each kernel's contract in torch: the tests run the host loop with
it on the CPU against float64, and the CUDA kernels against it on a GPU (benchmarks/gpu_check.py).

The extension: ``COMA_BUILD_CUDA=1 pip install -e .`` builds it ahead of time (setup.py);
otherwise the first use compiles it with ``torch.utils.cpp_extension.load`` (ninja; cached under
TORCH_EXTENSIONS_DIR, ~1 min the first time).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .tiled import cdiv, chunk_rows, chunked_grads, free_bytes, merge_lse, mm_f32, normalised_coefficients

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "infonce_binding.cpp", CSRC / "infonce_kernels.cu"]
_lock = threading.Lock()
_module = None
_failed: Exception | None = None  # a failed build is not retried by every later call (~40 s each)


def load_extension():
    """The compiled extension: the AOT build if installed, else a JIT build (cached).  A build
    that failed raises the same error again, at once, for the rest of the process."""
    global _module, _failed
    with _lock:
        if _module is not None:
            return _module
        if _failed is not None:
            raise RuntimeError(f"backend='cuda': the extension failed to build earlier in this process: {_failed}")
        try:
            _module = _build()
        except Exception as exc:
            _failed = exc
            raise
        return _module


def _build():
    """The AOT build (setup.py with COMA_BUILD_CUDA=1) when installed, else the JIT build."""
    try:
        from . import _infonce_cuda as mod
    except ImportError:
        return _jit_build()
    return mod


def _jit_build():
    """``torch.utils.cpp_extension.load`` (ninja; cached under TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("backend='cuda': no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH) "
                           "to JIT-build coma_kernels/csrc/*; or build ahead of time with "
                           "COMA_BUILD_CUDA=1 pip install -e .; or use backend='triton'")
    return cpp_extension.load(
        name="_infonce_cuda", sources=[str(s) for s in SOURCES],
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
        verbose=os.environ.get("COMA_VERBOSE_BUILD") == "1")


class TorchEpilogue:
    """The three epilogue kernels' contracts in torch (fp32 throughout).  ``S`` is a logits
    chunk [rows, m] of raw dot products; row vectors are the chunk's slices."""

    rows_per_group = 128

    def row_lse(self, S, scale, lse):
        """lse [rows] ← log Σ_c exp(scale·S[r, c])."""
        torch.logsumexp(S * scale, dim=1, out=lse)

    def col_partials(self, S, scale, pmax, psum, group0):
        """pmax/psum [group0 + g, m] ← (max, Σ exp(· − max)) of scale·S over rows [g·R, (g+1)·R)."""
        for g, r in enumerate(range(0, S.shape[0], self.rows_per_group)):
            block = S[r:r + self.rows_per_group] * scale
            top = block.amax(dim=0)
            pmax[group0 + g] = top
            psum[group0 + g] = torch.exp(block - top).sum(dim=0)

    def grad_weights(self, S, scale, G, rlse, rcoef, clse, ccoef, pidx, pcoef):
        """G ← a·exp(scale·S − rlse) + b·exp(scale·S − clse) − w at the positive, in G's dtype."""
        s = S * scale
        g = rcoef[:, None] * torch.exp(s - rlse[:, None])
        if clse is not None:
            g += ccoef[None, :] * torch.exp(s - clse[None, :])
        if pidx is not None:
            g[torch.arange(g.shape[0], device=g.device), pidx] -= pcoef
        G.copy_(g)


class CudaEpilogue:
    """The compiled kernels (csrc/infonce_kernels.cu) behind :class:`TorchEpilogue`'s interface."""

    def __init__(self, module):
        self.mod = module
        self.rows_per_group = module.rows_per_group()

    def row_lse(self, S, scale, lse):
        self.mod.row_lse(S, float(scale), lse)

    def col_partials(self, S, scale, pmax, psum, group0):
        self.mod.col_partials(S, float(scale), pmax, psum, group0)

    def grad_weights(self, S, scale, G, rlse, rcoef, clse, ccoef, pidx, pcoef):
        self.mod.grad_weights(S, float(scale), G, rlse, rcoef, clse, ccoef, pidx, pcoef)


class CudaOps:
    """The host loop (see the module docstring) over an epilogue: :class:`CudaEpilogue` on a GPU,
    :class:`TorchEpilogue` in the CPU tests."""

    name = "cuda"

    def __init__(self, epilogue, dtype: torch.dtype):
        self.epi = epilogue
        self.g_dtype = dtype  # G feeds the dQ/dK GEMMs in the input dtype (tensor cores for bf16/fp16)

    @classmethod
    def for_inputs(cls, device: torch.device, dtype: torch.dtype) -> "CudaOps":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {device} tensors; use backend='torch' on "
                               "CPU (the CUDA extension cannot run without a GPU)")
        if not torch.cuda.is_available():
            raise RuntimeError("backend='cuda': torch reports no usable CUDA device")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"backend='cuda' supports float32/float16/bfloat16 inputs, not {dtype}")
        return cls(CudaEpilogue(load_extension()), dtype)

    def stats(self, query, key, scale: float, col: bool):
        q, k = query.contiguous(), key.contiguous()
        (n, d), m = q.shape, k.shape[0]
        # whole row groups per chunk, so that a chunk's column partials fill whole groups
        chunk = chunk_rows(n, m, d, self.epi.rows_per_group, 4, free_bytes(q.device))
        f32 = dict(dtype=torch.float32, device=q.device)
        row_lse = torch.empty(n, **f32)
        groups = cdiv(n, self.epi.rows_per_group)
        pmax, psum = (torch.empty(groups, m, **f32), torch.empty(groups, m, **f32)) if col else (None, None)
        kt = k.t()
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            S = mm_f32(q[r0:r1], kt)                                    # [C, m] fp32, cuBLAS
            self.epi.row_lse(S, scale, row_lse[r0:r1])
            if col:
                self.epi.col_partials(S, scale, pmax, psum, r0 // self.epi.rows_per_group)
            del S
        return row_lse, (merge_lse(pmax, psum) if col else None)

    def softmax_grads(self, query, key, scale, row_lse, row_coef, col_lse=None, col_coef=None,
                      pos_index=None, pos_coef=None):
        q, k = query.contiguous(), key.contiguous()
        coefs = normalised_coefficients(row_lse, row_coef, col_lse, col_coef, pos_index, pos_coef)
        _, rl, rc, cl, cc, pi, pc = coefs
        kt = k.t()

        def write_g(r0: int, r1: int, g: torch.Tensor) -> None:
            S = mm_f32(q[r0:r1], kt)                                    # recomputed: [C, m] fp32, cuBLAS
            self.epi.grad_weights(S, scale, g, rl[r0:r1], rc[r0:r1], cl, cc,
                                  None if pi is None else pi[r0:r1], None if pc is None else pc[r0:r1])

        # 4 bytes of S beside each element of G
        return chunked_grads(q, k, scale, coefs[0], self.g_dtype, self.epi.rows_per_group, 4, write_g)
