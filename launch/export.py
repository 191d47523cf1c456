"""Export a training checkpoint as a Hugging Face model directory (LoRA merged) that
``pipeline.Embedder.from_pretrained`` and plain ``transformers`` load.

    python launch/export.py --checkpoint runs/stage1_qwen2_5_vl_3b/checkpoints --out runs/stage1_qwen2_5_vl_3b/export
    python launch/export.py --checkpoint runs/NAME/checkpoints/step-400 --out /tmp/coma-step400 --dtype bfloat16

One CPU process; no GPU or launcher needed (the ZeRO-2/3 partitions are merged from the files).
Training runs already export at their end into runs/NAME/export; use this for an intermediate
step or when that export was interrupted.
"""
import argparse
import sys
from importlib.util import find_spec

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a step-N directory or a checkpoints directory (uses latest)")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weights' dtype in the export (default: the run's model.dtype)")
    args = ap.parse_args(argv)
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.fileio import output_problem
    from pipeline.export import export_checkpoint

    if problem := output_problem(args.out, folder=True, replace=True):
        print(f"error: --out: {problem}", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # the checkpoint's config.yaml no longer fits this version's schema
        print(f"error: the checkpoint's config.yaml: {e}; edit that file (the model section is what "
              f"export needs) and rerun", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
