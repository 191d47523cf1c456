"""data_prep/shard.py: manifest → shards → loader round trips, bad rows, determinism, reruns."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_prep import shard, tar_writer
from datagen import dataset, make_images, records, write_jsonl
from pipeline.data import open_shards


def run_shard(manifest, out, *extra) -> int:
    return shard.main(["--input", str(manifest), "--output", str(out), "--workers", "1", *map(str, extra)])


def read_all(out, kind):
    """Every sample of a shard folder, in shard order (loader, no shuffle, one process)."""
    loader = open_shards(str(out), kind=kind, batch_size=1000, rank=0, world_size=1, num_workers=0,
                          shuffle=False, drop_last=False)
    return [s for batch in loader for s in batch]


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["pair", "qa", "mmeb"])
def test_round_trip_jsonl(tmp_path, kind):
    manifest = dataset(tmp_path, kind, 6)
    assert run_shard(manifest, tmp_path / "out", "--kind", kind, "--samples-per-shard", 4) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["pattern"] == "train-{000000..000001}.tar" and m["samples"] == 6 and m["skipped_total"] == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 2}
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""

    src = [json.loads(line) for line in manifest.read_text().splitlines()]
    got = read_all(tmp_path / "out", kind)
    assert [s["__key__"] for s in got] == [f"{kind}-{i:09d}" for i in range(1, 7)]
    for rec, s in zip(src, got):
        if kind == "pair":
            assert s["text"] == rec["text"] and s["meta"] == rec["meta"]
            assert (pixels(s["image"]) == pixels(Image.open(tmp_path / rec["image"]))).all()
        elif kind == "qa":
            # the placeholder contract: foreign markers become <image>
            assert s["conversations"][0]["question"] == rec["conversations"][0]["question"].replace("<|image_1|>", "<image>")
            assert s["conversations"][1] == rec["conversations"][1]
            assert (pixels(s["image"]) == pixels(Image.open(tmp_path / rec["image"]))).all()
        else:
            assert s["task"] == rec["task"] and len(s["negatives"]) == len(rec["negatives"])
            for side in ("query", "positive"):
                want = rec[side]
                assert s[side]["text"] == want.get("text")
                if want.get("image"):
                    assert (pixels(s[side]["image"]) == pixels(Image.open(tmp_path / want["image"]))).all()
                else:
                    assert s[side]["image"] is None


def test_tar_layout_is_webdataset_standard(tmp_path):
    manifest = dataset(tmp_path, "mmeb", 2)
    assert run_shard(manifest, tmp_path / "out", "--kind", "mmeb") == 0
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == [
        "mmeb-000000001.json", "mmeb-000000001.negative_0.png", "mmeb-000000001.positive.png",
        "mmeb-000000002.json", "mmeb-000000002.query.png"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o444)}
    import webdataset as wds  # plain webdataset reads it too

    first = next(iter(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False)))
    assert json.loads(first["json"])["positive"]["image"] == "positive.png"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_round_trip_table_manifests(tmp_path, fmt):
    names = make_images(tmp_path / "images", 3)
    rows = [{"img": f"images/{n}", "caption": f"cap {i}", "key": f"k.{i}", "source": "web"}
            for i, n in enumerate(names)]
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    args = ["--image-column", "img", "--text-column", "caption"]
    assert run_shard(path, tmp_path / "out", *args) == 0
    got = read_all(tmp_path / "out", "pair")
    assert [(s["__key__"], s["text"], s["meta"]) for s in got] == [
        (f"k_{i}", f"cap {i}", {"source": "web"}) for i in range(3)]
    # a column that does not exist is an unusable invocation
    assert run_shard(path, tmp_path / "out2", "--text-column", "text", "--image-column", "img") == 2


def test_parquet_columns_without_a_json_type(tmp_path, capsys):
    """Timestamps, decimals and durations in extra Parquet columns become JSON text in the
    sample's meta (they used to crash the run with a TypeError); a binary column is refused
    before any work with exit 2 and its name."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = make_images(tmp_path / "images", 2)
    table = {"image": [f"images/{n}" for n in names], "text": ["a", "b"],
             "when": [datetime.datetime(2024, 1, 2, 3, 4, 5), None],
             "price": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(5, 2)),
             "took": [datetime.timedelta(seconds=3), None], "tags": [["x"], []]}
    pq.write_table(pa.table(table), tmp_path / "m.parquet")
    assert run_shard(tmp_path / "m.parquet", tmp_path / "out") == 0
    assert [s["meta"] for s in read_all(tmp_path / "out", "pair")] == [
        {"when": "2024-01-02T03:04:05", "price": "1.50", "took": "0:00:03", "tags": ["x"]},
        {"when": None, "price": None, "took": None, "tags": []}]

    thumbs = pa.array([b"\xff\xd8", b""])
    pq.write_table(pa.table({**table, "thumb": thumbs, "enc": thumbs.dictionary_encode()}), tmp_path / "bin.parquet")
    capsys.readouterr()
    assert run_shard(tmp_path / "bin.parquet", tmp_path / "out2") == 2
    assert "['thumb', 'enc'] hold binary data" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------- bad rows
