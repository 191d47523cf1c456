"""Charts (pipeline/plots.py): loss curves from metrics.jsonl, Precision@1 per task."""
import json

import pytest
from PIL import Image

from pipeline.plots import loss_series, plot_loss_curves, plot_precision_per_task, plot_run, read_metrics


def write_metrics(run, n=5, torn=True):
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss/train": 3.0 - 0.5 * s, "lr": 1e-4, "throughput/samples_per_s": 9.0})
             for s in range(1, n + 1)]
    lines.insert(2, json.dumps({"step": 2, "loss/eval": 2.5, "loss/nan": float("nan")}))
    lines.insert(0, json.dumps({"step": 3, "loss/train": 99.0}))  # superseded by the resumed run's row
    (run / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9, \"lo" if torn else "\n"))
    (run / "config.yaml").write_text("train:\n  stage: 2\n")


def test_loss_series_and_torn_line(tmp_path):
    write_metrics(tmp_path / "run")
    rows = read_metrics(str(tmp_path / "run"))
    assert len(rows) == 7  # the torn last line of a killed job is ignored
    s = loss_series(rows)
    assert s["loss/train"] == ([1, 2, 3, 4, 5], [2.5, 2.0, 1.5, 1.0, 0.5])
    assert s["loss/eval"] == ([2], [2.5])
    assert "loss/nan" not in s and "lr" not in s
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(str(tmp_path / "bad.jsonl"))


def test_pngs_are_written(tmp_path):
    write_metrics(tmp_path / "s1")
    write_metrics(tmp_path / "s2", torn=False)
    png = plot_run(str(tmp_path / "s2"))
    assert png == str(tmp_path / "s2" / "loss.png")
    assert plot_run(str(tmp_path)) is None  # no metrics.jsonl: nothing to draw
    both = plot_loss_curves({"stage 1": str(tmp_path / "s1"), "stage 2": str(tmp_path / "s2")},
                            str(tmp_path / "out" / "loss.png"))
    res = {"tasks": {"t2i": {"precision@1": 0.5}, "cls": {"precision@1": 0.9}}, "overall": {"precision@1": 0.7}}
    other = {"tasks": {"t2i": {"precision@1": 0.1}}, "overall": {"precision@1": 0.1}}
    bars = plot_precision_per_task({"trained": res, "untrained": other}, str(tmp_path / "p1.png"), chance=0.1)
    for p in (png, both, bars):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300
    with Image.open(both) as a, Image.open(png) as b:
        assert a.size[0] > b.size[0]  # one panel per stage
