"""Registers, spills and shared memory of the Triton loss kernels on Hopper, without a GPU.

    python benchmarks/triton_resources.py                       # the autotuner's candidates, sm_90, bf16
    python benchmarks/triton_resources.py --configs 128,64,64,8,3 --tma 1 --persistent 0 1

Compiles ``_stats_kernel`` and ``_grad_tile_kernel`` of coma_kernels/infonce_triton.py ahead of
time for sm_90 (Triton's own ptxas), at the GPU target point's configuration (bf16, symmetric,
positives), for each variant: tile shape, TMA descriptors or pointer loads, persistent grid or one
program per work item; reads each cubin's resource usage with ``cuobjdump -res-usage``.  What
it shows is what a GPU profile would show first: a kernel at 255 registers with a stack spills
its epilogue to local memory, and one CTA per SM cannot overlap one tile's exp/reduction with
the next tile's matmul; shared memory beyond one stage of A and B tiles means the loads are
software-pipelined.  It says nothing about time: the GPU session (gpu_session.sh, phase
``breakdown``) times the same variants.

Prints a table and writes ``benchmarks/results/triton_resources.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)          # compile, never interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def compile_variant(kernel: str, config, tma: bool, persistent: bool) -> dict:
    """Compile one kernel variant (a :class:`coma_kernels.triton_tuning.TileConfig`) for sm_90;
    its registers per thread, stack bytes (spills), shared memory and CTAs per SM."""
    import triton
    from triton.backends.compiler import GPUTarget

    from coma_kernels.infonce_triton import GROUP_M, _grad_tile_kernel, _stats_kernel
    from coma_kernels.triton_tuning import Resources, ctas_per_sm

    bm, bn, bk = config.block_m, config.block_n, config.block_k
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    qk = ({"Q": f"tensordesc<bf16[{bm}, {bk}]>", "K": f"tensordesc<bf16[{bn}, {bk}]>"} if tma
          else {"Q": "*bf16", "K": "*bf16"})
    if kernel == "stats":
        fn, flags = _stats_kernel, {"COL": True}
        sig = {**qk, "RMAX": "*fp32", "RSUM": "*fp32", "PMAX": "*fp32", "PSUM": "*fp32",
               **ints("n", "m", "D", "stride_q", "stride_k", "cols_per_split", "splits"), "scale": "fp32"}
    else:
        fn, flags = _grad_tile_kernel, {"HAS_COL": True, "HAS_POS": True, "GROUP_M": GROUP_M}
        sig = {**qk, "G": "*bf16", "RLSE": "*fp32", "RCOEF": "*fp32", "CLSE": "*fp32",
               "CCOEF": "*fp32", "PIDX": "*i64", "PCOEF": "*fp32",
               **ints("row0", "row1", "m", "D", "stride_q", "stride_k", "stride_g"), "scale": "fp32"}
    # what a launch at the target point specialises on: every pointer 16-byte aligned, and every
    # integer a multiple of 16 (N = 32768, D = 2048) but the split count; without these hints the
    # compiler cannot vectorise the masked loads or pipeline them, and the cubin is not the one
    # the GPU would run
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items()
               if ty.startswith("*") or (ty == "i32" and name != "splits")}
    const = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "UPCAST": False, "PRECISION": "ieee",
             "TMA": tma, "PERSISTENT": persistent}
    t0 = time.perf_counter()
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in const}},
                                                 constexprs=const, attrs=aligned),
                       target=GPUTarget("cuda", 90, 32), options=config.options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                               timeout=60).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    row = {"kernel": kernel, "config": str(config), "tiles": f"{bm}x{bn}x{bk}", "num_warps": config.num_warps,
           "num_stages": config.num_stages, "tma": tma, "persistent": persistent,
           "registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
           "shared_bytes": int(k.metadata.shared), "cubin_bytes": len(k.asm["cubin"]),
           "compile_s": round(time.perf_counter() - t0, 1)}
    if regs and stack:
        row["ctas_per_sm"] = ctas_per_sm(Resources(row["registers"], row["stack_bytes"], row["shared_bytes"]),
                                         config.num_warps)
    return row


def main(argv=None) -> int:
    from coma_kernels.triton_tuning import CANDIDATES, TileConfig

    def config(text: str) -> TileConfig:  # argparse shows an ArgumentTypeError's own words
        try:
            return TileConfig.parse(text, source=None)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", type=config, default=list(CANDIDATES),
                    help="BM,BN,BK[,WARPS,STAGES] (default: the autotuner's candidates)")
    ap.add_argument("--tma", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--persistent", nargs="+", type=int, default=[0], choices=[0, 1])
    ap.add_argument("--out", default=str(RESULTS / "triton_resources.json"))
    args = ap.parse_args(argv)
    import triton

    rows = []
    for config, tma, pers, kernel in itertools.product(args.configs, args.tma, args.persistent, ("stats", "grad")):
        rows.append(compile_variant(kernel, config, bool(tma), bool(pers)))
    print("| kernel | config | tma | persistent | registers | stack (spill) B | shared KiB | CTAs/SM |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['config']} | {int(r['tma'])} | {int(r['persistent'])} | {r['registers']} | "
              f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r.get('ctas_per_sm')} |")
    report = {"triton": triton.__version__, "target": "sm_90", "dtype": "bf16", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