def test_encoding_trouble_is_one_bad_row_each(tmp_path, capsys):
    """A Latin-1 byte (JSONL line or CSV cell) and a lone surrogate escape (half an emoji, in a
    caption or an image path) each skip their row as invalid_unicode, where they used to stop
    the run with a traceback; a byte-order mark (Excel, Notepad) is not an error at all."""
    names = make_images(tmp_path / "images", 1)
    img = f"images/{names[0]}"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": img, "text": "bom first"}).encode() + b"\n"
                      + b'{"image": "' + img.encode() + b'", "text": "caf\xe9"}\n'
                      + b'{"image": "' + img.encode() + b'", "text": "half \\ud83d"}\n'
                      + b'{"image": "images/\\ud83d.png", "text": "x"}\n'
                      + json.dumps({"image": img, "text": "fine"}).encode() + b"\n")
    assert run_shard(jsonl, tmp_path / "out") == 0
    assert [s["text"] for s in read_all(tmp_path / "out", "pair")] == ["bom first", "fine"]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(e["line"], e["reason"]) for e in errors] == [(2, "invalid_unicode"), (3, "invalid_unicode"),
                                                          (4, "invalid_unicode")]
    assert "byte 0xe9" in errors[0]["detail"] and "\\ud83d" in errors[1]["detail"]
    assert run_shard(jsonl, tmp_path / "strict", "--strict") == 1
    # the BOM shifts no position: the bad byte of a first line is reported where it is
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + b'{"image": "' + img.encode() + b'", "text": "caf\xe9"}\n')
    assert run_shard(first, tmp_path / "out_first") == 1
    (err,) = [json.loads(x) for x in (tmp_path / "out_first" / "errors.jsonl").read_text().splitlines()]
    col = len('{"image": "' + img + '", "text": "caf') + 1
    assert err["detail"].startswith(f"byte 0xe9 at column {col} "), err
    # old-Mac line endings (CR only) still split into lines
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b"\r".join(json.dumps({"image": img, "text": t}).encode() for t in "abc") + b"\r")
    assert run_shard(cr, tmp_path / "out_cr") == 0
    assert [s["text"] for s in read_all(tmp_path / "out_cr", "pair")] == ["a", "b", "c"]

    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfimage,text\n" + img.encode() + b",caf\xe9\n" + img.encode() + b",ok\n")
    assert run_shard(csv_path, tmp_path / "out_csv") == 0
    assert [s["text"] for s in read_all(tmp_path / "out_csv", "pair")] == ["ok"]
    (err,) = [json.loads(line) for line in (tmp_path / "out_csv" / "errors.jsonl").read_text().splitlines()]
    assert (err["line"], err["reason"]) == (2, "invalid_unicode") and "['text']" in err["detail"]
    # an unclosed quote swallows the rest of the file: exit 2 naming the line it starts on
    quote = tmp_path / "quote.csv"
    quote.write_text(f'image,text\n{img},ok\n{img},"unclosed\n' + "x" * 200_000 + "\n")
    capsys.readouterr()
    assert run_shard(quote, tmp_path / "out_quote") == 2
    assert f"{quote}:3: not readable as CSV" in capsys.readouterr().err


