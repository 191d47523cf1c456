"""The demo on the bundled dataset (``make demo`` runs this on CPU).

    python launch/demo.py                          # data/builtin, 2 ranks
    python launch/demo.py --data-dir /tmp/digits --world-size 4

Data part (this file so far): build the bundled handwritten-digits dataset with
``data_prep/builtin.py`` (a rerun reuses it), then read every set back through the streaming
loader (``pipeline/data.py``) as each of ``--world-size`` ranks would, and print what it saw:
samples per set, per task and per rank, batch counts per rank (always equal), and one sample of
each kind.  :func:`data_demo` is the piece later stages of the demo call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    from pipeline.data import build_loader

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
            loader = build_loader(src["shards"], kind=src["kind"], batch_size=batch_size, rank=rank,
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


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/builtin", help="where the bundled dataset is built")
    ap.add_argument("--world-size", type=int, default=2, help="ranks to simulate when reading back")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per rank")
    args = ap.parse_args(argv)
    data_demo(args.data_dir, world_size=args.world_size, batch_size=args.batch_size,
              num_workers=args.num_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
