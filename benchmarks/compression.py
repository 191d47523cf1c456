"""Stage-1 cost of the compression mask: efficient split attention vs the explicit 4-D mask,
with plain causal attention over the same tokens as the lower bound (the mask only removes work).

    python benchmarks/compression.py                              # CPU, tiny Qwen2-VL, 64..1024 visual tokens
    python benchmarks/compression.py --device cuda --dtype bfloat16 --model PATH   # a GPU (flash-attn if installed)

What is timed: one stage-1 forward + backward of the language model (LoRA r=16 on q/k/v/o,
as in training) on a batch of ``--batch`` identical-shape samples ``[X][C][D]``: X = the chat
header + N visual tokens, C = 32 compression tokens, D = a 5-turn dialogue (~100 tokens).  The
vision tower is frozen, so its forward (the same for all three paths) is run once up front and
its features passed in as ``inputs_embeds``; the mask only changes the language model's cost.
Timings interleave the three paths rep by rep (fair under a noisy shared machine); the table
shows the minimum over the reps (the least-disturbed run; ratios use it) and the CSV/JSON also
keep the median.  One thread by default: on a 2-core machine shared with other jobs,
multi-threaded kernels mostly measure the scheduler.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around the step; on CPU the peak
resident-set growth over one step in a fresh subprocess per path: after setup, freed heap is
returned to the OS (``malloc_trim``) and the kernel's high-water mark is reset
(``/proc/self/clear_refs`` ← 5), then ``VmHWM`` after the step minus ``VmRSS`` before it.

Prints a table and writes ``benchmarks/results/compression.csv`` and ``compression.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.tiny_model import SHAPES  # noqa: E402  (constants: no torch, no transformers)

PATHS = ("causal", "efficient", "reference")
QA = [("What digit is shown in the image?", "The image shows a handwritten digit three."),
      ("Is the digit even or odd?", "It is odd."),
      ("How many strokes were used to write it?", "It looks like two strokes."),
      ("Is the digit centred in the picture?", "Yes, it is roughly in the middle."),
      ("What colour is the background?", "The background is dark.")]


def setup(model_path: str, tokens: int, batch: int, device: str, dtype: str, attn: str = "auto"):
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.collate import Collator
    from pipeline.config import LoraConfig, ModelConfig
    from pipeline.model import load_model

    side = int(round(tokens ** 0.5)) * 28                  # N visual tokens = (side/28)^2 after 2×2 merging
    cfg = ModelConfig(init=model_path, dtype=dtype, num_compression_tokens=32, gradient_checkpointing=False,
                      attn_implementation=attn,
                      min_pixels=side * side, max_pixels=side * side,
                      lora=LoraConfig(enabled=True, r=16, alpha=64, dropout=0.0))
    model = load_model(cfg).to(device)
    model.train()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    conv = [{"question": q, "answer": a} for q, a in QA]
    samples = [{"__key__": f"s{i}", "kind": "qa", "image": img, "conversations": conv, "meta": {}}
               for i in range(batch)]
    from pipeline.collate import to_device

    b = to_device(Collator(model.processor, cfg, kind="qa")(samples), device)
    with torch.no_grad():
        emb = model.embed_inputs(**b)
    n_img = int((b["input_ids"][0] == model.hf.config.image_token_id).sum())
    return model, b, emb, n_img


def step(model, batch, emb, path):
    model.zero_grad(set_to_none=True)
    out = model(**batch, inputs_embeds=emb.detach().requires_grad_(False), mask_impl=path)
    out.loss.backward()
    return float(out.loss.detach())


def _flash() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Subprocess body: one step of one path, print the step's peak RSS growth in bytes."""
    import ctypes
    import gc

    model, b, emb, _ = setup(args.model, args.tokens_one, args.batch, "cpu", args.dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)       # setup's freed heap back to the OS
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    step(model, b, emb, args.path)
    print(json.dumps({"peak_delta": max(_status_kb("VmHWM") - before, 0) * 1024}))


