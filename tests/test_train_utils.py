"""LR schedule and the metrics writer."""
import json
import math

import pytest

from pipeline.metrics import Metrics, format_line, read_jsonl
from pipeline.schedule import lr_multiplier


def test_warmup_cosine():
    total = 100  # 5% warm-up = 5 steps
    ms = [lr_multiplier(s, total, 0.05, 0.0) for s in range(total)]
    assert ms[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ms[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(ms[5:], ms[6:]))  # monotone decay after warm-up
    assert 0 < ms[-1] < 1e-3                             # the last update still moves the weights
    assert lr_multiplier(5 + 95 // 2, total, 0.05, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_multiplier(100, total, 0.05, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, total, 0.0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier(50, total, 0.0, schedule="linear")


def test_metrics_files(tmp_path):
    m = Metrics(tmp_path, tensorboard=True)
    m.log(1, {"loss/train": 2.5, "optim/lr": 1e-4, "throughput/mfu": 0.41, "loss/ce": 2.5})
    m.log(2, {"loss/train": float("nan"), "optim/lr": 1e-4})
    m.log(2, {"loss/train": 2.0, "optim/lr": 1e-4})  # a resumed run re-logs step 2
    m.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss/train"] == 2.0
    raw = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert raw[1]["loss/train"] == "nan"
    assert list((tmp_path / "tensorboard").iterdir())
    line = format_line(1, {"loss/train": 2.5, "optim/lr": 1e-4, "throughput/mfu": 0.41, "loss/ce": 2.5})
    assert line == "step 1 | loss 2.5000 | lr 1.00e-04 | MFU 41.0% | ce 2.5000"
    off = Metrics(tmp_path / "other", enabled=False)
    off.log(1, {"loss/train": 1.0})
    assert not (tmp_path / "other").exists()
