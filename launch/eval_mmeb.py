"""MMEB v1 evaluation of an exported model on a local copy of MMEB-eval (nothing is downloaded).

    python launch/eval_mmeb.py --model runs/stage2/export --mmeb-root data/MMEB-eval --out runs/stage2/mmeb
    python launch/eval_mmeb.py --model runs/stage2/export --mmeb-root data/MMEB-eval --out runs/stage2/mmeb \
        --datasets ImageNet-1K MSCOCO_t2i --max-rows 100          # a quick look at two datasets

The local copy holds one entry per dataset (``{name}/*.parquet`` as in the Hugging Face snapshot of
TIGER-Lab/MMEB-eval, or ``{name}.jsonl``) and the images under ``--image-root`` (default
``MMEB_ROOT/eval_images`` or ``MMEB_ROOT/images``).  The CoMa authors' copy,
ziyjiang/MMEB_Test_Instruct (instructions apart from the text), is read too and joined as their
evaluation joins it.  Writes ``{dataset}_score.json``,
``{dataset}_pred.jsonl``, ``summary.json`` and ``summary.txt`` into ``--out`` and prints the summary
table (Precision@1 per dataset, meta-task, in-/out-of-distribution and overall means).  A dataset
missing from the local copy is reported and excluded; rerunning skips finished datasets
(``--overwrite`` redoes them).  See pipeline/mmeb.py for the protocol.
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
    ap.add_argument("--mmeb-root", required=True, help="local copy of MMEB-eval (or of ziyjiang/MMEB_Test_Instruct)")
    ap.add_argument("--out", required=True, help="output directory for score/pred files and the summary")
    ap.add_argument("--image-root", default=None, help="folder the rows' image paths are relative to")
    ap.add_argument("--datasets", nargs="*", default=None, help="subset of the 36 datasets (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-rows", type=int, default=None, help="first N rows per dataset (quick checks)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--pooling", choices=["mean", "last"], default=None,
                    help="override the model's pooling (released CoMa weights: 'last' as their evaluation, "
                         "'mean' as their training)")
    ap.add_argument("--overwrite", action="store_true", help="recompute datasets that already have a score file")
    args = ap.parse_args(argv)

    from pipeline.evaluate import load_encoder
    from pipeline.mmeb import MMEBDataError, format_summary, run_mmeb

    from pipeline.fileio import output_problem

    if not os.path.isdir(args.mmeb_root):
        print(f"error: --mmeb-root {args.mmeb_root} is not a directory", file=sys.stderr)
        return 2
    if problem := output_problem(args.out, folder=True):
        print(f"error: --out: {problem}", file=sys.stderr)
        return 2
    try:
        encode = load_encoder(args.model, device=args.device, batch_size=args.batch_size, pooling=args.pooling)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_mmeb(encode, args.mmeb_root, args.out, datasets=args.datasets, image_root=args.image_root,
                           batch_size=args.batch_size, max_rows=args.max_rows, overwrite=args.overwrite)
    except MMEBDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"\nwrote {os.path.join(args.out, 'summary.json')} and per-dataset *_score.json / *_pred.jsonl")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
