"""MTEB / MIEB tasks on an exported model, through the ``mteb`` package (``pip install -e ".[mteb]"``).

    python launch/eval_mteb.py --model runs/stage2/export --tasks CIFAR10ZeroShot Flickr30kI2TRetrieval \
        --out runs/stage2/mteb
    python launch/eval_mteb.py --model runs/stage2/export --benchmark "MIEB(lite)" --out runs/stage2/mteb
    python launch/eval_mteb.py --model runs/stage2/export --tasks mytasks:MyRetrieval --out runs/x   # a local task

``--tasks`` takes mteb task names, or ``module:Class`` for a task class of your own (an mteb
``AbsTask`` subclass that loads its data locally).  mteb downloads each task's data from the
Hugging Face Hub on first use.  Results go to mteb's standard folder under ``--out``
(``results/<model name>/<revision>/<Task>.json``, readable by ``mteb.ResultCache``), plus
``summary.json`` and a printed table of each task's main score per split and subset.  A task
already in the folder is not rerun unless ``--overwrite``.  Inputs are built exactly as in
``launch/eval_mmeb.py`` (see pipeline/mteb_model.py).
"""
import argparse
import importlib
import json
import os
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")


def load_tasks(names, benchmark=None) -> list:
    """mteb task names and ``module:Class`` specs → task objects (ValueError names the bad one)."""
    import mteb

    tasks = list(mteb.get_benchmark(benchmark).tasks) if benchmark else []
    for spec in names or []:
        if ":" in spec:
            mod, _, attr = spec.partition(":")
            try:
                tasks.append(getattr(importlib.import_module(mod), attr)())
            except (ImportError, AttributeError) as e:
                raise ValueError(f"--tasks {spec}: cannot load the task class ({e})") from None
        else:
            try:
                tasks.append(mteb.get_task(spec))
            except KeyError as e:
                raise ValueError(f"--tasks {spec}: {e.args[0] if e.args else 'not an mteb task'}") from None
    if not tasks:
        raise ValueError("no task: pass --tasks NAME … or --benchmark NAME")
    return tasks


def summarize(model_result, tasks) -> list[dict]:
    """One row per task, split and subset: the task's main score (×100, as mteb's leaderboard)."""
    metric = {t.metadata.name: t.metadata.main_score for t in tasks}
    rows = []
    for tr in model_result.task_results:
        for split, subsets in tr.scores.items():
            for s in subsets:
                rows.append({"task": tr.task_name, "split": split, "subset": s.get("hf_subset", "default"),
                             "metric": metric.get(tr.task_name),
                             "score": 100.0 * float(s["main_score"])})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    w = max(len(r["task"]) for r in rows)
    lines = [f"{'task':<{w}}  {'split':<10} {'subset':<12} {'metric':<12} {'score':>7}"]
    lines += [f"{r['task']:<{w}}  {r['split']:<10} {r['subset']:<12} {r['metric'] or '':<12} {r['score']:7.2f}"
              for r in rows]
    mean = sum(r["score"] for r in rows) / len(rows)
    lines.append(f"{'mean':<{w}}  {'':<10} {'':<12} {'':<12} {mean:7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an exported model directory (launch/export.py), a released "
                    "CoMa checkpoint, or a plain Hugging Face VLM directory (evaluated untrained)")
    ap.add_argument("--tasks", nargs="*", default=None, help="mteb task names, or module:Class for a local task")
    ap.add_argument("--benchmark", default=None, help='an mteb benchmark, e.g. "MIEB(lite)" (adds its tasks)')
    ap.add_argument("--out", required=True, help="results folder (mteb's layout under results/, plus summary.json)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--pooling", choices=["mean", "last"], default=None, help="override the model's pooling")
    ap.add_argument("--prompts", default=None, help="JSON file of instructions by task name, task type or "
                    "query/document (mteb's prompts_dict); default: each task's own prompt")
    ap.add_argument("--name", default=None, help="model name in the results (org/name; default local/<folder>)")
    ap.add_argument("--revision", default=None, help="revision in the results (default: a hash of the config)")
    ap.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results")
    args = ap.parse_args(argv)

    try:
        import mteb
    except ImportError:
        print('error: mteb is not installed: pip install -e ".[mteb]"', file=sys.stderr)
        return 2
    from pipeline.fileio import output_problem
    from pipeline.mteb_model import CoMaMTEB

    if problem := output_problem(args.out, folder=True):
        print(f"error: --out: {problem}", file=sys.stderr)
        return 2
    if args.name is not None and "/" not in args.name:
        print(f"error: --name {args.name!r}: mteb wants organization/model_name", file=sys.stderr)
        return 2
    try:
        prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8")) if args.prompts else None
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: --prompts {args.prompts}: {e}", file=sys.stderr)
        return 2
    try:
        tasks = load_tasks(args.tasks, args.benchmark)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = CoMaMTEB(args.model, revision=args.revision, device=args.device, batch_size=args.batch_size,
                         pooling=args.pooling, prompts=prompts, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    result = mteb.evaluate(model, tasks, cache=mteb.ResultCache(args.out),
                           overwrite_strategy="always" if args.overwrite else "only-missing",
                           encode_kwargs={"batch_size": args.batch_size})
    rows = summarize(result, tasks)
    folder = os.path.join(args.out, "results", model.mteb_model_meta.model_name_as_path(),
                          model.mteb_model_meta.revision)
    tmp = os.path.join(args.out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "name": model.mteb_model_meta.name,
                   "revision": model.mteb_model_meta.revision, "results": folder, "rows": rows}, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "summary.json"))
    print(format_table(rows))
    print(f"\nwrote {folder}/<task>.json and {os.path.join(args.out, 'summary.json')}")
    failed = [t.metadata.name for t in tasks if t.metadata.name not in {r["task"] for r in rows}]
    if failed:
        print(f"error: no result for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
