"""Export round trip: a trained LoRA (or full) model → HF directory that plain transformers and
pipeline.Embedder both load, with the same embeddings as the in-memory model."""
import json

import pytest
import torch

from pipeline.collate import Collator
from pipeline.config import LoraConfig
from pipeline.embedder import Embedder
from pipeline.export import export_model, read_meta
from pipeline.model import load_model
from tests.tiny_models import digits_qa_samples, image, model_cfg

ITEMS = [{"text": "What digit is this? <image>", "image": image(56, 56, 0)},
         {"text": "seven", "image": None},
         {"text": None, "image": image(84, 56, 1)}]


def _trained(cfg, steps=3):
    torch.manual_seed(0)
    model = load_model(cfg)
    # a few real steps so LoRA B, the new token rows and the logit scale are all non-trivial
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = Collator(model.processor, cfg, kind="qa")(digits_qa_samples(4))
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.mark.parametrize("family,lora", [("qwen2_vl", True), ("qwen2_5_vl", True), ("qwen2_vl", False)],
                         ids=["qwen2_vl-lora", "qwen2_5_vl-lora", "qwen2_vl-full"])
def test_export_round_trip(tmp_path, family, lora):
    # the full-fine-tuning case also caps text (the first item's question is cut): Embedder must
    # rebuild the same cut inputs from coma.json
    cfg = model_cfg(family, lora=LoraConfig(enabled=lora, r=4, alpha=8, use_dora=lora and family == "qwen2_5_vl",
                                            dropout=0.0), pooling="mean", max_text_tokens=None if lora else 2)
    model = _trained(cfg)
    with torch.no_grad():
        expected = model(**Collator(model.processor, cfg, kind="mmeb").encode(ITEMS))
    out = export_model(model, tmp_path / "export")
    meta = read_meta(out)
    assert meta["num_compression_tokens"] == 4 and meta["compression_tokens"][0] == "<|cmp_0|>"
    assert meta["family"] == family and abs(meta["logit_scale"] - 1 / 0.03) < 1e-3
    assert meta["max_text_tokens"] == cfg.max_text_tokens

    emb = Embedder.from_pretrained(out, device="cpu")
    got = emb.encode(ITEMS, batch_size=2)
    assert got.dtype == torch.float32 and got.shape == (3, 64)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    # plain transformers loads it: no peft, no project code, same config class
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(out)
    assert type(plain) is type(model.hf)
    assert not any("lora" in k for k in plain.state_dict())
    assert json.loads((out / "config.json").read_text())["model_type"] == family


def test_export_from_a_gathered_state_dict(tmp_path):
    """The ZeRO-3 route: the engine hands over weights it gathered (here: a CPU copy); the export
    must not depend on the live parameters."""
    cfg = model_cfg()
    model = _trained(cfg, steps=2)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**Collator(model.processor, cfg, kind="mmeb").encode(ITEMS))
        for p in model.parameters():   # wreck the live weights: only `sd` may be used
            p.zero_()
    out = export_model(model, tmp_path / "e", state_dict=sd)
    torch.testing.assert_close(Embedder.from_pretrained(out).encode(ITEMS), expected, atol=2e-5, rtol=1e-4)
    # while the engine's HfDeepSpeedConfig (ZeRO-3) is alive, rank 0 exports alone: nothing in
    # the export may partition or broadcast (no process group exists here, so a collective fails)
    from transformers.integrations import HfDeepSpeedConfig

    ds = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert ds.is_zero3()
    out3 = export_model(model, tmp_path / "e3", state_dict=sd)
    del ds
    torch.testing.assert_close(Embedder.from_pretrained(out3).encode(ITEMS), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="backbone"):
        export_model(model, tmp_path / "bad", state_dict={"x": torch.zeros(1)})


