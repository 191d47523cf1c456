"""pipeline/data/: exact epochs across ranks x workers, equal batch counts, corrupt data,
resume, task-homogeneous runs, resampled mixtures."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import pytest

from conftest import REPO
from data_prep import shard
from datagen import dataset, png_bytes, write_tar
from pipeline.config import Config, DataConfig, DataSource
from pipeline.data import Plan, Source, build_loader, open_shards


def make_shards(root, kind, n, spp, name="shards"):
    manifest = dataset(root, kind, n, size=(10, 8))
    assert shard.main(["--input", str(manifest), "--output", str(root / name), "--kind", kind,
                       "--samples-per-shard", str(spp), "--workers", "1"]) == 0
    return root / name


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """17 pair samples in 3 uneven shards (7, 7, 3)."""
    return make_shards(tmp_path_factory.mktemp("pairs"), "pair", 17, 7, name="pairs")


@pytest.fixture(scope="module")
def mmeb(tmp_path_factory):
    """40 mmeb samples (tasks t2i / i2t alternating) in 5 shards (9, 9, 9, 9, 4)."""
    return make_shards(tmp_path_factory.mktemp("mmeb"), "mmeb", 40, 9)


def keys(batches):
    return [[(s["__key__"], s["__pad__"]) for s in b] for b in batches]


ALL_PAIRS = {f"pair-{i:09d}" for i in range(1, 18)}

RANK_SCRIPT = r"""
import json, sys
from pipeline.data import open_shards
shards, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
res = {}
for drop_last in (False, True):
    loader = open_shards(shards, kind="pair", batch_size=3, rank=rank, world_size=2, num_workers=2,
                          seed=5, shuffle_buffer=4, drop_last=drop_last)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        res[f"{drop_last}-{epoch}"] = {"len": len(loader),
                                       "batches": [[(s["__key__"], s["__pad__"]) for s in b] for b in loader]}
json.dump(res, open(out, "w"))
"""


def test_exactly_once_two_ranks_two_workers_real_processes(pairs, tmp_path):
    """Two rank processes, each with two DataLoader worker processes, over 3 uneven shards."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(pairs), str(r), str(tmp_path / f"r{r}.json")],
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        # drop_last=False: 17 samples over 2 ranks → 9 slots each, one padded repeat
        r0, r1 = (r[f"False-{epoch}"] for r in res)
        assert r0["len"] == r1["len"] == len(r0["batches"]) == len(r1["batches"]) == 3
        assert [len(b) for b in r0["batches"]] == [len(b) for b in r1["batches"]] == [3, 3, 3]
        real = [k for r in (r0, r1) for b in r["batches"] for k, pad in b if not pad]
        assert len(real) == 17 and set(real) == ALL_PAIRS
        assert sum(pad for r in (r0, r1) for b in r["batches"] for _, pad in b) == 1
        # drop_last=True: floor(17 / (2*3)) = 2 full batches per rank, all distinct
        d0, d1 = (r[f"True-{epoch}"] for r in res)
        assert d0["len"] == d1["len"] == len(d0["batches"]) == len(d1["batches"]) == 2
        used = [k for r in (d0, d1) for b in r["batches"] for k, pad in b]
        assert len(used) == len(set(used)) == 12 and not any(p for r in (d0, d1) for b in r["batches"] for _, p in b)
    assert res[0]["False-0"]["batches"] != res[0]["False-1"]["batches"]  # reshuffled per epoch


