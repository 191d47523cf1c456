"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints built offline, for tests, benchmarks and the demo.

    from pipeline.tiny_model import make_tiny_model
    path = make_tiny_model("/tmp/tiny-qwen2vl", family="qwen2_vl")   # ~1 MB, a few seconds

The directory is a complete Hugging Face model directory, loadable by plain ``transformers``
(``Qwen2VLForConditionalGeneration.from_pretrained(path)``) and by every ``--model PATH`` of
this project:

* ``config.json`` + ``model.safetensors``: random weights (hidden 64, 2 layers, 4 heads, 2 KV
  heads, M-RoPE sections [2, 3, 3]; a 2-block ViT with 14-px patches and 2×2 merging);
* a byte-level BPE tokenizer trained here with the ``tokenizers`` library on a small built-in
  corpus, carrying Qwen's special tokens (same strings, so the ChatML formatting of the real
  checkpoints applies unchanged) and a ChatML chat template;
* ``preprocessor_config.json`` for the PIL-only ``Qwen2VLImageProcessorPil`` (no torchvision),
  with min/max pixels sized for the bundled 8×8 digit images upscaled to ~56 px: a 56×56 image
  becomes a 4×4 patch grid = 4 visual tokens after merging; max 28·28·16 (16 tokens) unless
  the caller asks for more (the compression benchmark does).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pipeline.fileio import atomic_directory

# Qwen's special tokens, in Qwen's order (ids here are small; the strings are what matter).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A ChatML template in the shape of Qwen-VL's: content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; an image part renders as the vision span.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What digit is shown in the image? The image shows the digit {d}.",
    "Is the digit even or odd? The digit {d} is {parity}.",
    "How many strokes does it have? It is written with a few strokes.",
    "Summarize the above image in a few words. A handwritten {d}.",
    "Summarize the above sentence in a few words.",
    "Represent the given image for classification. Find an image that matches the caption.",
    "a photo of the number {d}, a handwritten digit {w} on a dark background",
    "Question: what number is written here? Answer: {w}.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Retrieve the caption that best describes the picture. Select the correct answer.",
    "system\nYou are a helpful assistant. user\n{w} assistant\nThe answer is {d}.",
]
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _corpus() -> list[str]:
    lines = []
    for d, w in enumerate(_WORDS):
        for t in _CORPUS:
            lines.append(t.format(d=d, w=w, parity="even" if d % 2 == 0 else "odd"))
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE tokenizer offline and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _configs(family: str, vocab_size: int, ids: dict, layers: int = 2):
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        # 0.1 instead of 0.02: with a frozen random LM head at 0.02 the logits cannot leave the
        # uniform distribution, so LoRA-only training would barely move the loss.
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    top = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **top), Qwen2VLForConditionalGeneration
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top), Qwen2_5_VLForConditionalGeneration
    raise ValueError(f"unknown tiny model family {family!r}; use 'qwen2_vl' or 'qwen2_5_vl'")


def make_tiny_model(out_dir: str | os.PathLike, family: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl",
                    seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16,
                    layers: int = 2, spare_rows: int = 0) -> Path:
    """Write a complete tiny HF model directory to ``out_dir`` and return its path (``layers``:
    language-model layers; the demo uses 4, where stage 1 can learn to compress a digit;
    ``spare_rows``: embedding rows beyond the tokenizer, as the released Qwen checkpoints have
    (151936 rows for 151657 tokens), so that K compression tokens fit without a resize).

    Written to a temporary sibling and renamed at the end, so an interrupted build never
    leaves a half-written directory that later loads fail on in confusing ways.
    """
    import torch
    from transformers import Qwen2VLImageProcessorPil

    out = Path(out_dir).resolve()
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = ((len(tok) + spare_rows + 63) // 64) * 64  # padded to 64 rows like Qwen's
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    config, cls = _configs(family, vocab, ids, layers)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    improc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                      patch_size=14, merge_size=2, temporal_patch_size=2)

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        improc.save_pretrained(tmp)
        (tmp / "tiny_model.json").write_text(json.dumps({"family": family, "seed": seed, "layers": layers}),
                                             encoding="utf-8")
    return out


# ------------------------------------------------------------------------- random-init shapes
# Qwen2.5-VL shapes for GPU benchmarks when no weights are at hand (benchmarks/throughput.py and
# compression.py ``--random-init``): text and vision fields as in the released config.json files.
# "qwen2_5_vl_3b_4layers": the 3B's attention and MLP shapes with 4 language and 4 vision layers
# (the compression mask's cost per layer, in seconds of set-up); "small" runs the same path on a
# CPU in seconds.
_VISION_25 = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
SHAPES = {
    "qwen2_5_vl_3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2, vocab_size=151936),
                          mrope=[16, 24, 24], vision=dict(_VISION_25, out_hidden_size=2048), tie=True),
    "qwen2_5_vl_7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
                          mrope=[16, 24, 24], vision=dict(_VISION_25, out_hidden_size=3584), tie=False),
    "small": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024),
                  mrope=[4, 6, 6], vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                               window_size=112, fullatt_block_indexes=[1], out_hidden_size=128),
                  tie=False),
}
SHAPES["qwen2_5_vl_3b_4layers"] = dict(SHAPES["qwen2_5_vl_3b"],
                                       text=dict(SHAPES["qwen2_5_vl_3b"]["text"], num_hidden_layers=4),
                                       vision=dict(_VISION_25, depth=4, fullatt_block_indexes=[3], out_hidden_size=2048))


def random_init_path(shape: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`random_init_model` keeps ``shape``: ``out_dir``, or ``$TMPDIR/coma-SHAPE``."""
    import tempfile

    return Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / f"coma-{shape}"


def random_init_model(shape: str, out_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory (:func:`random_init_path`) with a ``shape``-sized Qwen2.5-VL of
    random bf16 weights, the tiny model's tokenizer and PIL image processor (token ids stay
    below the vocabulary).  Reused when it exists; written whole or not at all."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    out = random_init_path(shape, out_dir)
    if (out / "config.json").exists():
        return out
    if shape not in SHAPES:
        raise ValueError(f"random-init shape {shape!r} is not one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    with tempfile.TemporaryDirectory(prefix="coma-random-init-") as scratch, atomic_directory(out) as tmp:
        base = make_tiny_model(Path(scratch) / "base", family="qwen2_5_vl")  # tokenizer, processor, config
        cfg = AutoConfig.from_pretrained(base)
        t, v = cfg.text_config, cfg.vision_config
        for k, val in spec["text"].items():
            setattr(t, k, val)
        t.layer_types = ["full_attention"] * t.num_hidden_layers
        t.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": spec["mrope"]}
        for k, val in spec["vision"].items():
            setattr(v, k, val)
        cfg.tie_word_embeddings = t.tie_word_embeddings = spec["tie"]
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16: a 7B fp32 copy would need 30 GB of RAM
        # Initialised on the GPU when there is one: drawing 3-7 B random numbers on the CPU takes a
        # good part of the GPU session's train-phase budget, on the GPU a second.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        try:
            with device:
                model = Qwen2_5_VLForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(old)
        model.save_pretrained(tmp)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the engine loads its own partitioned copy next
        for f in base.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json") and f.is_file():
                shutil.copy(f, tmp / f.name)
    return out
