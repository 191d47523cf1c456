"""The demo's training commands stay valid against the presets and the config schema (cheap: no
training here; `make demo` runs the demo itself)."""
from pathlib import Path

import pytest

from conftest import REPO


def test_demo_stage_args_parse(tmp_path):
    from launch.demo import stage_args
    from pipeline.config import ConfigError
    from pipeline.cli import parse_cli

    for stage in (1, 2):
        run_dir = tmp_path / "demo-x" / f"stage{stage}"
        argv = stage_args(stage, "runs/tiny-qwen2vl", "data/builtin/shards/qa/train-{000000..000007}.tar", run_dir, 7,
                          ["--optim.lr=1e-3"])
        cfg = parse_cli(stage, argv)
        assert cfg.train.stage == stage and cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3
        assert Path(cfg.train.run_root) / cfg.train.name == run_dir
        assert cfg.data.sources[0].shards.endswith("train-{000000..000007}.tar")
        assert cfg.model.init == "runs/tiny-qwen2vl"
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_cli(1, stage_args(1, "m", "s", tmp_path / "r", 1, ["--optim.lrr=1"]))


def test_demo_table_names_every_column():
    from launch.demo import COLUMNS, results_table

    res = {"tasks": {t: {"precision@1": 0.25 * (i + 1)} for i, t in enumerate(COLUMNS)}, "overall": {"precision@1": 0.5}}
    table = results_table({"untrained": res, "stage 1 + stage 2": res}, "note")
    lines = table.splitlines()
    assert lines[0] == "note" and all(c in lines[1] for c in COLUMNS.values())
    assert lines[3].split()[-4:] == ["25.0", "50.0", "75.0", "50.0"]
    assert (REPO / "launch/configs/stage1_tiny.yaml").is_file()