@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_covers_every_sample_once_with_equal_batches(drop_last):
    """The plan (what every rank computes from sizes.json) over many shapes, uneven shards."""
    sizes = [7, 7, 3, 0, 11]
    src = [Source("s", [f"s{i}.tar" for i in range(len(sizes))])]
    for world in (1, 2, 3, 4, 8):
        for workers in (1, 2, 3):
            for b in (1, 2, 5):
                plan = Plan([f"s{i}.tar" for i in range(5)], [0] * 5, sizes, src, b, world, workers,
                            seed=1, drop_last=drop_last)
                seen = Counter()
                per_rank = []
                for rank in range(world):
                    wps = [plan.worker(3, rank, k) for k in range(workers)]
                    # the DataLoader's round-robin order: batch j from worker j % K
                    order = [wps[j % workers].batch_sizes[j // workers] for j in range(plan.batches())]
                    per_rank.append(order)
                    for wp in wps:
                        assert wp.real <= wp.quota
                        for p in wp.pieces:
                            assert p.skip + p.take <= sizes[p.shard]
                            seen.update((p.shard, p.skip + i) for i in range(p.take))
                assert all(o == per_rank[0] for o in per_rank), (world, workers, b)
                assert max(seen.values(), default=1) == 1
                if drop_last:
                    assert all(s == b for s in per_rank[0]) and len(seen) > 28 - world * b
                else:
                    assert len(seen) == 28 and sum(per_rank[0]) * world - 28 < world


def test_equal_batch_counts_uneven_shards_real_workers(pairs):
    for world in (2, 3):
        counts = []
        for rank in range(world):
            loader = open_shards(str(pairs), kind="pair", batch_size=2, rank=rank, world_size=world,
                                  num_workers=2, drop_last=False)
            got = keys(loader)
            counts.append((len(loader), len(got), [len(b) for b in got]))
        assert all(c == counts[0] for c in counts) and counts[0][0] == counts[0][1], counts


def test_resume_reproduces_the_uninterrupted_run(mmeb):
    def make():
        return open_shards(str(mmeb), kind="mmeb", batch_size=4, rank=1, world_size=2, num_workers=2,
                            seed=3, shuffle_buffer=6, task_batch_size=2)

    full = make()
    reference = []
    for epoch in (0, 1):
        full.set_epoch(epoch)
        reference += keys(full)
    n = len(full)
    assert n == 5 and len(reference) == 2 * n

    for stop in (1, 3, n, n + 2):  # mid-epoch, the epoch's end, inside the next epoch
        first = make()
        seen = []
        for epoch in (0, 1):
            first.set_epoch(epoch)
            for batch in first:
                seen += keys([batch])
                if len(seen) == stop:
                    break
            if len(seen) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        for epoch in range(state["epoch"], 2):
            resumed.set_epoch(epoch)
            seen += keys(resumed)
        assert seen == reference, stop


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(pairs, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    with open(bad / "train-000000.tar", "r+b") as f:      # a truncated tar (copy died half-way)
        f.truncate(os.path.getsize(bad / "train-000000.tar") // 2)
    with tarfile.open(pairs / "train-000001.tar") as src, tarfile.open(bad / "train-000001.tar", "w") as dst:
        for m in src:                                     # one sample's image bytes garbled
            data = src.extractfile(m).read()
            if m.name == "pair-000000010.png":
                data = b"\x89PNG garbage" + data[40:]
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))

    results = []
    for rank in (0, 1):
        loader = open_shards(str(bad), kind="pair", batch_size=3, rank=rank, world_size=2, num_workers=2,
                              drop_last=False)
        got = keys(loader)
        assert len(got) == len(loader) == 3 and [len(b) for b in got] == [3, 3, 3]
        results.append((got, loader.metrics()))
    m = Counter()
    for _, metrics in results:
        m.update(metrics)
    assert m["data/corrupt_samples"] == 1 and m["data/corrupt_shards"] >= 1
    real = {k for got, _ in results for b in got for k, pad in b if not pad}
    assert "pair-000000010" not in real and len(real) < 17 and real <= ALL_PAIRS

    # the warning names the shard (single process, so the log record reaches caplog)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    loader = open_shards(str(bad), kind="pair", batch_size=3, rank=0, world_size=1, num_workers=0, drop_last=False)
    assert len(keys(loader)) == len(loader) == 6
    text = caplog.text
    assert "train-000000.tar" in text and "pair-000000010" in text
    assert loader.metrics()["data/corrupt_samples"] == 1

    os.unlink(bad / "train-000002.tar")  # a shard gone before the run: a configuration error, named
    with pytest.raises(ValueError, match=r"names 3 shards, 1 of which do not exist: \S+/train-000002\.tar"):
        open_shards(str(bad), kind="pair", batch_size=3, rank=0, world_size=1, num_workers=0, drop_last=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_in_sizes_json_is_delivered_or_counted(pairs, tmp_path, workers):
    """A tar truncated to half its size and another with 64 KiB of random bytes written into it:
    the samples they can no longer deliver used to vanish from the counts (only undecodable ones
    were counted).  Delivered + corrupt + lost = what sizes.json lists, per shard too."""
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    with open(bad / "train-000000.tar", "r+b") as f:
        f.truncate(os.path.getsize(bad / "train-000000.tar") // 2)
    with open(bad / "train-000001.tar", "r+b") as f:
        f.seek(512)
        f.write(os.urandom(64 << 10))
    loader = open_shards(str(bad), kind="pair", batch_size=3, rank=0, world_size=1, num_workers=workers,
                          drop_last=False)
    real = [k for b in keys(loader) for k, pad in b if not pad]
    m = loader.metrics()
    assert len(real) == len(set(real)) and m["data/lost_samples"] > 0
    assert len(real) + m["data/corrupt_samples"] + m["data/lost_samples"] == 17, (len(real), m)
    lost = loader.lost_by_shard()
    assert {os.path.basename(u) for u in lost} == {"train-000000.tar", "train-000001.tar"}
    assert sum(lost.values()) == m["data/lost_samples"] and lost[str(bad / "train-000001.tar")] >= 6
    resumed = open_shards(str(bad), kind="pair", batch_size=3, rank=0, world_size=1, num_workers=workers,
                           drop_last=False)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert resumed.lost_by_shard() == lost  # a checkpoint keeps the per-shard counts


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_counts_corrupt_data_once(pairs, tmp_path, workers):
    """Counters restored from a checkpoint plus what the resumed loader counts equal the
    uninterrupted run's: re-reading the consumed prefix (a truncated shard) is not counted twice."""
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    with open(bad / "train-000000.tar", "r+b") as f:
        f.truncate(os.path.getsize(bad / "train-000000.tar") // 2)

    def make():
        return open_shards(str(bad), kind="pair", batch_size=2, rank=0, world_size=1, num_workers=workers,
                            seed=1, shuffle_buffer=3, drop_last=False)

    full = make()
    reference = keys(full)
    want = full.metrics()
    assert want["data/corrupt_shards"] >= 1 and want["data/padded_samples"] >= 1
    for stop in range(1, len(reference)):
        first = make()
        seen = []
        for batch in first:
            seen += keys([batch])
            if len(seen) == stop:
                break
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        seen += keys(resumed)
        assert seen == reference, stop
        assert resumed.metrics() == want, stop


def test_unusable_sources_fail_early_or_with_a_clean_reason(pairs, mmeb, tmp_path):
    """Pair shards under a qa config and a folder without manifest.json are refused when the
    loader is built (the trainer turns that into exit 2), and data that cannot yield a single
    sample of the kind stops iteration with a DataError whose reason survives the trip out of
    a DataLoader worker (the trainer logs it and exits 3), instead of a worker traceback."""
    from pipeline.data import DataError, data_error_reason

    with pytest.raises(ValueError, match=r"holds 'pair' shards \(its manifest.json\), not 'qa' shards"):
        open_shards(str(pairs), kind="qa", batch_size=2, rank=0, world_size=1, num_workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is a folder but its manifest.json is missing"):
        open_shards(str(tmp_path / "empty"), kind="pair", batch_size=2, rank=0, world_size=1, num_workers=0)

    # mmeb shards named explicitly (no folder manifest to compare with) read as pair: nothing decodes
    (tmp_path / "copy").mkdir()
    for f in mmeb.glob("train-*.tar"):
        shutil.copy(f, tmp_path / "copy" / f.name)
    shutil.copy(mmeb / "sizes.json", tmp_path / "copy")
    pattern = str(tmp_path / "copy" / "train-{000000..000004}.tar")
    for workers in (0, 1):
        loader = open_shards(pattern, kind="pair", batch_size=2, rank=0, world_size=1, num_workers=workers)
        with pytest.raises(DataError) as info:
            next(iter(loader))
        reason = data_error_reason(info.value)
        assert reason.startswith("no usable pair sample in any of the 5 shards of source(s) ['copy']: "
                                 "samples do not decode as pair (first: mmeb-"), reason
        assert "Traceback" not in reason


def test_task_homogeneous_sub_batches(mmeb):
    loader = open_shards(str(mmeb), kind="mmeb", batch_size=6, rank=0, world_size=1, num_workers=2,
                          task_batch_size=3, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    for b in batches[:-1]:  # the tail of each worker's stream may mix tasks
        for i in range(0, 6, 3):
            assert len({s["task"] for s in b[i:i + 3]}) == 1
    sample = batches[0][0]
    assert sample["kind"] == "mmeb" and set(sample["query"]) == {"text", "image"}
    with pytest.raises(ValueError, match="divide"):
        open_shards(str(mmeb), kind="mmeb", batch_size=4, rank=0, world_size=1, task_batch_size=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux-only")
def test_worker_result_pipe_holds_whole_batches(pairs, monkeypatch):
    """Batches up to Packed.INLINE_BYTES travel inside their pickle through the workers' result
    pipe: ShardLoader widens it from 64 KiB, so the rank reads a batch in one copy instead of
    waiting on the worker to refill the pipe.  A renamed DataLoader internal fails here instead
    of silently bringing the data wait back."""
    import fcntl

    import pipeline.data.workers as data

    seen = []

    def spy(it, *args, **kwargs):
        got = widen(it, *args, **kwargs)
        seen.append((got, fcntl.fcntl(it._worker_result_queue._reader.fileno(), fcntl.F_GETPIPE_SZ)))
        return got

    widen = data.widen_result_pipe
    monkeypatch.setattr(data, "widen_result_pipe", spy)
    loader = open_shards(str(pairs), kind="pair", batch_size=4, rank=0, world_size=1, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) and {s["__key__"] for b in batches for s in b} <= ALL_PAIRS
    assert seen == [(data.RESULT_PIPE_BYTES, data.RESULT_PIPE_BYTES)]
    assert widen(iter([])) is None  # not a multi-worker iterator: nothing to widen, no error
    list(open_shards(str(pairs), kind="pair", batch_size=4, rank=0, world_size=1, num_workers=0))
    assert len(seen) == 1  # no workers, no pipe


def test_resampled_epochs_and_weights(tmp_path, pairs):
    other = make_shards(tmp_path, "pair", 17, 7, name="others")
    spec = f"{pairs}::{other}"
    for rank in (0, 1):
        loader = open_shards(spec, kind="pair", batch_size=4, rank=rank, world_size=2, num_workers=2,
                              resampled=True, epoch_samples=30)
        a = keys(loader)
        assert len(loader) == len(a) == 4  # ceil(ceil(30 / 2) / 4) batches, on both ranks
        assert all(len(b) == 4 for b in a)
        loader.set_epoch(0)
        assert keys(loader) == a            # same (seed, epoch, rank) → same stream
        loader.set_epoch(1)
        assert keys(loader) != a

    loader = open_shards(spec, kind="pair", batch_size=50, rank=0, world_size=1, num_workers=0,
                          resampled=True, epoch_samples=800, weights="1::3")
    by_source = Counter(s["__source__"] for b in loader for s in b)
    assert sum(by_source.values()) == 800
    assert 2.0 < by_source["others"] / by_source["pairs"] < 4.5  # drawn ∝ weight x size, sizes equal


def test_sources_weights_caps_and_config(tmp_path, pairs):
    other = make_shards(tmp_path, "pair", 17, 7, name="others")
    two = open_shards(f"{pairs}::{other}", kind="pair", batch_size=5, rank=0, world_size=1, num_workers=0,
                       weights="1::2", drop_last=False)
    samples = [s for b in two for s in b]
    assert len(samples) == 51 and not any(s["__pad__"] for s in samples)
    # an integer weight repeats a source within the exact epoch
    assert Counter(Counter((s["__source__"], s["__key__"]) for s in samples).values()) == {1: 17, 2: 17}

    cfg = DataConfig(kind="pair", sources=[DataSource(shards=str(pairs), name="a", max_samples=10),
                                           DataSource(shards=str(other), name="b")], workers=0, seed=1)
    run = Config(data=dataclasses.replace(cfg, resampled=True))  # evaluation reads each sample once all the same
    loader = build_loader(run, 0, 1, batch_size=4, evaluation=True)
    samples = [s for b in loader for s in b]
    assert Counter(s["__source__"] for s in samples) == {"a": 10, "b": 17}
    assert len({(s["__source__"], s["__key__"]) for s in samples}) == 27 and not any(s["__pad__"] for s in samples)
    with pytest.raises(TypeError, match="batch plan"):
        build_loader(run, 0, 1)
    with pytest.raises(ValueError, match="resampled"):
        open_shards(f"{pairs}::{other}", kind="pair", batch_size=4, rank=0, world_size=1, weights="1::0.5")
    with pytest.raises(ValueError, match="matches no shard"):
        open_shards(str(tmp_path / "nothing-{0..3}.tar"), kind="pair", batch_size=4, rank=0, world_size=1)


def test_caps_are_per_source_even_with_equal_names():
    sources = [Source("same", ["a0.tar", "a1.tar"], max_samples=5), Source("same", ["b0.tar"])]
    plan = Plan(["a0.tar", "a1.tar", "b0.tar"], [0, 0, 1], [4, 4, 6], sources, 1, 1, 1, drop_last=False)
    for epoch in range(4):
        taken = Counter()
        for idx, take in plan.sequence(epoch):
            taken[plan.shard_source[idx]] += take
        assert taken == {0: 5, 1: 6} and plan.total == 11


def test_remote_shards_find_sizes_json_through_the_same_command(pairs, caplog):
    """pipe:/http shards: sizes.json is read through the same command with the shard's file
    name swapped (no fallback to counting — which for a pipe: shard used to give 0 samples)."""
    from pipeline.data.plan import sizes_location

    assert sizes_location("pipe:aws s3 cp s3://b/d/train-000001.tar -") == \
        ("pipe:aws s3 cp s3://b/d/sizes.json -", "train-000001.tar")
    assert sizes_location("https://h/d/val-000002.tar?sig=1") == ("https://h/d/sizes.json?sig=1", "val-000002.tar")

    caplog.set_level(logging.WARNING, logger="pipeline.data.plan")
    local = open_shards(str(pairs), kind="pair", batch_size=3, rank=0, world_size=1, num_workers=0, seed=2)
    remote = open_shards(f"pipe:cat {pairs}/train-{{000000..000002}}.tar", kind="pair", batch_size=3, rank=0,
                          world_size=1, num_workers=0, seed=2)
    assert remote.dataset.plan.sizes == [7, 7, 3]
    assert keys(remote) == keys(local)
    assert remote.metrics()["data/corrupt_shards"] == 0 and "counting its samples" not in caplog.text


KILLED_RANK = r"""
import os, signal, sys, time
from pipeline.data import open_shards
loader = open_shards(sys.argv[1], kind="pair", batch_size=4, rank=0, world_size=1, num_workers=2,
                      prefetch_factor=8, shuffle_buffer=1)
it = iter(loader)
next(it)
time.sleep(3)  # let the workers fill the result queue's pipe
me = str(os.getpid())
kids = [p for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/stat").read().split(") ")[1].split()[1] == me]
print(" ".join(kids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a rank dying hard mid-epoch
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_with_their_rank(tmp_path):
    """A rank killed mid-epoch leaves no DataLoader worker behind (they used to block forever
    flushing a full result pipe, holding the job's stdout open: the launcher never returned)."""
    import time

    big = tmp_path / "big"  # 256 px images: a few prefetched batches overflow a 64 KiB pipe
    manifest = dataset(big, "pair", 24, size=(256, 256))
    assert shard.main(["--input", str(manifest), "--output", str(big / "shards"), "--kind", "pair",
                       "--samples-per-shard", "6", "--workers", "1"]) == 0
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-c", KILLED_RANK, str(big / "shards")], stdout=f,
                              stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == -9, out.read_text()[-2000:]
    workers = out.read_text().split()
    assert len(workers) == 2, out.read_text()[-2000:]
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split(") ")[1].split()[0] != "Z"]
    for p in alive:  # leave nothing behind even when the assertion fails
        os.kill(int(p), 9)
    assert not alive, f"DataLoader workers {alive} outlived their rank"


EXITING_RANK = r"""
import sys
from pipeline.data import DataError, open_shards
loader = open_shards(sys.argv[1], kind=sys.argv[2], batch_size=1, rank=0, world_size=1, num_workers=2)
try:
    it = iter(loader)
    next(it)                 # pair: the loop is left mid-epoch, its generator still alive
except DataError as e:       # nothing decodes: the error (and its traceback) kept
    kept = e
sys.exit(3)
"""


@pytest.mark.parametrize("kind", ["pair", "qa"])
def test_rank_exits_with_loader_workers_alive(pairs, tmp_path, kind):
    """Workers ignore SIGTERM (SLURM's preemption signal must not kill them mid-save), which is
    what multiprocessing sends its children at interpreter exit before joining them: a rank that
    exits while a loader iterator is alive (stopped mid-epoch, a DataError kept) hung forever."""
    shards = pairs
    if kind == "qa":  # nothing decodes
        shards = tmp_path / "s-000000.tar"
        write_tar(shards, [(f"k{i}", {"png": b"not an image", "json": _qa()}) for i in range(2)])
    proc = subprocess.run([sys.executable, "-c", EXITING_RANK, str(shards), kind],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _qa(question="What is it?", answer="a digit"):
    return json.dumps({"conversations": [{"question": question, "answer": answer}]}).encode()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_samples_the_collator_rejects_are_skipped_and_counted(tmp_path, caplog, batch_size):
    """Samples that decode but that the model's collator refuses (a 2000x1 px image the Qwen2-VL
    processor rejects, an empty or malformed conversation) are replaced and counted like
    undecodable ones, instead of an exception that ends the run; a dataset where nothing
    collates stops with a DataError that says why."""
    from pipeline.collate import Collator
    from pipeline.data import DataError, data_error_reason
    from pipeline.processing import Processor
    from tests.tiny_models import model_cfg, tiny_model_dir

    proc = Processor.from_pretrained(tiny_model_dir("qwen2_vl"), num_compression_tokens=4)
    collate = Collator(proc, model_cfg(), kind="qa")
    good = {"png": png_bytes(56, 56), "json": _qa()}
    samples = [("a-0", {"png": png_bytes(2000, 1), "json": _qa()}), ("a-1", good),
               ("a-2", {"png": png_bytes(56, 56), "json": json.dumps({"conversations": []}).encode()}),
               ("a-3", {"png": png_bytes(56, 56), "json": json.dumps({"conversations": "hi"}).encode()}),
               ("a-4", good), ("a-5", {"png": png_bytes(56, 56), "json": _qa(question="")})]
    write_tar(tmp_path / "s-000000.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": len(samples)}))
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    loader = open_shards(str(tmp_path / "s-000000.tar"), kind="qa", batch_size=batch_size, rank=0,
                          world_size=1, num_workers=0, shuffle=False, drop_last=False,
                          collate_fn=lambda b: (collate(b), [(s["__key__"], s["__pad__"]) for s in b]))
    got = list(loader)
    assert len(got) == len(loader) == 6 // batch_size
    for batch, ks in got:
        assert batch["input_ids"].shape[0] == len(ks) == batch_size
        assert batch["image_grid_thw"].shape[0] == batch_size
    real = [k for _, ks in got for k, pad in ks if not pad]
    assert real == ["a-1", "a-4"]
    assert loader.metrics() == {"data/corrupt_samples": 4, "data/corrupt_shards": 0, "data/lost_samples": 0,
                                "data/padded_samples": 4}
    assert "sample a-0 in " in caplog.text and "rejected by the collator (ValueError: absolute aspect" in caplog.text

    # nothing collates (model.max_length below the image + C tokens): a DataError with the reason
    tight = Collator(proc, model_cfg(max_length=8), kind="qa")
    loader = open_shards(str(tmp_path / "s-000000.tar"), kind="qa", batch_size=batch_size, rank=0,
                          world_size=1, num_workers=0, shuffle=False, drop_last=False, collate_fn=tight)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    reason = data_error_reason(info.value)
    assert "the collator rejects them (first: a-0: ValueError" in reason and "model.max_length" in reason, reason
    assert "Traceback" not in reason


def test_transparent_and_16_bit_images_decode_as_the_processor_would(tmp_path):
    """Alpha is composited onto white (the Hugging Face processors' convert_to_rgb), not dropped:
    a black glyph on a transparent background stays a glyph, not an all-black image; 16-bit
    greyscale is scaled to 8 bits, not clipped to white."""
    import numpy as np
    from PIL import Image

    def png(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 14:18, 3] = 255                                # an opaque black bar, the rest transparent
    glyph = Image.fromarray(rgba, "RGBA")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] * 256)
    ramp = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    members = {"rgba": png(glyph), "la": png(glyph.convert("LA")), "p": png(palette, transparency=0),
               "i16": png(ramp), "rgb": png(Image.new("RGB", (16, 16), (10, 20, 30)))}
    write_tar(tmp_path / "s-000000.tar", [(k, {"png": v, "txt": k.encode()}) for k, v in members.items()])
    loader = open_shards(str(tmp_path / "s-000000.tar"), kind="pair", batch_size=5, rank=0, world_size=1,
                          num_workers=0, shuffle=False, drop_last=False)
    [batch] = list(loader)
    got = {s["text"]: np.asarray(s["image"]) for s in batch}
    assert all(s["image"].mode == "RGB" for s in batch)
    for k in ("rgba", "la"):
        assert got[k][0, 0].tolist() == [255, 255, 255] and got[k][16, 15].tolist() == [0, 0, 0], k
    assert (got["p"] == 255).all()
    want = (np.arange(64 * 64).reshape(64, 64) * 16 + 128) // 257
    assert (got["i16"][..., 0] == want).all()
    assert (got["rgb"] == [10, 20, 30]).all()


def test_open_image_matches_pil_probe():
    """pipeline.imaging.open_image asks only the plugin the file's signature names: the same
    format, mode, size and pixels as Image.open's full probe, and the same errors for bytes
    that only look like an image."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError, features

    from pipeline.imaging import open_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    encoded = {}
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "PPM"] + (["WEBP"] if features.check("webp") else []):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        encoded[fmt] = buf.getvalue()
    buf = io.BytesIO()  # a JPEG with a second frame is an MPO: the JPEG plugin still makes it one
    img.save(buf, format="MPO", save_all=True, append_images=[img.rotate(90)])
    encoded["MPO"] = buf.getvalue()
    for fmt, data in encoded.items():
        ours, ref = open_image(data), Image.open(io.BytesIO(data))
        assert (ours.format, ours.mode, ours.size) == (ref.format, ref.mode, ref.size) and ours.format == fmt
        assert np.array_equal(np.asarray(ours), np.asarray(ref)), fmt
    for junk in (b"\x89PNG\r\n\x1a\n" + bytes(40), b"\xff\xd8\xff" + bytes(40), b"GIF89a", b"not an image"):
        with pytest.raises(UnidentifiedImageError):
            Image.open(io.BytesIO(junk))
        with pytest.raises(UnidentifiedImageError):
            open_image(junk)
    with pytest.raises(OSError):  # truncated: opens, fails to decode, as with Image.open
        open_image(encoded["JPEG"][:200]).load()


def test_loader_keeps_pillow_blocks_unless_the_user_tuned_them(tmp_path):
    """Loader workers (and the shard writer) let Pillow keep 64 MiB of freed image blocks, so a
    batch of decoded images reuses memory instead of faulting in fresh pages (~13 % of a 512 px
    JPEG pass); Pillow's own PILLOW_BLOCKS_MAX / PILLOW_BLOCK_SIZE, when set, win."""
    probe = ("from PIL import Image; from pipeline.data import open_shards; import sys;"
             "[_ for _ in open_shards(sys.argv[1], kind='pair', batch_size=2, rank=0, world_size=1, num_workers=0,"
             " drop_last=False)]; print(Image.core.get_blocks_max(), Image.core.get_block_size())")
    write_tar(tmp_path / "s-000000.tar", [(f"k{i}", {"png": png_bytes(16, 16), "txt": b"x"}) for i in range(4)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILLOW_")}
    for extra, want in (({}, "64 1048576"), ({"PILLOW_BLOCKS_MAX": "3"}, "3 16777216")):
        r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "s-000000.tar")], cwd=REPO,
                           env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-2:] == want.split(), (extra, r.stdout)