def _bad_manifest(tmp_path):
    names = make_images(tmp_path / "images", 4)
    (tmp_path / "images" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (4, 30)).save(tmp_path / "images" / "tiny.png")
    good = records("pair", names)
    rows = [
        good[0],                                                    # line 1 ok
        {"image": "images/missing.png", "text": "x"},               # 2 missing_image
        {"image": "images/garbage.png", "text": "x"},               # 3 undecodable_image
        {"image": "images/tiny.png", "text": "x"},                  # 4 image_too_small
        {"image": f"images/{names[1]}", "text": "   "},             # 5 empty_text
        {"image": f"images/{names[1]}", "txt": "typo"},             # 6 schema (unknown field)
        "{not json",                                                # 7 invalid_json
        {"image": f"images/{names[2]}", "text": 5},                 # 8 schema (text not a string)
        dict(good[2], key="dup"),                                   # 9 ok
        dict(good[3], key="dup"),                                   # 10 duplicate_key
        good[1],                                                    # 11 ok
    ]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_rows_are_skipped_counted_and_listed(tmp_path, capsys):
    manifest = _bad_manifest(tmp_path)
    assert run_shard(manifest, tmp_path / "out", "--samples-per-shard", 4) == 0
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert m["samples"] == 3 and m["rows"] == 11
    assert m["skipped"] == {"duplicate_key": 1, "empty_text": 1, "image_too_small": 1, "invalid_json": 1,
                            "missing_image": 1, "schema": 2, "undecodable_image": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in errors] == [
        (2, "missing_image"), (3, "undecodable_image"), (4, "image_too_small"), (5, "empty_text"),
        (6, "schema"), (7, "invalid_json"), (8, "schema"), (10, "duplicate_key")]
    assert errors[0]["key"] == "bad-000000002" and "missing.png" in errors[0]["detail"]
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 3
    assert "skipped 8 of 11 rows" in capsys.readouterr().out
    assert sorted(s["__key__"] for s in read_all(out, "pair")) == ["bad-000000001", "bad-000000011", "dup"]


