"""The embedded demo: the whole CoMa pipeline at toy scale on CPU, and the paper's claim in miniature.

    make demo                                    # = DS_ACCELERATOR=cpu .venv/bin/python launch/demo.py
    DS_ACCELERATOR=cpu python launch/demo.py --stage1-steps 200 --stage2-steps 200
    python launch/demo.py --data-only            # only build the bundled dataset and read it back

Steps (1 and 2 are reused when already done, so a rerun costs only training and evaluation):
  1. a tiny random Qwen2-VL, 4 layers           -> runs/tiny-qwen2vl-4layer       (launch/make_tiny_model.py)
  2. the bundled digits dataset, sharded, read back through the loader as 2 ranks
                                                -> data/builtin                   (data_prep/builtin.py)
  3. stage 1 (full fine-tuning), 2 CPU ranks, ZeRO-3 over gloo
                                                -> RUN/stage1/export              (launch/stage1.py)
     then the compression probe: asked "Which digit is written here?" about held-out digits, how
     often the untrained and the stage-1 model answer right with the true image and with another
     image (launch/evaluate.py --probe-compression): the image travelling through C, or not
  4. stage 2 from the stage-1 export            -> RUN/stage2_after_stage1/export (launch/stage2.py)
  5. stage 2 from the untrained model           -> RUN/stage2_only/export         (same steps, data, seed)
  6. Precision@1 on the held-out split (its images are never trained on) for the untrained model,
     stage 2 only and stage 1 + stage 2, per task: text->image, image->text, classification;
     printed, written to RUN/results.json, charted in RUN/precision_at_1.png and RUN/loss.png.
RUN is a new directory per invocation (runs/demo-YYYYMMDD-HHMMSS): reruns never overwrite.
The two training presets are launch/configs/stage{1,2}_tiny.yaml; the demo only points them at
its model, data, run directory and step counts.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

# Held-out task -> column of the results table (data_prep/builtin.py's task names).
COLUMNS = {"digits_t2i": "text→image", "digits_i2t": "image→text", "digits_cls": "classification"}


def _describe(sample: dict) -> str:
    def side(s):
        img = s.get("image")
        return f"text={s.get('text')!r} image={'%dx%d' % img.size if img is not None else None}"

    if sample["kind"] == "pair":
        return f"{sample['__key__']}: image {sample['image'].size} text={sample['text']!r}"
    if sample["kind"] == "qa":
        turns = "; ".join(f"{t['question']} -> {t['answer']}" for t in sample["conversations"])
        return f"{sample['__key__']}: image {sample['image'].size} {turns}"
    return (f"{sample['__key__']} [{sample['task']}]: query({side(sample['query'])}) "
            f"positive({side(sample['positive'])}) + {len(sample['negatives'])} negatives")


def data_demo(data_dir: str = "data/builtin", world_size: int = 2, batch_size: int = 8,
              num_workers: int = 1, workers: int = 2, verbose: bool = True) -> dict:
    """Build (or reuse) the bundled dataset under ``data_dir`` and read every set back with the
    loader as ranks ``0..world_size-1``.  Returns ``{set: {"kind", "samples", "per_task",
    "batches_per_rank", "padded", "shards"}}`` (``shards`` = the absolute brace pattern)."""
    from data_prep.builtin import build, sources
    from pipeline.data import open_shards

    t0 = time.perf_counter()
    build(data_dir, workers=workers)
    say = print if verbose else (lambda *a, **k: None)
    say(f"bundled dataset ready in {data_dir} ({time.perf_counter() - t0:.1f} s)")
    report = {}
    for name, src in sources(data_dir).items():
        t0 = time.perf_counter()
        is_eval = name == "eval"
        per_task, keys, batches, padded, example = Counter(), Counter(), [], 0, None
        for rank in range(world_size):
            loader = open_shards(src["shards"], kind=src["kind"], batch_size=batch_size, rank=rank,
                                  world_size=world_size, num_workers=num_workers, drop_last=False,
                                  shuffle=not is_eval)
            n = 0
            for batch in loader:
                n += 1
                for s in batch:
                    if s["__pad__"]:
                        padded += 1
                        continue
                    keys[s["__key__"]] += 1
                    per_task[s.get("task", src["kind"])] += 1
                    example = example or s
            batches.append(n)
        if sorted(keys.values()) != [1] * src["samples"]:
            raise RuntimeError(f"{name}: the loader did not return every sample exactly once")
        report[name] = {"kind": src["kind"], "samples": len(keys), "per_task": dict(sorted(per_task.items())),
                        "batches_per_rank": batches, "padded": padded, "shards": src["shards"]}
        dt = time.perf_counter() - t0
        say(f"\n{name} ({src['kind']}, {src['num_shards']} shards): {len(keys)} samples, each exactly once "
            f"over {world_size} ranks x {num_workers} workers ({len(keys) / dt:.0f} samples/s incl. decode)")
        say(f"  batches of {batch_size} per rank: {batches}   padded repeats: {padded}")
        if len(per_task) > 1:
            say("  per task: " + ", ".join(f"{t}={c}" for t, c in sorted(per_task.items())))
        say(f"  e.g. {_describe(example)}")
    return report


# ------------------------------------------------------------------------------ the pipeline
class Step:
    """Numbered, timed console sections: ``with Step("stage 1"):``."""

    count, total = 0, 7

    def __init__(self, title: str):
        Step.count += 1
        self.title = f"[{Step.count}/{Step.total}] {title}"

    def __enter__(self):
        print(f"\n{self.title}", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"    done in {time.perf_counter() - self.t0:.0f} s", flush=True)


def _launcher(world_size: int) -> list[str]:
    """DeepSpeed's launcher from this interpreter's environment (torchrun if it is missing)."""
    from pipeline.dist import free_port

    ds = Path(sys.executable).parent / "deepspeed"
    port = str(free_port())
    if ds.exists() or shutil.which("deepspeed"):
        return [str(ds) if ds.exists() else shutil.which("deepspeed"), "--num_gpus", str(world_size),
                "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_port", port]


def stage_args(stage: int, init: str, shards: str, run_dir: Path, steps: int, extra: list[str],
               world_size: int = 2) -> list[str]:
    """Arguments of launch/stage{stage}.py for one demo run: the tiny preset pointed at the demo's
    model, shards, run directory and step count (``extra``: the user's ``--override``s, last so
    they win).  Where the ranks take every core (2 ranks on a 2-core laptop or CI runner), data
    loads in each rank (``data.workers=0``): a worker would only compete with them (README:
    Throughput on a CPU-only machine; the epoch plan is the same either way)."""
    from pipeline.config import load_config
    from pipeline.runtime import loader_workers_compete

    preset = REPO / f"launch/configs/stage{stage}_tiny.yaml"
    compete = loader_workers_compete(world_size, load_config(str(preset)).data.workers)
    workers = ["--data.workers=0"] if compete else []
    return ["--config", str(preset), f"--model.init={init}",
            f"--data.sources=[{{shards: '{shards}', name: digits}}]", f"--train.run_root={run_dir.parent}",
            f"--train.name={run_dir.name}", f"--train.max_steps={steps}", *workers, *extra]


def train_stage(stage: int, init: str, shards: str, run_dir: Path, steps: int, world_size: int,
                extra: list[str]) -> Path:
    """Run launch/stage{stage}.py on ``world_size`` CPU ranks; return its export directory.

    The full output goes to ``run_dir/NAME.log``; the console shows the trainer's step lines.
    """
    name = run_dir.name
    cmd = _launcher(world_size) + [str(REPO / f"launch/stage{stage}.py")] + stage_args(
        stage, init, shards, run_dir, steps, extra, world_size)
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log_path = run_dir.parent / f"{name}.log"
    shown = shlex.join(cmd[cmd.index(str(REPO / f"launch/stage{stage}.py")):]).replace(str(REPO) + "/", "")
    print(f"    $ DS_ACCELERATOR=cpu deepspeed --num_gpus {world_size} {shown}\n    (full log: {log_path})", flush=True)
    tail: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            if "coma.train" in line and ("step " in line or "done:" in line):
                print("    " + line.split("INFO coma.train: ", 1)[-1].rstrip(), flush=True)
        rc = proc.wait()
    export = run_dir / "export"
    if rc != 0 or not (export / "coma.json").exists():
        print("\n".join(["    " + t for t in tail]), file=sys.stderr)
        raise SystemExit(f"stage {stage} ({name}) failed with exit status {rc}; full log: {log_path}")
    return export  # the trainer also wrote run_dir/loss.png


def export_untrained(model_dir: str, out: Path) -> Path:
    """The baseline: the tiny model with fresh compression tokens, exactly as stage 2 starts from it."""
    from pipeline.config import load_config
    from pipeline.export import export_model
    from pipeline.model import build_model

    cfg = load_config(REPO / "launch/configs/stage2_tiny.yaml", [f"--model.init={model_dir}", "--model.lora.enabled=false"])
    model = build_model(cfg, for_training=False)
    return export_model(model, out)


def evaluate_models(models: dict[str, Path], eval_shards: str, max_samples: Optional[int]) -> dict:
    """P@1 etc. of every model on the same held-out samples (pipeline/evaluate.py)."""
    from pipeline.evaluate import evaluate, load_encoder, read_mmeb_shards
    from pipeline.fileio import atomic_write_json as write_json

    samples = read_mmeb_shards(eval_shards, max_samples=max_samples)
    print(f"    {len(samples)} held-out queries: " + ", ".join(
        f"{t}={c}" for t, c in sorted(Counter(s["task"] for s in samples).items())), flush=True)
    results = {}
    for label, export in models.items():
        res = evaluate(samples, load_encoder(str(export), device="cpu", batch_size=64), batch_size=64,
                       progress=False)
        write_json(str(export.parent / "scores.json"), res)
        print(f"    {label}: mean P@1 {100 * res['overall']['precision@1']:.1f}", flush=True)
        results[label] = res
    return results


PROBE_TASK, PROBE_QUESTION = "digits_cls", "Which digit is written here?"  # the question stage 1 trains on


def probe_compression(models: dict[str, str], eval_shards: str, n: int) -> dict:
    """The compression probe (pipeline.evaluate.compression_probe) of each model, printed."""
    from pipeline.evaluate import compression_probe, read_mmeb_shards

    samples = [s for s in read_mmeb_shards(eval_shards) if s["task"] == PROBE_TASK]
    out = {}
    for label, path in models.items():
        r = compression_probe(str(path), samples, task=PROBE_TASK, max_samples=n, question=PROBE_QUESTION)
        out[label] = r
        print(f"    {label:<28} asked '{PROBE_QUESTION}' about {r['n']} held-out digits: "
              f"{100 * r['true']:.1f}% right with the image, {100 * r['swapped']:.1f}% with another image "
              f"(chance {100 * r['chance']:.0f}%)", flush=True)
    return out


def noise_note(results: dict) -> str:
    """What the retrieval table can and cannot tell apart."""
    first = next(iter(results.values()))
    n = min(m["n"] for m in first["tasks"].values())
    se = 100 * (0.25 * 0.75 / n) ** 0.5
    return (f"Noise: with {n} queries per task one standard error is about {se:.1f} points at P@1 = 25%, and a "
            f"60-step stage 2 on this random 0.2M-parameter model moves by 2-6 points between seeds and data "
            f"orders: differences of that size are noise. The paper's effect (stage 1 helping stage 2) needs a "
            f"pretrained VLM, whose text and image are already aligned; what this model can show is the "
            f"mechanism, in the compression probe above.")


def results_table(results: dict, note: str) -> str:
    cols = [c for c in COLUMNS if any(c in r["tasks"] for r in results.values())]
    w = max(len(k) for k in results) + 2
    head = f"{'model':<{w}}" + "".join(f"{COLUMNS[c]:>16}" for c in cols) + f"{'mean':>8}"
    lines = [note, head, "-" * len(head)]
    for label, r in results.items():
        vals = "".join(f"{100 * r['tasks'][c]['precision@1']:>16.1f}" for c in cols)
        lines.append(f"{label:<{w}}{vals}{100 * r['overall']['precision@1']:>8.1f}")
    return "\n".join(lines)


def run_demo(args) -> int:
    t_start = time.perf_counter()
    from data_prep.builtin import sources

    with Step(f"tiny Qwen2-VL ({args.layers} layers) in {args.model_dir}"):
        if (Path(args.model_dir) / "config.json").exists():
            print("    reusing it (delete the folder to rebuild)")
        else:
            from pipeline.tiny_model import make_tiny_model

            make_tiny_model(args.model_dir, family=args.family, layers=args.layers)
    with Step(f"bundled digits dataset in {args.data_dir}, read back as {args.world_size} ranks"):
        data_demo(args.data_dir, world_size=args.world_size, batch_size=8, num_workers=1, verbose=args.verbose)
        src = sources(args.data_dir)
        print(f"    train: {src['qa']['samples']} qa (stage 1), {src['mmeb']['samples']} mmeb (stage 2); "
              f"held-out: {src['eval']['samples']} mmeb samples of images never trained on")
    run = Path(args.run_root) / time.strftime("demo-%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=False)
    extra = list(args.override or [])
    how = "LoRA" if args.stage1_lora else "full fine-tuning"
    with Step(f"stage 1 (compression, {how}), {args.stage1_steps} steps on {args.world_size} CPU ranks, "
              f"ZeRO-3 over gloo"):
        s1 = train_stage(1, args.model_dir, src["qa"]["shards"], run / "stage1", args.stage1_steps,
                         args.world_size, extra + ([] if args.stage1_lora else ["--model.lora.enabled=false"]))
    with Step("compression probe: does the image travel through the compression tokens?"):
        probe = probe_compression({"untrained": args.model_dir, f"after stage 1 ({args.stage1_steps} steps)": s1},
                                  src["eval"]["shards"], args.probe_samples)
    with Step(f"stage 2 (matching) from the stage-1 export, {args.stage2_steps} steps"):
        s12 = train_stage(2, str(s1), src["mmeb"]["shards"], run / "stage2_after_stage1", args.stage2_steps,
                          args.world_size, extra)
    with Step(f"stage 2 from the untrained model (no stage 1), the same {args.stage2_steps} steps"):
        s2 = train_stage(2, args.model_dir, src["mmeb"]["shards"], run / "stage2_only", args.stage2_steps,
                         args.world_size, extra)
    with Step("evaluation on the held-out split"):
        untrained = export_untrained(args.model_dir, run / "untrained" / "export")
        models = {"untrained": untrained, f"stage 2 only ({args.stage2_steps} steps)": s2,
                  f"stage 1 + stage 2 ({args.stage1_steps} + {args.stage2_steps} steps)": s12}
        results = evaluate_models(models, src["eval"]["shards"], args.eval_samples)

    from pipeline.fileio import atomic_write_json as write_json
    from pipeline.plots import plot_loss_curves, plot_precision_per_task

    n_cand = next(iter(results.values()))["overall"]
    cands = {t: m["mean_candidates"] for t, m in next(iter(results.values()))["tasks"].items()}
    chance = 100 * sum(1 / c for c in cands.values()) / len(cands)
    note = (f"Precision@1 (%) on {n_cand['n']} held-out queries, same data and stage-2 steps for every model; "
            f"{', '.join(f'{c:.0f}' for c in sorted(set(cands.values())))} candidates per query (chance {chance:.1f}%)")
    table = results_table(results, note)
    charts = [plot_precision_per_task(results, str(run / "precision_at_1.png"),
                                      title="Precision@1 on held-out digits", chance=chance / 100),
              plot_loss_curves({"stage 1": str(run / "stage1"), "stage 2 after stage 1": str(run / "stage2_after_stage1"),
                                "stage 2 only": str(run / "stage2_only")}, str(run / "loss.png"))]
    write_json(str(run / "results.json"), {
        "table": {label: {COLUMNS.get(t, t): m["precision@1"] for t, m in r["tasks"].items()} | {"mean": r["overall"]["precision@1"]}
                  for label, r in results.items()},
        "exports": {label: str(p) for label, p in models.items()},
        "compression_probe": probe,
        "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "world_size": args.world_size,
        "eval_shards": src["eval"]["shards"], "chance_precision@1": chance / 100,
        "seconds": round(time.perf_counter() - t_start, 1)})
    (run / "results.txt").write_text(table + "\n", encoding="utf-8")

    print("\n" + "=" * 80 + "\n" + table + "\n" + noise_note(results) + "\n" + "=" * 80)
    print(f"\nrun directory   {run}")
    print(f"  checkpoints   {run}/stage1/checkpoints, {run}/stage2_after_stage1/checkpoints, {run}/stage2_only/checkpoints")
    print(f"  exported      {s1}  (stage 1)\n                {s12}  (stage 1 + stage 2)\n                {s2}  (stage 2 only)")
    print(f"  scores        {run}/results.json, {run}/*/scores.json")
    print(f"  charts        {charts[0]}\n                {charts[1]}")
    print(f"  logs          {run}/*.log, metrics in {run}/*/metrics.jsonl")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"\nembed with it:  python -c \"from pipeline import Embedder; "
          f"print(Embedder.from_pretrained('{s12}').encode([{{'text': 'A handwritten digit seven.'}}]).shape)\"")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/builtin", help="where the bundled dataset is built (reused)")
    ap.add_argument("--model-dir", default="runs/tiny-qwen2vl-4layer", help="where the tiny model is built (reused)")
    ap.add_argument("--layers", type=int, default=4, help="language-model layers of the tiny model")
    ap.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--run-root", default="runs", help="a new demo-YYYYMMDD-HHMMSS folder is made here")
    ap.add_argument("--world-size", type=int, default=2, help="CPU ranks per training run")
    ap.add_argument("--stage1-steps", type=int, default=200)
    ap.add_argument("--stage1-lora", action="store_true",
                    help="stage 1 with the preset's LoRA (default: full fine-tuning, which the probe needs to show "
                         "anything on a random model: LoRA on it cannot even fit the answers)")
    ap.add_argument("--probe-samples", type=int, default=150, help="held-out digits the compression probe asks about")
    ap.add_argument("--stage2-steps", type=int, default=60, help="the same for both stage-2 runs")
    ap.add_argument("--eval-samples", type=int, default=None, help="first N held-out queries (default: all)")
    ap.add_argument("--override", action="append", metavar="--a.b=VALUE",
                    help="extra config override for every training run (repeatable), e.g. --override=--optim.lr=1e-3")
    ap.add_argument("--data-only", action="store_true", help="only build the dataset and read it back")
    ap.add_argument("--verbose", action="store_true", help="print the data read-back details")
    args = ap.parse_args(argv)
    if args.data_only:
        data_demo(args.data_dir, world_size=args.world_size)
        return 0
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
