"""The compression attention mask: the explicit reference, the efficient split-attention path,
their agreement (loss and gradients, mixed image sizes, left/right padding, both families),
and the property the mask exists for — the dialogue reads the image only through C."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.collate import Collator
from pipeline.config import LoraConfig
from pipeline.masks import (build_layout, compression_attention_packed, compression_attention_rows,
                            reference_mask)
from pipeline.model import load_model
from tests.tiny_models import model_cfg, qa_samples

CIDS = torch.tensor([90, 91, 92])
PAD = 0


def _rows(layout_spec, L):
    """[(pad_left, n_x, n_d)] → input_ids, attention_mask with C = CIDS between X and D."""
    ids = torch.full((len(layout_spec), L), PAD)
    am = torch.zeros(len(layout_spec), L, dtype=torch.long)
    for b, (off, nx, nd) in enumerate(layout_spec):
        seq = list(range(10, 10 + nx)) + CIDS.tolist() + list(range(40, 40 + nd))
        ids[b, off:off + len(seq)] = torch.tensor(seq)
        am[b, off:off + len(seq)] = 1
    return ids, am


SPEC = [(0, 5, 4), (3, 2, 6), (1, 4, 1)]  # right-padded, left-padded, padded both sides
L = 14


def test_reference_mask_is_the_spec_table():
    ids, am = _rows(SPEC, L)
    allowed = reference_mask(ids, am, CIDS)[:, 0] == 0
    K = len(CIDS)
    for b, (off, nx, nd) in enumerate(SPEC):
        X = slice(off, off + nx)
        C = slice(off + nx, off + nx + K)
        D = slice(off + nx + K, off + nx + K + nd)
        a = allowed[b]
        tril = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
        assert torch.equal(a[X, X], tril(nx))                       # X: causal
        assert not a[X, C].any() and not a[X, D].any()              # X never sees C or D
        assert a[C, X].all()                                         # C sees all of X
        assert torch.equal(a[C, C], tril(K))                         # C: causal
        assert not a[C, D].any()
        assert not a[D, X].any()                                     # the dialogue never sees X
        assert a[D, C].all()                                         # ... only C
        assert torch.equal(a[D, D], tril(nd))                        # D: causal
        real = torch.zeros(L, dtype=torch.bool)
        real[off:off + nx + K + nd] = True
        assert not a[real][:, ~real].any()                           # nobody real sees padding


@pytest.mark.parametrize("form", ["rows", "packed"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_split_attention_equals_explicit_mask(hq, hkv, form):
    """Both forms of the efficient path: row-by-row SDPA (CPU) and the packed varlen layout that
    the flash-attention path uses (run here on SDPA segments, so its packing is tested on CPU)."""
    torch.manual_seed(0)
    ids, am = _rows(SPEC, L)
    B, d = len(SPEC), 8
    q = torch.randn(B, hq, L, d, requires_grad=True)
    k = torch.randn(B, hkv, L, d, requires_grad=True)
    v = torch.randn(B, hkv, L, d, requires_grad=True)
    layout = build_layout(ids, am, CIDS)
    fn = compression_attention_rows if form == "rows" else compression_attention_packed
    out = fn(q, k, v, layout, scale=d ** -0.5)                                  # [B, L, H, d]
    mask = reference_mask(ids, am, CIDS)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                                         attn_mask=mask).transpose(1, 2)
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-5)
    assert (out[~real] == 0).all()
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out[real] * w[real]).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref[real] * w[real]).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["rows", "packed"])
def test_grouped_query_attention_never_asks_sdpa_for_gqa_with_a_mask(monkeypatch, form):
    """On CUDA, SDPA runs ``enable_gqa`` only in its flash and math kernels, and flash takes no
    mask: a call with both (the dialogue's lower-right mask, Qwen's 16 query / 2 KV heads) runs
    the math kernel, an fp32 score tensor per row and layer.  Every masked call repeats K/V
    instead (the memory-efficient kernel takes it); unmasked calls keep ``enable_gqa``."""
    import pipeline.masks as masks

    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask is not None, kw.get("enable_gqa", False), q.shape[1], k.shape[1]))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(masks.F, "scaled_dot_product_attention", spy)
    ids, am = _rows(SPEC, L)
    q, k, v = torch.randn(len(SPEC), 4, L, 8), torch.randn(len(SPEC), 2, L, 8), torch.randn(len(SPEC), 2, L, 8)
    fn = compression_attention_rows if form == "rows" else compression_attention_packed
    fn(q, k, v, build_layout(ids, am, CIDS), scale=8 ** -0.5)
    assert any(masked for masked, *_ in calls), calls                      # the dialogue calls are there
    assert not any(masked and gqa for masked, gqa, *_ in calls), calls
    assert all(hq == hk for masked, _, hq, hk in calls if masked), calls  # K/V repeated per group
    if masks._SDPA_GQA:
        assert all(gqa for masked, gqa, *_ in calls if not masked), calls


def test_auto_attention_is_flash_only_for_half_precision(monkeypatch):
    """flash-attention has no fp32 kernels and transformers only warns when it loads one: ``auto``
    must pick sdpa for an fp32 model (the compression probe, an fp32 Embedder) even where
    flash-attn is installed, and an explicit flash_attention_2 with fp32 is a config error."""
    import transformers.utils

    from pipeline.model import choose_attn

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert choose_attn("auto", "efficient", "bfloat16") == "flash_attention_2"
    assert choose_attn("auto", "efficient", "float32") == "sdpa"
    assert choose_attn("auto", "reference", "bfloat16") == "sdpa"
    with pytest.raises(ValueError, match="model.dtype bfloat16 or float16"):
        choose_attn("flash_attention_2", "efficient", "float32")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert choose_attn("auto", "efficient", "bfloat16") == "sdpa"


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def full_ft(request):
    # full fine-tuning so every LM weight has a gradient to compare; checkpointing on, so the
    # layout kwarg is shown to survive the checkpointed decoder layers
    cfg = model_cfg(request.param, lora=LoraConfig(enabled=False), gradient_checkpointing=True)
    model = load_model(cfg)
    model.train()
    return model, cfg


def _loss_and_grads(model, batch, impl, inputs_embeds=None):
    model.zero_grad(set_to_none=True)
    out = model(**batch, mask_impl=impl, inputs_embeds=inputs_embeds)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_efficient_path_equals_reference(full_ft, padding_side):
    model, cfg = full_ft
    batch = Collator(model.processor, cfg, kind="qa", padding_side=padding_side)(qa_samples())
    assert batch["attention_mask"].sum(1).unique().numel() == 3       # really padded, 3 lengths
    torch.manual_seed(0)
    l_ref, g_ref = _loss_and_grads(model, batch, "reference")
    l_eff, g_eff = _loss_and_grads(model, batch, "efficient")
    torch.testing.assert_close(l_eff, l_ref, atol=1e-6, rtol=1e-5)
    assert g_ref.keys() == g_eff.keys() and len(g_ref) > 10
    for name in g_ref:
        torch.testing.assert_close(g_eff[name], g_ref[name], atol=1e-6, rtol=1e-4, msg=name)
    # the mask matters: plain causal attention over the same tokens gives another loss
    l_causal, _ = _loss_and_grads(model, batch, "causal")
    assert abs(float(l_causal) - float(l_ref)) > 1e-4


def _detach_c_kv(model, batch):
    """Forward hooks that cut the gradient through C's keys and values in every layer."""
    cmask = torch.isin(batch["input_ids"], model.compression_ids).unsqueeze(-1)

    def hook(_mod, _inp, out):
        return torch.where(cmask, out.detach(), out)

    lm = model.adapter.language_model(model.hf)
    return [getattr(layer.self_attn, n).register_forward_hook(hook) for layer in lm.layers for n in ("k_proj", "v_proj")]


