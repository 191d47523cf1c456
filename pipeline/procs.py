"""Child-process lifetime: a worker process dies with the process that started it.

Used by the training loader's DataLoader workers (``pipeline.data.die_with_parent``) and by
``data_prep/shard.py``'s pool workers.  Why: a parent killed with SIGKILL (the out-of-memory
killer's signal) runs no clean-up, so its multiprocessing workers live on, blocked on a pipe
read or write, holding their memory and the job's stdout open.
"""
from __future__ import annotations

import os
import signal
import sys


def exit_with_parent(parent_pid: int) -> None:
    """Call first thing in a forked or spawned child: on Linux the kernel SIGKILLs this process
    when its parent thread exits (``PR_SET_PDEATHSIG``); elsewhere nothing happens.
    ``parent_pid``: the parent's pid as the parent saw it, to catch a parent that already died
    between the fork and this call (the child is then re-parented, and exits at once)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(1)