def test_strict_stops_at_first_bad_row(tmp_path, capsys):
    manifest = _bad_manifest(tmp_path)
    assert run_shard(manifest, tmp_path / "out", "--strict") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error (--strict): ") and f"{manifest}:2: missing_image:" in err
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def test_unusable_invocations_exit_2_with_one_line(tmp_path, capsys):
    manifest = dataset(tmp_path, "pair", 2)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,text\nimages/img000.png,hi\n")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    cases = [
        (["--input", str(tmp_path / "nope.jsonl")], "no such manifest"),
        (["--input", str(manifest), "--kind", "video"], "invalid choice"),
        (["--input", str(csv_path), "--text-column", "caption"], "unknown column"),
        (["--input", str(csv_path), "--kind", "qa"], "pair only"),
        (["--input", str(empty)], "no records"),
        (["--input", str(manifest), "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--input", str(tmp_path)], "is a folder"),
    ]
    for argv, words in cases:
        assert shard.main(argv + ["--output", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (argv, err)
    # and as a real command line
    r = subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "--input", "/nonexistent.jsonl",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such manifest" in r.stderr


# ------------------------------------------------------------------ determinism, reruns, repair
def _tree(folder) -> dict[str, bytes]:
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f != "manifest.json"}


def test_byte_identical_whatever_the_worker_count(tmp_path):
    manifest = dataset(tmp_path, "mmeb", 23)
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        assert shard.main(["--input", str(manifest), "--output", str(out), "--kind", "mmeb",
                           "--samples-per-shard", "5", "--workers", str(workers), "--shuffle-seed", "7"]) == 0
        outs.append(_tree(out))
    assert outs[0] == outs[1]
    assert sum(f.endswith(".tar") for f in outs[0]) == 5
    # the seed really permutes rows: shard 0 is not the first five manifest lines
    keys = [s["__key__"] for s in read_all(tmp_path / "out1", "mmeb")][:5]
    assert keys != [f"mmeb-{i:09d}" for i in range(1, 6)] and len(set(keys)) == 5


def test_rerun_skips_complete_shards_and_repairs_missing_or_partial(tmp_path, capsys):
    manifest = dataset(tmp_path, "pair", 10)
    out = tmp_path / "out"
    assert run_shard(manifest, out, "--samples-per-shard", 3) == 0
    before = _tree(out)
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in before if f.endswith(".tar")}
    capsys.readouterr()

    assert run_shard(manifest, out, "--samples-per-shard", 3) == 0  # idempotent
    assert "(0 written at 0 rows/s, 4 already complete)" in capsys.readouterr().out
    assert _tree(out) == before
    assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes

    os.unlink(out / "train-000001.tar")                           # deleted shard
    with open(out / "train-000002.tar", "r+b") as f:              # partial shard (a crash mid-copy)
        f.truncate(1000)
    (out / "train-000003.tar.tmp123").write_bytes(b"half")         # leftover of a killed run
    capsys.readouterr()
    assert run_shard(manifest, out, "--samples-per-shard", 3) == 0
    assert "2 written" in capsys.readouterr().out
    assert _tree(out) == before
    assert os.stat(out / "train-000000.tar").st_mtime_ns == mtimes["train-000000.tar"]

    # changed rows → only the shard holding them is redone
    lines = manifest.read_text().splitlines()
    lines[9] = json.dumps(dict(json.loads(lines[9]), text="a new caption"))
    manifest.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_shard(manifest, out, "--samples-per-shard", 3) == 0
    assert "1 written" in capsys.readouterr().out
    assert [s["text"] for s in read_all(out, "pair")][9] == "a new caption"


def test_max_image_side_reencodes_large_images(tmp_path):
    (tmp_path / "images").mkdir()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    big.convert("CMYK").save(tmp_path / "images" / "cmyk.jpg", format="JPEG")
    big.convert("P").save(tmp_path / "images" / "pal.png")
    big.resize((30, 12)).save(tmp_path / "images" / "small.png")
    rows = [{"image": f"images/{n}", "text": n} for n in ("cmyk.jpg", "pal.png", "small.png")]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    assert run_shard(manifest, tmp_path / "out", "--max-image-side", 50) == 0
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    for key in ("m-000000001", "m-000000002"):
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (50, 20)
    # not larger than the limit: original bytes kept
    assert members["m-000000003.png"] == (tmp_path / "images" / "small.png").read_bytes()


def test_world_size_warning(tmp_path, capsys):
    manifest = dataset(tmp_path, "pair", 24)
    assert run_shard(manifest, tmp_path / "a", "--samples-per-shard", 4) == 0   # 6 shards
    err = capsys.readouterr().err
    assert "6 shard(s) is not a multiple of 8" in err and "--samples-per-shard 3 gives 8 shards" in err
    assert run_shard(manifest, tmp_path / "b", "--samples-per-shard", 3) == 0   # 8 shards: quiet
    assert "warning" not in capsys.readouterr().err
    assert run_shard(manifest, tmp_path / "c", "--samples-per-shard", 2) == 0   # 12 shards
    err = capsys.readouterr().err
    assert "12 shard(s)" in err and "gives 8 shards" in err or "gives 16 shards" in err


def test_sizes_json_keeps_other_prefixes(tmp_path):
    manifest = dataset(tmp_path, "pair", 3)
    assert run_shard(manifest, tmp_path / "out", "--prefix", "train") == 0
    assert run_shard(manifest, tmp_path / "out", "--prefix", "val") == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"train-000000.tar": 3, "val-000000.tar": 3}


@pytest.mark.parametrize("key,members", [
    ("a", {"txt": 0}), ("k-000000001", {"json": 511, "png": 512, "txt": 513}), ("x" * 96, {"png": 70000}),
    ("key", {"negative_12.jpeg": 1 << 20, "query.png": 3}), ("ключ-é", {"txt": 7}), ("k" * 120, {"txt": 5})])
