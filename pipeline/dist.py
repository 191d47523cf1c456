"""Distributed helpers: launcher environment → rank / local rank / world size, process-group
initialisation through DeepSpeed, and the few collectives the trainer needs.

This is the only module under ``pipeline/`` that calls ``torch.distributed`` (the gathered
loss in ``coma_kernels/distributed.py`` is the other one in the project).  Model and loop code ask
this module for ranks and reductions, so they never depend on how the job was launched.

Launchers understood, in order of precedence:

* ``deepspeed`` and ``torchrun``: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` are already exported (deepspeed also passes ``--local_rank``).
* SLURM ``srun`` (one task per GPU): ``SLURM_PROCID`` → rank, ``SLURM_LOCALID`` → local rank,
  ``SLURM_NTASKS`` → world size, the first host of ``SLURM_JOB_NODELIST`` → ``MASTER_ADDR``
  (unless the sbatch script exported one), ``MASTER_PORT`` derived from the job id so two jobs
  sharing a node do not collide.
* Nothing: a single process (rank 0 of 1) on ``127.0.0.1`` and a free port.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also deepspeed), "slurm" or "single"


# ------------------------------------------------------------------------------ SLURM nodelists
def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[01-03,07],login1,a[1-2]b[3-4]`` into host names
    (what ``scontrol show hostnames`` prints), keeping zero padding."""
    hosts: list[str] = []
    for item in _split_top_level(spec.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed SLURM hostlist {spec!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"malformed SLURM hostlist {spec!r}: unbalanced '['")
    out.append("".join(cur))
    return out


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"malformed SLURM hostlist range {rng!r} in {item!r}")
            nums = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            nums = [rng]
        for n in nums:
            out.extend(_expand_one(prefix + n + suffix))  # suffix may hold another [..]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- environment → ranks
def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Work out rank, local rank and world size from the launcher's environment (see module
    docstring).  Pure: reads ``environ`` only, so it is unit-testable with a fake SLURM job."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=world,
            # torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or world),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
        hosts = expand_hostlist(nodelist) if nodelist else []
        addr = environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        job = int(re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "0")) or 0)
        port = int(environ.get("MASTER_PORT") or 15000 + job % 20000)
        world = int(environ["SLURM_NTASKS"])
        per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
        local_world = int(per_node.split("(")[0]) if per_node[:1].isdigit() else (
            world // max(len(hosts), 1))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=local_world,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(environ.get("MASTER_PORT") or 0), "single")


def export_env(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write the torchrun-style variables DeepSpeed and torch.distributed read (``env://``)."""
    port = env.master_port or free_port()
    environ.update({
        "RANK": str(env.rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(port),
    })


# ------------------------------------------------------------------------------ process groups
def _torch_dist():
    import torch.distributed as dist

    return dist


def init(timeout_s: int = 1800, backend: Optional[str] = None) -> DistEnv:
    """Initialise the default process group through ``deepspeed.init_distributed`` (so
    DeepSpeed's comm layer and torch.distributed share one group).  ``backend`` defaults to
    gloo on the CPU accelerator and to the accelerator's own backend (nccl) otherwise.
    ``timeout_s`` bounds every collective: a rank that dies makes the survivors fail within it
    instead of hanging (gloo usually notices the closed socket much sooner)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = read_env()
    export_env(env)
    env = read_env()
    acc = get_accelerator()
    cpu = acc.device_name() == "cpu"
    if backend is None:
        backend = "gloo" if cpu else acc.communication_backend_name()
    if not cpu:
        acc.set_device(env.local_rank)
    if not is_initialized():
        if cpu:  # left by a run of this address and port that died during set-up: never reuse it
            _unlink(shm_allreduce_path(env.rank))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
        if cpu:
            barrier()  # every rank is past init_distributed, so has mapped every rank's buffer
            _unlink(shm_allreduce_path(env.rank))
    return env


def shm_allreduce_path(rank: int, environ: Mapping[str, str] = os.environ) -> str:
    """The ``/dev/shm`` file DeepSpeed's CPU all-reduce creates for ``rank`` at
    ``init_distributed`` (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: 66 MB per rank, when every
    rank is on one node).

    DeepSpeed maps every rank's file and never removes its own, so each CPU run left 66 MB
    per rank in ``/dev/shm`` — memory, not disk — until a machine running tests or benchmarks all
    day had filled it (18 GB after a few hundred runs here; later runs then stall or die of
    SIGBUS).  :func:`init` removes the name once all ranks have mapped the file: the mappings
    stay valid, and the kernel frees the memory when the last rank exits, however it exits.
    A file left by a run killed before that point has this run's name only if it had the
    same address and port; :func:`init` removes it before any rank maps it."""
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def is_initialized() -> bool:
    dist = _torch_dist()
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return _torch_dist().get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return _torch_dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        _torch_dist().barrier()


def _device():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def all_reduce_dict(values: Mapping[str, float], op: str = "mean") -> dict[str, float]:
    """Reduce a dict of Python floats over ranks in one collective.  ``op``: mean, sum, max or
    min.  Every rank must pass the same keys (sorted here so order cannot differ)."""
    import torch

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    if is_initialized() and get_world_size() > 1:
        dist = _torch_dist()
        red = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(t, op=red)
        if op == "mean":
            t /= get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    _torch_dist().all_gather_object(out, obj)
    return out


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (used so all ranks take the
    same branch, e.g. skipping a step or stopping the run)."""
    return all_reduce_dict({"f": 1.0 if flag else 0.0}, op="max")["f"] > 0


def destroy() -> None:
    if is_initialized():
        _torch_dist().destroy_process_group()
