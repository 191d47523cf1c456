"""Host-side driver of the fused tile kernels (the Triton backend), and the helpers the GPU
backends share (chunk sizing, fp32-output GEMMs, LSE merging, the gradient coefficients).

A backend supplies two tile kernels; :class:`TiledOps` turns them into the primitives of
:mod:`coma_kernels.infonce` (``stats`` and ``softmax_grads``):

``launch_stats``  grid (row blocks of Q) × (splits of the key columns).  Every program keeps an
    online (max, sum-exp) for its rows over its columns → RMAX/RSUM [splits, n]; when symmetric
    it also writes each tile's per-column (max, sum-exp) over its rows → PMAX/PSUM
    [row blocks, m].  ``merge_lse`` combines the partials.  One pass over Q Kᵀ gives both
    directions; the partials cost 8·(n·splits + m·⌈n/BLOCK_M⌉) bytes, O(n·m/BLOCK_M).

``launch_grad_tiles``  grid (row blocks of a chunk of C rows) × (key tiles).  Recomputes each
    logits tile once and writes the softmax-gradient weights
        G_ij = a_i · exp(S_ij − row_lse_i) + b_j · exp(S_ij − col_lse_j)
    into a [C, m] buffer (the column term only when symmetric).  (The positive logit's −w_i is
    subtracted in the same fp32 tile, before G is rounded.)  Then dQ_chunk = s·G K and
    dK += s·Gᵀ Q_chunk are GEMMs (cuBLAS through torch.mm / addmm, fp32 accumulation; dK
    accumulated in place across chunks in fp32), and d logit_scale = Σ G ⊙ (Q Kᵀ) is read off
    the dQ GEMM as Σ Q ⊙ (G K) (see :func:`chunked_grads`).  S is recomputed once in backward
    (not once per direction), with no atomics and no D-wide read-modify-write, deterministically.

Chunk size (:func:`chunk_rows`): the chunk buffers (G, and the CUDA backend's fp32 S beside it)
take at most the bytes of the fp32 dQ and dK the backward returns anyway, (n + m)·D·4 (64 MiB at
least), and at most a quarter of the device's free memory (``torch.cuda.mem_get_info`` plus the
caching allocator's unused blocks).  So the loss's extra memory stays O((n + m)·D), as Inf-CL's
does, and the loss backward, which runs while every saved activation of the model is still
alive, never adds an n×m spike to a training step's peak: at n = m = 32k, D = 2048 in bf16, G is
512 MiB (four 8192-row chunks) instead of the 2 GiB of one chunk.  The price is dK accumulated in
place over the chunks (cuBLAS reads and writes the fp32 [m, D] once more per chunk: ~1.5 GiB of
traffic at that size, ~0.5 ms on an H100).  ``COMA_INFONCE_CHUNK_ELEMS_GPU`` fixes C·m instead
(tests force many chunks; ``benchmarks/loss_breakdown.py --variants`` times one whole chunk).
Peak extra memory is O(C·m + (n + m)·D).  G is normalised to max |coefficient| = 1 before it
is rounded to fp16/bf16 (the coefficients are O(1/n), below fp16's normal range at large n);
the norm is folded back into the GEMM scale.
"""
from __future__ import annotations

import abc
import os

import torch

