#!/usr/bin/env bash
# The prepared GPU session: run it first whenever a GPU is lent (the device tool's command):
#
#   make wheelhouse                                  # here, once: .whl/ (git-ignored) for phases 5-8
#   device run:  command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 430
#   device run:  command "PHASES='wheels train' bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 230
#                (right after the first, while the machine is warm: the 3B run is its own call)
#
# Phases, cheapest and most informative first, each under its own time limit.  The device tool
# returns at most 8 files from $OUT, so $OUT holds two: phases.jsonl, one JSON line per phase
# appended the moment it ends ({"phase", "status": ok|fail|timeout|skipped, "rc", "seconds",
# "result", "tail"}), and session.tar.gz, every phase's log and result files (from $WORK),
# rewritten after each phase.  Each line is also printed, so the call's output tail holds the
# numbers too.  A call cut short keeps every phase that finished.  The first call's limits add
# up to 400 s and the second's to 200 s: both calls and a machine start fit the 15-minute
# device budget (a rerun of the first call does not).
#
#   1 env          (10 s)  card, driver, torch/CUDA/triton versions; the CUDA extension starts
#                          building in the background (correctness and loss wait for it)
#   2 correctness (100 s)  benchmarks/gpu_check.py --skip-bench: triton and cuda InfoNCE vs float64
#                          (fp32/bf16/fp16, odd shapes, the trained regime), gathered_infonce on NCCL
#   3 breakdown    (45 s)  benchmarks/loss_breakdown.py: per-kernel times of the triton loss at
#                          N=32768, D=2048, bf16, symmetric, and the cuBLAS ceiling of its four GEMMs
#   4 variants     (90 s)  the same loss per Triton kernel variant (one chunk, autotuned, tiles, TMA, persistent grid)
#   5 wheels       (30 s)  install .whl/ (benchmarks/wheelhouse.py) and import what it carries; phases 1-4 need none
#   6 loss         (65 s)  benchmarks/loss.py at the target point: reference, triton, cuda, Inf-CL
#                          (a row written as each provider finishes)
#   7 compression  (60 s)  benchmarks/compression.py: the stage-1 mask paths on the GPU's attention
#                          kernels, with a random-init model of Qwen2.5-VL-3B's attention shape (4 layers)
#   8 train       (170 s)  benchmarks/throughput.py: ZeRO-3 stage 1 of a random-init Qwen2.5-VL-3B
#                          (LoRA, bf16, 448 px images): step time, tokens/s, MFU, peak memory;
#                          not in the default list (the second call above)
#
# PHASES="env correctness ..." picks phases; OUT defaults to benchmarks/results/gpu_session, WORK
# (logs and result files) to a new $TMPDIR/coma-gpu-session-<time>-<pid> per run.  On a CPU-only
# machine the script runs as a dry run: env and the phase bookkeeping run, the GPU phases record "skipped"
# (tests/test_gpu_session.py does exactly this).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
# a folder per run: a result file left by an earlier run must never be read as this run's
WORK=${WORK:-${TMPDIR:-/tmp}/coma-gpu-session-$(date +%Y%m%d-%H%M%S)-$$}
PHASES=${PHASES:-"env correctness breakdown variants wheels loss compression"}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
# The device machine gets a copy of the working tree, not an installed package: put it on the path.
# Nothing there reaches the network: the hub libraries must not try (and wait out their timeouts).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The CUDA extension's JIT build, in a folder of this script's own: a build killed midway leaves a
# lock there that every later build would wait on for ever, so a lock found at the start is stale.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
  export TORCH_EXTENSIONS_DIR=${TMPDIR:-/tmp}/coma-torch-extensions
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
fi
unset TRITON_INTERPRET
HAVE_GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SKIPPED=99  # a phase's exit code for "not run here" (2 is argparse's usage error: a failure)

# record NAME RC SECONDS [RESULT_FILE]: one JSON line in $OUT/phases.jsonl (and on stdout), then
# $OUT/session.tar.gz rebuilt from $WORK
record() {
  python3 - "$OUT" "$WORK" "$SKIPPED" "$@" <<'PY'
import json, sys
from pathlib import Path
out, work, skipped = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
name, rc, secs = sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
res_file = Path(sys.argv[7]) if len(sys.argv) > 7 else None
log = work / f"{name}.log"
lines = log.read_text(errors="replace").splitlines() if log.exists() else []
result = None
if res_file is not None and res_file.exists():
    text = res_file.read_text(errors="replace")
    try:
        result = json.loads(text)
    except ValueError:  # JSON lines or CSV: keep the rows
        rows = [r for r in text.splitlines() if r.strip()]
        try:
            result = [json.loads(r) for r in rows]
        except ValueError:
            result = rows[:40]
if name == "correctness":
    passed = [l for l in lines if l.startswith("PASS")]
    failed = [l for l in lines if l.startswith("FAIL")]
    result = {"passed": len(passed), "failed": len(failed), "fail_lines": failed[:20],
              "summary": next((l for l in lines if l.startswith("correctness:")), None)}
status = {0: "ok", 124: "timeout", 137: "timeout", skipped: "skipped"}.get(rc, "fail")
line = {"phase": name, "status": status, "rc": rc, "seconds": round(secs, 1), "result": result,
        "tail": lines[-15:]}
text = json.dumps(line)
with open(out / "phases.jsonl", "a") as f:
    f.write(text + "\n")
print(f"[gpu_session] {name}: {status} (rc {rc}, {secs:.0f} s) {text[:3000]}", flush=True)
PY
  tar -czf "$OUT/.session.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT/.session.tar.gz.tmp" "$OUT/session.tar.gz"
}

