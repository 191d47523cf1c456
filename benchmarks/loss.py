"""InfoNCE loss providers: time (forward, backward, total), throughput, peak memory, error vs fp64.

    python benchmarks/loss.py                          # CPU: torch providers at small N (fp32)
    python benchmarks/loss.py --quick                  # CPU smoke run (seconds)
    python benchmarks/loss.py --device cuda            # GPU sweep: N 1k..64k, D 256..3584, bf16 + fp32
    python benchmarks/loss.py --device cuda --n 32768 --d 2048 --dtype bf16   # the target point

Providers: ``reference`` (materialised logits + F.cross_entropy, open_clip-style), ``torch``
(chunked), ``triton``, ``cuda`` (this repo's backends), and on GPU, where installed, ``infcl``
(Inf-CL's ``cal_inf_loss``: one direction per call, so the symmetric loss is two calls) and
``liger`` (Liger's fused linear cross-entropy, used as InfoNCE with the keys as the "lm head";
also one direction per call).

Metrics per row: forward / backward / total ms (median over ``--repeats`` after a warm-up; on
GPU timed with CUDA events), TFLOP/s counted as 8·N²·D for forward + backward (2 for the
forward product, 6 for backward: recompute + dQ + dK), % of the card's dense bf16 peak, peak
extra memory over the inputs (CUDA: ``max_memory_allocated``; CPU: VmHWM − VmRSS after
resetting the peak with /proc/self/clear_refs, the process re-executed with a fixed glibc mmap
threshold so freed tensors leave RSS), and the max error of loss and gradients against a
float64 computation on the same (rounded) inputs.  Each row also carries its ratio to the
``reference`` provider of the same shape (speed-up, memory fraction).

Writes ``benchmarks/results/loss_<device>.csv`` (+ ``.json`` with the environment) and prints a
table.  Out-of-memory and unavailable providers are recorded with their status, not skipped.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")
RESULTS = REPO / "benchmarks" / "results"

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _reexec_with_malloc_threshold():
    # glibc raises its mmap threshold after the first large free and then keeps freed 16 MiB
    # chunks resident; a fixed threshold makes RSS track live tensors (CPU peak memory).
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def _rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class Memory:
    """Peak extra memory of one call: CUDA allocator stats, or VmHWM on Linux CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss("VmHWM") - self.base


# ------------------------------------------------------------------------------ providers
def provider_fn(name, symmetric):
    """f(q, k, s) -> scalar mean loss (mean of both directions when symmetric), or raises."""
    import torch
    import coma_kernels

    if name in ("reference", "torch", "triton", "cuda"):
        return lambda q, k, s: coma_kernels.fused_infonce(q, k, s, symmetric=symmetric, backend=name)
    if name == "infcl":
        from inf_cl import cal_inf_loss  # CUDA only

        def infcl(q, k, s):  # returns the mean q→k loss; upcasts to fp32 internally; D % 256 == 0
            # The scale goes into q here, not through scale=: a scale that requires grad is
            # all-reduced inside Inf-CL without a process group (fails outside torch.distributed).
            # (s·q)·k = s·(q·k): the same logits, and s still gets its gradient through q.
            labels = torch.arange(q.shape[0], device=q.device)
            qs = q * s
            one = cal_inf_loss(qs, k, labels=labels)
            return 0.5 * (one + cal_inf_loss(k, qs, labels=labels)) if symmetric else one
        return infcl
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss()

        def liger(q, k, s):
            labels = torch.arange(q.shape[0], device=q.device)
            one = ce(k, q * s.to(q.dtype), labels)          # keys as the "lm head" weight
            return 0.5 * (one + ce(q, k * s.to(q.dtype), labels)) if symmetric else one
        return liger
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(n, d, dtype, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + 0.5 * q, dim=-1)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def fp64_truth(q, k, s, symmetric):
    """Loss and grads in float64 on the same inputs, chunked (no n×n buffer) on their device."""
    import torch
    import coma_kernels
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    s64 = torch.tensor(float(s), dtype=torch.float64, device=q.device)
    loss = coma_kernels.fused_infonce(q64, k64, s64, symmetric=symmetric, backend="torch")
    loss.backward()
    return loss.item(), q64.grad, k64.grad


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    import torch
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        return out, a.elapsed_time(b)
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1e3


