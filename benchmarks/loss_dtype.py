"""Which dtype the contrastive loss should take its embeddings in: the error that rounding the
unit-norm embeddings to fp32 / bf16 / fp16 puts into the loss and its gradients, against float64,
from untrained (p(positive) = 0.9) to well-trained (0.999) inputs.

    python benchmarks/loss_dtype.py                  # CPU, seconds
    python benchmarks/loss_dtype.py --n 4096 --d 2048

The loss itself is computed in float64 here (the materialised reference), so the table isolates
the input rounding; the fused kernels' own error on rounded inputs is what
tests/test_kernels_infonce.py bounds.  Measured on the development machine (N = 512, D = 256,
tau = 0.03): bf16 inputs move dq/dk by 0.3-0.6 % (relative norm) and the loss by <= 8e-4; fp32
by < 1e-7.  The embeddings are means of bf16 hidden states to begin with, so pipeline/model.py
hands the loss bf16 embeddings in bf16 training (tensor-core GEMMs at full rate) rather than fp32
ones (TF32 or FMA).  Writes benchmarks/results/loss_dtype.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

RESULTS = Path(__file__).resolve().parent / "results"


def grads(q, k, scale):
    import torch

    import coma_kernels

    q = q.double().detach().requires_grad_()
    k = k.double().detach().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = coma_kernels.fused_infonce(q, k, s, symmetric=True, backend="reference")
    loss.backward()
    return loss.detach(), q.grad, k.grad, s.grad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.03)
    args = ap.parse_args(argv)
    import torch

    from coma_kernels.infonce_reference import trained_regime_inputs

    scale, rows = 1.0 / args.temperature, []
    print(f"{'p(miss)':>8} {'dtype':>9} {'loss rel':>9} {'dq rel':>9} {'dk rel':>9} {'ds rel':>9}")
    for miss in (1e-1, 1e-2, 1e-3):
        q64, k64 = trained_regime_inputs(args.n, args.n, args.d, scale, miss=miss,
                                         generator=torch.Generator().manual_seed(0))
        truth = grads(q64, k64, scale)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = grads(q64.to(dtype), k64.to(dtype), scale)
            rel = [float((g - t).norm() / t.norm()) for g, t in zip(got, truth)]
            rows.append({"miss": miss, "dtype": str(dtype).split(".")[1], "loss": rel[0], "dq": rel[1],
                         "dk": rel[2], "ds": rel[3], "n": args.n, "d": args.d, "temperature": args.temperature})
            print(f"{miss:>8g} {rows[-1]['dtype']:>9} " + " ".join(f"{x:>9.1e}" for x in rel))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss_dtype.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {RESULTS / 'loss_dtype.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
