"""data.task_sampling=uniform / data.batch_composition=shared: the authors' stage-2 mixture.
Each block of task_batch_size samples comes from one source (a task), drawn by weight whatever
its size; with the shared composition every rank draws the same source for a block, reading its
own share of it.  Frequencies over 10,000 blocks, real processes at 2 and 4 ranks, exact resume."""
import json
import subprocess
import sys
from collections import Counter

import pytest

from data_prep import shard
from datagen import make_images, records, write_jsonl
from pipeline.data import open_shards
from pipeline.data.plan import BlockMixture, Plan, Source

TASKS = ["t2i", "i2t", "vqa"]


def _plan(sizes, weights=None, world=2):
    weights = weights or [1.0] * len(sizes)
    sources = [Source(f"s{i}", [f"s{i}.tar"], w) for i, w in enumerate(weights)]
    return Plan([f"s{i}.tar" for i in range(len(sizes))], list(range(len(sizes))), list(sizes), sources,
                batch_size=8, world_size=world, num_workers=1, seed=3, resampled=True)


def test_uniform_block_frequencies_over_10000_blocks():
    sizes = [10 * (i + 1) ** 2 for i in range(20)]          # 10 … 4000 samples: size must not matter
    mix = BlockMixture(_plan(sizes), block=4, rank=0, shared=True)
    counts = Counter(mix.source_of(g) for g in range(10_000))
    sigma = (10_000 * 0.05 * 0.95) ** 0.5
    assert all(abs(counts[s] - 500) < 5 * sigma for s in range(20)), counts
    weighted = BlockMixture(_plan([5, 5000], weights=[1.0, 3.0]), block=4, rank=0, shared=True)
    share = sum(weighted.source_of(g) == 0 for g in range(10_000)) / 10_000
    assert abs(share - 0.25) < 5 * (0.25 * 0.75 / 10_000) ** 0.5


def test_shared_sequence_and_disjoint_shares():
    plan = _plan([37, 100, 8], world=4)
    shared = [BlockMixture(plan, 4, r, shared=True) for r in range(4)]
    own = [BlockMixture(plan, 4, r, shared=False) for r in range(4)]
    assert all(len({m.source_of(g) for m in shared}) == 1 for g in range(2000))
    assert any(len({m.source_of(g) for m in own}) > 1 for g in range(50))
    for s, size in enumerate([37, 100, 8]):
        spans = [m.slices[s] for m in shared]
        assert spans[0][0] == 0 and spans[-1][1] == size and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # a source's blocks continue where the last one stopped, wrapping inside the rank's share
    m = shared[1]
    lo, hi = m.slices[2]
    seen = []
    for g in range(200):
        s, pieces = m.pieces(g)
        if s == 2:
            seen += [p.skip + i for p in pieces for i in range(p.take)]
    assert seen[: 3 * (hi - lo)] == list(range(lo, hi)) * 3


@pytest.fixture(scope="module")
def task_shards(tmp_path_factory):
    """One shard folder per task (how the authors' subsets are laid out), sizes 24, 40, 12."""
    root = tmp_path_factory.mktemp("blocks")
    images = make_images(root / "images", 40, size=(10, 8))
    out = []
    for task, n in zip(TASKS, (24, 40, 12)):
        rows = [dict(r, task=task) for r in records("mmeb", images[:n])]
        manifest = write_jsonl(root / f"{task}.jsonl", rows)
        assert shard.main(["--input", str(manifest), "--output", str(root / task), "--kind", "mmeb",
                           "--samples-per-shard", "7", "--workers", "1", "--prefix", task]) == 0
        out.append(str(root / task))
    return out


RANK = r"""
import json, sys
from pipeline.data import open_shards
folders, rank, world, out = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
loader = open_shards([{"shards": f, "name": f.rsplit("/", 1)[-1]} for f in folders], kind="mmeb", batch_size=8,
                      rank=rank, world_size=world, num_workers=2, seed=1, task_batch_size=4,
                      task_sampling="uniform", batch_composition="shared")
batches = []
while len(batches) < 10:  # past the end of the nominal epoch: the stream runs on
    for b in loader:
        batches.append([[s["task"], s["__key__"]] for s in b])
json.dump(batches[:10], open(out, "w"))
"""


@pytest.mark.parametrize("world", [2, 4])
def test_shared_blocks_hold_one_task_across_real_ranks(task_shards, tmp_path, world):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(task_shards), str(r), str(world),
                               str(tmp_path / f"r{r}.json")]) for r in range(world)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(world)]
    for t in range(10):
        for blk in range(2):  # 8 per rank = 2 blocks of 4
            tasks = {task for r in ranks for task, _ in r[t][4 * blk: 4 * blk + 4]}
            assert len(tasks) == 1, (t, blk, tasks)  # one task per block, the same on every rank
            shares = [{key for _, key in r[t][4 * blk: 4 * blk + 4]} for r in ranks]
            assert sum(map(len, shares)) == len(set().union(*shares))  # each rank reads its own share
    assert len({task for r in ranks for b in r for task, _ in b}) > 1


def test_uniform_blocks_resume_exactly(task_shards):
    def make():
        return open_shards(task_shards, kind="mmeb", batch_size=8, rank=1, world_size=2, num_workers=0,
                            seed=4, task_batch_size=4, task_sampling="uniform", batch_composition="shared")

    def take(loader, n):  # n batches, across epoch ends
        out = []
        while len(out) < n:
            for b in loader:
                out.append([s["__key__"] for s in b])
                if len(out) == n:
                    break
        return out

    want = take(make(), 12)
    assert len(make()) == 5  # a nominal epoch of 5 batches: the 12 cross two epoch ends
    first = make()
    got = take(first, 7)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += take(resumed, 5)
    assert got == want


def test_uniform_needs_blocks(task_shards):
    with pytest.raises(ValueError, match="task_batch_size"):
        open_shards(task_shards, kind="mmeb", batch_size=8, rank=0, world_size=1, task_sampling="uniform")
    with pytest.raises(ValueError, match="needs data.task_sampling=uniform"):
        open_shards(task_shards, kind="mmeb", batch_size=8, rank=0, world_size=1, batch_composition="shared")
