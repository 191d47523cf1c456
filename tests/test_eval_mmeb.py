"""The MMEB v1 protocol (pipeline/mmeb.py) on a small MMEB-layout fixture generated here."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.mmeb import ALL_DATASETS, IN_DISTRIBUTION, META_TASKS, MMEBDataError, run_mmeb

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = {"red": [1, 0, 0], "crimson": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1]}


def color_encoder(items):
    """An item with an image → the image's colour; a text-only item → its first colour word."""
    out = []
    for it in items:
        if "image" in it:
            assert "<|image_1|>" not in it.get("text", ""), "MMEB marker must be normalised"
            img = Image.open(it["image"]).convert("RGB")
            out.append([c / 255 for c in img.getpixel((0, 0))])
        else:
            word = next(w for w in it["text"].split() if w in WORDS)
            out.append(WORDS[word])
    return torch.tensor(out)


def write_fixture(root):
    img_root = os.path.join(root, "eval_images")
    for ds in ("ImageNet-1K", "MSCOCO_t2i", "RefCOCO"):
        os.makedirs(os.path.join(img_root, ds), exist_ok=True)
        for name, rgb in COLORS.items():
            Image.new("RGB", (8, 8), rgb).save(os.path.join(img_root, ds, f"{name}.png"))
    inst = "<|image_1|> Represent the given image for classification"

    def cls_row(img, labels):
        return {"qry_text": inst, "qry_img_path": f"ImageNet-1K/{img}.png", "tgt_text": labels,
                "tgt_img_path": [""] * len(labels)}

    # classification, parquet in the HF snapshot layout: 3 of 4 correct (the last one a tie that
    # MMEB's argmax resolves to the first candidate).
    rows = [cls_row("red", ["red", "green", "blue"]), cls_row("green", ["blue", "green", "red"]),
            cls_row("blue", ["blue", "red", "green"]), cls_row("red", ["red", "crimson", "green"])]
    os.makedirs(os.path.join(root, "ImageNet-1K"))
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "ImageNet-1K", "test-00000-of-00001.parquet"))
    # retrieval t2i as a single JSONL file; tgt_text "" = no candidate has text: 2 of 2 correct.
    with open(os.path.join(root, "MSCOCO_t2i.jsonl"), "w") as f:
        for q, imgs in (("find a blue photo", ["blue", "red"]), ("a red one", ["red", "green", "blue"])):
            f.write(json.dumps({"qry_text": q, "qry_img_path": "", "tgt_text": "",
                                "tgt_img_path": [f"MSCOCO_t2i/{i}.png" for i in imgs]}) + "\n")
    # grounding (OOD), JSONL in a folder: query image + text, 1 of 2 correct.
    os.makedirs(os.path.join(root, "RefCOCO"))
    with open(os.path.join(root, "RefCOCO", "test.jsonl"), "w") as f:
        for q, imgs in (("red", ["red", "blue"]), ("green", ["blue", "green"])):
            f.write(json.dumps({"qry_text": "<|image_1|> Select the portion of the image", "qry_img_path":
                                f"RefCOCO/{q}.png", "tgt_text": ["", ""],
                                "tgt_img_path": [f"RefCOCO/{i}.png" for i in imgs]}) + "\n")
    # a present but broken dataset: its image is not there.
    with open(os.path.join(root, "ScienceQA.jsonl"), "w") as f:
        f.write(json.dumps({"qry_text": "<|image_1|> what?", "qry_img_path": "ScienceQA/nope.png",
                            "tgt_text": ["red"], "tgt_img_path": [""]}) + "\n")


def test_dataset_lists():
    assert len(ALL_DATASETS) == len(set(ALL_DATASETS)) == 36
    assert {m: len(d) for m, d in META_TASKS.items()} == {"classification": 10, "vqa": 10, "retrieval": 12,
                                                        "grounding": 4}
    assert len(IN_DISTRIBUTION) == 20
    assert {"ImageNet-1K", "MSCOCO", "WebQA"} <= IN_DISTRIBUTION
    assert not {"ImageNet-A", "RefCOCO", "ScienceQA", "EDIS"} & IN_DISTRIBUTION


