"""Stage-2 engine checks in one real 2-rank ZeRO-3 run (torchrun, gloo, tiny Qwen2-VL):

1. parameters are partitioned at construction (``p.numel() == 0``, ``p.ds_numel`` > 0);
2. the embedding-cache step (chunks of 2, one coalesced reduction) gives the same gradients and
   the same parameter update as the per-rank batch of 4 in one forward, from the same init on
   the same samples (hard negatives included, symmetric loss, learnable logit scale).  Tolerance: fp32, |Δ| ≤ 1e-5 + 1e-4·|ref| on
   gradients, 1e-6 absolute on the updated weights (lr 1e-3);
3. a rank whose whole batch is text-only (no image anywhere) while the other rank has images
   completes the step: the dummy-vision guard keeps the ZeRO-3 collectives aligned;
4. a NaN loss on one rank skips the update on both ranks (weights unchanged), and
   ``train.max_bad_steps`` of them in a row stop the run with a message naming the step.

Run as a script by the test (``python -m torch.distributed.run … tests/test_engine_cache.py OUT``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import BatchSource

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_embedding_cache_equivalence_and_guards(tmp_path):
    from conftest import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(Path(__file__).resolve()), str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["partitioned"] and res["buffers_placed"], res
    assert res["new_rows_mean_err"] <= 1e-6 and res["new_rows_scale"] > 1e-4, res
    assert res["init_equal"] and res["scale_trained"]
    assert res["grad_max_err"] <= 1e-5 + 1e-4 * res["grad_max_ref"], res
    assert res["grad_max_ref"] > 1e-4  # the step did produce gradients
    assert res["update_max_err"] <= 1e-6 and res["update_max_ref"] > 1e-5, res
    assert res["text_only_ok"] and res["text_only_loss_finite"]
    assert res["nan_skipped"] and res["nan_weights_unchanged"]
    assert res["stopped"] and "2 non-finite steps in a row" in res["stopped"] and "at step 22" in res["stopped"]
    assert "last good checkpoint: none" in res["stopped"]


# ------------------------------------------------------------------------------------ worker
def _samples(rank: int, n: int, text_only: bool = False):
    import numpy as np
    from PIL import Image

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    out = []
    for i in range(n):
        j = rank * n + i
        rng = np.random.default_rng(j)
        img = Image.fromarray(rng.integers(0, 256, (56, 56 + 28 * (j % 2), 3), dtype=np.uint8))
        q = {"text": f"which digit is {words[j % 10]}?", "image": None} if text_only else \
            {"text": "<image> Represent the given image.", "image": img}
        out.append({"__key__": f"s{j}", "kind": "mmeb", "task": "t", "query": q,
                    "positive": {"text": f"the digit {words[j % 10]}", "image": None},
                    "negatives": [{"text": f"the digit {words[(j + 3) % 10]}", "image": None}], "meta": {}})
    return out


class _Fixed(BatchSource):
    """A batch source that repeats one step's chunks."""
    steps_per_epoch = 100

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        while True:
            yield self.parts


def _build(cfg, seed):
    from pipeline.engine import build
    from pipeline.runtime import seed_all

    seed_all(seed)
    return build(cfg, world_size=2, total_steps=10)


def _trainable(model):
    """Full copies of the trainable parameters (gathered from the ZeRO-3 partitions)."""
    import deepspeed

    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.detach().clone()
    return out


def _grads(model):
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters() if p.requires_grad}


