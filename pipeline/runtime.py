"""Process set-up of a training rank, outside the loop itself: stop signals, logging, seeds,
CPU threads, the garbage-collection schedule, and what the machine is (cores, peak memory, device
name).  Used by :mod:`pipeline.train` and by benchmarks/throughput.py, which times the same loop.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import resource
import sys
from pathlib import Path
from typing import Optional

from pipeline.config import Config, ConfigError

log = logging.getLogger("coma.train")

STOPPED_FILE = "STOPPED"  # runs/NAME/STOPPED: the run stopped on a signal with a checkpoint saved


class StopSignals:
    """Handlers for ``train.stop_signals`` (SIGUSR1, SIGTERM): a signal only records its name;
    :class:`pipeline.train.Loop` checks after every step whether any rank got one (one scalar all-reduce) and
    then every rank saves and stops together — a rank stopping on its own would leave the
    others hanging in the next collective.

    Why: SLURM sends SIGTERM on preemption and at the time limit (then SIGKILL after
    KillWait), and ``--signal=USR1@300`` warns 300 s early; without this the job loses every
    step since the last periodic checkpoint.  Later signals change nothing: the time limit's
    SIGTERM after an early USR1 must not cut the save short (SIGKILL still ends a stuck job).
    DataLoader workers, forked with these handlers, ignore the signals (SLURM signals every
    process of the step): a worker dying of SIGTERM would make the rank raise mid-save; they
    exit with the rank (``pipeline.data.die_with_parent``).  Installed in the main thread only
    (Python's rule for handlers)."""

    def __init__(self, names: list[str]):
        import signal
        import threading

        self.received: Optional[str] = None
        self._pid = os.getpid()
        self._old: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in names:
            try:
                sig = signal.Signals[name]
            except KeyError:
                raise ConfigError(f"train.stop_signals: {name!r} is not a signal name "
                                  f"(e.g. SIGUSR1, SIGTERM)") from None
            self._old[sig] = signal.signal(sig, self._handle)

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def _handle(self, signum, frame) -> None:
        import signal

        if os.getpid() == self._pid and self.received is None:  # the rank itself, first signal
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    """Rank 0 logs INFO to the console and to ``run_dir/train.log``; other ranks warnings only
    (their lines would repeat rank 0's and drown SLURM logs)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_coma", False):
            root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._coma = True
        root.addHandler(h)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_all(seed: int, deterministic: bool = False) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: a few kernels (e.g. index_add on GPU) have no deterministic variant; the
        # warning names them rather than stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cpu_threads(cfg: Config, env, environ=os.environ) -> Optional[int]:
    """Torch intra-op threads per rank for a run on the CPU accelerator: this node's cores shared
    among its ranks, less one per DataLoader worker (the collator runs there), at least 1.  None
    (torch's default stays) on GPU runs and when ``OMP_NUM_THREADS`` is set: the user's choice wins.

    Why: torch starts as many threads as cores in every rank, so 2 ranks with 2 workers each on a
    2-core machine ran 4 compute threads + 4 workers; the threads spin on each other and the
    workers preempt them (the measured step times: benchmarks/README.md)."""
    from deepspeed.accelerator import get_accelerator

    if "OMP_NUM_THREADS" in environ or get_accelerator().device_name() != "cpu":
        return None
    return max(1, cpu_cores() // max(env.local_world_size, 1) - max(cfg.data.workers, 0))


def set_cpu_threads(cfg: Config, env) -> Optional[int]:
    """Apply :func:`cpu_threads` (and log it); returns the count set, None when left alone."""
    import torch

    threads = cpu_threads(cfg, env)
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("CPU run: %d torch threads per rank (%d ranks on this node, data.workers=%d; "
                 "OMP_NUM_THREADS overrides)", threads, env.local_world_size, cfg.data.workers)
        if loader_workers_compete(env.local_world_size, cfg.data.workers) and env.rank == 0:
            log.warning("CPU run: %d rank(s) per node already take all %d cores, so data.workers=%d "
                        "competes with the model for them; --data.workers=0 (loading in each rank) is "
                        "faster here (README: Throughput on a CPU-only machine)",
                        env.local_world_size, cpu_cores(), cfg.data.workers)
    return threads


def loader_workers_compete(ranks_per_node: int, workers: int) -> bool:
    """Whether ``workers`` DataLoader workers per rank would find no core of their own on this
    CPU node (the ranks' share of the cores is already used up): loading in each rank is faster."""
    return workers > 0 and cpu_cores() // max(ranks_per_node, 1) <= workers


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a SLURM allocation's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_memory_gib() -> float:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process RSS peak


@contextlib.contextmanager
def manual_gc(every: int):
    """Python's automatic garbage collection off for the training loop, which collects every
    ``every`` steps instead (:meth:`pipeline.train.Loop.step`); ``every <= 0`` changes nothing.

    Why: a full collection walks every Python object of torch, transformers and DeepSpeed, and
    allocations trigger it on each rank at its own moment, so the other ranks wait for it at the
    next collective.  The objects that exist once
    the model and engine are built are frozen (``gc.freeze``: never scanned again), which makes
    the scheduled collections cheap.  The same scheme as torchtitan's ``gc_freq`` and
    Megatron-LM's ``--manual-gc``.  (One rank has no one to wait for, and gains nothing
    measurable: benchmarks/README.md.)"""
    if every <= 0:
        yield
        return
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def device_label() -> str:
    """The CUDA device's name ('' without one), for the peak-FLOPs lookup: a label only, so a
    CUDA error here never stops a run."""
    import torch

    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return ""
