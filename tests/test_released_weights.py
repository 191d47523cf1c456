"""The authors' released CoMa checkpoints (404-not-founds/CoMa-3B, -7B) load as published — their
tokenizer's <|ctoken_pad_i|> compression tokens, no coma.json — and embed as their evaluation
does: the official input format, the last compression token's state (their eval.sh's
--pooling eos), their evaluation's image bounds; mean pooling (their training's) on request.
Tested on a tiny model saved in that layout."""
import shutil

import pytest
import torch
from PIL import Image

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


def test_their_instruction_apart_eval_copy_joins_as_their_parsers(released, tmp_path):
    """Rows of ziyjiang/MMEB_Test_Instruct (qry_inst apart from qry_text, tgt_inst apart from
    tgt_text) become, token for token, the strings the authors' five eval parsers build
    (CoMa src/data/eval_dataset/image_{cls,qa,i2t,t2i,i2i_vg}*.py over processor.py's
    process_input_text; the parser per dataset from VLM2Vec experiments/public/eval/image.yaml).
    The instructions carry the whitespace quirks their code treats differently (strip or not)."""
    from pipeline.mmeb import INSTRUCT_PARSER, parse_row

    image(56, 56).save(tmp_path / "q.png")
    image(56, 84).save(tmp_path / "t.png")
    rows = {  # dataset -> row
        "ImageNet-1K": {"qry_inst": "<|image_1|> Represent the given image for classification\n", "qry_text": "",
                        "qry_img_path": "q.png", "tgt_inst": "", "tgt_text": ["tench", "goldfish"], "tgt_img_path": []},
        "OK-VQA": {"qry_inst": "<|image_1|>\n Represent the given image with the following question: ",
                   "qry_text": "What is it?", "qry_img_path": "q.png", "tgt_inst": "", "tgt_text": ["a cat", "a dog"],
                   "tgt_img_path": []},
        "MSCOCO_i2t": {"qry_inst": "<|image_1|> Find an image caption describing the given everyday image.",
                       "qry_text": "", "qry_img_path": "q.png", "tgt_inst": "", "tgt_text": ["A cat.", "A dog."],
                       "tgt_img_path": []},
        "VisDial": {"qry_inst": "Represent the given dialogue about an image, which is used for image retrieval:",
                    "qry_text": "Q: what is it A: a cat", "qry_img_path": "",
                    "tgt_inst": "Represent the given image.", "tgt_text": ["", ""], "tgt_img_path": ["t.png", "q.png"]},
        "WebQA": {"qry_inst": "Find a Wikipedia image that answers this question:", "qry_text": "Where is it?",
                  "qry_img_path": "", "tgt_inst": "Represent the given Wikipedia image with related text information:",
                  "tgt_text": ["Paris", "Rome"], "tgt_img_path": ["t.png", "q.png"]},
        "CIRR": {"qry_inst": "<|image_1|> Given an image, find a similar everyday image with the following modification:",
                 "qry_text": "make it red", "qry_img_path": "q.png", "tgt_inst": "Represent the given image.",
                 "tgt_text": ["", ""], "tgt_img_path": ["t.png", "q.png"]},
    }
    assert {INSTRUCT_PARSER[d] for d in rows} == {"cls", "qa", "i2t", "t2i", "i2i_vg"}
    I = "<|image_1|>"  # noqa: E741 - their image token, replaced by the vision span below
    theirs = {  # their code's concatenations, written out: (query, first two candidates); cls and i2t
        # keep the instruction's own leading space after the marker is removed: two spaces
        "ImageNet-1K": (I + "  Represent the given image for classification\n" + "\n", ["tench", "goldfish"]),
        "OK-VQA": (I + "\nRepresent the given image with the following question: What is it?" + "\n", ["a cat", "a dog"]),
        "MSCOCO_i2t": (I + "  Find an image caption describing the given everyday image." + "\n", ["A cat.", "A dog."]),
        "VisDial": ("Represent the given dialogue about an image, which is used for image retrieval: "
                    "Q: what is it A: a cat\n\n", [I + " Represent the given image.\n"] * 2),
        "WebQA": ("Find a Wikipedia image that answers this question: Where is it?\n",
                  [I + " Represent the given Wikipedia image with related text information: Paris\n",
                   I + " Represent the given Wikipedia image with related text information: Rome\n"]),
        "CIRR": (I + "\nGiven an image, find a similar everyday image with the following modification: make it red\n",
                 [I + " Represent the given image."] * 2),  # i2i_vg: no newline without a caption
    }
    emb = Embedder.from_pretrained(released)
    col, tok = emb.collator, emb.model.processor.tokenizer
    c = "".join(RELEASED_COMPRESSION_TOKEN.format(i=i) for i in range(K))
    for name, row in rows.items():
        q, cands = parse_row(f"{name}.parquet", 1, row, str(tmp_path), name)
        for item, want in zip([q] + cands, [theirs[name][0]] + theirs[name][1]):
            item = dict(item, image=Image.open(item["image"]).convert("RGB")) if "image" in item else item
            batch = col.encode([item])
            if "image" in item:
                n = int(batch["image_grid_thw"][0].prod() // 4)
                want = want.replace(I, "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>")
            got = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
            assert got == tok(want + c, add_special_tokens=False)["input_ids"], (name, item.get("role"), want)
    with pytest.raises(Exception, match="needs its MMEB dataset name"):
        parse_row("x.parquet", 1, rows["CIRR"], str(tmp_path))
