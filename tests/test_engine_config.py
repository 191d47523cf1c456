"""DeepSpeed config filling from the run config, and the presets in launch/configs."""
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.engine import build_ds_config, plan_batches

REPO = Path(__file__).resolve().parent.parent


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_stage1_batch_fields_filled():
    cfg = _cfg("--train.global_batch_size=256", "--train.micro_batch_size=8",
               f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json")
    ds = build_ds_config(cfg, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (256, 8, 4)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in ds
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=8"):
        build_ds_config(_cfg("--train.global_batch_size=96", "--train.micro_batch_size=8",
                             f"--train.ds_config={REPO}/ds_configs/zero3_bf16.json"), world_size=8)
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        plan_batches(cfg, 3)


def test_stage2_plan_uses_cache_not_accumulation():
    cfg = _cfg("--train.stage=2", "--train.global_batch_size=1024", "--train.micro_batch_size=16")
    p = plan_batches(cfg, 8)
    assert (p.per_rank, p.micro, p.accumulation, p.cache_chunk) == (128, 128, 1, 16)
    p = plan_batches(_cfg("--train.stage=2", "--train.global_batch_size=16", "--train.micro_batch_size=8"), 2)
    assert p.cache_chunk is None and p.micro == 8
    p = plan_batches(_cfg("--train.stage=2", "--train.global_batch_size=16", "--train.micro_batch_size=8",
                          "--train.embedding_cache_chunk=3"), 2)
    assert p.cache_chunk == 3


def test_explicit_mismatch_names_both_values(tmp_path):
    ds = json.loads((REPO / "ds_configs/zero2_bf16.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    cfg = _cfg("--train.global_batch_size=64", "--train.micro_batch_size=8", "--model.dtype=float32")
    with pytest.raises(ConfigError, match=r"'train_micro_batch_size_per_gpu' is 4 but .* gives 8"):
        build_ds_config(cfg, 2, ds)
    ds["train_micro_batch_size_per_gpu"] = 8  # agreeing explicit values are fine
    out = build_ds_config(cfg, 2, ds)
    assert out["gradient_accumulation_steps"] == 4 and out["bf16"]["enabled"] is False
    ds2 = dict(ds, bf16={"enabled": True})
    with pytest.raises(ConfigError, match=r"bf16\.enabled.*model\.dtype=float32"):
        build_ds_config(cfg, 2, ds2)
    with pytest.raises(ConfigError, match="optim.name=cpu_adam"):
        build_ds_config(_cfg("--train.global_batch_size=64", "--train.micro_batch_size=8",
                             f"--train.ds_config={REPO}/ds_configs/zero3_bf16_offload.json"), 2)
    fused = build_ds_config(_cfg("--train.global_batch_size=64", "--train.micro_batch_size=8",
                                 "--optim.name=fused_adam", "--optim.lr=1e-4"), 2, ds)
    assert fused["optimizer"]["type"] == "AdamW" and fused["optimizer"]["params"]["lr"] == 1e-4
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3},\n "x": }')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON \(line 2"):
        build_ds_config(_cfg(f"--train.ds_config={bad}"), 1)
    with pytest.raises(ConfigError, match="train.ds_config=.*nope.json: file not found"):
        build_ds_config(_cfg("--train.ds_config=nope.json"), 1)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "launch/configs").glob("*.yaml")))
def test_presets_load_and_fill(preset):
    cfg = load_config(REPO / "launch/configs" / preset)
    cfg.train.ds_config = str(REPO / cfg.train.ds_config)
    world = 2 if "tiny" in preset else 8
    ds = build_ds_config(cfg, world)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world


def test_paper_presets():
    s1 = load_config(REPO / "launch/configs/stage1_qwen2_5_vl_3b.yaml")
    s2 = load_config(REPO / "launch/configs/stage2_qwen2_5_vl_3b.yaml")
    for c in (s1, s2):
        assert (c.model.lora.r, c.model.lora.alpha, c.model.lora.dropout) == (16, 64, 0.1)
        assert (c.optim.lr, c.optim.schedule, c.optim.warmup_ratio) == (5e-5, "cosine", 0.05)
        assert c.model.num_compression_tokens == 32
        assert (c.model.min_pixels, c.model.max_pixels) == (28 * 28 * 256, 28 * 28 * 1024)  # 256..1024 tokens
    assert (s1.train.stage, s1.train.epochs, s1.train.global_batch_size) == (1, 1, 256)
    assert (s2.train.stage, s2.train.max_steps, s2.train.global_batch_size) == (2, 1500, 1024)
    assert s2.loss.temperature == 0.03 and s2.data.task_batch_size == 64
    full = load_config(REPO / "launch/configs/stage1_qwen2_5_vl_7b_fullft.yaml")
    assert full.model.lora.enabled is False and full.model.init.endswith("7B-Instruct")
    # what the authors' code does (docs/fidelity.md), in both stages and both sizes
    for c in (s1, s2, load_config(REPO / "launch/configs/stage1_qwen2_5_vl_7b.yaml"),
              load_config(REPO / "launch/configs/stage2_qwen2_5_vl_7b.yaml")):
        lc = c.model.lora
        assert (lc.use_dora, lc.init, lc.trainable_embeddings, c.model.prompt_format) == (
            True, "gaussian", "all", "official")
    assert (s1.model.mask_impl, s1.model.stage1_loss) == ("causal", "all")
    assert (s2.data.task_sampling, s2.data.batch_composition, s2.loss.hard_negatives) == ("uniform", "shared", False)
    assert len(s2.data.sources) == 20 and s2.model.pooling == "mean"
    # the paper's text where it differs: the compression mask and the answer-only loss
    for size in ("3b", "7b"):
        alt = load_config(REPO / f"launch/configs/stage1_qwen2_5_vl_{size}_paper_mask.yaml")
        assert (alt.model.mask_impl, alt.model.stage1_loss) == ("efficient", "answer")
        assert alt.model.lora.use_dora and alt.model.prompt_format == "official"


def test_parameters_made_outside_zero_init_take_the_engine_dtype():
    """DeepSpeed's bf16 ZeRO-3 trains one flat buffer of bf16 partitions (fp32 master weights in the
    optimizer); parameters made after zero.Init (peft's fp32 adapters, the logit-scale offset) are
    cast to it, partitioned ones are left alone, and an fp32 engine casts nothing.  The 2-process
    build of the real preset: tests/test_gpu_session.py::test_train_phase_runs_on_cpu_with_the_small_shape."""
    import torch

    from pipeline.engine import cast_to_engine_dtype, engine_dtype

    def model():
        m = torch.nn.Module()
        m.adapter = torch.nn.Linear(3, 2)                                     # fp32, as peft makes it
        m.logit_scale_offset = torch.nn.Parameter(torch.zeros(1))
        m.partitioned = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
        m.partitioned.ds_id = 0                                              # what zero.Init marks
        m.steps = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        return m

    bf16 = {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    fp32 = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert engine_dtype(bf16) == torch.bfloat16 and engine_dtype(fp32) == torch.float32
    assert engine_dtype({"fp16": {"enabled": True}}) == torch.float16
    m = model()
    assert sorted(cast_to_engine_dtype(m, bf16)) == ["adapter.bias", "adapter.weight", "logit_scale_offset"]
    assert m.adapter.weight.dtype == m.logit_scale_offset.dtype == torch.bfloat16
    assert float(m.logit_scale_offset) == 0.0                                # τ stays exactly the configured one
    assert m.partitioned.dtype == torch.bfloat16 and m.steps.dtype == torch.int64
    assert cast_to_engine_dtype(model(), fp32) == []
