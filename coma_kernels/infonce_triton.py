"""Triton kernels for the tiled InfoNCE primitives: the two tile kernels that
:class:`coma_kernels.tiled.TiledOps` drives (the algorithm, chunking and memory bounds are
described there; the maths in :mod:`coma_kernels.infonce`).

``_stats_kernel``: a program owns BLOCK_M rows of Q and a contiguous split of the key columns,
streams its keys in BLOCK_N tiles, builds each tile's logits from BLOCK_K slices of D in an fp32
accumulator (tensor cores for fp16/bf16) that never leaves registers, and keeps the online
(max, sum-exp) per row, m' = max(m, max_j S_ij), l' = l·exp(m − m') + Σ_j exp(S_ij − m'); when
symmetric it also writes each tile's per-column (max, sum-exp) over its rows.

``_grad_tile_kernel``: a program owns one (row block, key tile) of a chunk, recomputes that
logits tile and writes G (the positive's weight subtracted in fp32 before rounding); d
logit_scale comes from the dQ GEMM (:func:`coma_kernels.tiled.chunked_grads`), so no logits
stay live beside G.  Its 1-D grid is walked in groups of ``GROUP_M`` row
blocks (the Triton matmul tutorial's order): programs running together share key tiles, which
stay in L2 instead of being read once per row block.

With ``COMA_INFONCE_TRITON_PERSISTENT=1`` a fixed grid of programs walks the work items, and
``tl.range(..., flatten=True)`` fuses each program's (item, D-slice) loop nest into one loop
(Triton's fuse-nested-loops pass, run for sm_80/sm_90): the pipeliner then prefetches the next
tile's first Q/K slices while this tile's exponentials and G store run, instead of draining at
every tile.  On sm_90 with TMA and 128×64 tiles that also takes the gradient kernel from 151 to
125 registers (two CTAs per SM; benchmarks/triton_resources.py).

Why ``exp`` and not ``exp2`` with log2(e) folded into the scale (flash-attention's trick): base 2
rounds the large logit and its LSE once more each before they cancel, and in the trained regime
(p(positive) ≈ 0.999, where the gradient is 1 − p) that made fp32 d logit_scale miss its
tolerance by 1.3× (tests/test_kernels_infonce.py); the multiply it would save runs on the FMA
pipe beside the special-function unit's ``ex2`` anyway.

Under TRITON_INTERPRET=1 (CPU) bf16 ``tl.dot`` is broken upstream, so bf16 tiles are converted
to fp32 before the dot when interpreting (the ``UPCAST`` constexpr) and G is kept in fp32.
fp32 inputs on a GPU use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import os

import torch

from . import triton_tuning
from .tiled import TiledOps, cdiv
from .triton_tuning import DEFAULT, Resources, TileConfig, pow2

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError as exc:  # pragma: no cover - triton ships with Linux torch wheels
    raise RuntimeError(f"backend='triton' needs the triton package ({exc}); pip install triton, "
                       "or use backend='torch'") from exc

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot_tile(A, B, rows, cols, rmask, cmask, r_start, c_start, D, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A[rows] · B[cols]ᵀ, summed over D in BLOCK_K slices.  With
    ``TMA``, A and B are tensor descriptors (rows and cols contiguous ranges; the hardware pads
    what lies outside the matrix with zeros, and the callers mask rows and columns they do not
    own); otherwise pointers, loaded under the masks."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if TMA:
            a = A.load([tl.cast(r_start, tl.int32), k0])
            bt = tl.trans(B.load([tl.cast(c_start, tl.int32), k0]))
        else:
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
def _stats_item(Q, K, RMAX, RSUM, PMAX, PSUM, item, n, m, D, stride_q, stride_k, cols_per_split, splits, scale,
                COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Work item ``item`` = (row block, split), splits fastest: neighbouring items share Q's rows."""
    pid_m = item // splits
    split = item % splits
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: row · stride may pass 2³¹
    rmask = rows < n
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_start = split * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, m)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < c_end
        acc = _dot_tile(Q, K, rows, cols, rmask, cmask, pid_m * BLOCK_M, c0, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, TMA)
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
def _stats_kernel(Q, K, RMAX, RSUM, PMAX, PSUM, n, m, D, stride_q, stride_k, cols_per_split, splits, scale,
                  COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr):
    if PERSISTENT:  # a fixed grid of programs walks the work items (one flattened loop: see the module docstring)
        for item in tl.range(tl.program_id(0), tl.cdiv(n, BLOCK_M) * splits, tl.num_programs(0), flatten=True):
            _stats_item(Q, K, RMAX, RSUM, PMAX, PSUM, item, n, m, D, stride_q, stride_k, cols_per_split, splits,
                        scale, COL, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, TMA)
    else:           # one program per work item
        _stats_item(Q, K, RMAX, RSUM, PMAX, PSUM, tl.program_id(0), n, m, D, stride_q, stride_k, cols_per_split,
                    splits, scale, COL, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, TMA)


