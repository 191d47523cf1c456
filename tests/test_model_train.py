"""Training-side behaviour of the CoMa model: LoRA and full fine-tuning both learn on real
data, what is trainable, pooling under left/right padding, the dummy-vision guard, the
contrastive forward."""
import pytest
import torch

from pipeline.collate import Collator
from pipeline.config import LoraConfig
from pipeline.engine import count_parameters
from pipeline.model import Stage1Output, load_model
from tests.tiny_models import digits_qa_samples, image, model_cfg


def _train(model, batches, lr, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()


@torch.no_grad()
def _eval_loss(model, batches):
    model.eval()
    return sum(float(model(**b).loss) for b in batches) / len(batches)


@pytest.mark.parametrize("lora,lr", [(True, 1e-2), (False, 3e-3)], ids=["lora", "full"])
def test_stage1_loss_decreases_on_digits(lora, lr):
    torch.manual_seed(0)
    cfg = model_cfg(lora=LoraConfig(enabled=lora, r=8, alpha=16, dropout=0.0), gradient_checkpointing=True)
    model = load_model(cfg)
    col = Collator(model.processor, cfg, kind="qa")
    samples = digits_qa_samples(16)
    batches = [col(samples[i:i + 8]) for i in range(0, 16, 8)]
    before = _eval_loss(model, batches)
    _train(model, batches, lr, steps=10)
    after = _eval_loss(model, batches)
    print(f"stage-1 loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before, (before, after)


def test_trainable_sets():
    lora_model = load_model(model_cfg())
    names = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names)
    assert not any("visual" in n for n in names)               # frozen vision, no LoRA in the ViT
    assert any("trainable_tokens" in n for n in names)         # the K new embedding rows train
    full = load_model(model_cfg(lora=LoraConfig(enabled=False)))
    tr, tot = count_parameters(full)
    vis = sum(p.numel() for p in full.adapter.visual(full.hf).parameters())
    assert tr == tot - vis - 1                                 # everything but the ViT and the fixed scale
    unfrozen = load_model(model_cfg(lora=LoraConfig(enabled=False), freeze_vision=False))
    assert count_parameters(unfrozen)[0] == tot - 1
    frozen = load_model(model_cfg(), for_training=False)
    assert count_parameters(frozen)[0] == 0 and not frozen.training


def test_new_token_rows_get_gradient_and_move():
    model = load_model(model_cfg())
    emb = model.hf.get_input_embeddings()
    delta = [p for n, p in model.named_parameters() if "trainable_tokens" in n][0]
    assert delta.shape == (4, 64)
    out = model(**Collator(model.processor, model.cfg, kind="qa")(digits_qa_samples(2)))
    out.loss.backward()
    assert delta.grad.abs().sum() > 0
    assert isinstance(out, Stage1Output) and int(out.num_targets) > 0 and emb is not None


@pytest.fixture(scope="module")
def eval_model():
    return load_model(model_cfg(), for_training=False)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_same_under_left_and_right_padding(eval_model, pooling):
    eval_model.cfg.pooling = pooling
    try:
        items = [{"text": "a much longer text than the other one, with several words", "image": None},
                 {"text": "short <image>", "image": image(84, 56)},
                 {"text": None, "image": image(56, 56, 1)}]
        right = eval_model(**Collator(eval_model.processor, eval_model.cfg, kind="mmeb").encode(items))
        left = eval_model(**Collator(eval_model.processor, eval_model.cfg, kind="mmeb",
                                     padding_side="left").encode(items))
        alone = torch.cat([eval_model(**Collator(eval_model.processor, eval_model.cfg, kind="mmeb").encode([it]))
                           for it in items])
    finally:
        eval_model.cfg.pooling = "mean"
    assert right.dtype == torch.float32 and right.shape == (3, 64)
    torch.testing.assert_close(right.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-4)   # padding changes nothing


def test_pooling_mean_vs_last_differ(eval_model):
    b = Collator(eval_model.processor, eval_model.cfg, kind="mmeb").encode([{"text": "seven", "image": None}])
    mean = eval_model(**b)
    eval_model.cfg.pooling = "last"
    try:
        last = eval_model(**b)
    finally:
        eval_model.cfg.pooling = "mean"
    assert (mean - last).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_dummy_vision_guard_runs_vision_tower_on_text_only_batches(family):
    model = load_model(model_cfg(family, lora=LoraConfig(enabled=False), freeze_vision=False))
    calls = []
    hook = model.adapter.visual(model.hf).register_forward_hook(lambda *a: calls.append(1))
    text_only = Collator(model.processor, model.cfg, kind="mmeb").encode([{"text": "five", "image": None},
                                                                          {"text": "an odd digit", "image": None}])
    try:
        with_guard = model(**text_only)
        with_guard.sum().backward()
        assert len(calls) == 1
        # every vision parameter took part (zero gradient, not None): ZeRO-3 reduces them on every rank
        grads = [p.grad for p in model.adapter.visual(model.hf).parameters()]
        assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0 for g in grads)
        model.cfg.dummy_vision = False
        calls.clear()
        without = model(**text_only)
        assert len(calls) == 0
        torch.testing.assert_close(with_guard, without, atol=0, rtol=0)   # the dummy contributes exactly 0
    finally:
        hook.remove()
        model.cfg.dummy_vision = True


