#!/usr/bin/env bash
# The whole GPU check of a lent H100/H200 in one command that ends inside the device tool's
# 10-minute call (a session has 15 minutes of device time in all, machine start included):
#
#   bash benchmarks/wheelhouse.sh            # here first: .whl/ with deepspeed, webdataset, … (git-ignored)
#   device run:  command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600
#
# 1. kernels (KERNEL_S, default 330 s): benchmarks/gpu_check.py — triton and cuda InfoNCE vs
#    float64 (fp32/bf16/fp16, odd shapes, the trained regime), gathered_infonce over NCCL, then
#    the loss benchmark from the issue's target point (N=32768, D=2048, bf16, symmetric) down.
# 2. training (TRAIN_S, default 240 s): benchmarks/throughput.py under torchrun on 1 GPU with a
#    random-init Qwen2.5-VL-3B (stage 1 preset: LoRA, ZeRO-3, bf16, gradient checkpointing),
#    synthetic 448 px images (256 visual tokens), global batch 32: step time, MFU, memory,
#    pipeline vs bare loop.
#
# Everything lands in $OUT as two files (the tool returns at most 8): summary.txt (PASS/FAIL
# counts, the target lines, the throughput row) and gpu_session.tgz (all logs, CSV and JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
KERNEL_S=${KERNEL_S:-330}
TRAIN_S=${TRAIN_S:-240}
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
mkdir -p "$OUT" "$WORK/kernels"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing .whl/ failed" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
python3 - <<'PY' 2>&1 | tee "$WORK/versions.txt"
import importlib, torch
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch", torch.__version__)
for m in ("triton", "deepspeed", "transformers", "peft", "webdataset", "inf_cl"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
PY

t0=$SECONDS
timeout "$KERNEL_S" python3 benchmarks/gpu_check.py --out "$WORK/kernels" --deadline $((KERNEL_S - 15)) \
  >"$WORK/gpu_check.log" 2>&1
echo "gpu_check exit $? after $((SECONDS - t0)) s" >>"$WORK/gpu_check.log"

t0=$SECONDS
timeout "$TRAIN_S" python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29533 \
  benchmarks/throughput.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml --random-init qwen2_5_vl_3b \
  --random-init-dir /tmp/coma-3b --image-size 448 --model.max_pixels=200704 --data synthetic \
  --warmup 1 --steps 2 --rounds 2 --train.global_batch_size=32 --train.micro_batch_size=8 \
  --out "$WORK/throughput.jsonl" >"$WORK/throughput.log" 2>&1
echo "throughput exit $? after $((SECONDS - t0)) s" >>"$WORK/throughput.log"

{
  cat "$WORK/versions.txt"
  echo "--- kernels"
  grep -c '^PASS' "$WORK/gpu_check.log" | sed 's/^/PASS lines: /'
  grep -E '^FAIL|^correctness|target|exit' "$WORK/gpu_check.log"
  echo "--- training"
  tail -n 25 "$WORK/throughput.log"
  cat "$WORK/throughput.jsonl" 2>/dev/null
} >"$OUT/summary.txt"
tar czf "$OUT/gpu_session.tgz" -C "$WORK" .
cat "$OUT/summary.txt"
