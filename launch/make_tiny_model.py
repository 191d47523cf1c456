"""Write a tiny random Qwen2-VL / Qwen2.5-VL model directory (no network needed).

    python launch/make_tiny_model.py --out runs/tiny-qwen2vl --family qwen2_vl
    python launch/make_tiny_model.py --out runs/tiny-qwen25vl --family qwen2_5_vl --seed 1

The result is accepted by every ``--model PATH`` / ``model.init`` in the project and by plain
``transformers`` ``from_pretrained``.  See pipeline/tiny_model.py for what it contains.
"""
import argparse
import sys
from importlib.util import find_spec

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    ap.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2, help="language-model layers (the demo uses 4)")
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=28 * 28 * 16)
    args = ap.parse_args(argv)
    from pipeline.tiny_model import make_tiny_model

    path = make_tiny_model(args.out, family=args.family, seed=args.seed,
                           min_pixels=args.min_pixels, max_pixels=args.max_pixels, layers=args.layers)
    print(f"wrote tiny {args.family} model to {path}")


if __name__ == "__main__":
    main()