def bench_one(name, n, d, dtype_name, symmetric, device, repeats, scale, truth_cache):
    import torch
    dtype = getattr(torch, DTYPES[dtype_name])
    row = {"provider": name, "n": n, "d": d, "dtype": dtype_name, "symmetric": symmetric}
    try:
        fn = provider_fn(name, symmetric)
    except ImportError as exc:
        return {**row, "status": f"not installed ({exc.name})"}
    except Exception as exc:  # noqa: BLE001 - recorded in the CSV
        return {**row, "status": f"unavailable: {exc}"[:200]}
    q0, k0 = make_inputs(n, d, dtype, device)
    s = torch.tensor(scale, device=device, requires_grad=True)
    fwd, bwd, tot, peak = [], [], [], 0
    try:
        for rep in range(repeats + 1):  # the first is warm-up (Triton compile, CUDA JIT build)
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            s.grad = None
            _sync(device)
            with Memory(device) as mem:
                loss, t_f = _timed(device, lambda: fn(q, k, s))
                _, t_b = _timed(device, loss.backward)
            if rep:
                fwd.append(t_f)
                bwd.append(t_b)
                tot.append(t_f + t_b)
                peak = max(peak, mem.peak)
            loss_v, gq, gk = loss.item(), q.grad, k.grad
            del loss
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "oom"}
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": f"error: {type(exc).__name__}: {exc}"[:200]}
    key = (n, d, dtype_name, symmetric)
    if key not in truth_cache:
        try:
            truth_cache[key] = fp64_truth(q0, k0, scale, symmetric)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM for fp64 at 64k × 3584
            truth_cache[key] = exc
    truth = truth_cache[key]
    err_loss = err_grad = None
    if not isinstance(truth, Exception):
        t_loss, t_q, t_k = truth
        err_loss = abs(loss_v - t_loss)
        err_grad = max(((gq.double() - t_q).abs().max() / t_q.abs().max()).item(),
                       ((gk.double() - t_k).abs().max() / t_k.abs().max()).item())
    total = statistics.median(tot)
    tflops = 8.0 * n * n * d / (total / 1e3) / 1e12
    return {**row, "status": "ok", "fwd_ms": round(statistics.median(fwd), 3), "bwd_ms": round(statistics.median(bwd), 3),
            "total_ms": round(total, 3), "tflops": round(tflops, 3), "peak_extra_mib": round(peak / 2**20, 1),
            "max_err_loss": err_loss, "max_err_grad_rel": err_grad}


