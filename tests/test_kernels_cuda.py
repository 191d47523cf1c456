"""The CUDA backend's sources compile where nvcc exists (compile check only: no GPU here), and
the backend refuses clearly when it cannot run."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import coma_kernels

CU = Path(__file__).resolve().parent.parent / "coma_kernels" / "csrc" / "infonce_kernels.cu"


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (PATH, /usr/local/cuda, $CUDA_HOME): "
                                             "cannot compile-check coma_kernels/csrc/infonce_kernels.cu")
def test_cuda_kernels_compile_for_hopper(tmp_path):
    out = tmp_path / "infonce_kernels.o"
    # the defines torch.utils.cpp_extension adds to every nvcc call (no implicit half/bf16 operators)
    torch_defines = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                     "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    r = subprocess.run([_nvcc(), "-c", "-arch=sm_90a", "-O3", "--use_fast_math", "-std=c++17", *torch_defines,
                        "-Xptxas", "-v", str(CU), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 0
    # row_lse, col_partials and grad_weights for three G dtypes, none spilling
    infos = [line for line in r.stderr.splitlines() if "registers" in line]
    assert len(infos) == 5, r.stderr[-3000:]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", r.stderr)]
    assert spills and max(spills) == 0, r.stderr[-3000:]


@pytest.mark.skipif(_nvcc() is None or shutil.which("g++") is None,
                    reason="needs nvcc (for cuda_runtime.h) and g++ to compile-check the binding")
def test_binding_compiles_against_torch_headers(tmp_path):
    """infonce_binding.cpp against this torch's headers, as cpp_extension would compile it (C++20).
    A CPU-only torch lacks one generated CUDA header; a stand-in with its one define replaces it."""
    import sysconfig

    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda", Path(_nvcc()).resolve().parent.parent]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if not found:
        pytest.skip(f"no include/cuda_runtime.h under {homes}")
    cuda_inc = found[0]
    inc = [str(tmp_path), *cpp_extension.include_paths(), str(cuda_inc), sysconfig.get_paths()["include"]]
    r = subprocess.run(["g++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_infonce_cuda",
                        "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in inc],
                        str(CU.parent / "infonce_binding.cpp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_binding_names_match_setup_py(repo_root):
    setup = (repo_root / "setup.py").read_text()
    assert 'name="coma_kernels._infonce_cuda"' in setup
    for src in ("coma_kernels/csrc/infonce_binding.cpp", "coma_kernels/csrc/infonce_kernels.cu"):
        assert src in setup and (repo_root / src).exists()
    binding = (repo_root / "coma_kernels/csrc/infonce_binding.cpp").read_text()
    for sym in ("coma_infonce_row_lse", "coma_infonce_col_partials", "coma_infonce_grad_weights",
                "coma_infonce_rows_per_group"):
        assert sym in binding and sym in CU.read_text()


def test_cuda_backend_refuses_cpu_tensors():
    q = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        coma_kernels.fused_infonce(q, q, torch.tensor(10.0), backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        coma_kernels.infonce_loss_and_grads(q, q, torch.tensor(10.0), backend="cuda")



def test_a_failed_extension_build_is_not_retried(monkeypatch):
    """A JIT build that fails (~40 s on a GPU machine) raises its error again at once on every
    later use in the process, instead of rebuilding for each case of a sweep."""
    from coma_kernels import infonce_cuda

    calls = []

    def failing_build():
        calls.append(1)
        raise OSError("nvcc: exit status 1")

    monkeypatch.setattr(infonce_cuda, "_module", None)
    monkeypatch.setattr(infonce_cuda, "_failed", None)
    monkeypatch.setattr(infonce_cuda, "_build", failing_build)
    with pytest.raises(OSError, match="nvcc"):
        infonce_cuda.load_extension()
    with pytest.raises(RuntimeError, match="failed to build earlier in this process: nvcc: exit status 1"):
        infonce_cuda.load_extension()
    assert len(calls) == 1
