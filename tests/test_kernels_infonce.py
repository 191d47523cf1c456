"""Every tiled InfoNCE backend against an fp64 materialised reference on the same inputs:
loss and the gradients w.r.t. query, key and logit_scale.  Triton runs under
TRITON_INTERPRET=1 (set in conftest.py), so sizes stay ≤ 512."""
import subprocess
import sys

import pytest
import torch

import coma_kernels

# (dtype, rtol on the loss (relative to |loss| + 1), rtol on gradients (relative to the largest reference value))
TOLS = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 4e-2)}


def make(n, m, d, dtype, scale, seed=0, normalise=True, edge=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(m, d, generator=g, dtype=torch.float64)
    if normalise:  # embeddings are L2-normalised in training: cos in [-1, 1]
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        k[: min(n, m)] += edge * q[: min(n, m)]  # give the positives an edge
    return q.to(dtype), k.to(dtype), torch.tensor(float(scale))


def run(backend, q, k, s, **kw):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    loss = coma_kernels.fused_infonce(q, k, s, backend=backend, **kw)
    gq, gk, gs = torch.autograd.grad(loss, (q, k, s))
    return [loss.detach(), gq, gk, gs]


def reference(q, k, s, **kw):
    # fp64 on exactly the (rounded) inputs the backend sees
    return run("reference", q.double(), k.double(), s.double(), **kw)


def assert_close(got, want, dtype, what="", tols=None):
    lt, gt = (tols or TOLS)[dtype]
    names = ["loss", "d_query", "d_key", "d_logit_scale"]
    for name, a, b, tol in zip(names, got, want, [lt, gt, gt, gt]):
        a = a.double()
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        err = (a - b).abs().max().item()
        ref = b.abs().max().item() + (1.0 if name == "loss" else 1e-12)  # a loss near 0 still carries lse-sized error
        assert err <= tol * ref, f"{what} {name}: max err {err:.3e} > {tol:.0e} x {ref:.3e}"


CASES = [
    # n, m, D, scale, symmetric, custom positives
    (37, 37, 19, 1.0, False, False),
    (50, 77, 8, 33.3, True, False),       # hard negatives, D=8
    (96, 130, 72, 100.0, False, True),    # custom positive_index (with repeats)
    (130, 200, 40, 20.0, True, True),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}m{}d{}s{}{}{}".format(
    c[0], c[1], c[2], int(c[3]), "sym" if c[4] else "", "pidx" if c[5] else ""))
