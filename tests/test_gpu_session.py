"""benchmarks/gpu_session.sh, the script every lent GPU runs first, dry-run on this CPU machine:
every phase leaves one JSON line the moment it ends (a call cut short keeps what finished), the
GPU phases say they were skipped, and the phases' limits fit a rerun into one session's budget."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
PHASES = ["env", "correctness", "breakdown", "variants", "wheels", "loss", "compression"]  # the first call


def test_phase_limits_fit_both_calls_in_the_budget():
    """The first call (the default phases) and the second (wheels + the 3B run) each leave room
    for a rerun in a 15-minute device budget, machine start-up included."""
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^phase (\w+) (\d+) ", SCRIPT.read_text(), re.M)}
    assert list(limits) == PHASES + ["train"]
    assert sum(limits[p] for p in PHASES) <= 420, limits
    assert limits["wheels"] + limits["train"] <= 200, limits
    assert "PHASES='wheels train'" in SCRIPT.read_text()


def test_dry_run_writes_a_json_line_per_phase(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in (out / "phases.jsonl").read_text().splitlines()]
    assert [p["phase"] for p in lines] == PHASES
    first = lines[0]
    assert first["status"] == "ok" and first["result"]["torch"] and "gpu" in first["result"]
    assert all(p["status"] == "skipped" for p in lines[1:]), [(p["phase"], p["status"], p["tail"]) for p in lines]
    assert all((out / f"{p}.log").exists() for p in PHASES)
