"""data_prep/builtin.py (the bundled digits dataset) and the data part of launch/demo.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, load_script
from data_prep.builtin import NAMES, sources
from pipeline.data import open_shards


def manifest_images(path) -> set[str]:
    out = set()
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        sides = [r] if "image" in r else [r["query"], r["positive"], *r.get("negatives", [])]
        out |= {s["image"] for s in sides if s.get("image")}
    return out


def test_split_is_disjoint_and_complete(builtin_dir):
    summary = json.loads((builtin_dir / "builtin.json").read_text())
    assert summary["train_images"] + summary["eval_images"] == 1797
    train = set().union(*(manifest_images(builtin_dir / f"{n}.jsonl") for n in ("pair", "qa", "mmeb")))
    ev = manifest_images(builtin_dir / "eval.jsonl")
    assert not train & ev
    assert len(train) == summary["train_images"] and len(ev) == summary["eval_images"]
    sets = summary["sets"]
    assert {n: (s["kind"], s["samples"], s["num_shards"]) for n, s in sets.items()} == {
        "pair": ("pair", 1498, 8), "qa": ("qa", 1498, 8), "mmeb": ("mmeb", 3 * 1498, 8), "eval": ("mmeb", 3 * 299, 8)}
    assert sets["eval"]["tasks"] == ["digits_cls", "digits_i2t", "digits_t2i"]


def test_sets_read_back_through_the_loader(builtin_dir):
    src = sources(builtin_dir)
    ev = open_shards(src["eval"]["shards"], kind="mmeb", batch_size=64, rank=0, world_size=1, num_workers=0,
                      shuffle=False, drop_last=False)
    samples = [s for b in ev for s in b]
    assert len(samples) == 897 and not any(s["__pad__"] for s in samples)
    for s in samples[:30]:
        label = NAMES[s["meta"]["label"]]
        assert len(s["negatives"]) == 9
        if s["task"] == "digits_cls":
            assert s["positive"]["text"] == label and s["query"]["image"].size == (56, 56)
            assert sorted([n["text"] for n in s["negatives"]] + [label]) == sorted(NAMES)
        if s["task"] == "digits_t2i":
            assert label in s["query"]["text"] and s["positive"]["image"].mode == "RGB"
    qa = open_shards(src["qa"]["shards"], kind="qa", batch_size=4, rank=1, world_size=2, num_workers=0)
    s = next(iter(qa))[0]
    assert s["conversations"][0] == {"question": "Which digit is written here?", "answer": NAMES[s["meta"]["label"]]}
    assert s["conversations"][1]["answer"] == ("odd" if s["meta"]["label"] % 2 else "even")
    assert s["image"].size == (56, 56) and s["image"].mode == "RGB"


def test_rerun_is_a_no_op(builtin_dir):
    before = {}
    for root, _, files in os.walk(builtin_dir):
        for f in files:
            p = os.path.join(root, f)
            before[p] = os.stat(p).st_mtime_ns
    r = subprocess.run([sys.executable, str(REPO / "data_prep" / "builtin.py"), "--output", str(builtin_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1498 train / 299 eval images" in r.stdout
    assert [p for p, t in before.items() if os.stat(p).st_mtime_ns != t] == []
    assert r.stdout.count("(0 written at 0 rows/s, 8 already complete)") == 4


def test_demo_data_part(builtin_dir, capsys):
    report = load_script(REPO / "launch" / "demo.py").data_demo(str(builtin_dir), world_size=2, batch_size=16, num_workers=0)
    assert report["mmeb"]["per_task"] == {"digits_cls": 1498, "digits_i2t": 1498, "digits_t2i": 1498}
    assert report["eval"]["samples"] == 897 and report["eval"]["padded"] == 1
    for r in report.values():
        assert r["batches_per_rank"][0] == r["batches_per_rank"][1]
    out = capsys.readouterr().out
    assert "each exactly once over 2 ranks" in out and "e.g. digits-" in out
