"""Peak memory of the chunked torch backend at n = m = 16384, D = 256 (fp32, forward + backward)
is at most 10% of the materialised reference's.

Method: each backend runs in a fresh subprocess.  After the inputs exist, the kernel's peak-RSS
counter is reset (``echo 5 > /proc/self/clear_refs``), forward + backward run, and the extra peak
is VmHWM − VmRSS(before).  tracemalloc cannot see torch's allocations, and torch has no CPU
peak counter; RSS sees every page torch touches.  MALLOC_MMAP_THRESHOLD_ pins glibc's mmap
threshold so freed tensors go back to the OS instead of lingering in the heap (glibc otherwise
raises the threshold after the first free and keeps freed 16 MiB chunks resident, which only
inflates the chunked backend's number).
"""
import json
import os
import subprocess
import sys

import pytest

N, D = 16384, 256

SCRIPT = r"""
import json, sys, time, torch, coma_kernels
torch.set_num_threads(2)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
s = torch.tensor(20.0, requires_grad=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # reset VmHWM to the current RSS
base = status("VmRSS")
t = time.time()
loss = coma_kernels.fused_infonce(q, k, s, backend=backend)
loss.backward()
print(json.dumps({"peak": status("VmHWM") - base, "loss": loss.item(), "ds": s.grad.item(),
                  "secs": time.time() - t}))
"""


def _peak(backend, repo_root):
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(D), backend], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_torch_backend_peak_memory_is_tenth_of_reference(repo_root):
    chunked = _peak("torch", repo_root)
    ref = _peak("reference", repo_root)
    assert abs(chunked["loss"] - ref["loss"]) < 1e-4 and abs(chunked["ds"] - ref["ds"]) < 1e-3
    assert ref["peak"] > N * N * 4, "the reference must have materialised the 1 GiB logits"
    ratio = chunked["peak"] / ref["peak"]
    print(f"peak extra memory: torch {chunked['peak'] / 2**20:.0f} MiB, reference {ref['peak'] / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.10, f"torch backend peak {chunked['peak']} B is {ratio:.1%} of the reference's {ref['peak']} B"
