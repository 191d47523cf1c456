"""The authors' released CoMa checkpoints (404-not-founds/CoMa-3B, -7B) load as published — their
tokenizer's <|ctoken_pad_i|> compression tokens, no coma.json — and embed as their evaluation
does: the official input format, the last compression token's state (their eval.sh's
--pooling eos), their evaluation's image bounds; mean pooling (their training's) on request.
Tested on a tiny model saved in that layout."""
import shutil

import pytest
import torch

from pipeline.collate import Collator
from pipeline.config import LoraConfig
from pipeline.embedder import Embedder
from pipeline.export import RELEASED_EVAL_PIXELS, read_meta
from pipeline.model import load_model
from pipeline.processing import RELEASED_COMPRESSION_TOKEN
from tests.tiny_models import image, model_cfg, tiny_model_dir

K = 4


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny Qwen2-VL in the released layout: compression tokens named as theirs, inside the
    embedding rows (no resize at load), no coma.json."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    out = tmp_path_factory.mktemp("released") / "CoMa-tiny"
    shutil.copytree(tiny_model_dir(), out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens([RELEASED_COMPRESSION_TOKEN.format(i=i) for i in range(K)], special_tokens=True)
    tok.save_pretrained(out)
    hf = AutoModelForImageTextToText.from_pretrained(out)
    if hf.get_input_embeddings().weight.shape[0] < len(tok):
        hf.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    hf.save_pretrained(out)
    return out


QUERY = "\nRepresent the given image with the following question: What is it?"
ITEMS = [{"text": "<image>" + QUERY, "image": image(56, 56), "role": "query"},
         {"text": "A handwritten seven", "image": None, "role": "candidate"},
         {"text": "A handwritten seven", "image": None, "role": "query"}]


def test_released_layout_is_read_as_published(released):
    meta = read_meta(released)
    assert meta["released"] and meta["num_compression_tokens"] == K
    assert (meta["pooling"], meta["prompt_format"]) == ("last", "official_eval")
    assert (meta["min_pixels"], meta["max_pixels"]) == RELEASED_EVAL_PIXELS
    emb = Embedder.from_pretrained(released)
    proc = emb.model.processor
    assert proc.added_tokens == 0  # their tokens are found, none added
    assert proc.tokenizer.convert_ids_to_tokens(proc.compression_ids) == [
        RELEASED_COMPRESSION_TOKEN.format(i=i) for i in range(K)]


def test_released_weights_embed_as_their_evaluation(released):
    emb = Embedder.from_pretrained(released)
    got = emb.encode(ITEMS)
    # by hand: their input string (C = their tokens, appended), the last position's state, L2-normalised
    cfg = model_cfg(init=str(released), num_compression_tokens=K, pooling="last", prompt_format="official_eval",
                    min_pixels=RELEASED_EVAL_PIXELS[0], max_pixels=RELEASED_EVAL_PIXELS[1],
                    lora=LoraConfig(enabled=False))
    model = load_model(cfg, for_training=False)
    batch = Collator(model.processor, cfg, kind="mmeb").encode(ITEMS)
    # their strings (src/data/eval_dataset/image_qa_dataset.py:17-20, processor.py:367-385): a
    # query ends with "\n" before C, a text candidate is its raw text + C
    c = "".join(RELEASED_COMPRESSION_TOKEN.format(i=i) for i in range(K))
    span = "<|vision_start|>" + "<|image_pad|>" * int(batch["image_grid_thw"][0].prod() // 4) + "<|vision_end|>"
    tok = model.processor.tokenizer
    for row, theirs in enumerate([span + QUERY + "\n" + c, "A handwritten seven" + c, "A handwritten seven\n" + c]):
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == \
            tok(theirs, add_special_tokens=False)["input_ids"], row
    with torch.no_grad():
        am = batch["attention_mask"]
        hidden = model._decode(model.embed_inputs(**batch), model._positions(
            batch["input_ids"], am, batch["mm_token_type_ids"], batch["image_grid_thw"]), am).float()
        last = am.sum(1) - 1  # right padding: the last real token is the last compression token
        want = torch.nn.functional.normalize(hidden[torch.arange(len(ITEMS)), last], dim=-1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # their training pooled the mean of C: offered, and different
    mean = Embedder.from_pretrained(released, pooling="mean").encode(ITEMS)
    assert mean.shape == got.shape and float((mean - got).abs().max()) > 1e-3
