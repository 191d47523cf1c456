"""Tile configurations of the Triton loss kernels, and the autotuner that picks one per shape
after dropping every configuration whose compiled kernel spills registers.

Triton's ``@triton.autotune`` times every configuration it is given.  For these kernels that
is the wrong search: on sm_90 the 128×128 tiles compile at 255 registers with spill stores
(benchmarks/triton_resources.py), and a spilling kernel pays local-memory traffic in every tile
of a 32k × 32k loss, while the non-spilling ones differ in what the timing then decides (tile
shape, warps per CTA, pipeline stages, and so CTAs per SM).  :func:`choose` therefore compiles
each candidate first, reads its registers, spills and shared memory from the compiled kernel
(as torch.inductor does for its own spill threshold), times only those that spill nothing (all
of them, least-spilling first, if every one spills), and keeps the fastest.

Opt in with ``COMA_INFONCE_TRITON_AUTOTUNE=1`` (:class:`coma_kernels.infonce_triton.TritonOps`).
Choices are kept per process and in a JSON file (``COMA_INFONCE_TRITON_TUNING_FILE``, default
``$XDG_CACHE_HOME/coma_kernels/triton_tiles.json``), keyed by kernel, GPU, Triton version, dtype,
flags and the problem size rounded up to a power of two, so a restarted job does not tune
again.  Tuning the two kernels at N = 32k costs one compile per candidate plus a few timed
launches each (tens of seconds once); every rank tunes on its own GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a tile kernel: the tile shape (rows of Q, key columns, slice
    of D per step) and Triton's launch options."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def fit(self, d: int, elem: int) -> "TileConfig":
        """This configuration with BLOCK_K at most D (rounded up to a power of two) and at most 128
        bytes of a row (64 bf16/fp16 or 32 fp32 elements: fp32 tiles of 64 would need twice the
        shared memory)."""
        return dataclasses.replace(self, block_k=max(16, min(self.block_k, pow2(d), 64 if elem <= 2 else 32)))

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"

    @classmethod
    def parse(cls, text: str, source: str | None = "COMA_INFONCE_TRITON_TILES") -> "TileConfig":
        """``"BM,BN,BK"`` or ``"BM,BN,BK,WARPS,STAGES"``; warps default to 8 for tiles of ≥ 128×64,
        else 4.  ``source`` (the environment variable, None for a command-line value that
        argparse names itself) leads the error message."""
        try:
            v = [int(x) for x in text.split(",")]
            if len(v) == 3:
                v += [8 if v[0] * v[1] >= 128 * 64 else 4, 3]
            if len(v) != 5 or min(v) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{source + '=' if source else ''}{text!r}: expected BM,BN,BK or BM,BN,BK,WARPS,STAGES "
                             "with positive integers, e.g. 128,64,64 or 128,64,64,8,3") from None
        return cls(*v)


DEFAULT = TileConfig(128, 128, 64, 8, 3)  # the measured default (H200: 40.7% of bf16 peak at N = 32k)

# What the tuner compiles.  Register budgets per thread for two CTAs per SM (a 64K register file):
# 128 at 8 warps, 255 at 4 warps; shared memory per stage is (BM + BN)·BK·2 bytes for bf16.
CANDIDATES = (
    DEFAULT,
    TileConfig(128, 128, 64, 8, 4),
    TileConfig(128, 64, 64, 8, 3),
    TileConfig(128, 64, 64, 8, 4),
    TileConfig(128, 64, 64, 4, 3),
    TileConfig(64, 128, 64, 4, 3),
    TileConfig(128, 128, 32, 8, 4),
    TileConfig(128, 128, 64, 4, 3),   # spills on sm_90 with Triton 3.9 (the pruning drops it there)
    TileConfig(128, 256, 64, 8, 3),   # half the key re-reads; spills on sm_90 with Triton 3.9
)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled kernel asks of an SM: registers per thread, spilled bytes per thread,
    shared memory per CTA."""

    registers: int
    spill_bytes: int
    shared_bytes: int


# sm_90 (H100/H200) limits: 64K 32-bit registers, 228 KiB shared memory (1 KiB of it reserved
# per CTA), 2048 threads and 32 CTAs per SM; registers are allocated per warp in units of 256.
HOPPER = {"registers": 65536, "shared": 233472, "threads": 2048, "ctas": 32}


