"""Weights & Biases logging through pipeline.metrics, in offline mode (no account, no network):
the run's values reach W&B's run files, and a resumed run continues the same W&B run."""
import json

import pytest

from pipeline.metrics import Metrics

wandb = pytest.importorskip("wandb")


def test_offline_wandb_run_logs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    m = Metrics(run, tensorboard=False, wandb=True, wandb_project="coma-test", run_name="t",
                config={"optim": {"lr": 5e-5}})
    for step in (1, 2, 3):
        m.log(step, {"loss/train": 1.0 / step, "optim/lr": 5e-5, "throughput/mfu": None}, console=False)
    first_id = m._wandb.id
    m.close()
    assert (run / "wandb_id.txt").read_text().strip() == first_id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and first_id in runs[0].name
    assert any(runs[0].glob("*.wandb")), "W&B wrote no run data"

    resumed = Metrics(run, tensorboard=False, wandb=True, wandb_project="coma-test", run_name="t")
    resumed.log(4, {"loss/train": 0.2}, console=False)
    assert resumed._wandb.id == first_id
    resumed.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
