"""Training throughput of the real pipeline vs a bare loop on the same engine.

    # CPU, 2 ranks over gloo, tiny model (what was measured here)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/throughput.py --config launch/configs/stage1_tiny.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/throughput.py --config launch/configs/stage2_tiny.yaml \\
        --model.init=runs/stage1_tiny/export
    # GPU node, real shards, 3B
    deepspeed benchmarks/throughput.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml --data real --steps 20
    # GPU node, no weights: random-init Qwen2.5-VL-3B shapes, synthetic 448 px images (256 visual tokens)
    deepspeed benchmarks/throughput.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml --random-init qwen2_5_vl_3b \
        --image-size 448 --model.max_pixels=200704

Per invocation, on one DeepSpeed engine:

* **pipeline**: :class:`pipeline.train.Loop` exactly as training runs it — the trainer's batch
  source (``pipeline.data.make_loader`` over ``pipeline.data.build_loader``: shard reading,
  decoding, collation in DataLoader workers, the hand-over) over the config's shards
  (``--data real``) or over synthetic shards (``synthetic``, the default: smooth random JPEGs of
  ``--image-size`` px and templated text, written once per node with ``data_prep/shard.py`` under
  ``--synthetic-dir``, default ``$TMPDIR/coma-synthetic``, and drawn with replacement so that no
  epoch ends inside the timed blocks), FLOPs/token accounting,
  the metrics window reduced over ranks and logged every ``train.log_every`` steps (console,
  metrics.jsonl, TensorBoard into a temporary directory).  Checkpoint saves are not in the
  timed steps (they are periodic I/O, measured separately by their own log lines).
* **loop in memory**: the same ``Loop`` over batches collated in advance (no loader): the
  loop's own bookkeeping without data loading;
* **bare**: the same engine and step function (``StepRunner``) on those batches, no loader, no
  logging, no hooks.

Blocks of ``--steps`` steps of each alternate ``--rounds`` times
after ``--warmup`` steps of each, so drift on a shared machine hits both; the reported step
time is the median over blocks of the block means (max over ranks: the slowest rank sets the
pace); the ratios are medians over rounds of each round's own ratio, and the data-wait share
the median over the pipeline blocks.  Targets: pipeline ≤ 1.05 × bare, data wait ≤ 5 % of the step.

What keeps the comparison fair:

* all three run in the same processes with the same torch threads, set as training sets them
  (``pipeline.runtime.set_cpu_threads``: on a CPU run, the node's cores per rank less one per
  loader worker, unless ``OMP_NUM_THREADS`` is set), so neither side gains from a thread count
  the other does not get;
* both data modes go through the trainer's own loader (``pipeline.data.build_loader``: the same
  workers, packed hand-over, prefetch and pinning); only the shards differ;
* the iterator that pre-collates the bare batches is closed before timing, so no extra
  DataLoader worker lives through the timed blocks.

``loader_cpu_step_s`` is the loader's own CPU cost per step (read, decode, collate) measured in
process, outside the timed blocks.  On a GPU node it runs on idle cores beside the step; on a
CPU-only machine whose cores are all busy with the model (2 ranks on 2 cores), it is taken from
the step itself, so there ``pipeline / bare`` is bounded below by roughly
``1 + loader_cpu_share``, whatever the loader settings.

One JSON row per run appended to ``benchmarks/results/throughput.jsonl`` (git sha, device, world
size, ZeRO stage, batch, mean sequence length, versions, samples/s, tokens/s, TFLOPs and MFU per
GPU, peak memory, data-wait share, the step times and their ratios, loader CPU per step, torch
threads and loader workers); a table is printed.
"""
from __future__ import annotations

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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pipeline.data import BatchSource  # noqa: E402
from pipeline.tiny_model import SHAPES, random_init_model, random_init_path  # noqa: E402


# ------------------------------------------------------------------------------ synthetic data
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
KIND = {1: "qa", 2: "mmeb"}  # the shard kind each training stage reads


def synthetic_record(i: int, stage: int, image: str) -> dict:
    """One manifest row of the synthetic set: a qa sample (stage 1) or an mmeb pair (stage 2)."""
    w = WORDS[i % 10]
    if stage == 1:
        return {"key": f"syn{i:06d}", "image": image,
                "conversations": [{"question": "What digit is shown?", "answer": w},
                                  {"question": "Is it even or odd?", "answer": "even" if i % 2 == 0 else "odd"}]}
    return {"key": f"syn{i:06d}", "task": "synthetic",
            "query": {"text": "<image> Represent the given image.", "image": image},
            "positive": {"text": f"a handwritten {w}", "image": None}, "negatives": []}


