"""The Triton tile autotuner (coma_kernels/triton_tuning.py): spilling configurations are never
timed, the fastest clean one is kept per shape in the process and on disk, and the tuned loss
still matches float64.  Compilation and GPU timing are what a GPU supplies; here the selection,
the cache and the host-side integration run for real (the loss under the Triton interpreter),
with the resources of each candidate given per test (benchmarks/triton_resources.py and
tests/test_kernels_triton_aot.py read real sm_90 resources)."""
import json
import time
import warnings

import pytest
import torch

from coma_kernels import triton_tuning
from coma_kernels.triton_tuning import Resources, TileCache, TileConfig, choose, ctas_per_sm

A, B, C = TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 8, 3), TileConfig(128, 128, 64, 4, 3)


def test_spilling_candidates_are_never_timed():
    res = {A: Resources(255, 0, 96 << 10), B: Resources(118, 0, 72 << 10), C: Resources(255, 160, 96 << 10)}
    ms = {A: 3.0, B: 2.0, C: 1.0}   # the spiller would win on time: it must not be timed at all
    timed = []
    best, report = choose([A, B, C], res.__getitem__, lambda c: timed.append(c) or ms[c])
    assert best == B and timed == [A, B]
    rows = {r["config"]: r for r in report}
    assert rows[str(C)]["skipped"] == "spills 160 B per thread" and "ms" not in rows[str(C)]
    assert rows[str(B)]["ctas_per_sm"] == 2 and rows[str(A)]["ctas_per_sm"] == 1
    assert rows[str(A)]["ms"] == 3.0 and rows[str(B)]["registers"] == 118


def test_when_every_candidate_spills_all_are_timed_and_a_failing_compile_is_skipped():
    res = {A: Resources(255, 64, 96 << 10), C: Resources(255, 8, 96 << 10)}

    def resources(c):
        if c == B:
            raise RuntimeError("out of resources: shared memory")
        return res[c]

    timed = []
    best, report = choose([A, B, C], resources, lambda c: timed.append(c) or {A: 1.0, C: 2.0}[c])
    assert timed == [C, A] and best == A            # least spilling first; the time decides
    assert "out of resources" in next(r for r in report if r["config"] == str(B))["skipped"]
    with pytest.raises(RuntimeError, match="no Triton tile configuration compiled: RuntimeError: nope"):
        choose([B], lambda c: (_ for _ in ()).throw(RuntimeError("nope")), lambda c: 0.0)


def test_a_candidate_that_fails_to_launch_is_skipped():
    """A configuration can compile and still fail at launch (Triton's OutOfResources on a card
    with less shared memory): the tuner records why and times the rest; none launching is an error."""
    res = {A: Resources(255, 0, 96 << 10), B: Resources(118, 0, 72 << 10)}

    def timer(c):
        if c == A:
            raise RuntimeError("out of resource: shared memory, Required: 233472, Hardware limit: 232448")
        return 2.0

    best, report = choose([A, B], res.__getitem__, timer)
    assert best == B
    row = next(r for r in report if r["config"] == str(A))
    assert row["skipped"].startswith("launch failed: RuntimeError: out of resource") and "ms" not in row
    with pytest.raises(RuntimeError, match="no Triton tile configuration launched: launch failed"):
        choose([A], res.__getitem__, timer)


@pytest.mark.parametrize("regs,spill,shared,warps,want", [
    (255, 0, 96 << 10, 8, 1),    # the 128×128 default: one CTA per SM
    (128, 0, 72 << 10, 8, 2),    # 128×64 at 8 warps: exactly the 2-CTA register budget
    (129, 0, 72 << 10, 8, 1),    # one register more: the 256-register warp granule tips it
    (255, 0, 72 << 10, 4, 2),    # 4 warps: 255 registers still fit twice
    (40, 0, 120 << 10, 4, 1),    # shared memory limits instead
    (32, 0, 0, 4, 16),           # threads limit: 2048 / 128
])
def test_ctas_per_sm_on_hopper(regs, spill, shared, warps, want):
    assert ctas_per_sm(Resources(regs, spill, shared), warps) == want


def test_tile_config_parse():
    assert TileConfig.parse("128,64,64") == TileConfig(128, 64, 64, 8, 3)
    assert TileConfig.parse("16,16,16") == TileConfig(16, 16, 16, 4, 3)
    assert TileConfig.parse("128,64,64,4,4") == TileConfig(128, 64, 64, 4, 4)
    for bad in ("128,64", "a,b,c", "128,0,64", "1,2,3,4"):
        with pytest.raises(ValueError, match="COMA_INFONCE_TRITON_TILES"):
            TileConfig.parse(bad)


