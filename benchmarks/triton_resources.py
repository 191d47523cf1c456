"""Registers, spills and shared memory of the Triton loss kernels on Hopper, without a GPU.

    python benchmarks/triton_resources.py                       # every variant, sm_90, bf16
    python benchmarks/triton_resources.py --tiles 128,64,64 --tma 1 --persistent 0

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


def compile_variant(kernel: str, tiles: tuple[int, int, int], tma: bool, persistent: bool,
                    num_warps: int = 8, num_stages: int = 3) -> dict:
    """Compile one kernel variant for sm_90; its registers per thread, stack bytes (spills) and
    shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    from coma_kernels.infonce_triton import GROUP_M, _grad_tile_kernel, _stats_kernel

    bm, bn, bk = tiles
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    qk = ({"Q": f"tensordesc<bf16[{bm}, {bk}]>", "K": f"tensordesc<bf16[{bn}, {bk}]>"} if tma
          else {"Q": "*bf16", "K": "*bf16"})
    if kernel == "stats":
        fn, flags = _stats_kernel, {"COL": True}
        sig = {**qk, "RMAX": "*fp32", "RSUM": "*fp32", "PMAX": "*fp32", "PSUM": "*fp32",
               **ints("n", "m", "D", "stride_q", "stride_k", "cols_per_split", "splits"), "scale": "fp32"}
    else:
        fn, flags = _grad_tile_kernel, {"HAS_COL": True, "HAS_POS": True, "GROUP_M": GROUP_M}
        sig = {**qk, "G": "*bf16", "DSP": "*fp32", "RLSE": "*fp32", "RCOEF": "*fp32", "CLSE": "*fp32",
               "CCOEF": "*fp32", "PIDX": "*i64", "PCOEF": "*fp32",
               **ints("row0", "row1", "m", "D", "stride_q", "stride_k", "stride_g"), "scale": "fp32"}
    const = {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "UPCAST": False, "PRECISION": "ieee",
             "TMA": tma, "PERSISTENT": persistent}
    t0 = time.perf_counter()
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in const}},
                                                 constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                               timeout=60).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"kernel": kernel, "tiles": f"{bm}x{bn}x{bk}", "tma": tma, "persistent": persistent,
            "num_warps": num_warps, "num_stages": num_stages,
            "registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_bytes": int(k.metadata.shared), "cubin_bytes": len(k.asm["cubin"]),
            "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", nargs="+", default=["128,128,64", "128,64,64"], help="BM,BN,BK shapes")
    ap.add_argument("--tma", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--persistent", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--out", default=str(RESULTS / "triton_resources.json"))
    args = ap.parse_args(argv)
    import triton

    rows = []
    for tiles, tma, pers, kernel in itertools.product(args.tiles, args.tma, args.persistent, ("stats", "grad")):
        rows.append(compile_variant(kernel, tuple(int(x) for x in tiles.split(",")), bool(tma), bool(pers)))
    print("| kernel | tiles | tma | persistent | registers | stack (spill) B | shared KiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['tiles']} | {int(r['tma'])} | {int(r['persistent'])} | {r['registers']} | "
              f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} |")
    report = {"triton": triton.__version__, "target": "sm_90", "dtype": "bf16", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