def synthetic_shards(folder: Path, stage: int, image_size: int, samples: int) -> Path:
    """Write ``samples`` synthetic samples under ``folder`` as shards with ``data_prep/shard.py``
    (smooth random ``image_size`` px JPEGs, as photos decode, and templated text) and return the
    shard folder.  A rerun finds them written and does nothing."""
    import numpy as np
    from PIL import Image

    from data_prep import shard

    if (folder / "shards" / "manifest.json").exists():
        return folder / "shards"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (image_size, image_size), Image.Resampling.BICUBIC)
        path = folder / "images" / f"{i:06d}.jpg"
        img.save(path, quality=90)
        rows.append(json.dumps(synthetic_record(i, stage, f"images/{i:06d}.jpg")) + "\n")
    shard.write_atomic(folder / "manifest.jsonl", "".join(rows).encode())
    argv = ["--input", str(folder / "manifest.jsonl"), "--output", str(folder / "shards"),
            "--kind", KIND[stage], "--samples-per-shard", str(max(8, samples // 16))]
    if shard.main(argv) != 0:
        raise RuntimeError(f"data_prep/shard.py {' '.join(argv)} failed")
    return folder / "shards"


def use_synthetic_data(cfg, plan, env, image_size: int, steps: int, where: Path) -> None:
    """Point ``cfg.data`` at synthetic shards (written once per node by its first rank): two
    global batches of distinct samples, drawn with replacement for an epoch of ``steps``
    optimizer steps, so no epoch boundary (a new DataLoader) falls inside the timed blocks."""
    from pipeline import dist
    from pipeline.config import DataSource

    samples = max(64, 2 * plan.global_batch)
    folder = where / f"stage{cfg.train.stage}-{image_size}px-{samples}"
    if env.local_rank == 0:
        synthetic_shards(folder, cfg.train.stage, image_size, samples)
    dist.barrier()
    d = cfg.data
    d.sources = [DataSource(shards=str(folder / "shards"))]
    d.kind = KIND[cfg.train.stage]
    d.resampled, d.epoch_samples, d.task_sampling, d.batch_composition = True, steps * plan.global_batch, \
        "proportional", "per_rank"


def loader_cpu_per_step(cfg, plan, env, steps: int) -> float:
    """CPU seconds one rank's loader spends per optimizer step (read, decode, collate: what the
    DataLoader workers do, less packing and the hand-over), measured in this process on the same
    data with ``data.workers=0``.  Not in the
    timed blocks.  On a GPU this work overlaps the step on otherwise idle cores; where the cores
    are all busy with compute (a CPU run), it is taken from the step, so ``pipeline / bare`` cannot
    fall below about ``1 + loader_cpu_step_s / bare_step_s`` divided by the spare cores."""
    import copy

    from pipeline.data import make_loader

    c = copy.deepcopy(cfg)
    c.data.workers = 0  # in this process: same samples and collator, no hand-over
    stream = iter(make_loader(c, plan, env))
    next(stream)  # first step: shuffle buffer fill, shard open
    t0 = time.process_time()
    for _ in range(steps):
        next(stream)
    cpu = (time.process_time() - t0) / steps
    stream.close()
    return cpu


# ------------------------------------------------------------------------------------ helpers
def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pop_flag(argv: list, name: str, default, cast=str):
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            v = argv[i + 1]
            del argv[i:i + 2]
            return cast(v)
        if a.startswith(name + "="):
            del argv[i]
            return cast(a.split("=", 1)[1])
    return default


def _mfu_note(loop) -> str:
    """The pipeline block's own metrics window (tokens/s, MFU), where the loop logged one."""
    last = getattr(loop, "last_logged", None) or {}
    keys = [("throughput/tokens_per_s_per_gpu", "tokens/s/GPU", "{:.0f}"), ("throughput/mfu", "MFU", "{:.1%}"),
            ("memory/peak_gib", "peak GiB", "{:.1f}")]
    return "".join(f", {label} {fmt.format(last[k])}" for k, label, fmt in keys if last.get(k) is not None)


def main(argv: list) -> int:
    from pipeline import dist
    from pipeline.config import load_config
    from pipeline.engine import build, plan_batches, zero_stage
    from pipeline.metrics import Metrics
    from pipeline.cli import parse_cli
    from pipeline.metrics import count_tokens
    from pipeline.runtime import manual_gc, seed_all, set_cpu_threads, setup_logging
    from pipeline.step import StepRunner, TrainState
    from pipeline.data import make_loader
    from pipeline.train import Loop

    argv = list(argv)
    warmup = _pop_flag(argv, "--warmup", 3, int)
    steps = _pop_flag(argv, "--steps", 10, int)
    rounds = _pop_flag(argv, "--rounds", 5, int)
    data = _pop_flag(argv, "--data", "synthetic")
    image_size = _pop_flag(argv, "--image-size", 56, int)
    out_path = Path(_pop_flag(argv, "--out", str(REPO / "benchmarks/results/throughput.jsonl")))
    shape = _pop_flag(argv, "--random-init", None)
    shape_dir = _pop_flag(argv, "--random-init-dir", None)
    synth_dir = _pop_flag(argv, "--synthetic-dir", None)
    if shape is not None and shape not in SHAPES:
        print(f"--random-init must be one of {sorted(SHAPES)}", file=sys.stderr)
        return 2
    if data not in ("synthetic", "real"):
        print("--data must be synthetic or real", file=sys.stderr)
        return 2
    cfg_path = _pop_flag(argv, "--config", None)
    stage = load_config(cfg_path).train.stage if cfg_path else 1
    cfg = parse_cli(stage, (["--config", cfg_path] if cfg_path else []) + argv)
    total = warmup * 2 + steps * rounds * 2 + 1
    cfg.train.max_steps = total
    cfg.train.save_every = 10**9

    env = dist.init(cfg.train.dist_timeout_s)
    setup_logging(None, env.rank)
    set_cpu_threads(cfg, env)  # as train() does: all three loops run with these threads
    if shape is not None:
        if env.rank == 0:
            random_init_model(shape, shape_dir)
        dist.barrier()
        cfg.model.init = str(random_init_path(shape, shape_dir))
    seed_all(cfg.train.seed)
    plan = plan_batches(cfg, env.world_size)
    built = build(cfg, env.world_size, total)
    seed_all(cfg.train.seed + 1000 * env.rank)
    if data == "synthetic":
        use_synthetic_data(cfg, plan, env, image_size, 2 * (total + steps + 8),
                           Path(synth_dir or Path(tempfile.gettempdir()) / "coma-synthetic"))
    source = make_loader(cfg, plan, env)  # the trainer's batch source, over pipeline.data.build_loader
    tmp = tempfile.mkdtemp(prefix="coma-bench-")
    metrics = Metrics(tmp, enabled=env.rank == 0, tensorboard=cfg.train.tensorboard)
    loop = Loop(cfg, built, source, metrics, None, total, TrainState())
    runner = StepRunner(cfg, built.engine, plan)
    bare_state = TrainState()
    built.engine.train()

    # Batches for the bare loop, collated up front from the same source (not timed).
    it = iter(source)
    bare_batches = [next(it) for _ in range(min(steps, 8))]
    # Close this second iterator: its DataLoader worker would otherwise stay alive through the
    # timed blocks with a prefetch queue of its own.
    if hasattr(it, "close"):
        it.close()
    tok_per_step, seqs, _ = count_tokens(bare_batches[0])

    class _InMemory(BatchSource):
        """The same pre-collated batches behind the Loop's source protocol: the pipeline without
        its loader, so the loop's own bookkeeping (counting, logging, metric reduction) is
        measured apart from data loading."""
        def __iter__(self):
            i = 0
            while True:
                yield bare_batches[i % len(bare_batches)]
                i += 1

    mem_loop = Loop(cfg, built, _InMemory(), Metrics(tmp + "/mem", enabled=env.rank == 0, tensorboard=cfg.train.tensorboard),
                    None, total, TrainState())

    def mem_block(n):
        for _ in range(n):
            mem_loop.step()

    def bare_block(n):
        for i in range(n):
            parts = bare_batches[i % len(bare_batches)]
            (runner.stage1 if cfg.train.stage == 1 else runner.stage2)(parts, bare_state)

    def pipe_block(n):
        for _ in range(n):
            loop.step()

    def timed(fn, n) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(n)
        dist.barrier()
        return (time.perf_counter() - t0) / n

    # As train() runs its loop: automatic garbage collection off, the loops collect every
    # train.gc_every steps (their cost is the pipeline's; the bare loop has none).
    with manual_gc(cfg.train.gc_every):
        pipe_block(warmup)
        mem_block(warmup)
        bare_block(warmup)
        # One metrics window per timed block: the loop logs (and reduces over ranks) at its end.
        cfg.train.log_every = steps
        loop.state.step = mem_loop.state.step = 0
        times, logged = {"pipe": [], "mem": [], "bare": []}, []
        order = list(times)
        for r in range(rounds):
            # rotated each round, so no loop always runs right after the same other one
            for name in order[r % 3:] + order[:r % 3]:
                if name == "pipe":
                    loop.window = type(loop.window)()
                    times["pipe"].append(timed(pipe_block, steps))
                    if getattr(loop, "last_logged", None):
                        logged.append(loop.last_logged)
                elif name == "mem":
                    mem_loop.window = type(mem_loop.window)()
                    times["mem"].append(timed(mem_block, steps))
                else:
                    times["bare"].append(timed(bare_block, steps))
                if env.rank == 0:  # as it happens: a run stopped by a time limit still says this much
                    print(f"[throughput] round {r + 1}/{rounds} {name}: {times[name][-1]:.4f} s/step "
                          f"(this rank){_mfu_note(loop) if name == 'pipe' else ''}", flush=True)
    loader_cpu = loader_cpu_per_step(cfg, plan, env, steps)
    red = dist.all_reduce_dict({**{f"{k}{i}": t for k, ts in times.items() for i, t in enumerate(ts)},
                                "loader_cpu": loader_cpu}, "max")
    blk = {k: [red[f"{k}{i}"] for i in range(rounds)] for k in times}  # block means, slowest rank
    red.update({k: statistics.median(v) for k, v in blk.items()})
    # Ratios from each round's own blocks (seconds apart), then the median over rounds: load
    # from other work on a shared machine drifts on a scale of seconds and cancels in the pair.
    red["ratio"] = statistics.median(p / b for p, b in zip(blk["pipe"], blk["bare"]))
    red["mem_ratio"] = statistics.median(m / b for m, b in zip(blk["mem"], blk["bare"]))
    waits = [w["time/data_wait_share"] for w in logged if "time/data_wait_share" in w]
    last = logged[-1] if logged else {}
    metrics.close()

    if env.rank == 0:
        import deepspeed
        import transformers
        from deepspeed.accelerator import get_accelerator

        dev = get_accelerator().device_name()
        if dev != "cpu" and torch.cuda.is_available():
            dev = torch.cuda.get_device_name()
        else:
            dev = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "\
                  f"{torch.get_num_threads()} threads/rank)"
        row = {
            "bench": "throughput", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": _git_sha(),
            "device": dev, "world_size": env.world_size, "zero_stage": zero_stage(built.ds_config),
            "stage": cfg.train.stage, "model": cfg.model.init, "dtype": cfg.model.dtype, "data": data,
            "global_batch": plan.global_batch, "per_rank_batch": plan.per_rank, "micro": plan.micro,
            "accumulation": plan.accumulation, "cache_chunk": plan.cache_chunk,
            "mean_seq_len": sum(seqs) / max(len(seqs), 1), "tokens_per_step_per_rank": tok_per_step,
            "warmup": warmup, "steps": steps, "rounds": rounds,
            "pipeline_step_s": red["pipe"], "loop_in_memory_step_s": red["mem"], "bare_step_s": red["bare"],
            "overhead_ratio": red["ratio"], "loop_overhead_ratio": red["mem_ratio"],
            "block_step_s": blk, "data_wait_blocks": waits,
            "loader_cpu_step_s": red["loader_cpu"], "loader_cpu_share": red["loader_cpu"] / red["bare"],
            "torch_threads": torch.get_num_threads(), "data_workers": cfg.data.workers,
            "load_average": os.getloadavg()[0],
            "samples_per_s_per_gpu": last.get("throughput/samples_per_s_per_gpu"),
            "tokens_per_s_per_gpu": last.get("throughput/tokens_per_s_per_gpu"),
            "tflops_per_gpu": last.get("throughput/tflops_per_gpu"), "mfu": last.get("throughput/mfu"),
            "peak_memory_gib": last.get("memory/peak_gib"), "data_wait_share": statistics.median(waits) if waits else None,
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        fmt = lambda v, f="{:.4g}": "n/a" if v is None else f.format(v)  # noqa: E731
        print("\n| metric | value |\n|---|---|")
        for k, f in [("device", "{}"), ("world_size", "{}"), ("zero_stage", "{}"), ("stage", "{}"),
                     ("global_batch", "{}"), ("mean_seq_len", "{:.1f}"), ("bare_step_s", "{:.4f}"),
                     ("pipeline_step_s", "{:.4f}"), ("loop_in_memory_step_s", "{:.4f}"), ("overhead_ratio", "{:.3f}"),
                     ("loop_overhead_ratio", "{:.3f}"), ("loader_cpu_step_s", "{:.4f}"), ("loader_cpu_share", "{:.2%}"), ("data_wait_share", "{:.2%}"), ("load_average", "{:.1f}"),
                     ("samples_per_s_per_gpu", "{:.2f}"), ("tokens_per_s_per_gpu", "{:.0f}"),
                     ("tflops_per_gpu", "{:.4g}"), ("mfu", "{:.2%}"), ("peak_memory_gib", "{:.2f}")]:
            print(f"| {k} | {fmt(row[k], f)} |")
        ok = row["overhead_ratio"] <= 1.05 and (row["data_wait_share"] or 0) <= 0.05
        print(f"\ntarget (pipeline <= 1.05x bare, data wait <= 5%): {'met' if ok else 'NOT met'}; row appended to {out_path}")
    dist.barrier()
    dist.destroy()
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    sys.exit(main(args))
