"""The smoke subset (`pytest -m smoke`), which .ci/run also runs in a venv of the newest upstream
releases: every module imports, and the whole path runs once — shards, one stage-1 step and one
stage-2 step on 2 CPU ranks, export, ``Embedder.encode``.  Run from a folder outside the
repository, with the presets as published, the way a user's cluster job runs them."""
import importlib
import math
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
from datagen import dataset

pytestmark = pytest.mark.smoke


def test_every_module_imports():
    import coma_kernels
    import data_prep
    import pipeline

    names = [m.name for pkg in (pipeline, coma_kernels, data_prep)
             for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    assert len(names) > 30, names
    for name in names:
        importlib.import_module(name)


def _run(cmd, cwd):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


@pytest.mark.slow
def test_stage1_step_stage2_step_export_encode(tmp_path):
    from pipeline import Embedder
    from pipeline.tiny_model import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny", family="qwen2_vl")
    for kind in ("qa", "mmeb"):
        manifest = dataset(tmp_path / kind, kind, 32)
        _run([sys.executable, str(REPO / "data_prep/shard.py"), "--input", str(manifest), "--output",
              str(tmp_path / kind / "shards"), "--kind", kind, "--samples-per-shard", "16", "--workers", "1"],
             cwd=tmp_path)
    common = [f"--train.run_root={tmp_path / 'runs'}", "--train.max_steps=1", "--train.log_every=1",
              "--train.dist_timeout_s=120"]
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    _run(deepspeed + [str(REPO / "launch/stage1.py"), "--config", str(REPO / "launch/configs/stage1_tiny.yaml"),
                      f"--model.init={tiny}", f"--data.sources=[{{shards: '{tmp_path / 'qa/shards'}'}}]", *common],
         cwd=tmp_path)
    stage1 = tmp_path / "runs/stage1_tiny/export"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    _run(torchrun + [str(REPO / "launch/stage2.py"), "--config", str(REPO / "launch/configs/stage2_tiny.yaml"),
                     f"--model.init={stage1}", f"--data.sources=[{{shards: '{tmp_path / 'mmeb/shards'}'}}]",
                     "--data.task_batch_size=null", *common], cwd=tmp_path)

    emb = Embedder.from_pretrained(tmp_path / "runs/stage2_tiny/export")
    from PIL import Image

    image = Image.open(next((tmp_path / "qa/images").iterdir())).convert("RGB")
    v = emb.encode([{"text": "a handwritten seven"}, {"image": image}, {"text": "<image> this", "image": image}])
    assert v.shape == (3, 64)
    assert all(math.isclose(float(n), 1.0, rel_tol=1e-4) for n in v.norm(dim=-1))
