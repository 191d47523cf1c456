"""benchmarks/throughput.py's synthetic data: real shards written by data_prep/shard.py and read by
the trainer's own loader (pipeline.data.build_loader), so both data modes time the same path."""
import importlib.util
from types import SimpleNamespace

import pytest

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("throughput_bench", REPO / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stage", [1, 2])
def test_synthetic_shards_go_through_the_trainers_loader(tmp_path, stage):
    from pipeline.config import Config
    from pipeline.data import build_loader

    bench = _bench()
    cfg = Config()
    cfg.train.stage = stage
    plan = SimpleNamespace(global_batch=8, per_rank=8, micro=4, accumulation=2, cache_chunk=None)
    env = SimpleNamespace(rank=0, world_size=1, local_rank=0)
    bench.use_synthetic_data(cfg, plan, env, image_size=28, steps=5, where=tmp_path)
    folder = tmp_path / f"stage{stage}-28px-64" / "shards"
    assert (folder / "manifest.json").exists()
    assert cfg.data.kind == ("qa" if stage == 1 else "mmeb") and cfg.data.resampled
    cfg.data.workers = 0
    loader = build_loader(cfg, 0, 1, plan=plan)
    # one epoch is the benchmark's steps: 5 steps of 8 samples, in batches of the plan's
    assert len(loader) == (10 if stage == 1 else 5)
    batch = next(iter(loader))
    assert len(batch) == (4 if stage == 1 else 8)
    s = batch[0]
    assert s["kind"] == cfg.data.kind and s["__key__"].startswith("syn")
    image = s["image"] if stage == 1 else s["query"]["image"]
    assert image.size == (28, 28) and image.mode == "RGB"
    # a second call finds the shards written and does not write them again
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    bench.use_synthetic_data(cfg, plan, env, image_size=28, steps=5, where=tmp_path)
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime
