"""The FLOPs model (pipeline/flops.py) against hand-computed counts."""
import pytest
import torch

from pipeline.flops import FlopsModel, batch_shape_stats, peak_flops


def _m(**kw):
    base = dict(llm_params=1000, llm_layers=2, llm_hidden=8, vit_params=100, vit_layers=1, vit_hidden=4,
                train_llm_weights=False)
    base.update(kw)
    return FlopsModel(**base)


def test_lora_frozen_vision_counts():
    # two sequences of 10 and 6 tokens; one image of 4 patches
    f = _m().step_flops([10, 6], [4])
    llm_mm = 2 * 1000 * 16
    llm_attn = 2 * 2 * 8 * (100 + 36)
    vit = 2 * 100 * 4 + 4 * 1 * 4 * 16
    # forward everything; backward: LLM matmuls 1x (frozen base), attention 2x, vision none
    assert f == pytest.approx(llm_mm + llm_attn + vit + llm_mm + 2 * llm_attn)


def test_full_ft_counts_model_flops_only():
    """PaLM/torchtitan model FLOPs: 6·N per token under full fine-tuning plus attention; the
    embedding cache's no-grad pass and checkpoint recompute are not model FLOPs (they used to be
    counted, the former always)."""
    m = _m(train_llm_weights=True, train_vit=True)
    llm_mm, llm_attn = 2 * 1000 * 5, 2 * 2 * 8 * 25
    vit = 2 * 100 * 2 + 4 * 4 * 4
    fwd = llm_mm + llm_attn + vit
    bwd = 2 * llm_mm + 2 * llm_attn + 2 * vit
    assert m.step_flops([5], [2]) == pytest.approx(fwd + bwd)
    assert m.step_flops([5], [2]) == pytest.approx(6 * 1000 * 5 + 3 * llm_attn + 3 * vit)
    # patches and tokens are counted separately: more patches never changes the LLM term
    assert m.step_flops([5], [3]) - m.step_flops([5], [2]) == pytest.approx(3 * (2 * 100 + 4 * 4 * (9 - 4)) / 1)


def test_output_head_runs_on_target_tokens_only():
    """An untied lm_head used to be counted on every token; stage 2 never runs it and stage 1
    only at its target tokens."""
    lora, full = _m(head_params=500), _m(head_params=500, train_llm_weights=True)
    assert lora.step_flops([10], []) == _m().step_flops([10], [])                 # stage 2
    assert lora.step_flops([10], [], head_tokens=3) - lora.step_flops([10], []) == pytest.approx(2 * 2 * 500 * 3)
    assert full.step_flops([10], [], head_tokens=3) - full.step_flops([10], []) == pytest.approx(6 * 500 * 3)


def test_batch_stats_nested_and_peak():
    batch = {"query": {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                       "image_grid_thw": torch.tensor([[1, 4, 4]])},
             "positive": {"attention_mask": torch.tensor([[0, 1, 1, 1]]), "image_grid_thw": None}}
    seqs, patches = batch_shape_stats(batch)
    assert seqs == [3, 4, 3] and patches == [16]
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("cpu") is None and peak_flops("cpu", override_tflops=2.0) == 2e12


def test_from_tiny_model(tmp_path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           in_chans=3, temporal_patch_size=2),
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    fm = FlopsModel.from_model(model, train_llm_weights=True)
    n_vit = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    n_emb = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n)
    n_all = sum(p.numel() for p in model.parameters())
    n_head = sum(p.numel() for n, p in model.named_parameters() if "lm_head" in n)
    assert fm.vit_params == n_vit and fm.llm_params == n_all - n_vit - n_emb - n_head
    assert fm.head_params == 128 * 32  # vocab × hidden, whether or not the head is tied
    assert (fm.llm_layers, fm.llm_hidden, fm.vit_layers, fm.vit_hidden) == (2, 32, 1, 16)