def test_tar_bytes_match_tarfile(key, members):
    """TarOut writes exactly what tarfile writes for the same members and fields (ustar; a GNU
    long-name record past 100 bytes), so any tar reader sees standard members."""
    rng = random.Random(len(key))
    sample = {"__key__": key, **{ext: rng.randbytes(n) for ext, n in members.items()}}
    ours = io.BytesIO()
    out = tar_writer.TarOut(ours)
    out.write(sample)
    out.close()
    ref = io.BytesIO()
    long_names = {len(f"{key}.{ext}".encode()) > 100 for ext in members}
    assert len(long_names) == 1  # one format per case: tarfile writes one format per archive
    fmt = tarfile.GNU_FORMAT if long_names.pop() else tarfile.USTAR_FORMAT
    with tarfile.open(fileobj=ref, mode="w", format=fmt, encoding="utf-8") as tf:
        for ext in sorted(members):
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = members[ext], 0, 0o444, "coma", "coma"
            tf.addfile(ti, io.BytesIO(sample[ext]))
    assert ours.getvalue() == ref.getvalue() and out.size == len(ref.getvalue())


def test_long_member_names_round_trip(tmp_path):
    key = "k" * 150
    with open(tmp_path / "t.tar", "wb") as f:
        out = tar_writer.TarOut(f)
        out.write({"__key__": key, "txt": b"hello", "json": b"{}"})
        out.write({"__key__": "short", "txt": b"x" * 700, "json": b"{}"})
        out.close()
    assert os.path.getsize(tmp_path / "t.tar") % 10240 == 0
    with tarfile.open(tmp_path / "t.tar") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf}
    assert got == {f"{key}.json": b"{}", f"{key}.txt": b"hello", "short.json": b"{}", "short.txt": b"x" * 700}
    import webdataset as wds

    assert [s["__key__"] for s in wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False)] == [key, "short"]


def test_parallel_runs_exit_cleanly_as_a_command(tmp_path):
    """Regression: the pool used to be terminated while workers still flushed progress ticks; a
    worker killed holding the queue's write lock made the main process hang at interpreter exit
    (seen as a CI run that printed its summary and never returned)."""
    manifest = dataset(tmp_path, "pair", 12)
    bad = write_jsonl(tmp_path / "bad.jsonl", records("pair", [f"img{i:03d}.png" for i in range(11)]) +
                      [{"image": "images/missing.png", "text": "x"}])
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--workers", "2", "--samples-per-shard", "1"]
    for i in range(3):
        ok = subprocess.run(cmd + ["--input", str(manifest), "--output", str(tmp_path / f"ok{i}")],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        strict = subprocess.run(cmd + ["--input", str(bad), "--output", str(tmp_path / f"strict{i}"), "--strict"],
                                capture_output=True, text=True, timeout=120)
        assert strict.returncode == 1 and "missing_image" in strict.stderr, strict.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and open(f"/proc/{p}/stat").read().rsplit(") ", 1)[1].split()[1] == str(pid):
                kids.append(int(p))
        except (OSError, IndexError):
            continue
    return kids


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_stops_the_run_and_a_rerun_finishes(tmp_path):
    """A worker killed mid-run (as the OOM killer would) ends the run with exit 1 and a message
    (multiprocessing.Pool used to wait forever for the lost shard); the rerun completes, and its
    tars equal a clean run's."""
    import signal
    import time

    manifest = dataset(tmp_path, "pair", 48, size=(640, 640))  # ~ms per image: the run lasts a while
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--input", str(manifest), "--workers", "2",
           "--samples-per-shard", "3", "--max-image-side", "64"]
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 60
    while victim is None and time.time() < deadline and proc.poll() is None:
        if any(out.glob("*_stats.json")):  # a worker, once work is under way
            victim = next(iter(_children(proc.pid)), None)
        time.sleep(0.01)
    assert victim is not None, "the run ended before a worker could be killed; make it longer"
    os.kill(victim, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("shard.py hung after a worker was killed") from None
    assert proc.returncode == 1 and "worker process died" in err and "rerun the same command" in err, err

    assert subprocess.run(cmd + ["--output", str(out)], capture_output=True, timeout=120).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run(cmd + ["--output", str(clean)], capture_output=True, timeout=120).returncode == 0
    tars = sorted(p.name for p in clean.glob("*.tar"))
    assert tars == sorted(p.name for p in out.glob("*.tar")) and len(tars) == 16
    for t in tars:
        assert (out / t).read_bytes() == (clean / t).read_bytes(), t


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_with_a_killed_main_process_and_a_rerun_finishes(tmp_path):
    """kill -9 of shard.py itself (the OOM killer's choice: the biggest process) used to leave
    its pool workers alive forever, blocked on a pipe read; they now die with it, and a rerun
    still ends with the tars of a clean run."""
    import signal
    import time

    manifest = dataset(tmp_path, "pair", 48, size=(640, 640))
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--input", str(manifest), "--workers", "2",
           "--samples-per-shard", "3", "--max-image-side", "64"]
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 60
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid) if any(out.glob("*_stats.json")) else []
        time.sleep(0.01)
    assert len(workers) >= 2, "the run ended before its workers were seen; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if _alive(w)]
    for w in alive:  # leave nothing behind even when the assertion fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"shard.py workers {alive} outlived the killed main process"

    assert subprocess.run(cmd + ["--output", str(out)], capture_output=True, timeout=120).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run(cmd + ["--output", str(clean)], capture_output=True, timeout=120).returncode == 0
    tars = sorted(p.name for p in clean.glob("*.tar"))
    assert tars == sorted(p.name for p in out.glob("*.tar")) and len(tars) == 16
    assert all((out / t).read_bytes() == (clean / t).read_bytes() for t in tars)


