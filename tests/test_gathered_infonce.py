"""gathered_infonce with 2 and 3 real gloo processes, equal and unequal local batches (with hard
negatives): gradients averaged over ranks (what DeepSpeed does) must equal the gradients of the
single-process fp64 mean loss on the concatenated global batch.

The file doubles as the worker script: ``python tests/test_gathered_infonce.py RANK WORLD PORT OUT``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coma_kernels

REPO = Path(__file__).resolve().parent.parent

# world -> list of (name, n per rank, m per rank, symmetric, backend, dtype)
CASES = {
    2: [("equal", [6, 6], [6, 6], False, "torch", torch.float64),
        ("equal_sym", [6, 6], [6, 6], True, "torch", torch.float64),
        ("unequal_hardneg_sym", [5, 9], [7, 9], True, "torch", torch.float64),
        ("unequal_triton_sym", [5, 9], [8, 9], True, "triton", torch.float32)],
    3: [("equal_hardneg", [4, 4, 4], [6, 6, 6], False, "torch", torch.float64),
        ("unequal", [3, 7, 5], [3, 10, 6], False, "torch", torch.float64),
        ("unequal_sym", [3, 7, 5], [3, 10, 6], True, "torch", torch.float64)],
}
D, SCALE = 12, 14.0


def global_batch(n, m, dtype, seed):
    """Per-rank (query, key) lists built from one seed, so every process sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    qs = [torch.nn.functional.normalize(torch.randn(a, D, generator=g, dtype=torch.float64), dim=-1) for a in n]
    ks = [torch.nn.functional.normalize(torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1) for b in m]
    for q, k in zip(qs, ks):
        k[: q.shape[0]] += 0.5 * q
    return [q.to(dtype) for q in qs], [k.to(dtype) for k in ks]


def worker(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    results = {}
    reduced = []  # numel of every all_reduce: the key gradient [M, D] must travel by reduce-scatter
    all_reduce = dist.all_reduce

    def counting_all_reduce(t, *a, **k):
        reduced.append(t.numel())
        return all_reduce(t, *a, **k)

    dist.all_reduce = counting_all_reduce
    for i, (name, n, m, sym, backend, dtype) in enumerate(CASES[world]):
        qs, ks = global_batch(n, m, dtype, seed=i)
        q = qs[rank].clone().requires_grad_()
        k = ks[rank].clone().requires_grad_()
        s = torch.tensor(SCALE, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
        reduced.clear()
        loss = coma_kernels.gathered_infonce(q, k, s, symmetric=sym, backend=backend)
        loss.backward()
        results[name] = {"loss": loss.detach(), "dq": q.grad, "dk": k.grad, "ds": s.grad,
                         "largest_all_reduce": max(reduced, default=0), "keys": sum(m)}
    dist.all_reduce = all_reduce
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, out)


def _launch(world, tmp_path):
    from conftest import free_port
    port = free_port()
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(tmp_path / f"{r}.pt")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo workers timed out")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_rank_averaged_gradients_equal_single_process_reference(world, tmp_path):
    per_rank = _launch(world, tmp_path)
    for i, (name, n, m, sym, backend, dtype) in enumerate(CASES[world]):
        qs, ks = global_batch(n, m, dtype, seed=i)
        q = torch.cat(qs).double().requires_grad_()
        k = torch.cat(ks).double().requires_grad_()
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        offsets = [sum(m[:r]) for r in range(world)]
        pidx = torch.cat([torch.arange(o, o + a) for o, a in zip(offsets, n)])
        ref = coma_kernels.fused_infonce(q, k, s, positive_index=pidx, symmetric=sym, backend="reference")
        ref.backward()
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
        res = [pr[name] for pr in per_rank]
        # the mean of the per-rank losses is the global mean loss
        torch.testing.assert_close(sum(r["loss"].double() for r in res) / world, ref.detach(), **tol, msg=name)
        # DeepSpeed averages: each rank's local gradient / world == the reference's rows
        torch.testing.assert_close(torch.cat([r["dq"].double() for r in res]) / world, q.grad, **tol, msg=name)
        torch.testing.assert_close(torch.cat([r["dk"].double() for r in res]) / world, k.grad, **tol, msg=name)
        torch.testing.assert_close(sum(r["ds"].double() for r in res) / world, s.grad, **tol, msg=name)
        # the [M, D] key gradient is reduce-scattered (each rank gets its rows), never all-reduced
        assert all(r["largest_all_reduce"] <= r["keys"] for r in res), (name, [r["largest_all_reduce"] for r in res])


def test_requires_initialised_process_group():
    q = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        coma_kernels.gathered_infonce(q, q, torch.tensor(10.0))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
