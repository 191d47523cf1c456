"""Converters from public formats to shard.py manifests (issue 7): a small fixture per format is
built here, converted, and the records, counts, skipped rows and their locations are checked."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from data_prep import from_folder, from_img2dataset, from_llava, from_mmeb_train
from pipeline.prompts import IMAGE_PLACEHOLDER


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Progress bars off (they go to stderr whenever COMA_NO_PROGRESS is unset), so the tests
    that expect exactly one error line on stderr see only that."""
    monkeypatch.setenv("COMA_NO_PROGRESS", "1")


def make_image(path: Path, color=(200, 30, 30), size=(24, 16), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def jpeg_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="JPEG")
    return buf.getvalue()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def skipped(manifest) -> list[dict]:
    return read_jsonl(str(manifest) + ".skipped.jsonl")


# ------------------------------------------------------------------------------------ LLaVA
LLAVA_RECORDS = [
    {"id": "a.1", "image": "imgs/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is it square?"}, {"from": "gpt", "value": "No, it is wide."}]},
    {"id": "b", "image": "imgs/b.png", "conversations": [
        {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A green block."}]},
    {"id": "c", "image": "imgs/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "human", "value": "Q2"}]},
    {"id": "d", "image": "imgs/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}]},
    {"id": "e", "image": "imgs/nope.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
    {"id": "f", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "a.1", "image": "imgs/b.png", "conversations": [
        {"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A block."}]},
    # the spelling of the reference code's QA-generation output (auto_a.py)
    {"image": "imgs/a.jpg", "message": [
        {"from": "user", "content": "<image>How many objects?"}, {"from": "assistant", "content": "One."}]},
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    make_image(d / "imgs" / "a.jpg", (220, 20, 20))
    make_image(d / "imgs" / "b.png", (20, 200, 20), fmt="PNG")
    (d / "llava.json").write_text(json.dumps(LLAVA_RECORDS))
    lines = [json.dumps(r) for r in LLAVA_RECORDS[:2]] + ['{"id": "broken", "image": '] + [json.dumps(LLAVA_RECORDS[2])]
    (d / "llava.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_llava_json_to_qa(llava_dir, tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    rc = from_llava.main(["--input", str(llava_dir / "llava.json"), "--output", str(out)])
    assert rc == 0
    recs = read_jsonl(out)
    assert [r["key"] for r in recs] == ["a_1", "b", "a_1_dup1", "llava-7"]
    a = recs[0]
    assert a["image"] == str(llava_dir / "imgs" / "a.jpg") and Path(a["image"]).is_absolute()
    # human -> question, gpt -> answer; the marker is gone from the dialogue (the image is X)
    assert a["conversations"] == [{"question": "What color is it?", "answer": "Red."},
                                  {"question": "Is it square?", "answer": "No, it is wide."}]
    assert recs[1]["conversations"] == [{"question": "Describe it.", "answer": "A green block."}]
    assert recs[3]["conversations"] == [{"question": "How many objects?", "answer": "One."}]
    assert all(IMAGE_PLACEHOLDER not in t["question"] for r in recs for t in r["conversations"])
    assert a["meta"] == {"source": "llava.json:record 1", "id": "a.1"}

    skips = {s["location"]: s for s in skipped(out)}
    assert set(skips) == {"llava.json:record 3", "llava.json:record 4", "llava.json:record 5", "llava.json:record 6"}
    assert skips["llava.json:record 3"]["reason"] == "turns_not_alternating"
    assert "expected 'gpt'" in skips["llava.json:record 3"]["detail"]
    assert skips["llava.json:record 4"]["reason"] == "turns_not_alternating"
    assert skips["llava.json:record 5"]["reason"] == "missing_image"
    assert skips["llava.json:record 6"]["reason"] == "no_image"
    printed = capsys.readouterr().out
    assert "turns_not_alternating" in printed and "duplicate key renamed" in printed
    assert f"shard.py --input {out} --output {tmp_path / 'qa-shards'} --kind qa" in printed
    assert not (tmp_path / "qa.jsonl.tmp").exists()


def test_llava_json_suffix_holding_json_lines(llava_dir, tmp_path):
    """A `.json` file that holds JSON Lines (how many releases ship them; the authors' loader,
    `datasets`' json builder, reads it) is read line by line, not refused as invalid JSON."""
    src = tmp_path / "llava_lines.json"
    src.write_text("\n".join(json.dumps(r) for r in LLAVA_RECORDS) + "\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert from_llava.main(["--input", str(src), "--output", str(a), "--image-root", str(llava_dir)]) == 0
    assert from_llava.main(["--input", str(llava_dir / "llava.json"), "--output", str(b)]) == 0
    strip = lambda recs: [r["conversations"] for r in recs]  # noqa: E731 (keys and meta name the file)
    assert strip(read_jsonl(a)) == strip(read_jsonl(b)) and len(read_jsonl(a)) == 4
    assert read_jsonl(a)[0]["meta"]["source"] == "llava_lines.json:line 1"


def test_llava_parquet_as_the_hub_stores_it(llava_dir, tmp_path):
    """The released SFT data as a Parquet file (the Hub's storage and conversion format): the
    conversations column is a list of structs; the records convert as from JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in LLAVA_RECORDS if "conversations" in r and isinstance(r.get("image"), str)]
    pq.write_table(pa.Table.from_pylist([{"id": r.get("id"), "image": r["image"], "conversations": r["conversations"]}
                                         for r in rows]), tmp_path / "sft.parquet")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert from_llava.main(["--input", str(tmp_path / "sft.parquet"), "--output", str(a),
                            "--image-root", str(llava_dir)]) == 0
    src = tmp_path / "same.jsonl"
    src.write_text("".join(json.dumps({"id": r.get("id"), "image": r["image"], "conversations": r["conversations"]})
                           + "\n" for r in rows))
    assert from_llava.main(["--input", str(src), "--output", str(b), "--image-root", str(llava_dir)]) == 0
    conv = lambda recs: [r["conversations"] for r in recs]  # noqa: E731
    assert conv(read_jsonl(a)) == conv(read_jsonl(b)) and len(read_jsonl(a)) >= 2
    assert read_jsonl(a)[0]["meta"]["source"] == "sft.parquet:row 1"


def test_llava_jsonl_bad_line_and_strict(llava_dir, tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    assert from_llava.main(["--input", str(llava_dir / "llava.jsonl"), "--output", str(out),
                            "--image-root", str(llava_dir)]) == 0
    assert len(read_jsonl(out)) == 2
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [
        ("llava.jsonl:line 3", "invalid_json"), ("llava.jsonl:line 4", "turns_not_alternating")]
    before = out.read_bytes()
    # --strict: exit 1 naming the line, and the finished manifest from before is left untouched
    rc = from_llava.run_cli(from_llava.main, ["--input", str(llava_dir / "llava.jsonl"), "--output", str(out),
                                              "--strict"])
    assert rc == 1
    assert "llava.jsonl:line 3: invalid_json" in capsys.readouterr().err
    assert out.read_bytes() == before and not (tmp_path / "qa.jsonl.tmp").exists()


# ------------------------------------------------------------------------------------- MMEB
def _mmeb_rows_imagenet(n):
    return {"qry": ["<|image_1|> Represent the given image for classification" for _ in range(n)],
            "qry_image_path": [f"images/ImageNet_1K/i{i}.jpg" for i in range(n)],
            "pos_text": [f"class {i}" for i in range(n)],
            "pos_image_path": ["" for _ in range(n)],
            "neg_text": ["" for _ in range(n)],
            "neg_image_path": ["" for _ in range(n)]}


@pytest.fixture(scope="module")
def mmeb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb") / "MMEB-train"
    n = 6
    for i in range(n):
        if i != 4:  # row 5 (i = 4) points at a missing image
            make_image(root / "images" / "ImageNet_1K" / f"i{i}.jpg", (40 * i, 10, 10))
    (root / "ImageNet_1K").mkdir(parents=True)
    pq.write_table(pa.table(_mmeb_rows_imagenet(n)), root / "ImageNet_1K" / "original-00000-of-00001.parquet")
    # another split in the same folder must not leak into --split original
    pq.write_table(pa.table(_mmeb_rows_imagenet(2)), root / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet")

    for name in ("x", "y", "z"):
        make_image(root / "images" / "MSCOCO_t2i" / f"{name}.jpg", (10, 10, 200))
    inst = "<|image_1|>\nRepresent the given image."
    rows = [
        {"qry": "Find me an everyday image that matches the given caption: a dog.", "qry_image_path": "",
         "pos_text": inst, "pos_image_path": "images/MSCOCO_t2i/x.jpg",
         "neg_text": inst, "neg_image_path": "images/MSCOCO_t2i/y.jpg"},
        {"qry": "", "qry_image_path": "", "pos_text": inst, "pos_image_path": "images/MSCOCO_t2i/x.jpg",
         "neg_text": "", "neg_image_path": ""},
        {"qry": "<|image_1|> a cat", "qry_image_path": None, "pos_text": inst, "pos_image_path": "images/MSCOCO_t2i/z.jpg",
         "neg_text": inst, "neg_image_path": "images/MSCOCO_t2i/gone.jpg"},
    ]
    (root / "MSCOCO_t2i").mkdir()
    (root / "MSCOCO_t2i" / "original.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_mmeb_train_to_mmeb(mmeb_root, tmp_path, capsys):
    out = tmp_path / "mmeb.jsonl"
    assert from_mmeb_train.main(["--input", str(mmeb_root), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    by_task = {}
    for r in recs:
        by_task.setdefault(r["task"], []).append(r)
    assert len(by_task["ImageNet_1K"]) == 5 and len(by_task["MSCOCO_t2i"]) == 2
    r0 = by_task["ImageNet_1K"][0]
    assert r0["key"] == "ImageNet_1K-0000000"
    # the instruction is kept as MMEB wrote it, only its marker made canonical
    assert r0["query"] == {"text": "<image> Represent the given image for classification",
                           "image": str(mmeb_root / "images" / "ImageNet_1K" / "i0.jpg")}
    assert r0["positive"] == {"text": "class 0", "image": None}
    assert "negatives" not in r0  # MMEB's empty neg_* columns are no hard negative
    assert r0["meta"] == {"source": "ImageNet_1K/original-00000-of-00001.parquet:row 1", "subset": "ImageNet_1K"}
    c0, c2 = by_task["MSCOCO_t2i"]
    assert c0["query"] == {"text": "Find me an everyday image that matches the given caption: a dog.", "image": None}
    assert c0["positive"]["text"] == "<image>\nRepresent the given image."
    assert c0["negatives"] == [{"text": "<image>\nRepresent the given image.",
                                "image": str(mmeb_root / "images" / "MSCOCO_t2i" / "y.jpg")}]
    assert c2["query"] == {"text": "a cat", "image": None}  # marker with no image removed
    assert "negatives" not in c2  # its negative's image is missing: dropped, row kept
    skips = [(s["location"], s["reason"]) for s in skipped(out)]
    assert skips == [("ImageNet_1K/original-00000-of-00001.parquet:row 5", "missing_image"),
                     ("MSCOCO_t2i/original.jsonl:line 2", "empty_query")]
    printed = capsys.readouterr().out
    assert "hard negative dropped (missing_image)" in printed
    assert "--kind mmeb" in printed


def test_mmeb_caps_select_the_reference_rows(mmeb_root, tmp_path):
    out = tmp_path / "m.jsonl"
    assert from_mmeb_train.main(["--input", str(mmeb_root), "--output", str(out), "--subsets", "ImageNet_1K",
                                 "--cap", "ImageNet_1K=3"]) == 0
    rows = [int(r["meta"]["source"].rsplit(" ", 1)[1]) - 1 for r in read_jsonl(out)]
    expected = [i for i in np.random.default_rng(42).permutation(6)[:3].tolist() if i != 4]
    assert rows == expected and {r["task"] for r in read_jsonl(out)} == {"ImageNet_1K"}


def test_mmeb_paper_caps():
    assert len(from_mmeb_train.PAPER_CAPS) == 20
    assert sum(from_mmeb_train.PAPER_CAPS.values()) == 1_103_000


def test_mmeb_usage_errors(mmeb_root, tmp_path, capsys):
    out = str(tmp_path / "m.jsonl")
    run = from_mmeb_train.run_cli
    # --paper-caps wants the 20 paper subsets; this copy has 2
    assert run(from_mmeb_train.main, ["--input", str(mmeb_root), "--output", out, "--paper-caps"]) == 2
    assert "'N24News' has no folder" in capsys.readouterr().err
    assert run(from_mmeb_train.main, ["--input", str(mmeb_root), "--output", out, "--cap", "CIRR=5"]) == 2
    assert "'CIRR' is not among the selected subsets" in capsys.readouterr().err
    assert run(from_mmeb_train.main, ["--input", str(mmeb_root), "--output", out, "--cap", "ImageNet_1K"]) == 2
    bad = tmp_path / "bad" / "Sub"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"qry": ["x"], "pos_text": ["y"]}), bad / "original.parquet")
    assert run(from_mmeb_train.main, ["--input", str(bad.parent), "--output", out]) == 2
    assert "no column 'qry_image_path'" in capsys.readouterr().err
    assert not Path(out).exists()
    two = tmp_path / "two" / "Sub"
    two.mkdir(parents=True)
    for split in ("train", "diverse_instruction"):
        pq.write_table(pa.table(_mmeb_rows_imagenet(1)), two / f"{split}-00000-of-00001.parquet")
    assert run(from_mmeb_train.main, ["--input", str(two.parent), "--output", out]) == 2
    assert "no 'original' split among ['diverse_instruction', 'train']" in capsys.readouterr().err
    # paper caps on the subsets present: all rows kept, the shortfall reported
    assert from_mmeb_train.main(["--input", str(mmeb_root), "--output", out, "--paper-caps",
                                 "--subsets", "ImageNet_1K,MSCOCO_t2i"]) == 0
    assert len(read_jsonl(out)) == 7
    assert "subsets smaller than their cap" in capsys.readouterr().out


# ------------------------------------------------------------------------------- img2dataset
def _tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _i2d_sample(key, caption, color, status="success"):
    meta = {"url": f"http://x/{key}.jpg", "key": key, "status": status, "caption": caption,
            "width": 20, "height": 20, "error_message": None}
    return key, {"jpg": jpeg_bytes(color), "txt": caption.encode(), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def i2d_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("i2d")
    samples = [_i2d_sample("000000000", "a red square", (200, 0, 0)),
               _i2d_sample("000000001", "a green square", (0, 200, 0)),
               _i2d_sample("000000002", "", (0, 0, 200)),          # empty caption
               _i2d_sample("000000003", "a grey square", (90, 90, 90))]
    (d / "00000.tar").write_bytes(_tar_bytes(samples))
    meta = {"key": [f"{i:09d}" for i in range(7)],
            "status": ["success"] * 4 + ["failed_to_download", "failed_to_resize", "success"],
            "error_message": [None] * 4 + ["HTTP Error 404", "image too small", None],
            "url": [f"http://x/{i}.jpg" for i in range(7)]}
    pq.write_table(pa.table(meta), d / "00000.parquet")
    # shard 2: truncated in the middle of its second image
    full = _tar_bytes([_i2d_sample("000010000", "first", (1, 2, 3)), _i2d_sample("000010001", "second", (3, 2, 1))])
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        cut = tf.getmember("000010001.jpg").offset_data + 100
    (d / "00001.tar").write_bytes(full[:cut])
    pq.write_table(pa.table({"key": ["000010000", "000010001"], "status": ["success", "success"],
                             "error_message": [None, None]}), d / "00001.parquet")
    return d


def test_img2dataset_webdataset(i2d_dir, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert from_img2dataset.main(["--input", str(i2d_dir), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["key"] for r in recs] == ["000000000", "000000001", "000000003", "000010000"]
    assert recs[0]["text"] == "a red square" and recs[0]["meta"]["url"] == "http://x/000000000.jpg"
    img = Path(recs[0]["image"])
    assert img == tmp_path / "pairs-images" / "00000" / "000000000.jpg"
    assert Image.open(img).getpixel((10, 10))[0] > 150
    reasons = {}
    for s in skipped(out):
        reasons.setdefault(s["reason"], []).append(s["location"])
    assert reasons["failed_to_download"] == ["00000.parquet:row 5"]
    assert reasons["failed_to_resize"] == ["00000.parquet:row 6"]
    assert reasons["missing_from_shard"] == ["00000.parquet:row 7", "00001.parquet:row 2"]
    assert reasons["empty_text"] == ["00000.tar:000000002"]
    assert reasons["unreadable_tar"] == ["00001.tar"]
    table = capsys.readouterr().out
    assert "00000" in table and "--kind pair" in table
    # rerun: extracted images are kept, the manifest is identical
    mtime = img.stat().st_mtime_ns
    first = out.read_bytes()
    assert from_img2dataset.main(["--input", str(i2d_dir), "--output", str(out)]) == 0
    assert out.read_bytes() == first and img.stat().st_mtime_ns == mtime


def test_img2dataset_files_and_parquet_formats(tmp_path):
    files = tmp_path / "files"
    shard = files / "00000"
    shard.mkdir(parents=True)
    for key, cap, col in (("000000000", "one", (255, 0, 0)), ("000000001", "two", (0, 255, 0))):
        (shard / f"{key}.jpg").write_bytes(jpeg_bytes(col))
        (shard / f"{key}.txt").write_text(cap)
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "status": "success"}))
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"],
                             "status": ["success", "success", "failed_to_download"],
                             "error_message": [None, None, "timeout"]}), files / "00000.parquet")
    out = tmp_path / "f.jsonl"
    assert from_img2dataset.main(["--input", str(files), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [(r["text"], Path(r["image"]).name) for r in recs] == [("one", "000000000.jpg"), ("two", "000000001.jpg")]
    assert recs[0]["image"] == str(shard / "000000000.jpg")  # images already on disk are not copied
    assert [s["reason"] for s in skipped(out)] == ["failed_to_download"]

    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    pq.write_table(pa.table({"key": ["000000000", "000000001"], "caption": ["blue", "lost"],
                             "status": ["success", "failed_to_download"],
                             "error_message": [None, "404"], "jpg": [jpeg_bytes((0, 0, 255)), None]}),
                   pqdir / "00000.parquet")
    out = tmp_path / "p.jsonl"
    assert from_img2dataset.main(["--input", str(pqdir), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert len(recs) == 1 and recs[0]["text"] == "blue" and Path(recs[0]["image"]).is_file()
    assert [(s["location"], s["reason"], s.get("detail")) for s in skipped(out)] == [
        ("00000.parquet:row 2", "failed_to_download", "404")]


# ----------------------------------------------------------------------------------- folder
@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    make_image(d / "a.jpg", (255, 0, 0))
    (d / "a.txt").write_text("a red block\n")
    make_image(d / "sub" / "b.png", (0, 255, 0), fmt="PNG")
    (d / "sub" / "b.txt").write_text("<image> a green block")
    make_image(d / "c.jpg", (0, 0, 255))                     # no caption
    make_image(d / "d.jpg", (9, 9, 9))
    (d / "d.txt").write_text("   \n")                        # empty caption
    (d / "a.json").write_text(json.dumps([{"question": "Colour?", "answer": "Red."}]))
    (d / "d.json").write_text(json.dumps([{"question": "Colour?"}]))
    return d


def test_folder_sidecars(photo_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert from_folder.main(["--input", str(photo_dir), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [(r["key"], r["text"]) for r in recs] == [("a", "a red block"), ("sub_b", "a green block")]
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [("c.jpg", "no_sidecar"), ("d.jpg", "empty_text")]
    out = tmp_path / "qa.jsonl"
    assert from_folder.main(["--input", str(photo_dir), "--kind", "qa", "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [(r["key"], r["conversations"]) for r in recs] == [("a", [{"question": "Colour?", "answer": "Red."}])]
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [
        ("c.jpg", "no_sidecar"), ("d.json", "schema"), ("sub/b.png", "no_sidecar")]


def test_folder_csv(photo_dir, tmp_path, capsys):
    qa_csv = tmp_path / "qa.csv"
    qa_csv.write_text("image,question,answer\n"
                      "a.jpg,What colour?,Red.\n"
                      "sub/b.png,What colour?,Green.\n"
                      "a.jpg,What shape?,A rectangle.\n"
                      "missing.jpg,Q,A\n"
                      "c.jpg,,no question\n")
    out = tmp_path / "qa.jsonl"
    assert from_folder.main(["--input", str(photo_dir), "--kind", "qa", "--csv", str(qa_csv), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [(r["key"], len(r["conversations"])) for r in recs] == [("a", 2), ("sub_b", 1)]
    assert recs[0]["conversations"][1] == {"question": "What shape?", "answer": "A rectangle."}
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [("qa.csv:line 5", "missing_image"), ("qa.csv:line 6", "empty_text")]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.jpg,x\n")
    assert from_folder.run_cli(from_folder.main, ["--input", str(photo_dir), "--csv", str(bad),
                                                  "--output", str(tmp_path / "b.jsonl")]) == 2
    assert "no column 'image'" in capsys.readouterr().err


def test_cli_entry_points(photo_dir, tmp_path):
    """The scripts run as `python data_prep/<name>.py` from any directory; a bad invocation is
    one line on stderr and exit status 2."""
    out = tmp_path / "pairs.jsonl"
    ok = subprocess.run([sys.executable, str(REPO / "data_prep" / "from_folder.py"), "--input", str(photo_dir),
                         "--output", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "next, write the shards:" in ok.stdout and len(read_jsonl(out)) == 2
    bad = subprocess.run([sys.executable, str(REPO / "data_prep" / "from_llava.py"), "--input",
                          str(tmp_path / "nope.json"), "--output", str(out)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: --input {tmp_path / 'nope.json'}: no such file"]


@pytest.mark.parametrize("module", [from_llava, from_mmeb_train, from_img2dataset, from_folder])
def test_bad_invocation_is_one_line_exit_2(module, tmp_path, capsys):
    assert module.run_cli(module.main, ["--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the following arguments are required: --output (see --help)"]


def test_bad_shard_args_fail_before_converting(photo_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    rc = from_folder.run_cli(from_folder.main, ["--input", str(photo_dir), "--output", str(out),
                                                "--shard-args", "--prefix 'unclosed"])
    assert rc == 2 and not out.exists()
    assert "--shard-args" in capsys.readouterr().err


# --------------------------------------------------------------------------------- bad input
# What a researcher's real data throws at the converters: each case once crashed with a
# traceback, wrote a wrong manifest, or lost a finished result.
def test_non_utf8_and_bom_inputs_skip_rows_not_the_run(llava_dir, tmp_path):
    rec = {"image": "imgs/a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                     {"from": "gpt", "value": "A"}]}
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "bom", **rec}).encode() + b"\n"   # Windows BOM
                    + b'{"id": "latin1", "image": "imgs/a.jpg", "conversations": [{"from": "human", '
                      b'"value": "caf\xe9?"}, {"from": "gpt", "value": "A"}]}\n'            # Latin-1 byte
                    + json.dumps({"id": "half-emoji", **rec}).encode().replace(b'"A"', b'"A \\ud83d"') + b"\n"
                    + json.dumps({"id": "ok", **rec}).encode() + b"\n")
    out = tmp_path / "qa.jsonl"
    assert from_llava.main(["--input", str(bad), "--output", str(out), "--image-root", str(llava_dir)]) == 0
    assert [r["key"] for r in read_jsonl(out)] == ["bom", "ok"]
    skips = skipped(out)
    assert [(s["location"], s["reason"]) for s in skips] == [("mixed.jsonl:line 2", "invalid_unicode"),
                                                             ("mixed.jsonl:line 3", "invalid_unicode")]
    assert "conversations[0].question 'caf\\udce9?'" in skips[0]["detail"]

    photos = tmp_path / "photos"
    make_image(photos / "a.jpg")
    (photos / "a.txt").write_text("fine")
    latin_name = os.fsdecode(bytes(photos) + b"/caf\xe9.jpg")  # a file name that is not UTF-8
    make_image(Path(latin_name))
    Path(latin_name[:-4] + ".txt").write_text("latin-1 name")
    out = tmp_path / "pairs.jsonl"
    assert from_folder.main(["--input", str(photos), "--output", str(out)]) == 0
    assert [r["key"] for r in read_jsonl(out)] == ["a"]
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [("caf\\udce9.jpg", "invalid_unicode")]

    csv_path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" (a BOM), one Latin-1 row
    csv_path.write_bytes(b"\xef\xbb\xbfimage,text\na.jpg,fine\na.jpg,caf\xe9\n")
    assert from_folder.main(["--input", str(photos), "--csv", str(csv_path), "--output", str(out)]) == 0
    assert [r["text"] for r in read_jsonl(out)] == ["fine"]
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [("excel.csv:line 3", "invalid_unicode")]


def test_folder_sidecars_with_a_byte_order_mark(tmp_path):
    photos = tmp_path / "photos"  # sidecars saved by Windows Notepad
    make_image(photos / "a.jpg")
    (photos / "a.txt").write_bytes(b"\xef\xbb\xbfa caption")
    (photos / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "Q?", "answer": "A."}]).encode())
    out = tmp_path / "p.jsonl"
    assert from_folder.main(["--input", str(photos), "--output", str(out)]) == 0
    assert read_jsonl(out)[0]["text"] == "a caption"  # not "\ufeffa caption"
    assert from_folder.main(["--input", str(photos), "--kind", "qa", "--output", str(out)]) == 0
    assert read_jsonl(out)[0]["conversations"] == [{"question": "Q?", "answer": "A."}]


def test_folder_csv_unclosed_quote_is_one_line(photo_dir, tmp_path, capsys):
    bad = tmp_path / "quote.csv"
    bad.write_text('image,text\na.jpg,fine\na.jpg,"unclosed\n' + "a.jpg,more\n" * 3 + "a.jpg," + "x" * 140_000 + "\n")
    out = tmp_path / "p.jsonl"
    assert from_folder.run_cli(from_folder.main, ["--input", str(photo_dir), "--csv", str(bad),
                                                  "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:line 3: field larger than field limit" in err[0]
    assert not out.exists() and not Path(str(out) + ".tmp").exists()


def test_unusable_output_paths_fail_before_converting(photo_dir, llava_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_dir").mkdir()
    src = tmp_path / "llava.json"
    src.write_bytes((llava_dir / "llava.json").read_bytes())
    cases = [
        (from_folder, ["--input", str(photo_dir), "--output", str(tmp_path / "a_dir")], "is a folder"),
        (from_folder, ["--input", str(photo_dir), "--output", str(a_file / "m.jsonl")], f"{a_file} is a file"),
        (from_folder, ["--input", str(photo_dir), "--output", str(tmp_path / "m.jsonl"), "--shard", str(a_file)],
         "--shard"),
        # the manifest would replace the only copy of the input
        (from_llava, ["--input", str(src), "--output", str(src)], "is the input file"),
        (from_llava, ["--input", str(src), str(src), "--output", str(tmp_path / "m.jsonl")], "given twice"),
    ]
    for module, args, says in cases:
        assert module.run_cli(module.main, args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert src.read_bytes() == (llava_dir / "llava.json").read_bytes()
    assert not (tmp_path / "m.jsonl").exists()


def test_rerun_that_converts_nothing_keeps_the_manifest(llava_dir, tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    assert from_llava.main(["--input", str(llava_dir / "llava.json"), "--output", str(out)]) == 0
    before, skipped_before = out.read_bytes(), skipped(out)
    moved = tmp_path / "moved.json"  # e.g. the images folder is not mounted on this node
    moved.write_bytes((llava_dir / "llava.json").read_bytes())
    assert from_llava.main(["--input", str(moved), "--output", str(out)]) == 1
    assert "is left as it was" in capsys.readouterr().err
    assert out.read_bytes() == before and skipped(out) == skipped_before
    assert not Path(str(out) + ".tmp").exists()


def test_folder_follows_symlinked_subfolders(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    make_image(photos / "a.jpg")
    (photos / "a.txt").write_text("here")
    make_image(elsewhere / "b.jpg")
    (elsewhere / "b.txt").write_text("linked in")
    (photos / "more").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(photos)  # a link loop is walked once
    out = tmp_path / "p.jsonl"
    assert from_folder.main(["--input", str(photos), "--output", str(out)]) == 0
    assert [(r["key"], r["text"]) for r in read_jsonl(out)] == [("a", "here"), ("more_b", "linked in")]
    # a link to a folder inside the root does not take that folder's images (keys stay stable)
    make_image(photos / "z_real" / "c.jpg")
    (photos / "z_real" / "c.txt").write_text("real")
    (photos / "a_alias").symlink_to(photos / "z_real")
    assert from_folder.main(["--input", str(photos), "--output", str(out)]) == 0
    assert [r["key"] for r in read_jsonl(out)] == ["a", "more_b", "z_real_c"]


def test_img2dataset_odd_keys_and_broken_parquet(tmp_path):
    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)]
    pq.write_table(pa.table({
        "key": [None, None, "../../escaped", "k" * 300],  # null keys; a key that is a path; a long key
        "caption": ["red", "green", "blue", "grey"],
        "jpg": [jpeg_bytes(c) for c in colors]}), pqdir / "00000.parquet")
    pq.write_table(pa.table({"key": ["s"], "caption": ["a path, not bytes"], "jpg": ["/data/x.jpg"]}),
                   pqdir / "00001.parquet")
    (pqdir / "00002.parquet").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # not fetched
    out = tmp_path / "p.jsonl"
    assert from_img2dataset.main(["--input", str(pqdir), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["text"] for r in recs] == ["red", "green", "blue", "grey"]
    images = [Path(r["image"]) for r in recs]
    assert len(set(images)) == 4  # every record its own image file ...
    for path, color in zip(images, colors):
        assert path.parent == tmp_path / "p-images" / "00000"  # ... inside --image-dir, its own colour
        assert all(abs(a - b) < 30 for a, b in zip(Image.open(path).getpixel((10, 10)), color)), path
    assert not (tmp_path / "escaped.jpg").exists()
    assert [(s["location"], s["reason"]) for s in skipped(out)] == [
        ("00001.parquet:row 1", "schema"), ("00002.parquet:row 1", "unreadable_parquet")]


def test_img2dataset_odd_tar_members_and_write_errors(tmp_path, capsys):
    wds = tmp_path / "wds"
    wds.mkdir()
    (wds / "00000.tar").write_bytes(_tar_bytes([
        ("000", {"jpg": jpeg_bytes((255, 0, 0)), "txt": b"red", "json": b"null"}),  # json that is no object
        ("001", {"jpg": jpeg_bytes((0, 255, 0)), "txt": b"green"}),
        ("000", {"jpg": jpeg_bytes((0, 0, 255)) + b"\0" * 9, "txt": b"blue"}),       # a key seen before
    ]))
    out = tmp_path / "w.jsonl"
    assert from_img2dataset.main(["--input", str(wds), "--output", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["text"] for r in recs] == ["red", "green", "blue"]
    assert Image.open(recs[0]["image"]).getpixel((10, 10))[0] > 150  # red is still red
    assert Image.open(recs[2]["image"]).getpixel((10, 10))[2] > 150
    # an extraction folder that cannot be written is not a truncated tar: the run stops, saying so
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    rc = from_img2dataset.run_cli(from_img2dataset.main, ["--input", str(wds), "--output", str(tmp_path / "x.jsonl"),
                                                          "--image-dir", str(blocker / "images")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {blocker / 'images'}")
    assert not (tmp_path / "x.jsonl").exists()


def test_mmeb_bad_columns_and_arguments(mmeb_root, tmp_path, capsys):
    root = tmp_path / "M"
    (root / "Sub").mkdir(parents=True)
    make_image(root / "images" / "q.jpg")
    pq.write_table(pa.table({"qry": ["<|image_1|> find it", "<|image_1|> ok"], "qry_image_path": [7, None],
                             "pos_text": ["x", "y"], "pos_image_path": [None, "images/q.jpg"]}),
                   root / "Sub" / "original.parquet")
    out = tmp_path / "m.jsonl"
    assert from_mmeb_train.main(["--input", str(root), "--output", str(out)]) == 0
    # a number for a path is not "no image" (the query would lose its image without a word)
    assert [r["meta"]["source"] for r in read_jsonl(out)] == ["Sub/original.parquet:row 2"]
    assert [(s["reason"], s["detail"]) for s in skipped(out)] == [("schema", "'qry_image_path' is int '7', expected text")]

    broken = tmp_path / "B" / "Sub"
    broken.mkdir(parents=True)
    buf = io.BytesIO()
    pq.write_table(pa.table(_mmeb_rows_imagenet(50)), buf)
    data = bytearray(buf.getvalue())
    data[10:200] = bytes(b ^ 0xFF for b in data[10:200])  # the footer reads, the pages do not
    (broken / "original.parquet").write_bytes(bytes(data))
    run = from_mmeb_train.run_cli
    for args, says in [(["--input", str(broken.parent)], "not a readable Parquet file"),
                       (["--input", str(mmeb_root), "--subsets", "ImageNet_1K,ImageNet_1K"], "listed twice"),
                       (["--input", str(mmeb_root), "--cap", "ImageNet_1K=2", "--seed", "-1"], "--seed -1")]:
        assert run(from_mmeb_train.main, args + ["--output", str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "x.jsonl").exists()
