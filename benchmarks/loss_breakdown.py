"""Where the time of one fused InfoNCE forward + backward goes, kernel by kernel, against the
cuBLAS ceiling of the four GEMMs it has to do.

    python benchmarks/loss_breakdown.py                                  # GPU: N=32768, D=2048, bf16, symmetric
    python benchmarks/loss_breakdown.py --backend cuda --n 16384 --d 3584

The loss does four N×N×D products (2·N²·D FLOPs each): Q Kᵀ for the statistics (forward), Q Kᵀ
again in the gradient tiles (recompute), G K for dQ and Gᵀ Q for dK.  The ceiling is torch.mm
on those shapes (bf16 in, fp32 out, the chunk sizes the backend uses): no kernel of ours can
beat it, and the gap per phase says which one to work on.  Kernel times come from
torch.profiler (CUDA activity), summed by kernel name over ``--repeats`` calls after a warm-up.

Prints a table and writes benchmarks/results/loss_breakdown.json (one object: environment,
per-kernel rows, the ceiling rows, and the ratios).  Needs a CUDA device.

    python benchmarks/loss_breakdown.py --variants --out variants.jsonl

times the same loss once per Triton kernel variant (:data:`VARIANTS`: tile shape, TMA
descriptors, persistent grid, the autotuner; benchmarks/triton_resources.py shows their registers
and spills) and appends one JSON line per variant the moment it is measured, so a cut-short call
keeps what it measured; the autotuner's choices and per-candidate report go to
``triton_tiles.json`` beside it.  The fastest variant that passes gpu_check.py becomes the default
on evidence.  ``--variants --device cpu`` runs the same loop under the Triton interpreter at a
toy size (times meaningless, no memory figures): tests/test_gpu_session.py checks that way that
the GPU session's variants phase works before a GPU minute is spent on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

RESULTS = Path(__file__).resolve().parent / "results"

# Triton kernel variants (coma_kernels/infonce_triton.py reads these when a loss is built), the
# most informative first: a cut-short phase keeps the lines already written.  128×64 tiles at 8
# warps hold 104-128 registers on sm_90 (two CTAs per SM); the autotuner times every candidate
# that does not spill (coma_kernels/triton_tuning.py) and its choice and report land in the line.
VARIANTS = {
    "default": {},
    # the backward as one chunk, as big as G gets (2 GiB at N = 32k): what bounding the chunks by
    # the gradients' size (coma_kernels/tiled.py: chunk_rows) costs in time, and saves in memory
    "one chunk": {"COMA_INFONCE_CHUNK_ELEMS_GPU": str(1 << 40)},
    "autotune, tma": {"COMA_INFONCE_TRITON_AUTOTUNE": "1", "COMA_INFONCE_TRITON_TMA": "1"},
    "tma, tiles 128x64": {"COMA_INFONCE_TRITON_TMA": "1", "COMA_INFONCE_TRITON_TILES": "128,64,64"},
    "tiles 128x64": {"COMA_INFONCE_TRITON_TILES": "128,64,64"},
    "tma": {"COMA_INFONCE_TRITON_TMA": "1"},
    "persistent, tma, tiles 128x64": {"COMA_INFONCE_TRITON_PERSISTENT": "1", "COMA_INFONCE_TRITON_TMA": "1",
                                      "COMA_INFONCE_TRITON_TILES": "128,64,64"},
}


def cuda_ms(fn, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` CUDA-event timed calls after one warm-up (wall
    clock without a GPU: the interpreter's dry run)."""
    import statistics
    import time

    import torch

    fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", action="store_true", help="time each Triton kernel variant instead (JSON lines)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the --variants loop under the Triton interpreter, a dry run at a toy size")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/loss_breakdown.json (.jsonl with --variants)")
    args = ap.parse_args(argv)
    args.out = args.out or str(RESULTS / ("loss_breakdown_variants.jsonl" if args.variants else "loss_breakdown.json"))
    if args.device == "cpu":
        if not args.variants:
            ap.error("--device cpu runs only the --variants loop (the breakdown needs CUDA profiling)")
        os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are defined, at the import below
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA device"}))
        return 2
    import coma_kernels
    from coma_kernels.tiled import chunk_rows, free_bytes, mm_f32
    from pipeline.flops import peak_flops

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n, d = args.n, args.d
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=-1).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=-1).to(dt).requires_grad_()
    s = torch.tensor(33.3, device=dev, requires_grad=True)

    def step(keep: bool = False):
        loss = coma_kernels.fused_infonce(q, k, s, symmetric=True, backend=args.backend)
        loss.backward()
        out = [loss.detach().float(), q.grad.float(), k.grad.float(), s.grad.float()] if keep else None
        q.grad = k.grad = s.grad = None
        return out

    if args.variants:
        gpu = torch.cuda.get_device_name() if dev == "cuda" else None
        return time_variants(step, args, flops=4 * 2.0 * n * n * d, gpu=gpu, peak=peak_flops(gpu) if gpu else None)
    total_ms = cuda_ms(step, args.repeats)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.repeats):
            step()
        torch.cuda.synchronize()
    kernels = []
    for ev in prof.key_averages():
        cuda_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if cuda_us:
            kernels.append({"kernel": ev.key[:90], "calls": ev.count // args.repeats,
                            "ms": round(cuda_us / 1e3 / args.repeats, 3)})
    kernels.sort(key=lambda r: -r["ms"])

    # The ceiling: the same four products with torch.mm at the chunk the host loop uses.
    chunk = min(n, chunk_rows(n, n, d, 128, q.element_size(), free_bytes(q.device)))
    qd, kd = q.detach(), k.detach()
    gch = torch.randn(chunk, n, device="cuda", dtype=dt)
    per = 2.0 * n * n * d
    ceiling = []
    for name, fn in [("logits Q Kᵀ (stats)", lambda: mm_f32(qd, kd.t())),
                     ("logits Q Kᵀ (recompute)", lambda: mm_f32(qd, kd.t())),
                     ("dQ = G K (all chunks)", lambda: [mm_f32(gch, kd) for _ in range(0, n, chunk)]),
                     ("dK += Gᵀ Q (all chunks)", lambda: [mm_f32(gch.t(), qd[:chunk]) for _ in range(0, n, chunk)])]:
        ms = cuda_ms(fn, args.repeats)
        ceiling.append({"gemm": name, "ms": round(ms, 3), "tflops": round(per / ms / 1e9, 1)})
    ceiling_ms = sum(r["ms"] for r in ceiling)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    flops = 4 * per
    report = {"gpu": name, "torch": torch.__version__, "backend": args.backend, "n": n, "d": d, "dtype": args.dtype,
              "chunk": chunk, "total_ms": round(total_ms, 3), "tflops": round(flops / total_ms / 1e9, 1),
              "pct_peak": round(100 * flops / (total_ms / 1e3) / peak, 1) if peak else None,
              "ceiling_ms": round(ceiling_ms, 3), "vs_ceiling": round(total_ms / ceiling_ms, 2),
              "kernels": kernels[:20], "ceiling": ceiling}
    print(f"{args.backend} N={n} D={d} {args.dtype} symmetric fwd+bwd: {total_ms:.2f} ms = {report['tflops']} TFLOP/s"
          f" ({report['pct_peak']}% of {name}'s bf16 peak); cuBLAS ceiling of its 4 GEMMs {ceiling_ms:.2f} ms"
          f" ({report['vs_ceiling']}x)")
    for r in kernels[:12]:
        print(f"  {r['ms']:9.3f} ms  x{r['calls']:<4} {r['kernel']}")
    for r in ceiling:
        print(f"  ceiling {r['gemm']:<26} {r['ms']:8.3f} ms  {r['tflops']:7.1f} TFLOP/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def time_variants(step, args, flops: float, gpu: str | None, peak: float | None) -> int:
    """One JSON line per variant in ``args.out``, appended as soon as it is timed (a failing
    variant is recorded with its error and the next one runs), with its peak memory over the
    inputs.  Each line also carries the
    variant's largest difference from the default's loss and gradients, relative to the largest
    default value: a variant that is fast because it is wrong shows here (gpu_check.py checks the
    default against float64)."""
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tuning = Path(args.out).with_name("triton_tiles.json")    # the autotuner's choices, beside the lines
    os.environ["COMA_INFONCE_TRITON_TUNING_FILE"] = str(tuning)
    reference = None                                          # the default variant's outputs
    for name, env in VARIANTS.items():
        row = {"variant": name, "env": env, "gpu": gpu, "n": args.n, "d": args.d, "dtype": args.dtype}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            ms = cuda_ms(step, args.repeats)
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                       pct_peak=round(100 * flops / (ms / 1e3) / peak, 1) if peak else None,
                       peak_extra_mib=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if gpu else None)
            out = step(keep=True)
            reference = out if name == "default" else reference
            if reference is not None:
                row["max_rel_diff_vs_default"] = {
                    what: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for what, a, b in zip(("loss", "d_query", "d_key", "d_logit_scale"), out, reference)}
            if "COMA_INFONCE_TRITON_AUTOTUNE" in env and tuning.exists():  # what it chose, per kernel
                row["tuned"] = json.loads(tuning.read_text())
        except Exception as e:  # a variant that does not compile or launch on this card
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        print(json.dumps(row), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