def cpu_peak(args, tokens: int, path: str) -> int:
    cmd = [sys.executable, __file__, "--_child", "--path", path, "--tokens-one", str(tokens),
           "--batch", str(args.batch), "--dtype", args.dtype, "--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF VLM dir (default: a tiny Qwen2-VL built on the fly)")
    ap.add_argument("--random-init", default=None, choices=sorted(SHAPES),
                    help="instead of --model: a random-init Qwen2.5-VL of this shape (pipeline/tiny_model.py SHAPES; "
                         "qwen2_5_vl_3b_4layers: the 3B's attention shape; the tiny model's timings on a GPU "
                         "are kernel-launch overhead)")
    ap.add_argument("--random-init-dir", default=None, help="where --random-init writes it (reused when there)")
    ap.add_argument("--tokens", default="64,256,576,1024", help="visual tokens per image")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="efficient", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-one", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args._child:
        return memory_child(args)
    tmp = None
    if args.random_init:
        from pipeline.tiny_model import random_init_model

        args.model = str(random_init_model(args.random_init, args.random_init_dir))
    elif args.model is None:
        from pipeline.tiny_model import make_tiny_model

        tmp = tempfile.mkdtemp(prefix="coma-bench-")
        args.model = str(make_tiny_model(Path(tmp) / "tiny", family="qwen2_vl"))

    rows = []
    tol = 1e-3 if args.dtype == "float32" else 3e-2
    for tokens in [int(t) for t in args.tokens.split(",")]:
        model, b, emb, n_img = setup(args.model, tokens, args.batch, args.device, args.dtype)
        models = dict.fromkeys(PATHS, model)
        if model.base_attn.startswith("flash"):  # the explicit mask needs SDPA: same weights, sdpa backbone
            models["reference"] = setup(args.model, tokens, args.batch, args.device, args.dtype, attn="sdpa")[0]
        L = b["input_ids"].shape[1]
        losses = {p: step(models[p], b, emb, p) for p in PATHS}
        assert abs(losses["efficient"] - losses["reference"]) < tol * max(1.0, abs(losses["reference"])), losses
        for _ in range(args.warmup):
            for p in PATHS:
                step(models[p], b, emb, p)
        times = {p: [] for p in PATHS}
        mem = {}
        for _ in range(args.reps):
            for p in PATHS:
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                _sync(args.device)
                t0 = time.perf_counter()
                step(models[p], b, emb, p)
                _sync(args.device)
                times[p].append(time.perf_counter() - t0)
                if args.device.startswith("cuda"):
                    mem[p] = torch.cuda.max_memory_allocated() - base
        if not args.device.startswith("cuda") and not args.no_memory:
            mem = {p: cpu_peak(args, tokens, p) for p in PATHS}
        med = {p: statistics.median(times[p]) * 1e3 for p in PATHS}
        best = {p: min(times[p]) * 1e3 for p in PATHS}
        row = {"visual_tokens": n_img, "seq_len": L, "batch": args.batch,
               **{f"{p}_ms": round(best[p], 3) for p in PATHS},
               **{f"{p}_median_ms": round(med[p], 3) for p in PATHS},
               **{f"{p}_peak_mb": round(mem[p] / 2**20, 2) if p in mem else None for p in PATHS},
               "eff_over_causal": round(best["efficient"] / best["causal"], 3),
               "ref_over_eff": round(best["reference"] / best["efficient"], 3),
               "eff_mem_over_ref": round(mem["efficient"] / mem["reference"], 3) if mem.get("reference") else None,
               "loss": round(losses["efficient"], 5)}
        rows.append(row)
        print(json.dumps(row), flush=True)  # each token count as it finishes: a time limit keeps these
        del model, models, b, emb

    env = {"device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
           "attention": "flash_attention_2" if _flash() else "sdpa", "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "model": "tiny qwen2_vl (hidden 64, 2 layers)" if tmp else (
               f"random-init {args.random_init}" if args.random_init else args.model)}
    hdr = (f"{'vis':>5} {'L':>5} | {'causal ms':>9} {'effic ms':>9} {'ref ms':>9} | {'eff/causal':>10} "
           f"{'ref/eff':>8} | {'causal MB':>9} {'effic MB':>9} {'ref MB':>9} {'eff/ref mem':>11}")
    print(f"stage-1 fwd+bwd, LM only (LoRA r16), batch {args.batch}, {env['device']} {args.dtype}, "
          f"{args.threads} thread(s); min of {args.reps} interleaved reps")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        f = lambda v: f"{v:9.1f}" if v is not None else f"{'n/a':>9}"  # noqa: E731
        print(f"{r['visual_tokens']:>5} {r['seq_len']:>5} | {r['causal_ms']:9.1f} {r['efficient_ms']:9.1f} "
              f"{r['reference_ms']:9.1f} | {r['eff_over_causal']:10.3f} {r['ref_over_eff']:8.3f} | "
              f"{f(r['causal_peak_mb'])} {f(r['efficient_peak_mb'])} {f(r['reference_peak_mb'])} "
              f"{r['eff_mem_over_ref'] if r['eff_mem_over_ref'] is not None else 'n/a':>11}")
    last = rows[-1]
    print(f"\nat {last['visual_tokens']} visual tokens: efficient = {last['eff_over_causal']:.2f}x plain causal "
          f"(target <= 1.10), explicit mask = {last['ref_over_eff']:.2f}x efficient (target >= 1.30), "
          f"memory efficient/explicit = {last['eff_mem_over_ref']}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    with open(out / f"compression{tag}.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    os.replace(out / f"compression{tag}.csv.tmp", out / f"compression{tag}.csv")
    (out / f"compression{tag}.json.tmp").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    os.replace(out / f"compression{tag}.json.tmp", out / f"compression{tag}.json")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