# phase NAME LIMIT RESULT_FILE CMD...: run CMD under LIMIT seconds, log to $WORK/NAME.log, record it
phase() {
  local name=$1 limit=$2 res=$3; shift 3
  case " $PHASES " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1  # bash: phases may be functions
  rc=$?
  record "$name" "$rc" "$((SECONDS - t0))" ${res:+"$res"}
}

gpu_only() {  # exit $SKIPPED (recorded as skipped) on a machine without a GPU, else run the command
  if [ "$HAVE_GPU" = 1 ]; then "$@"; else echo "no CUDA device: skipped"; return "$SKIPPED"; fi
}

install_wheels() {  # .whl/ into /tmp/site, then import what the later phases need from it
  compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/ carried (run make wheelhouse here first)"; return "$SKIPPED"; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  PYTHONPATH="/tmp/site:$PYTHONPATH" python3 -c "
import importlib
for name in ('deepspeed', 'transformers', 'peft', 'webdataset', 'inf_cl', 'pipeline.engine'):
    mod = importlib.import_module(name)
    print(name, getattr(mod, '__version__', ''), mod.__file__)"
}
export -f gpu_only install_wheels
export HAVE_GPU SKIPPED

# The CUDA extension compiles (~40 s) while the env phase and the Triton cases run
if [ "$HAVE_GPU" = 1 ] && case " $PHASES " in *" correctness "*|*" loss "*) true ;; *) false ;; esac; then
  python3 -c "from coma_kernels.infonce_cuda import load_extension; load_extension()" >"$WORK/cuda_build.log" 2>&1 &
fi

phase env 10 "$WORK/env.json" python3 -c "
import json, platform, shutil, subprocess, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'nvcc': shutil.which('nvcc'),
        'ninja': shutil.which('ninja')}
try:
    import triton; info['triton'] = triton.__version__
except ImportError:
    info['triton'] = None
try:
    info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version,memory.total,clocks.max.sm',
                                     '--format=csv,noheader'], capture_output=True, text=True, timeout=5).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info['driver'] = None
json.dump(info, open('$WORK/env.json', 'w'))
print(json.dumps(info))"
phase correctness 100 "" gpu_only python3 benchmarks/gpu_check.py --skip-bench --out "$WORK/correctness"
phase breakdown 45 "$WORK/loss_breakdown.json" gpu_only python3 benchmarks/loss_breakdown.py --out "$WORK/loss_breakdown.json"
phase variants 90 "$WORK/loss_variants.jsonl" gpu_only python3 benchmarks/loss_breakdown.py --variants --repeats 3 \
  --out "$WORK/loss_variants.jsonl"
phase wheels 30 "" install_wheels
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"; fi
phase loss 65 "$WORK/loss_target.csv" gpu_only python3 benchmarks/loss.py --device cuda --n 32768 --d 2048 \
  --dtype bf16 --symmetric on --repeats 3 --providers reference triton cuda infcl --out "$WORK/loss_target.csv"
phase compression 60 "$WORK/compression/compression_cuda.json" gpu_only python3 benchmarks/compression.py \
  --device cuda --dtype bfloat16 --random-init qwen2_5_vl_3b_4layers --tokens 256,1024 --reps 5 --no-memory \
  --out "$WORK/compression"
phase train 170 "$WORK/throughput.jsonl" gpu_only python3 -m torch.distributed.run --nproc_per_node 1 \
  --master_port 29533 benchmarks/throughput.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml \
  --random-init qwen2_5_vl_3b --random-init-dir /tmp/coma-3b --image-size 448 --model.max_pixels=200704 \
  --data synthetic --warmup 1 --steps 2 --rounds 2 --train.global_batch_size=32 --train.micro_batch_size=8 \
  --out "$WORK/throughput.jsonl"
cat "$OUT/phases.jsonl" 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    p = json.loads(line)
    print(f\"{p['phase']:<12} {p['status']:<8} {p['seconds']:>6} s\")"
