"""Retrieval metrics (pipeline/evaluate.py) against hand-computed cases, with a deterministic fake encoder."""

import pytest
import torch
from PIL import Image

from pipeline.evaluate import (ItemTable, build_queries, evaluate, format_table, rank_of_positive,
                               retrieval_metrics)

# 2-D vectors chosen so every score below can be worked out by hand.
VEC = {
    "q1": [1, 0], "p1": [1, 0], "n1": [0, 1], "n2": [-1, 0],
    "q2": [0, 1], "p2": [1, 0],
    "a cat": [1, 0.9], "a dog": [0.2, 1], "another cat": [1, 0.5],
    "cat": [1, 1], "dog": [1, -1],
}


class FakeEncoder:
    """text → VEC[text]; image → its mean red/green level.  Records how many items it embedded."""

    def __init__(self):
        self.calls = 0

    def __call__(self, items):
        self.calls += len(items)
        out = []
        for it in items:
            if "image" in it:
                r, g, _ = [c / 255 for c in it["image"].convert("RGB").resize((1, 1)).getpixel((0, 0))]
                out.append([r, g])
            else:
                out.append(VEC[it["text"]])
        return torch.tensor(out, dtype=torch.float32) * 3.0  # not normalised on purpose


def mmeb(task, q, p, negs=None, key=None):
    def side(x):
        return {"text": None, "image": x} if isinstance(x, Image.Image) else {"text": x, "image": None}
    return {"__key__": key or f"{task}-{q}", "kind": "mmeb", "task": task, "query": side(q),
            "positive": side(p), "negatives": [side(n) for n in (negs or [])], "meta": {}}


def hand_samples():
    return [
        mmeb("A", "q1", "p1", ["n1", "n2"]),     # scores p1 1, n1 0, n2 -1      -> rank 0
        mmeb("A", "q2", "p2", ["n1", "n2"]),     # scores p2 0, n1 1, n2 0       -> rank 2 (tie counts against)
        mmeb("B", "a cat", "cat"),               # pool {cat, dog}: 1.9 vs 0.1   -> rank 0
        mmeb("B", "a dog", "dog"),               # 1.2 (cat) vs -0.8 (dog)       -> rank 1
        mmeb("B", "another cat", "cat"),         # 1.5 vs 0.5                    -> rank 0
    ]


def test_rank_of_positive_ties():
    s = torch.tensor([0.5, 0.9, 0.5, 0.1])
    assert rank_of_positive(s, 0, "pessimistic") == 2
    assert rank_of_positive(s, 0, "first") == 1
    assert rank_of_positive(s, 1, "pessimistic") == 0
    assert rank_of_positive(s, 3, "first") == 3
    with pytest.raises(ValueError):
        rank_of_positive(s, 0, "random")


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics([0, 2, 7, 12])
    assert m["n"] == 4
    assert m["precision@1"] == pytest.approx(0.25) and m["recall@1"] == pytest.approx(0.25)
    assert m["recall@5"] == pytest.approx(0.5)
    assert m["recall@10"] == pytest.approx(0.75)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 8 + 1 / 13) / 4)
    with pytest.raises(ValueError):
        retrieval_metrics([])