def ctas_per_sm(res: Resources, num_warps: int, sm: dict = HOPPER) -> int:
    """How many CTAs of this kernel one SM holds at once (registers, shared memory, threads)."""
    per_warp = -(-res.registers * 32 // 256) * 256
    by_regs = (sm["registers"] // per_warp) // num_warps if per_warp else sm["ctas"]
    by_shared = sm["shared"] // (res.shared_bytes + 1024)
    return max(0, min(by_regs, by_shared, sm["threads"] // (32 * num_warps), sm["ctas"]))


def choose(candidates, resources: Callable[[TileConfig], Resources], timer: Callable[[TileConfig], float]
           ) -> tuple[TileConfig, list[dict]]:
    """The fastest candidate among those that compile without spilling, and a report row per
    candidate (its resources, CTAs per SM, milliseconds or why it was not timed).

    ``resources(cfg)`` compiles the kernel for ``cfg`` (raising for one that cannot run, e.g.
    too much shared memory); ``timer(cfg)`` returns its milliseconds on the real inputs (raising
    for one that compiled but cannot launch, e.g. Triton's ``OutOfResources``: it is skipped, as
    a failed compile is).  If every candidate spills, all are timed, least spilling first."""
    rows, compiled = [], []
    for cfg in candidates:
        row = {"config": str(cfg)}
        try:
            res = resources(cfg)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot compile or load is not a choice
            row["skipped"] = f"{type(exc).__name__}: {exc}"[:200]
        else:
            row.update(dataclasses.asdict(res), ctas_per_sm=ctas_per_sm(res, cfg.num_warps))
            compiled.append((cfg, res, row))
        rows.append(row)
    if not compiled:
        raise RuntimeError("no Triton tile configuration compiled: " + "; ".join(r.get("skipped", "") for r in rows))
    clean = [c for c in compiled if c[1].spill_bytes == 0]
    timed = clean or sorted(compiled, key=lambda c: c[1].spill_bytes)
    for cfg, res, row in compiled:
        if res.spill_bytes and clean:
            row["skipped"] = f"spills {res.spill_bytes} B per thread"
    best, best_ms = None, float("inf")
    for cfg, _res, row in timed:
        try:
            row["ms"] = ms = float(timer(cfg))
        except Exception as exc:  # noqa: BLE001 - compiled, but does not launch on this card
            row["skipped"] = f"launch failed: {type(exc).__name__}: {exc}"[:200]
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no Triton tile configuration launched: " + "; ".join(r.get("skipped", "") for r in rows))
    return best, rows


def tuning_file() -> Path:
    explicit = os.environ.get("COMA_INFONCE_TRITON_TUNING_FILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coma_kernels" / "triton_tiles.json"


def pow2(x: int) -> int:
    """The smallest power of two ≥ x (≥ 1).  Sizes are also tuned per power of two: N = 30000 uses
    N = 32768's choice."""
    return 1 << max(0, (int(x) - 1).bit_length())


class TileCache:
    """Chosen configurations by key, in this process and in :func:`tuning_file` (a JSON object
    ``{key: {"config": [BM, BN, BK, warps, stages], "report": [...]}}``, replaced atomically; a
    file that cannot be read is set aside with a warning and tuning starts over)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mem: dict[str, TileConfig] = {}

    def _read(self, path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path}: unreadable Triton tuning cache ({exc}); tuning again "
                          "(delete the file or set COMA_INFONCE_TRITON_TUNING_FILE to silence this)", stacklevel=3)
            return {}

    def get(self, key: str) -> Optional[TileConfig]:
        with self._lock:
            if key in self._mem:
                return self._mem[key]
            entry = self._read(tuning_file()).get(key)
            try:
                cfg = TileConfig(*entry["config"]) if entry else None
            except (TypeError, KeyError):
                cfg = None
            if cfg is not None:
                self._mem[key] = cfg
            return cfg

    def put(self, key: str, cfg: TileConfig, report: list[dict]) -> None:
        with self._lock:
            self._mem[key] = cfg
            path = tuning_file()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = self._read(path)
                data[key] = {"config": list(dataclasses.astuple(cfg)), "report": report}
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, path)  # ranks sharing a home directory never see half a file
            except OSError as exc:
                warnings.warn(f"{path}: cannot save the Triton tile choice ({exc}); it holds for this process only",
                              stacklevel=3)


CACHE = TileCache()