def worker(out_dir: Path) -> None:
    import torch

    from pipeline import dist
    from pipeline.collate import Collator
    from pipeline.config import load_config
    from pipeline.tiny_model import make_tiny_model
    from pipeline.step import StepRunner, TrainState

    env = dist.init(timeout_s=120)
    tiny = out_dir / "tiny"
    if env.rank == 0:
        make_tiny_model(tiny, family="qwen2_vl", spare_rows=4)  # as Qwen's: no resize, rows set while partitioned
    dist.barrier()
    common = [f"--model.init={tiny}", "--model.dtype=float32", "--model.num_compression_tokens=4",
              "--model.gradient_checkpointing=false", "--model.lora.r=4", "--model.lora.alpha=8",
              "--model.lora.dropout=0.0", "--train.stage=2", "--train.global_batch_size=8",
              f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json", "--optim.lr=1e-3",
              "--optim.warmup_ratio=0", "--optim.schedule=constant", "--optim.grad_clip=1e6",
              "--loss.learnable_scale=true", "--loss.symmetric=true"]
    res = {}
    samples = _samples(env.rank, 4)

    # A: per-rank batch of 4 in one forward.
    cfg_a = load_config(None, common + ["--train.micro_batch_size=4"])
    a = _build(cfg_a, seed=7)
    # Device placement is guaranteed, not an accident of the CPU: ZeRO-3 skips module.to(device) for a
    # zero.Init model, so a buffer made elsewhere (here: on `meta`) stayed there; the engine places it.
    from pipeline.engine import build
    from pipeline.model import load_model

    def stray_buffer(mc):
        m = load_model(mc, temperature=cfg_a.loss.temperature, learnable_scale=True)
        m.compression_ids = m.compression_ids.to("meta")
        return m

    placed = build(cfg_a, world_size=2, total_steps=10, model_loader=stray_buffer)
    res["buffers_placed"] = all(b.device == placed.engine.device for b in placed.model.buffers())
    del placed
    big = [p for n, p in a.model.named_parameters() if "embed_tokens" in n and not p.requires_grad]
    res["partitioned"] = bool(big) and all(p.numel() == 0 and p.ds_numel > 0 for p in big)
    # The compression rows were set while partitioned (the engine's gather hook): each is the mean
    # of the rows that existed before, on the whole table, not only on rank 0's shard.
    import deepspeed

    w = next(p for n, p in a.model.named_parameters() if n.endswith("embed_tokens.token_adapter.base_layer.weight"))
    ids = list(a.model.processor.compression_ids)
    with deepspeed.zero.GatheredParameters([w]):
        table = w.detach().float().clone()
    res["new_rows_mean_err"] = float((table[ids] - table[:min(ids)].mean(0)).abs().max())
    res["new_rows_scale"] = float(table[:min(ids)].mean(0).abs().max())
    assert a.plan.cache_chunk is None
    col = Collator(a.model.processor, cfg_a.model, kind="mmeb")
    init_a = _trainable(a.model)
    runner = StepRunner(cfg_a, a.engine, a.plan)
    # Gradients are read between backward and step: run the step's parts by hand.
    q, k, s = a.engine(**runner._device_batch(col(samples)))
    loss = runner._loss(q, k, s)
    a.engine.backward(loss)
    grads_a = _grads(a.model)
    a.engine.step()
    after_a = _trainable(a.model)

    # B: the same samples through the embedding cache in chunks of 2.
    cfg_b = load_config(None, common + ["--train.micro_batch_size=2"])
    b = _build(cfg_b, seed=7)
    assert b.plan.cache_chunk == 2
    init_b = _trainable(b.model)
    res["init_equal"] = all(torch.equal(init_a[n], init_b[n]) for n in init_a)
    runner_b = StepRunner(cfg_b, b.engine, b.plan)
    captured = {}
    orig_step = b.engine.step

    def step_capturing_grads(*args, **kw):  # read the coalesced gradients right before the update
        captured.update(_grads(b.model))
        return orig_step(*args, **kw)

    b.engine.step = step_capturing_grads
    out = runner_b.stage2([col(samples[:2]), col(samples[2:])], TrainState())
    b.engine.step = orig_step
    assert out["applied"]
    after_b = _trainable(b.model)
    res["scale_trained"] = "logit_scale_offset" in grads_a and float(grads_a["logit_scale_offset"].abs().max()) > 0
    res["grad_err_by_param"] = {n: float((grads_a[n] - captured[n]).abs().max()) for n in grads_a}
    res["grad_max_err"] = max(float((grads_a[n] - captured[n]).abs().max()) for n in grads_a)
    res["grad_max_ref"] = max(float(grads_a[n].abs().max()) for n in grads_a)
    res["update_max_err"] = max(float((after_a[n] - after_b[n]).abs().max()) for n in after_a)
    res["update_max_ref"] = max(float((after_a[n] - init_a[n]).abs().max()) for n in after_a)

    # Text-only rank: rank 1 has no image at all in its chunks, rank 0 has images.
    mixed = _samples(env.rank, 4, text_only=env.rank == 1)
    out = runner_b.stage2([col(mixed[:2]), col(mixed[2:])], TrainState(step=1))
    res["text_only_ok"] = True
    res["text_only_loss_finite"] = bool(torch.isfinite(torch.tensor(out["loss"])))

    # NaN on rank 0 only (tests/faults.py): both ranks skip, weights unchanged.
    import faults

    faults.install(nan_steps=[5])
    before = _trainable(b.model)
    out = runner_b.stage2([col(samples[:2]), col(samples[2:])], TrainState(step=5))
    res["nan_skipped"] = not out["applied"]
    res["nan_weights_unchanged"] = all(torch.equal(before[n], v) for n, v in _trainable(b.model).items())

    # K non-finite steps in a row stop the run, on every rank, naming the step.
    from pipeline.metrics import Metrics
    from pipeline.train import Loop, TrainingStopped

    faults.install(nan_steps=[20, 21])
    cfg_b.train.max_bad_steps, cfg_b.train.log_every = 2, 1
    loop = Loop(cfg_b, b, _Fixed([col(samples[:2]), col(samples[2:])]),
                Metrics(out_dir / "metrics", enabled=env.rank == 0), None, 100, TrainState(step=20))
    loop.step()
    try:
        loop.step()
        res["stopped"] = None
    except TrainingStopped as e:
        res["stopped"] = str(e)
    if env.rank == 0:
        (out_dir / "result.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