def test_backend_matches_fp64_reference(backend, dtype, case):
    n, m, d, scale, sym, custom = case
    q, k, s = make(n, m, d, dtype, scale, seed=n + m)
    kw = {"symmetric": sym}
    if custom:
        kw["positive_index"] = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(1))
    got = run(backend, q, k, s, **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype, "gradients must come back in the input dtype"
    assert_close(got, reference(q, k, s, **kw), dtype, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_trained_regime_keeps_small_gradients(backend, dtype):
    """p(positive) = 0.999 on average: the gradient is the small difference 1 − p of two O(1)
    numbers.  The positive term must be subtracted in fp32 before G is rounded to the input
    dtype; a bf16/fp16 G would round 1 − p (≈ 1e-3) to 0 or to 2⁻⁸ and fail these tolerances."""
    from coma_kernels.infonce_reference import trained_regime_inputs

    q64, k64 = trained_regime_inputs(200, 260, 48, 33.3, generator=torch.Generator().manual_seed(3))
    q, k, s = q64.to(dtype), k64.to(dtype), torch.tensor(33.3)
    for sym in (False, True):
        got = run(backend, q, k, s, symmetric=sym)
        assert_close(got, reference(q, k, s, symmetric=sym), dtype, f"{backend}/{dtype} sym={sym}",
                     tols={**TOLS, torch.float32: (1e-5, 1e-3)})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_and_odd_embedding_sizes(backend):
    for d in (8192, 1000):
        q, k, s = make(20, 33, d, torch.float32, 50.0, seed=d, edge=0.05)
        assert_close(run(backend, q, k, s, symmetric=True), reference(q, k, s, symmetric=True),
                     torch.float32, f"D={d}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_no_nan_or_inf_at_extreme_scale_and_identical_rows(backend, dtype):
    # random unnormalised inputs (cos ~ 0 but |logit| up to ~100·|q||k|), and all-identical rows
    q, k, s = make(64, 90, 48, dtype, 100.0, normalise=False)
    ref = reference(q, k, s, symmetric=True)
    got = run(backend, q, k, s, symmetric=True)
    for t in got:
        assert torch.isfinite(t).all()
    assert_close(got, ref, dtype, "unnormalised s=100")
    same = torch.ones(40, 16, dtype=dtype)
    got = run(backend, same, same, s, symmetric=True)
    ref = reference(same, same, s, symmetric=True)
    for t in got:
        assert torch.isfinite(t).all()
    # uniform softmax: loss = log n and the exact gradients are 0; logits are 1600 here, so fp32
    # lse carries ~1e-4 absolute error (one ulp of 1600) and the gradients inherit it
    assert abs(got[0].item() - ref[0].item()) < 1e-3
    for t in got[1:]:
        assert t.abs().max().item() < 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reductions(backend):
    q, k, s = make(45, 60, 24, torch.float32, 10.0)
    for sym in (False, True):
        none = coma_kernels.fused_infonce(q, k, s, symmetric=sym, reduction="none", backend=backend)
        ref = coma_kernels.fused_infonce(q.double(), k.double(), s.double(), symmetric=sym, reduction="none",
                                    backend="reference")
        assert none.shape == (45,)
        torch.testing.assert_close(none.double(), ref, rtol=1e-5, atol=1e-5)
        total = coma_kernels.fused_infonce(q, k, s, symmetric=sym, reduction="sum", backend=backend)
        mean = coma_kernels.fused_infonce(q, k, s, symmetric=sym, backend=backend)
        torch.testing.assert_close(total, none.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean, none.mean(), rtol=1e-5, atol=1e-5)
    # reduction="none" is differentiable per query
    qq = q.clone().requires_grad_()
    w = torch.rand(45)
    (coma_kernels.fused_infonce(qq, k, s, reduction="none", backend=backend) * w).sum().backward()
    qr = q.double().requires_grad_()
    (coma_kernels.fused_infonce(qr, k.double(), s.double(), reduction="none", backend="reference") * w.double()).sum().backward()
    torch.testing.assert_close(qq.grad.double(), qr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sym", [False, True])
def test_loss_and_grads_without_autograd(backend, sym):
    q, k, s = make(70, 100, 32, torch.float32, 33.3)
    pidx = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:70]
    loss, dq, dk, ds = coma_kernels.infonce_loss_and_grads(q, k, s, positive_index=pidx, symmetric=sym, backend=backend)
    assert not loss.requires_grad and not dq.requires_grad
    assert_close([loss, dq, dk, ds], reference(q, k, s, positive_index=pidx, symmetric=sym), torch.float32, "no-autograd")
    # grad_scale multiplies the gradients only
    loss2, dq2, _, ds2 = coma_kernels.infonce_loss_and_grads(q, k, s, positive_index=pidx, symmetric=sym,
                                                        backend=backend, grad_scale=4.0)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(dq2, 4 * dq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ds2, 4 * ds, rtol=1e-5, atol=1e-7)


def test_torch_backend_chunking_is_invisible():
    from coma_kernels.infonce import infonce_loss_and_grads
    from coma_kernels.infonce_torch import TorchOps
    q, k, s = make(100, 150, 16, torch.float64, 25.0)
    pidx = torch.arange(100)
    whole = infonce_loss_and_grads(q, k, s, pidx, True, TorchOps(chunk=1000))
    for chunk in (1, 7, 64):
        part = infonce_loss_and_grads(q, k, s, pidx, True, TorchOps(chunk=chunk))
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    q, k, s = make(8, 8, 4, torch.float32, 10.0)
    with pytest.raises(ValueError, match="m >= n"):
        coma_kernels.fused_infonce(q, k[:4], s)
    with pytest.raises(ValueError, match="embedding size D"):
        coma_kernels.fused_infonce(q, k[:, :3], s)
    with pytest.raises(ValueError, match="same dtype"):
        coma_kernels.fused_infonce(q, k.half(), s)
    with pytest.raises(ValueError, match="0-dim"):
        coma_kernels.fused_infonce(q, k, torch.tensor([10.0]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        coma_kernels.fused_infonce(q, k, s, positive_index=torch.full((8,), 8))
    with pytest.raises(ValueError, match="reduction"):
        coma_kernels.fused_infonce(q, k, s, reduction="avg")
    with pytest.raises(ValueError, match="loss.backend"):
        coma_kernels.fused_infonce(q, k, s, backend="cudnn")


def test_unavailable_backends_say_why(monkeypatch):
    q, k, s = make(8, 8, 4, torch.float32, 10.0)
    with pytest.raises(RuntimeError, match="CUDA"):
        coma_kernels.fused_infonce(q, k, s, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        coma_kernels.fused_infonce(q, k, s, backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        coma_kernels.fused_infonce(q.double(), k.double(), s, backend="triton")


def test_auto_picks_torch_on_cpu_and_import_is_lazy(repo_root):
    assert coma_kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert coma_kernels.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    code = ("import sys, kernels; lazy = ('triton', 'coma_kernels.infonce_triton', 'coma_kernels.infonce_cuda', "
            "'coma_kernels.distributed'); bad = [m for m in lazy if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"importing kernels pulled in {r.stdout} {r.stderr[-500:]}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_does_not_lower_precision(backend):
    """An outer autocast (a training step's bf16 region) turned the triton host loop's fp32
    GEMMs (tiled.py) into bf16 ones."""
    q, k, s = make(40, 60, 32, torch.float32, 33.3)
    want = run(backend, q, k, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(backend, q, k, s)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-7)


def test_triton_column_splits_and_row_chunks(monkeypatch):
    # forward with the key columns split over programs, backward over several row chunks
    monkeypatch.setenv("COMA_INFONCE_SPLITS", "3")
    monkeypatch.setenv("COMA_INFONCE_CHUNK_ELEMS_GPU", "1")
    q, k, s = make(300, 410, 24, torch.float16, 33.3)
    pidx = torch.randint(0, 410, (300,), generator=torch.Generator().manual_seed(5))
    for sym in (False, True):
        got = run("triton", q, k, s, symmetric=sym, positive_index=pidx)
        assert_close(got, reference(q, k, s, symmetric=sym, positive_index=pidx), torch.float16, f"sym={sym}")


@pytest.mark.parametrize("tiles,n", [("16,16,16", 70), ("16,16,16", 200), ("128,128,64", 70)])
def test_triton_other_tile_shapes(monkeypatch, tiles, n):
    # many small partial tiles (and a D loop of several steps), the GPU's own tile shape, and
    # 13 row blocks: one whole raster group of GROUP_M = 8 and a partial one of 5
    monkeypatch.setenv("COMA_INFONCE_TRITON_TILES", tiles)
    m = max(99, n + 29)
    q, k, s = make(n, m, 40, torch.float32, 33.3)
    pidx = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2))
    got = run("triton", q, k, s, symmetric=True, positive_index=pidx)
    assert_close(got, reference(q, k, s, symmetric=True, positive_index=pidx), torch.float32, tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dk_accumulates_in_place_in_fp32(dtype):
    """tiled.py's dK += alpha · Gᵀ Q_chunk writes into the fp32 accumulator itself (no [m, D]
    temporary per chunk on CUDA); every path gives the fp32 sum of the products."""
    from coma_kernels.tiled import addmm_f32_

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 19, generator=g).to(dtype), torch.randn(19, 11, generator=g).to(dtype)
    out = torch.randn(37, 11, generator=g)
    want = out.double() + 0.5 * (a.double() @ b.double())
    addmm_f32_(out, a, b, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_chunks_stay_within_the_gradients_size_and_free_memory(monkeypatch):
    """The chunk buffers take at most the bytes of the fp32 dQ and dK ((n + m)·D·4) and a quarter
    of the free memory: at n = m = 32k, D = 2048 in bf16 an 80 GB card gets 8192-row chunks (512
    MiB of G, not the 2 GiB of one chunk); 1 GiB free gives 4096 rows; the CUDA backend's 6 bytes
    of S and G per element give smaller chunks; a small loss is one chunk; a row block at least,
    and the forced element count wins over both bounds."""
    from coma_kernels.tiled import chunk_rows

    monkeypatch.delenv("COMA_INFONCE_CHUNK_ELEMS_GPU", raising=False)
    n = m = 32768
    assert chunk_rows(n, m, 2048, 128, 2, 70 << 30) == 8192       # 512 MiB = (n + m)·D·4 bytes of G
    assert chunk_rows(n, m, 2048, 128, 2, None) == 8192           # the interpreter: no memory reading
    assert chunk_rows(n, m, 2048, 128, 2, 1 << 30) == 4096        # 256 MiB of G: a quarter of 1 GiB
    assert chunk_rows(n, m, 2048, 128, 6, 70 << 30) == 2688       # S fp32 + G bf16: 512 MiB / 6 B / 32k
    assert chunk_rows(n, m, 2048, 128, 2, 1 << 20) == 128         # never less than one row block
    assert chunk_rows(4096, m, 2048, 128, 2, 70 << 30) == 4096    # a rank's rows against gathered keys
    assert chunk_rows(100, 50, 8, 64, 2, 70 << 30) == 128         # all rows, whole blocks (64 MiB floor)
    monkeypatch.setenv("COMA_INFONCE_CHUNK_ELEMS_GPU", "1")
    assert chunk_rows(n, m, 2048, 128, 2, 70 << 30) == 128
    monkeypatch.setenv("COMA_INFONCE_CHUNK_ELEMS_GPU", str(1 << 40))
    assert chunk_rows(n, m, 2048, 128, 2, 1 << 30) == n           # one chunk, whatever the bounds


def test_backward_g_buffer_is_bounded_by_the_gradients(monkeypatch):
    """chunked_grads sizes its G buffer from (n + m)·D: with the 64 MiB floor lowered, n = m = 512,
    D = 16 in bf16 may hold 64 KiB of G, i.e. 64 rows of 512 keys: eight chunks, and the
    gradients of those chunks still equal one chunk's."""
    from coma_kernels import tiled

    monkeypatch.delenv("COMA_INFONCE_CHUNK_ELEMS_GPU", raising=False)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(512, 16, generator=g), torch.randn(512, 16, generator=g)
    weights = torch.randn(512, 512, generator=g) / 512

    def run(floor):
        monkeypatch.setattr(tiled, "MIN_CHUNK_BYTES", floor)
        chunks = []

        def write_g(r0, r1, buf):
            chunks.append((r0, r1, buf.shape[0]))
            buf.copy_(weights[r0:r1])

        return chunks, tiled.chunked_grads(q, k, 2.0, 1.0, torch.bfloat16, 32, 0, write_g)

    few, want = run(tiled.MIN_CHUNK_BYTES)
    many, got = run(0)
    assert few == [(0, 512, 512)]
    assert [c[:2] for c in many] == [(r, r + 64) for r in range(0, 512, 64)] and {c[2] for c in many} == {64}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def run_ops(ops, q, k, s, symmetric=False, positive_index=None):
    """run() with an ops object instead of a backend name (the CUDA host loop on the CPU)."""
    from coma_kernels.infonce import check_inputs, infonce_forward

    q, k, s = (x.detach().clone().requires_grad_() for x in (q, k, s))
    pidx = check_inputs(q, k, s, positive_index, "mean")  # as fused_infonce does: default arange(n)
    loss = infonce_forward(q, k, s, pidx, symmetric, "mean", ops)
    return [loss.detach(), *torch.autograd.grad(loss, (q, k, s))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_elems", [None, "1"])
def test_cuda_host_loop(monkeypatch, dtype, chunk_elems):
    """The CUDA backend's host loop (cuBLAS logits chunks, then the fused epilogues) with the
    kernels' contracts in torch (TorchEpilogue) on the CPU, against float64: one chunk, and
    chunks of one 128-row group; 300 rows (a partial group), 1100 keys (a partial 1024-column
    block); symmetric, custom positives, and the trained regime where G must not round 1 − p
    away.  On a GPU benchmarks/gpu_check.py runs the compiled kernels against float64."""
    from coma_kernels.infonce_cuda import CudaOps, TorchEpilogue
    from coma_kernels.infonce_reference import trained_regime_inputs

    if chunk_elems:
        monkeypatch.setenv("COMA_INFONCE_CHUNK_ELEMS_GPU", chunk_elems)
    else:
        monkeypatch.delenv("COMA_INFONCE_CHUNK_ELEMS_GPU", raising=False)
    ops = CudaOps(TorchEpilogue(), dtype)
    q, k, s = make(300, 1100, 40, dtype, 33.3)
    pidx = torch.randperm(1100, generator=torch.Generator().manual_seed(4))[:300]
    for sym, pos in ((False, None), (True, None), (True, pidx)):
        got = run_ops(ops, q, k, s, symmetric=sym, positive_index=pos)
        assert_close(got, reference(q, k, s, symmetric=sym, positive_index=pos), dtype, f"sym={sym} pos={pos is not None}")
    q64, k64 = trained_regime_inputs(200, 260, 48, 33.3, generator=torch.Generator().manual_seed(3))
    q, k = q64.to(dtype), k64.to(dtype)
    for sym in (False, True):
        got = run_ops(ops, q, k, s, symmetric=sym)
        assert_close(got, reference(q, k, s, symmetric=sym), dtype, f"trained sym={sym}",
                     tols={**TOLS, torch.float32: (1e-5, 1e-3)})


@pytest.mark.parametrize("persistent,tma", [("1", "0"), ("0", "1"), ("1", "1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_persistent_and_tma_variants(monkeypatch, persistent, tma, dtype):
    """The kernel variants a GPU profile chooses between (COMA_INFONCE_TRITON_PERSISTENT / _TMA):
    three programs walking every work item (many tiles of 16, several column splits, chunks of
    one row block), and Q/K tiles through tensor descriptors (zero padding outside the matrix in
    place of masked loads), against float64; D = 10 in fp16 has 20-byte rows, which TMA cannot
    take: the pointer path runs instead."""
    monkeypatch.setenv("COMA_INFONCE_TRITON_PERSISTENT", persistent)
    monkeypatch.setenv("COMA_INFONCE_TRITON_TMA", tma)
    monkeypatch.setenv("COMA_INFONCE_TRITON_TILES", "16,16,16")
    monkeypatch.setenv("COMA_INFONCE_SPLITS", "3")
    monkeypatch.setenv("COMA_INFONCE_CHUNK_ELEMS_GPU", "1")
    for n, m, d in ((150, 170, 40), (20, 37, 10)):
        q, k, s = make(n, m, d, dtype, 33.3)
        pidx = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(6))
        for sym, pos in ((False, None), (True, pidx)):
            got = run("triton", q, k, s, symmetric=sym, positive_index=pos)
            assert_close(got, reference(q, k, s, symmetric=sym, positive_index=pos), dtype, f"n={n} d={d} sym={sym}")