def test_resources_tool_names_a_malformed_config():
    """benchmarks/triton_resources.py --configs says what is wrong with the value it was given
    (its own process: the tool sets Triton up for sm_90 compiles, not the interpreter)."""
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "triton_resources.py"), "--configs", "128,x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "argument --configs: '128,x': expected BM,BN,BK" in r.stderr, r.stderr


def test_cache_survives_a_new_process_and_a_corrupt_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "tiles.json"
    monkeypatch.setenv("COMA_INFONCE_TRITON_TUNING_FILE", str(path))
    TileCache().put("k1", B, [{"config": str(B), "ms": 1.0}])
    assert TileCache().get("k1") == B and TileCache().get("k2") is None          # read back from disk
    assert json.loads(path.read_text())["k1"]["report"][0]["ms"] == 1.0
    path.write_text("{not json")
    fresh = TileCache()
    with pytest.warns(UserWarning, match="unreadable Triton tuning cache"):
        assert fresh.get("k1") is None
    with pytest.warns(UserWarning, match="unreadable"):
        fresh.put("k3", A, [])
    assert TileCache().get("k3") == A                                            # rewritten whole
    assert not [p for p in path.parent.iterdir() if p.name != "tiles.json"]      # no temporary left


def test_cache_in_an_unwritable_place_holds_for_the_process(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMA_INFONCE_TRITON_TUNING_FILE", str(blocker / "tiles.json"))   # parent is a file
    cache = TileCache()
    with pytest.warns(UserWarning, match="holds for this process only"):
        cache.put("k", B, [])
    assert cache.get("k") == B


def test_autotuned_loss_matches_float64_and_is_cached(tmp_path, monkeypatch):
    """The TritonOps integration under the interpreter: each kernel is tuned once on the real
    inputs (stats in the forward, grad on the first backward chunk), a spilling candidate is
    never launched for timing, the chosen tiles give the fp64 loss and gradients, and a new loss
    reads the choice from the file instead of tuning again."""
    from coma_kernels.infonce_triton import TritonOps
    from test_kernels_infonce import TOLS, assert_close, make, reference, run_ops

    monkeypatch.setenv("COMA_INFONCE_TRITON_TUNING_FILE", str(tmp_path / "tiles.json"))
    monkeypatch.setattr(triton_tuning, "CACHE", TileCache())
    small, wide, spiller = TileConfig(16, 16, 16, 4, 3), TileConfig(32, 64, 16, 4, 3), TileConfig(64, 32, 16, 4, 3)
    monkeypatch.setattr(triton_tuning, "CANDIDATES", (small, wide, spiller))
    probed, timed = [], []

    def resources(self, fn, grid, args, kwargs):
        cfg = (kwargs["BLOCK_M"], kwargs["BLOCK_N"])
        probed.append((fn.__name__, cfg))
        return Resources(255, 96 if cfg == (64, 32) else 0, 0)

    def timer(self, run):
        timed.append(self.chosen.copy())
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0 + (0.0 if self.chosen.get("grad", small) == wide else 1.0)

    monkeypatch.setattr(TritonOps, "_compiled_resources", resources)
    monkeypatch.setattr(TritonOps, "_time", timer)
    q, k, s = make(90, 150, 24, torch.float32, 33.3)
    ops = TritonOps(interpret=True, dtype=torch.float32, autotune=True)
    got = run_ops(ops, q, k, s, symmetric=True)
    assert_close(got, reference(q, k, s, symmetric=True), torch.float32, "autotuned", tols=TOLS)
    assert {name for name, _ in probed} == {"_stats_kernel", "_grad_tile_kernel"} and len(probed) == 6
    assert all(spiller not in t.values() for t in timed) and len(timed) == 4
    assert ops.chosen["grad"] == wide        # the timer made the wide tiles the fastest gradient kernel
    saved = json.loads((tmp_path / "tiles.json").read_text())
    assert sorted(key.split("|")[0] for key in saved) == ["grad", "stats"]
    for entry in saved.values():
        assert any(r.get("skipped", "").startswith("spills 96 B") for r in entry["report"])

    monkeypatch.setattr(triton_tuning, "CACHE", TileCache())   # a new process: only the file remains
    probed.clear(), timed.clear()
    again = TritonOps(interpret=True, dtype=torch.float32, autotune=True)
    got = run_ops(again, q, k, s, symmetric=True)
    assert_close(got, reference(q, k, s, symmetric=True), torch.float32, "cached", tols=TOLS)
    assert not probed and not timed and again.chosen == ops.chosen


def test_autotune_is_off_under_the_interpreter_even_when_asked(monkeypatch):
    from coma_kernels.infonce_triton import TritonOps

    monkeypatch.setenv("COMA_INFONCE_TRITON_AUTOTUNE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TritonOps.for_inputs(torch.device("cpu"), torch.float32).autotune is False