FREE_MEMORY_SHARE = 0.25        # of the device's free memory, for the chunk buffers
MIN_CHUNK_BYTES = 64 << 20      # small losses run as one chunk, whatever their (n + m)·D


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
    if not a.is_cuda:  # the CPU rounds a bf16/fp16 product to bf16/fp16: multiply in fp32
        return torch.mm(a.float(), b.float())
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _OUT_DTYPE_MM[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _OUT_DTYPE_MM[0] = False
    return torch.mm(a, b).float()


_OUT_DTYPE_ADDMM = [True]


def chunk_rows(n: int, m: int, d: int, bm: int, elem_bytes: int, free_bytes: int | None) -> int:
    """Rows C of Q per chunk: a multiple of ``bm`` whose [C, m] buffers, ``elem_bytes`` bytes per
    element of them all, take at most max((n + m)·d·4, ``MIN_CHUNK_BYTES``) bytes (the fp32
    gradients' own size: the loss's memory stays O((n + m)·D)) and at most ``FREE_MEMORY_SHARE``
    of ``free_bytes`` (None: memory cannot be read, the CPU interpreter); at least one row block,
    at most all ``n`` rows.  ``COMA_INFONCE_CHUNK_ELEMS_GPU``: C·m at most that many elements,
    in place of both bounds."""
    forced = os.environ.get("COMA_INFONCE_CHUNK_ELEMS_GPU")
    if forced:
        elems = int(forced)
    else:
        budget = max((n + m) * d * 4, MIN_CHUNK_BYTES)
        if free_bytes is not None:
            budget = min(budget, int(free_bytes * FREE_MEMORY_SHARE))
        elems = budget // elem_bytes
    return min(cdiv(n, bm) * bm, max(bm, elems // max(m, 1) // bm * bm))


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new buffer can take on ``device``: the driver's free memory plus what torch's
    caching allocator holds unused; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def addmm_f32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float = 1.0) -> None:
    """out = beta · out + alpha · (a @ b) in place, ``out`` fp32 (``beta=0``: ``out`` is not read, so
    it may be uninitialised).  On CUDA with fp16/bf16 operands the
    product is accumulated straight into ``out`` (``out_dtype``, torch ≥ 2.8): no [m, D] fp32
    temporary per chunk, no read-modify-write pass over it (dK over 16 chunks at N = 32k,
    D = 2048 moved ~16 GiB that way).  Elsewhere: the fp32 product, then one add."""
    if a.is_cuda and a.dtype != torch.float32 and _OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_ADDMM[0] = False
    if beta == 0:
        torch.mul(mm_f32(a, b), alpha, out=out)
    elif a.is_cuda and a.dtype != torch.float32:
        out.add_(mm_f32(a, b), alpha=alpha)
    else:  # fp32, or the CPU (interpreter runs), where a bf16 product would be rounded to bf16
        out.addmm_(a.float(), b.float(), alpha=alpha)


def normalised_coefficients(row_lse, row_coef, col_lse=None, col_coef=None, pos_index=None, pos_coef=None):
    """``(norm, rl, rc, cl, cc, pi, pc)`` for the gradient-weight kernels: the coefficients divided
    by ``norm``, their largest magnitude (G's entries are O(1/n), below fp16's normal range at
    large n; normalised, G rounds well, and ``norm`` goes back into the GEMM scale), as contiguous
    fp32 vectors, the positive index as int64; None where a term is absent.  ``norm`` is 0.0 when
    every coefficient is 0 (the gradient is 0).  One host sync, not one per coefficient."""
    norm = float(torch.stack([x.abs().max() for x in (row_coef, col_coef, pos_coef) if x is not None]).max())
    if norm == 0.0:
        return 0.0, None, None, None, None, None, None
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    has_col, has_pos = col_lse is not None, pos_index is not None
    return (norm, f32(row_lse), f32(row_coef / norm),
            f32(col_lse) if has_col else None, f32(col_coef / norm) if has_col else None,
            pos_index.to(torch.int64).contiguous() if has_pos else None, f32(pos_coef / norm) if has_pos else None)


class TiledOps(abc.ABC):
    """Bookkeeping around two tile kernels (see the module docstring)."""

    name = "tiled"
    g_dtype: torch.dtype  # dtype of the G chunk buffer (the GEMM operands)

    @abc.abstractmethod
    def tiles(self, kernel: str, n: int, m: int, d: int, elem: int) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) that ``kernel`` ("stats" or "grad") uses for these sizes."""

    @abc.abstractmethod
    def default_splits(self, row_blocks: int, col_blocks: int, device: torch.device) -> int:
        """How many column splits the stats grid gets (fills the GPU when n is small)."""

    @abc.abstractmethod
    def launch_stats(self, q, k, scale, col, cols_per_split, rmax, rsum, pmax, psum) -> None:
        """Grid (⌈n/BLOCK_M⌉, splits); fills rmax/rsum [splits, n] and, if col, pmax/psum [⌈n/BLOCK_M⌉, m]."""

    @abc.abstractmethod
    def launch_grad_tiles(self, q, k, g, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale) -> None:
        """Grid (⌈(row1−row0)/BLOCK_M⌉, ⌈m/BLOCK_N⌉); g [row1−row0, m] (g_dtype) ← G of those rows.
        clse/ccoef and pidx/pcoef are None when the column / positive term is absent."""

    # ---- the primitives of coma_kernels.infonce
    def stats(self, query, key, scale: float, col: bool):
        q, k = query.contiguous(), key.contiguous()
        (n, d), m = q.shape, k.shape[0]
        bm, bn = self.tiles("stats", n, m, d, q.element_size())
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
        bm, _ = self.tiles("grad", n, m, d, q.element_size())
        coefs = normalised_coefficients(row_lse, row_coef, col_lse, col_coef, pos_index, pos_coef)
        _, rl, rc, cl, cc, pi, pc = coefs

        def write_g(r0: int, r1: int, g: torch.Tensor) -> None:
            self.launch_grad_tiles(q, k, g, rl, rc, cl, cc, pi, pc, r0, r1, float(scale))

        return chunked_grads(q, k, scale, coefs[0], self.g_dtype, bm, 0, write_g)


def chunked_grads(q, k, scale: float, norm: float, g_dtype: torch.dtype, row_multiple: int, extra_bytes: int,
                  write_g) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward both GPU backends share: (dQ [n, D], dK [m, D], d scale) in fp32.

    Over chunks of C query rows (:func:`chunk_rows`: multiples of ``row_multiple``; the G buffer
    plus ``extra_bytes`` per element of the backend's own within the bytes of dQ and dK and a
    share of free memory),
    ``write_g(r0, r1, g)`` fills ``g`` [r1 − r0, m] (``g_dtype``) with the softmax-gradient
    weights of rows [r0, r1), coefficients divided by ``norm`` (:func:`normalised_coefficients`).
    Then dQ_c = s·norm·G K and dK += s·norm·Gᵀ Q_c: GEMMs with fp32 results, dK overwritten by
    the first chunk (beta = 0).

    d scale = Σ G ⊙ (Q Kᵀ) = Σ_i q_i · (G K)_i is read off the dQ GEMM's product before it is
    scaled: one pass over [C, D] instead of a Σ G ⊙ S reduction in every gradient tile.  The
    tile kernels then hold G and no logits after the exponentials, which takes the Triton
    gradient kernel from 170 to 118 registers at 128×64 tiles (sm_90, TMA): two CTAs per SM
    (benchmarks/triton_resources.py).  With a bf16/fp16 G the sum sees G rounded, as dQ does;
    in bf16 that moves d scale by ~1e-3 relative (tests/test_kernels_infonce.py, trained regime),
    below the rounding of the inputs themselves."""
    (n, d), m = q.shape, k.shape[0]
    dq = torch.zeros(n, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(m, d, dtype=torch.float32, device=q.device)
    if norm == 0.0:
        return dq, dk, dq.new_zeros(())
    g_elem = torch.empty((), dtype=g_dtype).element_size()
    chunk = chunk_rows(n, m, d, row_multiple, g_elem + extra_bytes, free_bytes(q.device))
    gbuf = torch.empty(chunk, m, dtype=g_dtype, device=q.device)
    qg, kg = q.to(g_dtype), k.to(g_dtype)            # no-ops except when the Triton interpreter keeps G in fp32
    out_scale = float(scale) * norm
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        g = gbuf[: r1 - r0]
        write_g(r0, r1, g)
        gk = mm_f32(g, kg)                                # [C, D] fp32 = G K
        torch.mul(gk, out_scale, out=dq[r0:r1])
        ds += gk.mul_(qg[r0:r1]).sum()                    # Σ_i q_i · (G K)_i, in gk's storage
        addmm_f32_(dk, g.t(), qg[r0:r1], out_scale, beta=0.0 if r0 == 0 else 1.0)
    return dq, dk, ds * norm
