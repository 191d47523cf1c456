"""The tiny offline checkpoints: complete HF directories, Qwen special tokens, PIL processor."""
import json

import pytest

from tests.tiny_models import tiny_model_dir


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tiny_model_is_a_complete_hf_directory(family):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from pipeline.tiny_model import QWEN_SPECIAL_TOKENS

    path = tiny_model_dir(family)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == family
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = AutoTokenizer.from_pretrained(path)
    for t in QWEN_SPECIAL_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t                                   # one token each, never split
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert tok.decode(tok("What digit is shown?")["input_ids"]) == "What digit is shown?"
    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    from PIL import Image

    out = ip(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]          # 56 px digit → 4 visual tokens
    assert json.loads((path / "tiny_model.json").read_text())["family"] == family


def test_make_tiny_model_cli(tmp_path):
    from launch.make_tiny_model import main

    main(["--out", str(tmp_path / "m"), "--family", "qwen2_5_vl", "--max-pixels", str(28 * 28 * 64)])
    pre = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert pre["size"]["longest_edge"] == 28 * 28 * 64
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--family", "llava"])
    main(["--out", str(tmp_path / "l4"), "--layers", "4"])  # the demo's model
    cfg = json.loads((tmp_path / "l4" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4