@triton.jit
def _grad_tile(Q, K, G, RLSE, RCOEF, CLSE, CCOEF, PIDX, PCOEF, tile, row0, row1, m, D,
               stride_q, stride_k, stride_g, scale,
               HAS_COL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr):
    """Tile ``tile`` of the chunk's (row block, key tile) grid, in GROUP_M-row-block raster order."""
    blocks_m = tl.cdiv(row1 - row0, BLOCK_M)
    blocks_n = tl.cdiv(m, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    local = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    rmask = rows < row1
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < m
    acc = _dot_tile(Q, K, rows, cols, rmask, cmask, row0 + pid_m * BLOCK_M, pid_n * BLOCK_N, D, stride_q,
                    stride_k, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, TMA)
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
    tl.store(G + local[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=valid)


@triton.jit
def _grad_tile_kernel(Q, K, G, RLSE, RCOEF, CLSE, CCOEF, PIDX, PCOEF, row0, row1, m, D,
                      stride_q, stride_k, stride_g, scale,
                      HAS_COL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      TMA: tl.constexpr, PERSISTENT: tl.constexpr):
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(row1 - row0, BLOCK_M) * tl.cdiv(m, BLOCK_N), tl.num_programs(0),
                             flatten=True):
            _grad_tile(Q, K, G, RLSE, RCOEF, CLSE, CCOEF, PIDX, PCOEF, tile, row0, row1, m, D, stride_q,
                       stride_k, stride_g, scale, HAS_COL, HAS_POS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, UPCAST,
                       PRECISION, TMA)
    else:
        _grad_tile(Q, K, G, RLSE, RCOEF, CLSE, CCOEF, PIDX, PCOEF, tl.program_id(0), row0, row1, m, D,
                   stride_q, stride_k, stride_g, scale, HAS_COL, HAS_POS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                   UPCAST, PRECISION, TMA)


GROUP_M = 8  # row blocks per raster group of the gradient grid (see the module docstring)


class TritonOps(TiledOps):
    """Host side of the Triton kernels (chunking and GEMMs in :class:`coma_kernels.tiled.TiledOps`).

    Each kernel ("stats", "grad") gets a :class:`~coma_kernels.triton_tuning.TileConfig`: the one
    ``COMA_INFONCE_TRITON_TILES`` forces, else the autotuner's choice when
    ``COMA_INFONCE_TRITON_AUTOTUNE=1`` (:mod:`coma_kernels.triton_tuning`: candidates that spill are
    never timed), else :data:`~coma_kernels.triton_tuning.DEFAULT`."""

    name = "triton"

    def __init__(self, interpret: bool, dtype: torch.dtype, programs: int = 0, tma: bool = False,
                 tiles: str | None = None, autotune: bool = False):
        self.interpret = interpret
        self.programs, self.tma, self.autotune = programs, tma, autotune  # see for_inputs
        self.forced = TileConfig.parse(tiles) if tiles else None
        self.chosen: dict[str, TileConfig] = {}   # kernel → configuration, once tuned or read from the cache
        self._probing = False                     # launches compile and report resources instead of running
        self._probed: Resources | None = None
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
        # Kernel variants, read once here (a loss's forward and backward use the same ones), off by
        # default until a GPU profile shows they pay (benchmarks/README.md, benchmarks/triton_resources.py):
        # COMA_INFONCE_TRITON_TILES="BM,BN,BK[,WARPS,STAGES]": the tile configuration (tests, tuning);
        # COMA_INFONCE_TRITON_AUTOTUNE=1: tune it per shape, never timing a spilling candidate
        # (compiled kernels only: the interpreter has no registers to count);
        # COMA_INFONCE_TRITON_PERSISTENT=1: a persistent grid, two programs per SM (three programs
        # in the interpreter, so that the tests walk the work loop), each looping over work items;
        # COMA_INFONCE_TRITON_TMA=1: Q and K tiles through TMA tensor descriptors (Hopper and later).
        programs = 0
        if os.environ.get("COMA_INFONCE_TRITON_PERSISTENT", "0") == "1":
            programs = 3 if interpret else 2 * torch.cuda.get_device_properties(device).multi_processor_count
        tma = os.environ.get("COMA_INFONCE_TRITON_TMA", "0") == "1" and (
            interpret or torch.cuda.get_device_capability(device)[0] >= 9)
        autotune = os.environ.get("COMA_INFONCE_TRITON_AUTOTUNE", "0") == "1" and not interpret
        return cls(interpret, dtype, programs, tma, os.environ.get("COMA_INFONCE_TRITON_TILES"), autotune)

    def config(self, kernel: str, n: int, m: int, d: int, elem: int) -> TileConfig:
        """The tile configuration ``kernel`` ("stats" or "grad") launches with for these sizes."""
        if kernel in self.chosen:
            return self.chosen[kernel]
        if self.forced:
            return self.forced
        if self.interpret:
            # the interpreter's cost is per program × per tile: few, large tiles
            return TileConfig(max(16, min(128, pow2(n))), max(16, min(128, pow2(m))), max(16, min(pow2(d), 256)))
        return DEFAULT.fit(d, elem)

    def tiles(self, kernel, n, m, d, elem):
        c = self.config(kernel, n, m, d, elem)
        return c.block_m, c.block_n

    def default_splits(self, row_blocks, col_blocks, device):
        if self.interpret:
            return 1
        return cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, row_blocks)

    # ---- autotuning (coma_kernels.triton_tuning)
    def stats(self, query, key, scale, col):
        if self.autotune and "stats" not in self.chosen:
            self._tune("stats", query, key, f"col={int(col)}", lambda: TiledOps.stats(self, query, key, scale, col))
        return super().stats(query, key, scale, col)

    def _tune(self, kernel: str, q, k, flags: str, run) -> None:
        """Set ``self.chosen[kernel]``: from the cache, else by :func:`triton_tuning.choose` over
        ``run()`` (the real launch on the real inputs) with each candidate."""
        (n, d), m = q.shape, k.shape[0]
        key = "|".join([kernel, _device_name(q.device), f"triton {triton.__version__}", str(q.dtype).split(".")[-1],
                        flags, f"tma={int(self.tma)} persistent={int(self.programs > 0)}",
                        f"n={pow2(n)} m={pow2(m)} d={pow2(d)}"])
        cfg = triton_tuning.CACHE.get(key)
        if cfg is None:
            candidates = list(dict.fromkeys(c.fit(d, q.element_size()) for c in triton_tuning.CANDIDATES))

            def resources(c: TileConfig) -> Resources:
                self.chosen[kernel], self._probing, self._probed = c, True, None
                try:
                    run()
                finally:
                    self._probing = False
                return self._probed

            def timer(c: TileConfig) -> float:
                self.chosen[kernel] = c
                return self._time(run)

            cfg, report = triton_tuning.choose(candidates, resources, timer)
            triton_tuning.CACHE.put(key, cfg, report)
        self.chosen[kernel] = cfg

    def _launch(self, fn, grid, args, kwargs) -> None:
        if not self._probing:
            fn[grid](*args, **kwargs)
            return
        self._probed = self._compiled_resources(fn, grid, args, kwargs)

    @staticmethod
    def _compiled_resources(fn, grid, args, kwargs) -> Resources:
        """Compile ``fn`` for these arguments without launching it, and read what it asks of an SM."""
        kernel = fn.warmup(*args, grid=grid, **kwargs)
        kernel._init_handles()  # loads the binary: registers and spills come from the driver
        return Resources(kernel.n_regs, kernel.n_spills, kernel.metadata.shared)

    @staticmethod
    def _time(run) -> float:
        return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")

    # ---- launches
    def _grid(self, items: int) -> tuple[int]:
        """One program per work item, or the persistent grid's programs looping over them."""
        return (min(items, self.programs) if self.programs else items,)

    def _operands(self, q, k, c: TileConfig):
        """(Q, K, TMA): tensor descriptors when TMA is on and both have 16-byte aligned rows."""
        aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (q, k))
        if not (self.tma and aligned):
            return q, k, False
        from triton.tools.tensor_descriptor import TensorDescriptor

        return (TensorDescriptor.from_tensor(q, [c.block_m, c.block_k]),
                TensorDescriptor.from_tensor(k, [c.block_n, c.block_k]), True)

    def _options(self, c: TileConfig) -> dict:
        return {} if self.interpret else c.options

    def launch_stats(self, q, k, scale, col, cols_per_split, rmax, rsum, pmax, psum):
        (n, d), m = q.shape, k.shape[0]
        c = self.config("stats", n, m, d, q.element_size())
        splits = rmax.shape[0]
        qa, ka, tma = self._operands(q, k, c)
        self._launch(_stats_kernel, self._grid(cdiv(n, c.block_m) * splits),
                     (qa, ka, rmax, rsum, pmax, psum, n, m, d, q.stride(0), k.stride(0), cols_per_split, splits, scale),
                     dict(COL=col, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, UPCAST=self.upcast,
                          PRECISION=self.precision, TMA=tma, PERSISTENT=self.programs > 0, **self._options(c)))

    def launch_grad_tiles(self, q, k, g, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale):
        args = (q, k, g, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale)
        if self.autotune and "grad" not in self.chosen:  # tuned on the first chunk, whose G it then writes
            self._tune("grad", q, k, f"col={int(clse is not None)} pos={int(pidx is not None)}",
                       lambda: self._launch_grad(*args))
        self._launch_grad(*args)

    def _launch_grad(self, q, k, g, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale):
        (n, d), m = q.shape, k.shape[0]
        c = self.config("grad", n, m, d, q.element_size())
        has_col, has_pos = clse is not None, pidx is not None
        cl, cc = (clse, ccoef) if has_col else (rlse, rcoef)      # pointer slots unused without the term
        pi, pc = (pidx, pcoef) if has_pos else (rlse, rcoef)
        qa, ka, tma = self._operands(q, k, c)
        self._launch(_grad_tile_kernel, self._grid(cdiv(row1 - row0, c.block_m) * cdiv(m, c.block_n)),
                     (qa, ka, g, rlse, rcoef, cl, cc, pi, pc, row0, row1, m, d, q.stride(0), k.stride(0),
                      g.stride(0), scale),
                     dict(HAS_COL=has_col, HAS_POS=has_pos, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                          BLOCK_K=c.block_k, GROUP_M=GROUP_M, UPCAST=self.upcast, PRECISION=self.precision,
                          TMA=tma, PERSISTENT=self.programs > 0, **self._options(c)))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