def test_embedder_paths_instruction_and_errors(tmp_path):
    cfg = model_cfg()
    model = load_model(cfg, for_training=False)
    out = export_model(model, tmp_path / "e")
    emb = Embedder.from_pretrained(out)
    p = tmp_path / "digit.png"
    ITEMS[0]["image"].save(p)
    a = emb.encode([{"text": "What digit is this? <image>", "image": str(p)}])
    b = emb.encode(ITEMS[:1])
    torch.testing.assert_close(a, b)
    c = emb.encode(ITEMS[:1], instruction="Represent the image for retrieval.")
    assert (a - c).abs().max() > 1e-4
    # an export is a valid model.init for the next stage: the tokens are found, not re-added
    again = load_model(model_cfg(init=str(out)))
    assert again.processor.added_tokens == 0 and again.processor.compression_ids == model.processor.compression_ids
    assert emb.encode([]).shape == (0, 64)
    with pytest.raises(FileNotFoundError, match="neither an exported CoMa model"):
        Embedder.from_pretrained(tmp_path)


def test_embedder_on_a_base_model_is_the_untrained_baseline(tmp_path):
    """A plain HF VLM directory (make_tiny_model's output) embeds as an untrained CoMa model:
    K fresh compression tokens, exactly what exporting the untrained model first would give."""
    from tests.tiny_models import tiny_model_dir

    base = tiny_model_dir()
    meta = read_meta(base)
    assert meta["untrained"] and meta["pooling"] == "mean"
    cfg = model_cfg(init=str(base), num_compression_tokens=meta["num_compression_tokens"], lora=LoraConfig(enabled=False))
    exported = export_model(load_model(cfg, for_training=False), tmp_path / "untrained")
    torch.testing.assert_close(Embedder.from_pretrained(base).encode(ITEMS),
                               Embedder.from_pretrained(exported).encode(ITEMS))


def test_every_path_converts_images_alike(tmp_path):
    """Training (pipeline.data), shard re-encoding (--max-image-side) and the Embedder convert a
    transparent or 16-bit image the same way (pipeline/imaging.py): convert("RGB") made a black
    glyph on a transparent background all black and clipped 16-bit greyscale to white."""
    import numpy as np
    from PIL import Image

    from data_prep import shard
    from pipeline.data import open_shards
    from pipeline.embedder import Embedder
    from pipeline.imaging import to_rgb

    glyph = np.zeros((32, 32, 4), np.uint8)
    glyph[8:24, 8:24, 3] = 255  # opaque black square on transparent black
    Image.fromarray(glyph, "RGBA").save(tmp_path / "glyph.png")
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # uint16: mode I;16

    rgb = np.asarray(Embedder._load_image(str(tmp_path / "glyph.png")))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[16, 16].tolist() == [0, 0, 0]
    assert np.array_equal(rgb, np.asarray(to_rgb(Image.open(tmp_path / "glyph.png"))))
    grey = np.asarray(Embedder._load_image(str(tmp_path / "deep.png")))[..., 0]
    assert 100 < grey.mean() < 160  # 16-bit scaled to 8 bits, not clipped to 255

    (tmp_path / "m.jsonl").write_text('{"image": "deep.png", "text": "a ramp"}\n'
                                      '{"image": "glyph.png", "text": "a square"}\n')
    assert shard.main(["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"), "--workers", "1",
                       "--max-image-side", "16"]) == 0
    (batch,) = open_shards(str(tmp_path / "out"), kind="pair", batch_size=2, rank=0, world_size=1, num_workers=0,
                            shuffle=False, drop_last=False)
    ramp, square = (np.asarray(s["image"], dtype=float) for s in batch)
    assert 100 < ramp.mean() < 160 and square[0, 0].min() > 240 and square[8, 8].max() < 40


def test_export_keeps_the_prompt_format(tmp_path):
    """An export trained on the official format embeds with it (coma.json's prompt_format)."""
    cfg = model_cfg(prompt_format="official", lora=LoraConfig(enabled=False))
    model = load_model(cfg, for_training=False)
    out = export_model(model, tmp_path / "official")
    assert read_meta(out)["prompt_format"] == "official"
    with torch.no_grad():
        expected = model.embed(**Collator(model.processor, cfg, kind="mmeb").encode(ITEMS))
    torch.testing.assert_close(Embedder.from_pretrained(out).encode(ITEMS), expected, atol=2e-5, rtol=1e-4)
