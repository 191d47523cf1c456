"""LR schedule and the metrics writer."""
import json
import math

import pytest

from pipeline.metrics import Metrics, format_line, read_jsonl
from pipeline.schedule import lr_multiplier


def test_warmup_cosine():
    total = 100  # 5% warm-up = 5 steps
    ms = [lr_multiplier(s, total, 0.05, 0.0) for s in range(total)]
    assert ms[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ms[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(ms[5:], ms[6:]))  # monotone decay after warm-up
    assert 0 < ms[-1] < 1e-3                             # the last update still moves the weights
    assert lr_multiplier(5 + 95 // 2, total, 0.05, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_multiplier(100, total, 0.05, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, total, 0.0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier(50, total, 0.0, schedule="linear")


def test_metrics_files(tmp_path):
    m = Metrics(tmp_path, tensorboard=True)
    m.log(1, {"loss/train": 2.5, "optim/lr": 1e-4, "throughput/mfu": 0.41, "loss/ce": 2.5})
    m.log(2, {"loss/train": float("nan"), "optim/lr": 1e-4})
    m.log(2, {"loss/train": 2.0, "optim/lr": 1e-4})  # a resumed run re-logs step 2
    m.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss/train"] == 2.0
    raw = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert raw[1]["loss/train"] == "nan"
    assert list((tmp_path / "tensorboard").iterdir())
    line = format_line(1, {"loss/train": 2.5, "optim/lr": 1e-4, "throughput/mfu": 0.41, "loss/ce": 2.5})
    assert line == "step 1 | loss 2.5000 | lr 1.00e-04 | MFU 41.0% | ce 2.5000"
    off = Metrics(tmp_path / "other", enabled=False)
    off.log(1, {"loss/train": 1.0})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_loader_source_workers_give_the_same_steps(builtin_dir, stage):
    """LoaderSource with a DataLoader worker (batches packed in the worker, unpacked here, prefetch
    sized to a whole step) yields exactly the steps of the in-process loader (workers=0 and 1 plan
    the same sample order)."""
    from types import SimpleNamespace

    import torch

    from pipeline.config import load_config
    from pipeline.engine import plan_batches
    from pipeline.data import make_loader
    from tests.tiny_models import tiny_model_dir

    kind = "qa" if stage == 1 else "mmeb"
    over = [f"--model.init={tiny_model_dir('qwen2_vl')}", f"--data.sources=[{{shards: '{builtin_dir}/shards/{kind}'}}]",
            "--train.micro_batch_size=4", "--train.embedding_cache_chunk=4",
            f"--train.global_batch_size={12 if stage == 1 else 16}"]
    steps = {}
    for workers in (0, 1):
        cfg = load_config(f"launch/configs/stage{stage}_tiny.yaml", over + [f"--data.workers={workers}"])
        plan = plan_batches(cfg, 1)
        src = make_loader(cfg, plan, SimpleNamespace(rank=0, world_size=1))
        if workers and stage == 1:  # prefetch: this step's 3 micro-batches and the next step's
            assert plan.accumulation == 3 and src.loader.prefetch_factor == 6
        packed = src.loader.dataset.collate_fn
        assert (type(packed).__name__ == "PackedCollate") == (workers > 0)
        it = iter(src)
        steps[workers] = [next(it) for _ in range(3)]
        it.close()
    for a, b in zip(steps[0], steps[1]):
        assert len(a) == len(b) == (3 if stage == 1 else 4)  # micro-batches / cache chunks
        for x, y in zip(a, b):
            flat = lambda d: {k: v for k, v in (d.items() if "input_ids" in d else  # noqa: E731
                              [(f"{s}.{k}", v) for s in ("query", "candidates") for k, v in d[s].items()])}
            fx, fy = flat(x), flat(y)
            assert fx.keys() == fy.keys() and all(torch.equal(fx[k], fy[k]) and fx[k].dtype == fy[k].dtype for k in fx)


def test_cpu_threads_leave_cores_to_the_loader_workers():
    """CPU runs: a node's cores shared among its ranks, one per DataLoader worker left to the
    collator; OMP_NUM_THREADS, when set, is the user's choice and wins."""
    import os
    from types import SimpleNamespace

    from pipeline.runtime import cpu_threads

    cores = len(os.sched_getaffinity(0))
    cfg = lambda w: SimpleNamespace(data=SimpleNamespace(workers=w))  # noqa: E731
    env = lambda n: SimpleNamespace(local_world_size=n)  # noqa: E731
    assert cpu_threads(cfg(0), env(1), environ={}) == cores
    assert cpu_threads(cfg(1), env(1), environ={}) == max(1, cores - 1)
    assert cpu_threads(cfg(2), env(2), environ={}) == max(1, cores // 2 - 2)
    assert cpu_threads(cfg(4), env(64), environ={}) == 1
    assert cpu_threads(cfg(1), env(1), environ={"OMP_NUM_THREADS": "3"}) is None


def test_saturated_cpu_warns_about_loader_workers(caplog, monkeypatch):
    """Ranks that already take every core: a loader worker can only compete with them; say so."""
    import logging
    from types import SimpleNamespace

    import torch

    from pipeline.runtime import cpu_cores, set_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cfg = lambda w: SimpleNamespace(data=SimpleNamespace(workers=w))  # noqa: E731
    env = SimpleNamespace(local_world_size=cpu_cores(), rank=0)
    try:
        with caplog.at_level(logging.WARNING, logger="coma.train"):
            set_cpu_threads(cfg(1), env)
            assert "--data.workers=0" in caplog.text
            caplog.clear()
            set_cpu_threads(cfg(0), env)
            assert "--data.workers=0" not in caplog.text
    finally:
        torch.set_num_threads(before)


def _flag_collate(samples):
    import gc

    return gc.isenabled()


def test_manual_gc_freezes_disables_and_restores(tmp_path):
    """The training loop runs with automatic GC off and the set-up's objects frozen; both are
    undone afterwards, and gc_every <= 0 leaves Python's GC alone.  A loader worker forked in
    the loop collects by itself (GC on), or its reference cycles would pile up for the epoch."""
    import gc

    from datagen import png_bytes, write_tar
    from pipeline.data import open_shards
    from pipeline.runtime import manual_gc

    write_tar(tmp_path / "s-000000.tar", [(f"k{i}", {"png": png_bytes(16, 16), "txt": b"x"}) for i in range(4)])

    assert gc.isenabled()
    with manual_gc(0):
        assert gc.isenabled() and gc.get_freeze_count() == 0
    with manual_gc(50):
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        flags = list(open_shards(str(tmp_path / "s-000000.tar"), kind="pair", batch_size=2, rank=0, world_size=1,
                                  num_workers=1, drop_last=False, collate_fn=_flag_collate))
        assert flags == [True, True] and not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with manual_gc(10):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the state before is what comes back
    finally:
        gc.enable()
