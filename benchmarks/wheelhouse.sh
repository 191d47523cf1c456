#!/usr/bin/env bash
# Fill .whl/ with the wheels a lent GPU machine lacks (it has torch, triton, nvcc and ninja but
# cannot reach PyPI), pinned to the versions of this checkout's virtualenv so the GPU run uses
# the code paths the CPU suite tested:
#
#   bash benchmarks/wheelhouse.sh                 # here, once; .whl/ is git-ignored
#   bash benchmarks/gpu_session.sh                # there (device tool: carry [".whl"])
#
# Pure-Python wheels come from PyPI as they are; deepspeed publishes only a source archive and
# is built into a wheel here (no ops compiled: its JIT builds them there when asked); the few
# compiled dependencies are fetched for the GPU image's Python (3.12, manylinux x86-64).  What the
# image already has in a version these accept (huggingface_hub 1.33, tokenizers 0.23, accelerate,
# safetensors) is not carried.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
GPU_PY=${GPU_PY:-3.12}
PURE=(deepspeed hjson py-cpuinfo einops webdataset braceexpand transformers peft pydantic annotated-types
      typing-inspection typing_extensions kernels inf_cl)
# regex: transformers checks its version at import; msgpack, psutil: deepspeed imports them.
# flash-attn is not carried: PyPI has only its CUDA source build (the compression phase falls
# back to SDPA and says so).
COMPILED=(pydantic_core regex msgpack psutil)
rm -rf "$DEST" && mkdir -p "$DEST"
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
for p in "${PURE[@]}"; do
  if [ "$p" = inf_cl ]; then spec="inf_cl"; else spec="$p==$(ver "$p")"; fi
  if [ "$p" = deepspeed ]; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "$spec"
  fi
done
for p in "${COMPILED[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$p==$(ver "$p")"
done
ls -1 "$DEST"
du -sh "$DEST"
