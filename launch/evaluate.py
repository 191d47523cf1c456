"""Retrieval evaluation of an exported model on mmeb-kind shards (data_prep/shard.py --kind mmeb).

    python launch/evaluate.py --model runs/stage2/export --data 'eval-{000000..000003}.tar' --out scores.json
    python launch/evaluate.py --model runs/stage2/export --data 'data/digits/eval-{000000..000001}.tar' \
        --out runs/stage2/scores.json --plot

Every query is scored by cosine similarity against its candidates: the sample's own positive +
negatives when it has negatives, otherwise every distinct positive of its task (the mode used is
printed per task).  Prints and writes per-task and overall (mean over tasks) Precision@1,
Recall@1/5/10 and MRR; ``--plot`` also writes ``precision_at_1.png`` beside ``--out`` and, when
``--model`` is a run's ``export/`` folder, that run's ``loss.png``.  See pipeline/evaluate.py.
"""
import argparse
import os
import sys
from importlib.util import find_spec

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an exported model directory (launch/export.py), or a plain "
                    "Hugging Face VLM directory, evaluated untrained (fresh compression tokens)")
    ap.add_argument("--data", required=True, help="mmeb-kind shards: a brace pattern, a .tar, or a shard folder")
    ap.add_argument("--out", required=True, help="scores JSON to write")
    ap.add_argument("--plot", action="store_true", help="write PNG charts (P@1 per task, the run's loss curves)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--pooling", choices=["mean", "last"], default=None,
                    help="override the model's pooling (released CoMa weights: 'last' as their evaluation, "
                         "'mean' as their training)")
    ap.add_argument("--probe-compression", action="store_true",
                    help="instead of retrieval: the compression probe of a stage-1 model (answer accuracy with "
                         "the true vs a swapped image, pipeline.evaluate.compression_probe)")
    ap.add_argument("--task", default=None, help="--probe-compression: the task to ask (default: the first "
                    "whose queries have an image and positives are text)")
    ap.add_argument("--question", default=None, help="--probe-compression: ask this instead of each query's text "
                    "(e.g. the question stage 1 trained on)")
    ap.add_argument("--ties", default="pessimistic", choices=["pessimistic", "first"],
                    help="a tie with the positive counts as a miss (default) or, as MMEB's argmax, as a hit")
    args = ap.parse_args(argv)

    from pipeline.evaluate import evaluate, format_table, load_encoder, read_mmeb_shards
    from pipeline.fileio import atomic_write_json as write_json
    from pipeline.fileio import output_problem

    if problem := output_problem(args.out, folder=False):
        print(f"error: --out: {problem}", file=sys.stderr)
        return 2
    try:
        samples = read_mmeb_shards(args.data, max_samples=args.max_samples)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.probe_compression:
        from pipeline.evaluate import compression_probe

        try:
            probe = compression_probe(args.model, samples, task=args.task, max_samples=args.max_samples or 300,
                                      batch_size=args.batch_size, device=args.device or "cpu",
                                      question=args.question)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        probe.update({"model": os.path.abspath(args.model), "data": args.data})
        write_json(args.out, probe)
        print(f"compression probe, task {probe['task']}, {probe['n']} held-out images, {probe['candidates']} answers "
              f"(chance {100 * probe['chance']:.1f}%): true image {100 * probe['true']:.1f}%, swapped image "
              f"{100 * probe['swapped']:.1f}%\nwrote {args.out}")
        return 0
    try:
        encode = load_encoder(args.model, device=args.device, batch_size=args.batch_size, pooling=args.pooling)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    results = evaluate(samples, encode, batch_size=args.batch_size, ties=args.ties)
    results.update({"model": os.path.abspath(args.model), "data": args.data})
    write_json(args.out, results)
    print(format_table(results))
    print(f"\n{results['candidates']}; ties: {args.ties}\nwrote {args.out}")
    if args.plot:
        from pipeline.plots import plot_precision_per_task, plot_run

        out_dir = os.path.dirname(os.path.abspath(args.out))
        print("wrote", plot_precision_per_task({os.path.basename(os.path.normpath(args.model)): results},
                                               os.path.join(out_dir, "precision_at_1.png")))
        run_dir = os.path.dirname(os.path.abspath(os.path.normpath(args.model)))
        loss_png = plot_run(run_dir)
        if loss_png:
            print("wrote", loss_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