def test_contrastive_forward(eval_model):
    samples = [{"__key__": "a", "kind": "mmeb", "task": "t", "meta": {},
                "query": {"text": "<image> which digit?", "image": image(56, 56)},
                "positive": {"text": "three", "image": None},
                "negatives": [{"text": "five", "image": None}]},
               {"__key__": "b", "kind": "mmeb", "task": "t", "meta": {},
                "query": {"text": "find a one", "image": None},
                "positive": {"text": None, "image": image(56, 56, 1)}, "negatives": []}]
    q, k, scale = eval_model(**Collator(eval_model.processor, eval_model.cfg, kind="mmeb")(samples))
    assert q.shape == (2, 64) and k.shape == (3, 64) and q.dtype == k.dtype == torch.float32
    assert scale.dim() == 0 and abs(float(scale) - 1 / 0.03) < 1e-3
    # a bf16 model hands the loss bf16 embeddings (what the fused kernels are benchmarked on),
    # normalised in fp32 first; the scale stays fp32
    bf16 = load_model(model_cfg(dtype="bfloat16"), for_training=False)
    qb, kb, sb = bf16(**Collator(bf16.processor, bf16.cfg, kind="mmeb")(samples))
    assert qb.dtype == kb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert torch.allclose(qb.float().norm(dim=-1), torch.ones(2), atol=1e-2)
    learn = load_model(model_cfg(), temperature=0.05, learnable_scale=True)
    assert learn.logit_scale_offset.requires_grad and abs(float(learn.logit_scale().detach()) - 20.0) < 1e-3


@pytest.mark.parametrize("learnable", [False, True])
def test_logit_scale_is_exact_under_bf16_parameters(learnable):
    """DeepSpeed's bf16 mode casts every parameter: a bf16 log-scale rounded ln(1/0.03) = 3.5066
    to 3.5, so the forward used tau = 0.0302.  The configured tau is now exact in the forward, and a
    learnable scale moves by the fp32 master's steps near its start, not by bf16 steps of 3.5."""
    model = load_model(model_cfg(), temperature=0.03, learnable_scale=learnable).to(torch.bfloat16)
    assert float(model.logit_scale()) == float(torch.tensor(1 / 0.03, dtype=torch.float32))
    if learnable:
        with torch.no_grad():
            model.logit_scale_offset.fill_(1e-3)  # one small optimizer step, as its bf16 copy sees it
        moved = float(model.logit_scale()) / (1 / 0.03)
        assert moved != 1.0 and abs(moved - float(torch.tensor(1e-3).exp())) < 1e-5


def test_gaussian_adapter_init():
    """model.lora.init=gaussian: A ~ N(0, 1/r) as the reference code's peft config asks; B = 0."""
    from pipeline.config import LoraConfig

    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, init="gaussian")
    model = load_model(model_cfg(lora=lora))
    a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
    b = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])
    assert abs(float(a.std()) - 1 / 4) < 0.03 and float(b.abs().max()) == 0.0
    default = load_model(model_cfg(lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)))
    a0 = torch.cat([p.detach().flatten() for n, p in default.named_parameters() if "lora_A" in n])
    assert abs(float(a0.std()) - 1 / 4) > 0.05  # Kaiming uniform: a different spread


@pytest.mark.parametrize("tied", [False, True])
def test_all_embeddings_train_and_a_tied_head_follows(tied, tmp_path):
    """model.lora.trainable_embeddings=all: the whole input table trains (the reference code's
    modules_to_save), and a tied output head (Qwen2.5-VL-3B) reads the trainable copy."""
    import json
    import shutil

    from pipeline.collate import Collator
    from pipeline.config import LoraConfig
    from pipeline.embedder import Embedder
    from pipeline.export import export_model
    from tests.tiny_models import tiny_model_dir

    init = tiny_model_dir()
    if tied:
        init = tmp_path / "tied"
        shutil.copytree(tiny_model_dir(), init)
        cfg_json = json.loads((init / "config.json").read_text())
        cfg_json.setdefault("text_config", {})["tie_word_embeddings"] = True
        cfg_json["tie_word_embeddings"] = True
        (init / "config.json").write_text(json.dumps(cfg_json))
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, trainable_embeddings="all")
    cfg = model_cfg(init=str(init), lora=lora)
    model = load_model(cfg)
    table = model.hf.get_input_embeddings().modules_to_save["default"].weight
    assert table.requires_grad and table.shape[0] >= len(model.processor.tokenizer)
    head = model.adapter.lm_head(model.hf).weight
    assert (head is table) == tied
    before = table.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**Collator(model.processor, cfg, kind="qa")(digits_qa_samples(4))).loss.backward()
    opt.step()
    changed = (table.detach() - before).abs().sum(-1) > 0
    c = torch.tensor(model.processor.compression_ids)
    assert changed[c].all() and changed.sum() > len(c)  # more than the compression rows move
    out = export_model(model, tmp_path / "export")
    with torch.no_grad():
        want = model.embed(**Collator(model.processor, cfg, kind="mmeb").encode([{"text": "a seven"}]))
    torch.testing.assert_close(Embedder.from_pretrained(out).encode([{"text": "a seven"}]), want, atol=2e-5, rtol=1e-4)