def device_info(device):
    import torch

    from pipeline.flops import peak_flops
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info.update(gpu=name, cuda=torch.version.cuda,
                    bf16_peak_tflops=(peak_flops(name) or 0) / 1e12 or None)  # pipeline/flops.py's table
    else:
        info.update(gpu=None, cuda=None, bf16_peak_tflops=None, cpu=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--n", type=int, nargs="+", help="batch sizes N (n = m = N)")
    ap.add_argument("--d", type=int, nargs="+", help="embedding sizes D")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes")
    ap.add_argument("--providers", nargs="+", help="default: reference torch (CPU); all (GPU)")
    ap.add_argument("--symmetric", choices=["on", "off", "both"], default="on")
    ap.add_argument("--scale", type=float, default=1 / 0.03, help="logit scale (1/τ)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/loss_<device>.csv)")
    args = ap.parse_args(argv)

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        n_list = args.n or ([512, 1024] if args.quick else [1024, 2048, 4096])
        d_list = args.d or ([256] if args.quick else [256, 1024])
        dtypes = args.dtype or ["fp32"]
        providers = args.providers or ["reference", "torch"]
        repeats = args.repeats or (1 if args.quick else 3)
    else:
        n_list = args.n or [1024, 4096, 8192, 16384, 32768, 65536]
        d_list = args.d or [256, 1024, 2048, 3584]
        dtypes = args.dtype or ["bf16", "fp32"]
        providers = args.providers or ["reference", "torch", "triton", "cuda", "infcl", "liger"]
        repeats = args.repeats or 5
    syms = {"on": [True], "off": [False], "both": [False, True]}[args.symmetric]
    info = device_info(device)
    print(json.dumps(info))
    out = Path(args.out) if args.out else RESULTS / f"loss_{device}.csv"

    rows, truth = [], {}
    header = (f"{'provider':>9} {'N':>6} {'D':>5} {'dtype':>5} {'sym':>3} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
              f"{'TFLOP/s':>8} {'%peak':>6} {'mem MiB':>9} {'x ref':>6} {'mem/ref':>7} {'err loss':>9} {'err grad':>9}  status")
    print(header)
    for dtype_name in dtypes:
        for d in d_list:
            for n in n_list:
                for sym in syms:
                    truth.clear()
                    ref = None  # the reference runs first (when asked for): later rows get ratios to it
                    for name in providers:
                        r = bench_one(name, n, d, dtype_name, sym, device, repeats, args.scale, truth)
                        r.update({k: info.get(k) for k in ("device", "gpu", "torch", "triton", "cuda")})
                        if r.get("status") == "ok":
                            peak_t = info["bf16_peak_tflops"]
                            r["pct_bf16_peak"] = round(100 * r["tflops"] / peak_t, 1) if peak_t else None
                            if name == "reference":
                                ref = r
                            if ref:
                                r["speedup_vs_reference"] = round(ref["total_ms"] / r["total_ms"], 3)
                                r["mem_vs_reference"] = round(r["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9), 4)
                        print(_fmt(r), flush=True)
                        rows.append(r)
                        _write(rows, info, out)  # after every row: a time limit loses at most one provider
    _targets(rows)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return rows


def _fmt(r):
    def f(key, width, spec):
        v = r.get(key)
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"
    return (f"{r['provider']:>9} {r['n']:>6} {r['d']:>5} {r['dtype']:>5} {('y' if r['symmetric'] else 'n'):>3} "
            f"{f('fwd_ms', 9, '.2f')} {f('bwd_ms', 9, '.2f')} {f('total_ms', 9, '.2f')} {f('tflops', 8, '.3f')} "
            f"{f('pct_bf16_peak', 6, '.1f')} {f('peak_extra_mib', 9, '.1f')} {f('speedup_vs_reference', 6, '.2f')} "
            f"{f('mem_vs_reference', 7, '.3f')} {f('max_err_loss', 9, '.1e')} {f('max_err_grad_rel', 9, '.1e')}  "
            f"{r.get('status')}")


def _targets(rows):
    """The issue's targets at N=32768, D=2048, bf16, symmetric (GPU), when that point was run."""
    pick = {r["provider"]: r for r in rows if r.get("status") == "ok" and r["n"] == 32768 and r["d"] == 2048
            and r["dtype"] == "bf16" and r["symmetric"]}
    tri, inf, cu = pick.get("triton"), pick.get("infcl"), pick.get("cuda")
    if tri:
        print(f"target: triton {tri['pct_bf16_peak']}% of bf16 peak (goal >= 60%)")
        if inf:
            print(f"target: triton vs two Inf-CL calls: {inf['total_ms'] / tri['total_ms']:.2f}x faster (goal >= 2), "
                  f"memory {tri['peak_extra_mib']:.0f} vs {inf['peak_extra_mib']:.0f} MiB = "
                  f"{tri['peak_extra_mib'] / max(inf['peak_extra_mib'], 1e-9):.2f}x (goal <= 1)")
        if cu:
            print(f"target: cuda / triton time = {cu['total_ms'] / tri['total_ms']:.2f} (goal <= 1.3)")


def _write(rows, info, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["provider", "device", "gpu", "n", "d", "dtype", "symmetric", "fwd_ms", "bwd_ms", "total_ms", "tflops",
            "pct_bf16_peak", "peak_extra_mib", "speedup_vs_reference", "mem_vs_reference", "max_err_loss",
            "max_err_grad_rel", "status", "torch", "triton", "cuda"]
    tmp = out.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)  # never leave a half-written results file
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": info, "rows": rows}, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))


if __name__ == "__main__":
    _reexec_with_malloc_threshold()
    main()