@pytest.fixture
def small_fs(tmp_path):
    """A 512 KiB tmpfs (root only: skipped elsewhere): a disk that fills up, or goes read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _shard_cli(*args):
    r = subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "--workers", "2", *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


def test_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path, small_fs):
    manifest = dataset(tmp_path, "pair", 24, size=(128, 128))  # ~50 KB random PNGs: ~1.2 MB of shards
    rc, err = _shard_cli("--input", manifest, "--output", small_fs / "out", "--samples-per-shard", "3")
    assert rc == 1, err
    assert "warning: the shards will take about" in err and "free" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "No space left on device" in last and "rerun" in last, err
    assert "Traceback" not in err
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    assert _shard_cli("--input", manifest, "--output", small_fs / "out", "--samples-per-shard", "3")[0] == 0
    assert _shard_cli("--input", manifest, "--output", tmp_path / "clean", "--samples-per-shard", "3")[0] == 0
    tars = sorted(p.name for p in (tmp_path / "clean").glob("*.tar"))
    assert len(tars) == 8 and all((small_fs / "out" / t).read_bytes() == (tmp_path / "clean" / t).read_bytes()
                                  for t in tars)


def test_unwritable_outputs_are_one_line_naming_the_path(tmp_path, small_fs):
    manifest = dataset(tmp_path, "pair", 4)
    (tmp_path / "file").write_text("x")
    rc, err = _shard_cli("--input", manifest, "--output", tmp_path / "file" / "out")
    assert rc == 1 and err.count("\n") == 1 and f"{tmp_path / 'file'} is a file" in err, err
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    rc, err = _shard_cli("--input", manifest, "--output", small_fs / "out")
    assert rc == 1 and err.count("\n") == 1 and f"{small_fs} is on a read-only file system" in err, err


def test_a_manifest_of_only_bad_rows_leaves_no_shard_behind(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": f"images/missing{i}.png", "text": "x"} for i in range(3)])
    rc, err = _shard_cli("--input", bad, "--output", tmp_path / "out")
    assert rc == 1 and "no usable row" in err and "missing_image=3" in err, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.jsonl"]
