"""The DataLoader worker plumbing, each piece one named function with its reason:
:func:`die_with_parent` (workers end with their rank and ignore SLURM's stop signals),
:func:`widen_result_pipe` (whole batches fit the result pipe), :func:`_stop_workers` (no hang at
interpreter exit) — and :func:`worker_kwargs` / :func:`iterate` that apply them, so the
training loader and benchmarks/throughput.py hand batches over the same way.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing.util
import os
import weakref
from typing import Any, Iterator, Optional


def worker_kwargs(num_workers: int) -> dict:
    """DataLoader keyword arguments every loader of ours uses with workers: :func:`die_with_parent`
    as the ``worker_init_fn`` (bound to this process)."""
    return {"worker_init_fn": functools.partial(die_with_parent, os.getpid())} if num_workers > 0 else {}


def iterate(dl: Any) -> Iterator:
    """``iter(dl)`` for a DataLoader built with :func:`worker_kwargs`: with workers, its result pipe
    widened (:func:`widen_result_pipe`) and its workers stopped at interpreter exit
    (:func:`_stop_workers`)."""
    it = iter(dl)
    if getattr(dl, "num_workers", 0) > 0:
        widen_result_pipe(it)
        # Workers ignore SIGTERM (die_with_parent), and at interpreter exit multiprocessing
        # SIGTERMs its daemonic children and then joins them: a worker of an iterator still
        # alive then (one a DataError's traceback holds, a loop left mid-epoch) would block the
        # exit forever — a rank that should exit 3 hangs.  Its finalizers run before that.
        workers = list(getattr(it, "_workers", []))
        multiprocessing.util.Finalize(it, _stop_workers, args=(weakref.ref(it), workers), exitpriority=10)
    return it


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent_pid`` with functools.partial in the rank):
    on Linux the kernel SIGKILLs this worker when the rank that forked it dies.

    Why: when a rank is killed mid-step (OOM killer, a failed node, a crash in a CUDA kernel),
    PyTorch's workers notice the dead parent but then block forever at interpreter exit,
    flushing result batches into the queue pipe whose only other readers are the sibling
    workers, stuck the same way.  Those orphans keep the job's stdout/stderr open, so
    ``torchrun``, ``srun`` or a CI runner waiting for end-of-output hangs with them.

    The worker also ignores SIGTERM and SIGUSR1: SLURM signals every process of a job step at
    preemption or with ``--signal``, and a worker dying of it makes its rank raise at once
    (PyTorch's SIGCHLD check), cutting short the checkpoint the rank saves on that signal
    (``pipeline.runtime.StopSignals``).  The worker still ends with its rank (this SIGKILL)."""
    import signal

    from pipeline.procs import exit_with_parent

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    exit_with_parent(parent_pid)


RESULT_PIPE_BYTES = 1 << 20


def widen_result_pipe(it: Any, nbytes: int = RESULT_PIPE_BYTES) -> Optional[int]:
    """Give a multi-worker DataLoader iterator's result pipe ``nbytes`` of kernel buffer
    (Linux ``F_SETPIPE_SZ``; 1 MiB is the default ``/proc/sys/fs/pipe-max-size`` an unprivileged
    process may ask for).  Returns the pipe's new size, or None where it stays as it was (not
    Linux, no workers, over the limit: batches then travel as before, only slower).

    Why: a batch of up to ``pipeline.collate.Packed.INLINE_BYTES`` travels inside its pickle
    through this pipe, and the default 64 KiB buffer holds only part of a tiny-model
    micro-batch.  The rank then reads it in 64 KiB turns, each waiting for the worker's queue
    feeder thread to wake up and refill the pipe, which was most of the data wait on a small
    model.  With a buffer that holds whole batches the feeder has written them while the rank
    computed, and reading one is a copy (the measured times: benchmarks/README.md)."""
    import fcntl

    queue = getattr(it, "_worker_result_queue", None)
    reader = getattr(queue, "_reader", None)
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if reader is None or setpipe is None:
        return None
    try:
        return fcntl.fcntl(reader.fileno(), setpipe, nbytes)
    except OSError:  # EPERM: above pipe-max-size or the user's pipe-page quota; the pipe keeps working
        return None


def _stop_workers(ref: weakref.ref, workers: list) -> None:
    """At exit (PyTorch's own shutdown is a no-op by then): ask the workers to finish as the
    DataLoader does (done event, a None index), then SIGKILL any that did not within a few
    seconds, after taking them off PyTorch's SIGCHLD watch so their end is no error."""
    it = ref()
    if it is not None and not getattr(it, "_shutdown", True):
        with contextlib.suppress(Exception):  # best effort: the kill below still ends them
            it._workers_done_event.set()
            for q in it._index_queues:
                q.put(None)
    for w in workers:
        w.join(timeout=5)
    if any(w.is_alive() for w in workers):
        if it is not None and getattr(it, "_worker_pids_set", False):
            import torch

            torch._C._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
