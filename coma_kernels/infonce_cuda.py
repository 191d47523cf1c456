"""CUDA C++ backend: coma_kernels/csrc/infonce_kernels.cu (CUDA runtime only) bound by
coma_kernels/csrc/infonce_binding.cpp as the module ``coma_kernels._infonce_cuda``.

Ahead of time:  ``COMA_BUILD_CUDA=1 pip install -e .`` (setup.py builds the extension).
Just in time:   otherwise the first use compiles it with ``torch.utils.cpp_extension.load``
(ninja; cached under TORCH_EXTENSIONS_DIR, ~1 min the first time).
Same tiles, maths and host loop as the Triton backend (:class:`coma_kernels.tiled.TiledOps`).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .tiled import TiledOps, cdiv

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "infonce_binding.cpp", CSRC / "infonce_kernels.cu"]
_lock = threading.Lock()
_module = None


def load_extension():
    """The compiled extension: the AOT build if installed, else a JIT build (cached)."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        try:
            from . import _infonce_cuda as mod  # built by setup.py with COMA_BUILD_CUDA=1
        except ImportError:
            from torch.utils import cpp_extension
            if cpp_extension.CUDA_HOME is None:
                raise RuntimeError("backend='cuda': no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH) "
                                   "to JIT-build coma_kernels/csrc/*; or build ahead of time with "
                                   "COMA_BUILD_CUDA=1 pip install -e .; or use backend='triton'") from None
            mod = cpp_extension.load(
                name="_infonce_cuda", sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
                verbose=os.environ.get("COMA_VERBOSE_BUILD") == "1")
        _module = mod
        return mod


class CudaOps(TiledOps):
    """Host side of the CUDA tile kernels (chunking and GEMMs in :class:`coma_kernels.tiled.TiledOps`)."""

    name = "cuda"

    def __init__(self, module, dtype: torch.dtype):
        self.mod = module
        self.tile = module.tile()
        self.g_dtype = dtype

    @classmethod
    def for_inputs(cls, device: torch.device, dtype: torch.dtype) -> "CudaOps":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {device} tensors; use backend='torch' on "
                               "CPU (the CUDA extension cannot run without a GPU)")
        if not torch.cuda.is_available():
            raise RuntimeError("backend='cuda': torch reports no usable CUDA device")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"backend='cuda' supports float32/float16/bfloat16 inputs, not {dtype}")
        return cls(load_extension(), dtype)

    def tiles(self, n, m, d, elem):
        return self.tile, self.tile

    def default_splits(self, row_blocks, col_blocks, device):
        # 64-row blocks: aim for ~4 resident blocks per SM
        return cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, row_blocks)

    def launch_stats(self, q, k, scale, col, cols_per_split, rmax, rsum, pmax, psum):
        self.mod.stats(q, k, rmax, rsum, pmax, psum, col, cols_per_split, scale)

    def launch_grad_tiles(self, q, k, g, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale):
        self.mod.grad_tiles(q, k, g, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, row0, row1, scale)
