"""Converted public formats through the whole data path (issue 7): converter -> manifest ->
data_prep/shard.py (run by the converter's --shard) -> pipeline.data's loader -> the model's
Collator, checking counts, skipped rows, and that each image lands where its placeholder was."""
import json
from pathlib import Path

import pytest

from data_prep import from_img2dataset, from_llava, from_mmeb_train
from pipeline.prompts import IMAGE_PLACEHOLDER
from test_convert import i2d_dir, llava_dir, make_image, read_jsonl  # noqa: F401  (fixtures)

SHARD_ARGS = "--samples-per-shard 3 --workers 1"


def load(shard_dir: Path, kind: str) -> list[dict]:
    """Every decoded sample of a shard folder, in shard order, through pipeline.data."""
    from pipeline.data import open_shards

    # the evaluation setting: one rank, every sample exactly once, in shard order
    loader = open_shards(str(shard_dir), kind, batch_size=2, rank=0, world_size=1, num_workers=0,
                          shuffle=False, drop_last=False)
    samples = [s for batch in loader for s in batch]
    assert loader.metrics().get("data/corrupt_samples", 0) == 0
    return [s for s in samples if not s.get("__pad__")]


def shard_manifest(shard_dir: Path) -> dict:
    return json.loads((shard_dir / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("COMA_NO_PROGRESS", "1")  # inherited by the shard.py subprocess too


def convert_and_shard(module, args, shard_dir: Path) -> None:
    assert module.main(args + ["--shard", str(shard_dir), "--shard-args", SHARD_ARGS]) == 0


@pytest.fixture(scope="module")
def collator_for():
    """kind -> the model issue's Collator on a tiny Qwen2-VL (K = 4 compression tokens)."""
    from pipeline.collate import Collator
    from pipeline.processing import Processor
    from tiny_models import model_cfg

    cfg = model_cfg()
    proc = Processor.from_pretrained(cfg.init, cfg.num_compression_tokens)
    return lambda kind: Collator(proc, cfg, kind=kind), proc


def split_at_vision(ids: list[int], proc) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the vision span, the span's image-pad ids, and the ids after it."""
    start, end = ids.index(proc.vision_start_id), ids.index(proc.vision_end_id)
    return ids[:start], ids[start + 1:end], ids[end + 1:]


@pytest.fixture(scope="module")
def mmeb_marker_root(tmp_path_factory):
    """MMEB rows whose instruction puts the image mid-text, at the start, and on the positive."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mmeb_rt") / "MMEB-train"
    make_image(root / "images" / "VG" / "q.jpg", (250, 10, 10), size=(56, 56))
    make_image(root / "images" / "VG" / "p.png", (10, 250, 10), size=(56, 56), fmt="PNG")
    make_image(root / "images" / "VG" / "n.jpg", (10, 10, 250), size=(56, 56))
    (root / "MSCOCO").mkdir(parents=True)
    pq.write_table(pa.table({
        "qry": ["Select the portion of <|image_1|> that shows: the red square",
                "<|image_1|>\nRepresent the given image with the following question: what colour?",
                "a caption with no image"],
        "qry_image_path": ["images/VG/q.jpg", "images/VG/q.jpg", ""],
        "pos_text": ["<|image_1|>\nRepresent the given cropped image of the object", "red", "<|image_1|>"],
        "pos_image_path": ["images/VG/p.png", "", "images/VG/missing.png"],
        "neg_text": ["<|image_1|>\nRepresent the given cropped image of the object", "", ""],
        "neg_image_path": ["images/VG/n.jpg", "", ""],
    }), root / "MSCOCO" / "original-00000-of-00001.parquet")
    return root


def test_mmeb_image_lands_where_the_marker_was(mmeb_marker_root, tmp_path, collator_for):
    make_collator, proc = collator_for
    shards = tmp_path / "shards"
    convert_and_shard(from_mmeb_train, ["--input", str(mmeb_marker_root), "--output", str(tmp_path / "m.jsonl")],
                      shards)
    assert shard_manifest(shards)["samples"] == 2  # row 3's positive image is missing: skipped by the converter
    assert [s["reason"] for s in read_jsonl(str(tmp_path / "m.jsonl") + ".skipped.jsonl")] == ["missing_image"]
    samples = sorted(load(shards, "mmeb"), key=lambda s: s["__key__"])
    assert [s["__key__"] for s in samples] == ["MSCOCO-0000000", "MSCOCO-0000001"]
    s0, s1 = samples
    assert s0["task"] == "MSCOCO" and s0["kind"] == "mmeb"
    assert s0["query"]["text"] == "Select the portion of <image> that shows: the red square"
    assert s0["query"]["image"].getpixel((28, 28))[0] > 200            # the query's own image
    assert s0["positive"]["image"].getpixel((28, 28))[1] > 200         # the positive's (a PNG)
    assert len(s0["negatives"]) == 1 and s0["negatives"][0]["image"].getpixel((28, 28))[2] > 200
    assert s1["positive"] == {"text": "red", "image": None}

    batch = make_collator("mmeb")(samples)
    tok = proc.tokenizer
    q0 = batch["query"]["input_ids"][0][batch["query"]["attention_mask"][0].bool()].tolist()
    before, pads, after = split_at_vision(q0, proc)
    assert set(pads) == {proc.image_token_id} and len(pads) > 0
    assert tok.decode(before).endswith("Select the portion of")          # text before the marker ...
    assert tok.decode(after).startswith("that shows: the red square")     # ... image ... text after it
    q1 = batch["query"]["input_ids"][1][batch["query"]["attention_mask"][1].bool()].tolist()
    before, _, after = split_at_vision(q1, proc)
    assert IMAGE_PLACEHOLDER not in tok.decode(before) and "Represent" not in tok.decode(before)
    assert tok.decode(after).startswith("Represent the given image with the following question")
    # candidates: 2 positives then 1 hard negative; only the image ones hold a vision span
    cands = batch["candidates"]["input_ids"]
    assert batch["num_queries"] == 2 and cands.shape[0] == 3
    assert (cands[0] == proc.vision_start_id).sum() == 1 and (cands[1] == proc.vision_start_id).sum() == 0
    assert (cands[2] == proc.vision_start_id).sum() == 1


def test_llava_qa_roundtrip(llava_dir, tmp_path, collator_for):  # noqa: F811
    make_collator, proc = collator_for
    shards = tmp_path / "shards"
    convert_and_shard(from_llava, ["--input", str(llava_dir / "llava.json"), "--output", str(tmp_path / "qa.jsonl")],
                      shards)
    man = shard_manifest(shards)
    assert man["samples"] == 4 and man["skipped_total"] == 0
    samples = {s["__key__"]: s for s in load(shards, "qa")}
    assert set(samples) == {"a_1", "b", "a_1_dup1", "llava-7"}
    a = samples["a_1"]
    assert a["kind"] == "qa" and a["image"].mode == "RGB" and a["image"].getpixel((5, 5))[0] > 150
    assert a["conversations"] == [{"question": "What color is it?", "answer": "Red."},
                                  {"question": "Is it square?", "answer": "No, it is wide."}]
    assert a["meta"]["id"] == "a.1"

    batch = make_collator("qa")([a])
    ids = batch["input_ids"][0].tolist()
    before, pads, after = split_at_vision(ids, proc)
    # the image is X: vision span, then C right after X's closing tokens, then the dialogue
    c_start = ids.index(proc.compression_ids[0])
    assert ids.index(proc.vision_end_id) < c_start
    dialogue = proc.tokenizer.decode(ids[c_start + len(proc.compression_ids):])
    assert "What color is it?" in dialogue and "Is it square?" in dialogue
    assert IMAGE_PLACEHOLDER not in dialogue and "<image>" not in proc.tokenizer.decode(before)


def test_img2dataset_pair_roundtrip(i2d_dir, tmp_path):  # noqa: F811
    shards = tmp_path / "shards"
    convert_and_shard(from_img2dataset, ["--input", str(i2d_dir), "--output", str(tmp_path / "p.jsonl")], shards)
    assert shard_manifest(shards)["samples"] == 4
    samples = {s["__key__"]: s for s in load(shards, "pair")}
    assert {k: s["text"] for k, s in samples.items()} == {
        "000000000": "a red square", "000000001": "a green square", "000000003": "a grey square",
        "000010000": "first"}
    assert samples["000000001"]["image"].getpixel((10, 10))[1] > 150
    assert samples["000000000"]["meta"]["url"] == "http://x/000000000.jpg"
