"""Which implementation of the tiled primitives runs: ``loss.backend`` → an ops object.

Both entry points, :mod:`coma_kernels` (one process) and :mod:`coma_kernels.distributed` (the
gathered loss), choose their backend here, so neither imports the other.  Triton and the CUDA
build are imported only when chosen.
"""
from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"infonce backend={backend!r}; use one of {BACKENDS} (config key loss.backend)")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def get_ops(backend: str, device: torch.device, dtype: torch.dtype):
    """The tiled primitives (see :mod:`coma_kernels.infonce`) of a backend; raises RuntimeError
    saying why when the backend cannot run on this device/dtype."""
    backend = resolve_backend(backend, device)
    if backend == "torch":
        from .infonce_torch import TorchOps
        return TorchOps()
    if backend == "triton":
        from .infonce_triton import TritonOps
        return TritonOps.for_inputs(device, dtype)
    if backend == "cuda":
        from .infonce_cuda import CudaOps
        return CudaOps.for_inputs(device, dtype)
    raise ValueError(f"backend {backend!r} has no tiled primitives (the reference materialises the logits)")