def test_mmeb_protocol_on_fixture(tmp_path):
    root, out = tmp_path / "mmeb", tmp_path / "out"
    root.mkdir()
    write_fixture(str(root))
    logs = []
    s = run_mmeb(color_encoder, str(root), str(out), batch_size=2, progress=False, log=logs.append)
    d = s["datasets"]
    assert set(d) == {"ImageNet-1K", "MSCOCO_t2i", "RefCOCO"}
    assert d["ImageNet-1K"]["precision@1"] == pytest.approx(0.75) and d["ImageNet-1K"]["num_correct"] == 3
    assert d["MSCOCO_t2i"]["precision@1"] == 1.0
    assert d["RefCOCO"]["precision@1"] == 0.5 and d["RefCOCO"]["split"] == "OOD"
    assert list(s["failed"]) == ["ScienceQA"] and "nope.png" in s["failed"]["ScienceQA"]
    assert len(s["missing"]) == 36 - 4 and "VOC2007" in s["missing"]
    agg = s["aggregate"]
    assert agg["meta_tasks"] == {"classification": 0.75, "vqa": None, "retrieval": 1.0, "grounding": 0.5}
    assert agg["in_distribution"] == pytest.approx(0.875) and agg["out_of_distribution"] == 0.5
    assert agg["overall"] == pytest.approx(0.75) and agg["counts"]["overall"] == "3/36"
    # per-dataset files
    preds = [json.loads(x) for x in open(out / "ImageNet-1K_pred.jsonl")]
    assert [p["correct"] for p in preds] == [True, False, True, True]
    assert preds[1]["pred_text"] == "green" and preds[3]["rank"] == 0
    assert json.load(open(out / "RefCOCO_score.json"))["num_correct"] == 1
    assert json.load(open(out / "summary.json"))["aggregate"]["overall"] == pytest.approx(0.75)
    txt = (out / "summary.txt").read_text()
    assert "75.0" in txt and "missing" in txt and "FAILED ScienceQA" in txt
    assert any("MISSING" in line for line in logs)

    # Rerun: finished datasets are reused, not re-embedded (an encoder that fails proves it).
    def boom(items):
        raise AssertionError("should not embed again")

    s2 = run_mmeb(boom, str(root), str(out), datasets=["ImageNet-1K", "RefCOCO"], progress=False, log=logs.append)
    assert s2["aggregate"]["overall"] == pytest.approx((0.75 + 0.5) / 2)
    # --max-rows and --overwrite recompute
    s3 = run_mmeb(color_encoder, str(root), str(out), datasets=["ImageNet-1K"], max_rows=2, overwrite=True,
                  progress=False, log=logs.append)
    assert s3["datasets"]["ImageNet-1K"]["n"] == 2


def test_mmeb_bad_invocations(tmp_path):
    with pytest.raises(MMEBDataError, match="not a directory"):
        run_mmeb(color_encoder, str(tmp_path / "nope"), str(tmp_path / "o"), progress=False)
    with pytest.raises(MMEBDataError, match="unknown MMEB dataset"):
        run_mmeb(color_encoder, str(tmp_path), str(tmp_path / "o"), datasets=["ImageNet1K"], progress=False)
    (tmp_path / "VOC2007.jsonl").write_text('{"qry_text": "red", "tgt_text": ["red"], "tgt_img_path": [""]}\n{oops\n')
    s = run_mmeb(color_encoder, str(tmp_path), str(tmp_path / "o"), datasets=["VOC2007"], progress=False,
                 log=lambda m: None)
    assert "VOC2007.jsonl:2" in s["failed"]["VOC2007"]


def test_the_authors_instruction_apart_copy(tmp_path):
    """ziyjiang/MMEB_Test_Instruct's layout (qry_inst and tgt_inst apart, parquet per dataset):
    read, joined per dataset (pipeline.mmeb.instruct_row) and scored like the plain copy; the
    encoder sees the instruction, the text and, for image candidates, tgt_inst."""
    root, out = tmp_path / "mmeb", tmp_path / "out"
    img_root = root / "images"
    img_root.mkdir(parents=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (8, 8), rgb).save(img_root / f"{name}.png")
    cls = [{"qry_inst": "<|image_1|> Represent the given image for classification\n", "qry_text": "",
            "qry_img_path": f"{c}.png", "tgt_inst": "", "tgt_text": labels, "tgt_img_path": []}
           for c, labels in (("red", ["red", "green"]), ("green", ["blue", "green"]))]
    t2i = [{"qry_inst": "Find me an everyday image that matches the given caption:", "qry_text": q,
            "qry_img_path": "", "tgt_inst": "Represent the given image.", "tgt_text": ["", ""],
            "tgt_img_path": [f"{i}.png" for i in imgs]} for q, imgs in (("a blue one", ["blue", "red"]),
                                                                        ("a red one", ["red", "green"]))]
    for name, rows in (("ImageNet-1K", cls), ("MSCOCO_t2i", t2i)):
        (root / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / name / "test-00000-of-00001.parquet")
    seen = []

    def encoder(items):
        seen.extend(items)
        return color_encoder(items)

    s = run_mmeb(encoder, str(root), str(out), datasets=["ImageNet-1K", "MSCOCO_t2i"], progress=False,
                 log=lambda _: None)
    assert s["datasets"]["ImageNet-1K"]["precision@1"] == 0.5 and s["datasets"]["MSCOCO_t2i"]["precision@1"] == 1.0
    texts = {it.get("text") for it in seen}
    assert "<image>  Represent the given image for classification\n" in texts           # cls: unstripped
    assert "Find me an everyday image that matches the given caption: a blue one" in texts  # t2i query
    assert "<image> Represent the given image." in texts                                  # t2i image candidate
