"""CUDA C++ backend: kernels/csrc/infonce_kernels.cu (CUDA runtime only) bound by
kernels/csrc/infonce_binding.cpp as the module ``kernels._infonce_cuda``.

Ahead of time:  ``COMA_BUILD_CUDA=1 pip install -e .`` (setup.py builds the extension).
Just in time:   otherwise the first use compiles it with ``torch.utils.cpp_extension.load``
(ninja; cached under TORCH_EXTENSIONS_DIR, ~1 min the first time).
Same maths and interface as the Triton backend (:class:`kernels.infonce.RowKernelOps`).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .infonce import RowKernelOps

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
                                   "to JIT-build kernels/csrc/*; or build ahead of time with "
                                   "COMA_BUILD_CUDA=1 pip install -e .; or use backend='triton'") from None
            mod = cpp_extension.load(
                name="_infonce_cuda", sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
                verbose=os.environ.get("COMA_VERBOSE_BUILD") == "1")
        _module = mod
        return mod


class CudaOps(RowKernelOps):
    name = "cuda"

    def __init__(self, module):
        self.mod = module

    @classmethod
    def for_inputs(cls, device: torch.device, dtype: torch.dtype) -> "CudaOps":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {device} tensors; use backend='torch' on "
                               "CPU (the CUDA extension cannot run without a GPU)")
        if not torch.cuda.is_available():
            raise RuntimeError("backend='cuda': torch reports no usable CUDA device")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"backend='cuda' supports float32/float16/bfloat16 inputs, not {dtype}")
        return cls(load_extension())

    def row_lse(self, a, b, scale):
        return self.mod.row_lse(a, b, float(scale))

    def launch_grad(self, a, b, da, ds, scale, out_scale, rlse, rcoef, clse, ccoef, want_ds):
        rows = self.mod.rows_per_block()
        part = torch.zeros(-(-a.shape[0] // rows), dtype=torch.float32, device=a.device) if want_ds else da
        self.mod.grad_rows(a, b, da, part, rlse, rcoef, clse, ccoef, want_ds, float(scale), float(out_scale))
        if want_ds:
            ds[: part.numel()] += part  # ds has one slot per row; the per-block partials fit in front