@pytest.mark.parametrize("impl", ["reference", "efficient"])
def test_dialogue_reads_image_only_through_compression_tokens(full_ft, impl):
    model, cfg = full_ft
    assert cfg.stage1_loss == "answer"  # targets predicted from dialogue positions only
    batch = Collator(model.processor, cfg, kind="qa")(qa_samples())
    image_pos = batch["input_ids"] == model.hf.config.image_token_id

    def image_grad(impl_, cut):
        emb = model.embed_inputs(**batch).detach().requires_grad_(True)
        hooks = _detach_c_kv(model, batch) if cut else []
        try:
            model(**batch, mask_impl=impl_, inputs_embeds=emb).loss.backward()
        finally:
            for h in hooks:
                h.remove()
        return emb.grad[image_pos]

    assert image_grad(impl, cut=False).abs().sum() > 0          # the image matters, through C
    assert torch.count_nonzero(image_grad(impl, cut=True)) == 0  # ... and only through C: exactly zero
    # without the compression mask the same cut leaves a path from the dialogue to the image
    assert image_grad("causal", cut=True).abs().sum() > 0


def test_positions_continue_after_c_and_ignore_padding(full_ft):
    model, cfg = full_ft
    samples = qa_samples()
    pos = {}
    for side in ("right", "left"):
        b = Collator(model.processor, cfg, kind="qa", padding_side=side)(samples)
        p = model._positions(b["input_ids"], b["attention_mask"], b["mm_token_type_ids"], b["image_grid_thw"])
        pos[side] = [p[:, i, b["attention_mask"][i].bool()] for i in range(len(samples))]
        layout = build_layout(b["input_ids"], b["attention_mask"], model.compression_ids)
        for i, (s, c0, c1, e) in enumerate(layout.rows):
            assert (p[:, i, c1] == p[:, i, c1 - 1] + 1).all()            # D continues after C
            assert (p[:, i, c0 + 1:c1] - p[:, i, c0:c1 - 1] == 1).all()  # C consecutive text positions
    for a, b in zip(pos["right"], pos["left"]):
        assert torch.equal(a, b)


def test_eager_attention_backbone():
    """attn_implementation=eager: reference mask (additive, as eager wants it) and efficient path agree,
    and plain (text-only, so the vision tower's own eager/sdpa difference is out of it) embedding
    passes match the sdpa model."""
    eager = load_model(model_cfg(attn_implementation="eager"))
    sdpa = load_model(model_cfg(attn_implementation="sdpa"))
    batch = Collator(eager.processor, eager.cfg, kind="qa", padding_side="left")(qa_samples())
    with torch.no_grad():
        l_ref = eager(**batch, mask_impl="reference").loss
        l_eff = eager(**batch, mask_impl="efficient").loss
        torch.testing.assert_close(l_eff, l_ref, atol=1e-6, rtol=1e-5)
        enc = Collator(eager.processor, eager.cfg, kind="mmeb").encode([{"text": "two", "image": None},
                                                                        {"text": "a much longer text", "image": None}])
        torch.testing.assert_close(eager(**enc), sdpa(**enc), atol=1e-5, rtol=1e-4)