def test_evaluate_by_hand():
    enc = FakeEncoder()
    res = evaluate(hand_samples(), enc, batch_size=3, progress=False)
    a, b = res["tasks"]["A"], res["tasks"]["B"]
    assert [p["rank"] for p in res["predictions"]] == [0, 2, 0, 1, 0]
    assert a["candidate_mode"] == "own" and a["mean_candidates"] == 3
    assert b["candidate_mode"] == "pool" and b["mean_candidates"] == 2  # "cat" pooled once
    assert a["precision@1"] == pytest.approx(0.5) and a["recall@5"] == 1.0
    assert a["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert b["precision@1"] == pytest.approx(2 / 3) and b["mrr"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert res["overall"]["precision@1"] == pytest.approx((0.5 + 2 / 3) / 2)  # mean over tasks
    assert res["overall"]["n"] == 5 and res["overall"]["tasks"] == 2
    # 11 distinct inputs, each embedded exactly once.
    assert res["distinct_inputs_embedded"] == 11 and enc.calls == 11
    assert res["predictions"][1]["pred"] == 1  # n1 scored highest for q2
    table = format_table(res)
    assert "own(3)" in table and "pool(2)" in table and "overall" in table
    assert "66.7" in table  # B's P@1 in percent


def test_mixed_mode_and_image_dedup():
    red1 = Image.new("RGB", (9, 7), (255, 0, 0))
    red2 = Image.new("RGB", (9, 7), (255, 0, 0))      # same pixels, another object
    green = Image.new("RGB", (9, 7), (0, 255, 0))
    samples = [mmeb("C", "p1", red1, [green], key="x"),  # own: red 1 vs green 0 -> rank 0
               mmeb("C", "n1", red2, key="y")]           # pool {red}: a single candidate -> rank 0
    enc = FakeEncoder()
    res = evaluate(samples, enc, progress=False)
    c = res["tasks"]["C"]
    assert c["candidate_mode"] == "mixed"
    assert c["queries_own_candidates"] == 1 and c["queries_pool_candidates"] == 1
    assert res["distinct_inputs_embedded"] == 4  # p1, n1, red, green
    assert c["precision@1"] == 1.0


def test_collapsed_encoder_scores_zero():
    """Ties count against the positive: a model mapping everything to one vector gets 0, not 1."""
    res = evaluate(hand_samples(), lambda items: torch.ones(len(items), 4), progress=False)
    assert res["overall"]["precision@1"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected"):
        evaluate(hand_samples(), lambda items: torch.ones(len(items) + 1, 2), progress=False)
    with pytest.raises(ValueError, match="mmeb"):
        build_queries([{"__key__": "k", "kind": "pair", "image": None, "text": "x"}])
    with pytest.raises(ValueError, match="no samples"):
        evaluate([], FakeEncoder(), progress=False)


def test_item_table_dedups_by_content():
    t = ItemTable()
    assert t.add({"text": "a"}) == t.add({"text": "a"}) == 0
    assert t.add({"text": "a", "image": Image.new("RGB", (2, 2))}) == 1
    assert t.add({"text": "a", "image": Image.new("RGB", (2, 2), (1, 1, 1))}) == 2
    assert len(t) == 3


def write_mmeb_shards(out, kind="mmeb"):
    """Two samples through the real data_prep/shard.py (one per shard): a t2i query with an own
    negative, and an image query whose positive is a class name (no negatives -> pool)."""
    import json

    from data_prep import shard

    out.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(out / "red.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(out / "green.png")
    recs = [{"key": "s0", "task": "t2i", "query": {"text": "p1", "image": None},
             "positive": {"text": None, "image": "red.png"}, "negatives": [{"text": None, "image": "green.png"}]},
            {"key": "s1", "task": "cls", "query": {"text": "<|image_1|> which class?", "image": "green.png"},
             "positive": {"text": "n1", "image": None}, "meta": {"y": 1}}]
    if kind == "qa":
        recs = [{"key": "q0", "image": "red.png", "conversations": [{"question": "colour?", "answer": "red"}]}]
    (out / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert shard.main(["--input", str(out / "m.jsonl"), "--output", str(out / "shards"), "--kind", kind,
                       "--prefix", "eval", "--samples-per-shard", "1", "--workers", "1"]) == 0
    return out / "shards"


def test_read_mmeb_shards_and_evaluate(tmp_path):
    from pipeline.evaluate import read_mmeb_shards

    d = write_mmeb_shards(tmp_path / "ok")
    samples = read_mmeb_shards(str(d / "eval-{000000..000001}.tar"))
    assert [s["__key__"] for s in samples] == ["s0", "s1"]
    s0, s1 = samples
    assert s0["positive"]["image"].getpixel((0, 0)) == (255, 0, 0) and s0["query"]["image"] is None
    assert s1["query"]["text"] == "<image> which class?" and s1["meta"] == {"y": 1} and s1["negatives"] == []
    assert [s["__key__"] for s in read_mmeb_shards(str(d), max_samples=1)] == ["s0"]  # a shard folder works too
    res = evaluate(samples, FakeEncoder(), progress=False)
    assert res["tasks"]["t2i"]["candidate_mode"] == "own" and res["tasks"]["cls"]["candidate_mode"] == "pool"
    assert res["tasks"]["t2i"]["precision@1"] == 1.0  # p1=[1,0] matches red, not green
    with pytest.raises(Exception, match="eval-000002"):
        read_mmeb_shards(str(d / "eval-{000000..000002}.tar"))
    with pytest.raises(ValueError, match="mmeb"):
        read_mmeb_shards(str(write_mmeb_shards(tmp_path / "qa", kind="qa")))
