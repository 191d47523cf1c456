"""Which samples each rank and DataLoader worker reads in an epoch: the sources, their sizes,
and the plan.  Pure Python (no torch), so every rank computes the same plan independently.

How an epoch is cut (deterministic mode)
----------------------------------------
Every rank reads ``sizes.json`` beside the shards (written by ``shard.py``; found through the
same ``pipe:``/URL for remote shards; shards missing from it are counted by scanning their tar
headers), so every rank computes the same plan
without any collective:

1. the shard list is permuted from ``(seed, epoch)``; the epoch is the concatenation of those
   shards, ``N`` samples (integer source weights repeat a source, ``max_samples`` caps one);
2. split by node: rank ``r`` gets the contiguous sample range ``[r*q, (r+1)*q)`` with
   ``q = ceil(N / W)`` (``drop_last=False``: the last ranks pad the < W missing samples with
   repeats) or ``q = floor(N / (W*b)) * b`` (``drop_last=True``: the < W*b leftover samples
   of this epoch's order are not used);
3. split by worker: the rank's ``B = ceil(q / b)`` batches are dealt round-robin to the
   DataLoader workers (batch ``j`` to worker ``j % K``, the order the DataLoader returns
   them), each worker reading the contiguous sub-range that fills its batches;
4. each worker shuffles its samples in a buffer seeded from ``(seed, epoch, rank, worker)``,
   optionally groups them into task-homogeneous runs (``task_batch_size``), decodes and
   collates.

So every sample is read exactly once per epoch across ranks x workers, and every rank yields
exactly ``B`` batches of the same sizes — ranks never disagree on the step count (a mismatch
hangs ZeRO-3 at the epoch's end).  Ranks may start inside a shard: a reader skips the first
samples of a shard by headers only.  A shard that is missing, truncated or shorter than
``sizes.json`` says, and a sample that fails to decode, is skipped with a warning and counted;
its slot is filled with a repeat (``__pad__``), so the counts stay equal.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

log = logging.getLogger("pipeline.data")


# ------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float = 1.0
    max_samples: Optional[int] = None


def _expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    pattern = pattern.strip()
    if os.path.isdir(pattern):  # a shard.py output folder
        try:
            with open(os.path.join(pattern, "manifest.json"), encoding="utf-8") as f:
                pattern = os.path.join(pattern, json.load(f)["pattern"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{pattern} is a folder but its manifest.json is missing or unreadable "
                             f"({type(e).__name__}: {e}); shard.py writes one, or give a brace pattern such as "
                             f"{os.path.join(pattern, 'train-{000000..000007}.tar')}") from None
    urls = []
    for p in braceexpand.braceexpand(pattern):
        urls.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
    return urls


def _written_pattern(missing: list[str]) -> str:
    """'; FOLDER/manifest.json says the shards there are PATTERN' when shard.py wrote that folder."""
    for folder in dict.fromkeys(os.path.dirname(u) for u in missing):
        try:
            with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
                written = json.load(f)["pattern"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return f"; {os.path.join(folder, 'manifest.json')} says the shards there are {os.path.join(folder, written)}"
    return ""


def expand_sources(shards: Any, weights: Any = None) -> list[Source]:
    """Normalise the accepted shard specifications (see module docstring) to sources."""
    if isinstance(shards, str):
        items: list[Any] = shards.split("::")
    elif isinstance(shards, (list, tuple)):
        items = list(shards)
    else:
        raise TypeError(f"shards must be a pattern string or a list, got {type(shards).__name__}")
    if isinstance(weights, str):
        weights = [float(w) for w in weights.split("::")]
    if weights is not None and len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} sources ({shards!r})")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"shards": item}
        elif not isinstance(item, dict):  # a DataSource dataclass
            item = {k: getattr(item, k) for k in ("shards", "weight", "max_samples", "name")}
        pattern = item["shards"]
        urls = _expand_pattern(pattern)
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.exists(u)]
        if not urls or local and len(missing) == len(local):
            raise ValueError(f"shard pattern {pattern!r} matches no shard on disk (write shards with "
                             f"data_prep/shard.py, or check the path){_written_pattern(missing)}")
        if missing:  # a range typo would silently train on part of the data
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(f"shard pattern {pattern!r} names {len(urls)} shards, {len(missing)} of which do "
                             f"not exist: {shown}{_written_pattern(missing)}")
        w = weights[i] if weights is not None else item.get("weight", 1.0)
        name = item.get("name") or os.path.basename(os.path.dirname(urls[0])) or f"source{i}"
        out.append(Source(name, urls, float(w), item.get("max_samples")))
    return out


class KindMismatch(ValueError):
    """Shards of one kind where another is read (``found`` / ``wanted``)."""

    def __init__(self, folder: str, found: str, wanted: str):
        super().__init__(f"{folder} holds {found!r} shards (its manifest.json), not {wanted!r} shards")
        self.found, self.wanted = found, wanted


def check_kind(sources: Sequence[Source], kind: str) -> None:
    """Raise :class:`KindMismatch` when a local shard's folder ``manifest.json`` (written by
    shard.py) says it holds another kind than ``kind``: pair shards read as qa would otherwise
    decode to nothing and stop a run much later, inside a loader worker.  Shards not named by
    their folder's manifest (another prefix, another tool) are not checked."""
    import braceexpand

    manifests: dict[str, Optional[tuple[str, set]]] = {}
    for src in sources:
        for url in src.urls:
            if not is_local(url):
                continue
            folder = os.path.dirname(url)
            if folder not in manifests:
                try:
                    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
                        m = json.load(f)
                    manifests[folder] = (m["kind"], set(braceexpand.braceexpand(m["pattern"])))
                except (OSError, ValueError, KeyError, TypeError):
                    manifests[folder] = None  # not a shard.py folder (or an older one)
            known = manifests[folder]
            if known is not None and known[0] != kind and os.path.basename(url) in known[1]:
                raise KindMismatch(folder, known[0], kind)


def shard_sizes(urls: Sequence[str]) -> list[int]:
    """Sample counts from the ``sizes.json`` beside each shard; a shard missing from it (or a
    folder without one) is counted from its tar headers, with a warning.

    Remote shards (``pipe:…``, ``http(s)://…``) find theirs through the same command or
    address with the shard's file name replaced by ``sizes.json``: ``pipe:aws s3 cp
    s3://b/d/train-000001.tar -`` reads ``pipe:aws s3 cp s3://b/d/sizes.json -``."""
    cache: dict[str, dict] = {}
    out = []
    for url in urls:
        where, name = sizes_location(url)
        if where not in cache:
            cache[where] = _read_sizes(where)
        n = cache[where].get(name)
        if n is None:
            log.warning("%s is not in %s: counting its samples from the tar headers "
                        "(write shards with data_prep/shard.py, and keep its sizes.json beside them, "
                        "to avoid this)", url, where)
            n = _count_samples(url)
        out.append(int(n))
    return out


_SHARD_FILE = re.compile(r"[^\s/'\"]+\.tar(?![\w.])")


def sizes_location(url: str) -> tuple[str, str]:
    """(where the ``sizes.json`` that counts shard ``url`` is, the shard's key in it)."""
    if is_local(url):
        return os.path.join(os.path.dirname(url), "sizes.json"), os.path.basename(url)
    found = list(_SHARD_FILE.finditer(url))
    if not found:
        return f"(no .tar file name in {url!r})", url
    m = found[-1]
    return url[:m.start()] + "sizes.json" + url[m.end():], m.group(0)


def is_local(url: str) -> bool:
    """A plain file path (read seekably); anything else goes through ``webdataset.gopen``."""
    return os.path.exists(url) or not (url.startswith("pipe:") or "://" in url)


def open_tar(url: str) -> tarfile.TarFile:
    """A local shard seekably (skipped members are never read); a remote one streamed."""
    if is_local(url):
        return tarfile.open(url, "r:")
    from webdataset.gopen import gopen

    return tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")


def _read_sizes(where: str) -> dict:
    try:
        if is_local(where):
            with open(where, encoding="utf-8") as f:
                return json.load(f)
        from webdataset.gopen import gopen

        with gopen(where, "rb") as f:
            return json.loads(f.read())
    except Exception:  # noqa: BLE001 — missing/unreachable/invalid: count from the tars instead
        return {}


def _count_samples(url: str) -> int:
    keys = set()
    try:
        with open_tar(url) as tf:
            for m in tf:
                if m.isfile():
                    keys.add(split_name(m.name)[0])
    except Exception as e:  # noqa: BLE001 — OSError, TarError, a failed pipe command, …
        log.warning("cannot count samples of %s (%s): treated as empty", url, e)
    return len(keys)


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.ext2`` → (``dir/key``, ``ext.ext2``), webdataset's convention."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext


# --------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Piece:
    shard: int   # index into the loader's shard list
    skip: int    # samples passed over (headers only) at the start of the shard
    take: int    # samples read after them


@dataclass
class WorkerPlan:
    pieces: list[Piece]
    batch_sizes: list[int]   # this worker's batches, in order
    real: int                # samples the pieces hold; the rest of sum(batch_sizes) is padding

    @property
    def quota(self) -> int:
        return sum(self.batch_sizes)


@dataclass
class Plan:
    """Pure function of (shards, sizes, seed, epoch, rank, world, workers, batch): what every
    worker of one rank reads in one epoch."""
    shard_urls: list[str]
    shard_source: list[int]
    sizes: list[int]
    sources: list[Source]
    batch_size: int
    world_size: int
    num_workers: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    resampled: bool = False
    epoch_samples: Optional[int] = None
    total: int = field(init=False)

    def __post_init__(self):
        if not self.resampled:
            for s in self.sources:
                if s.weight != int(s.weight) or s.weight < 1:
                    raise ValueError(f"source {s.name}: weight {s.weight} needs resampled=True "
                                     "(an exact epoch can only repeat a source a whole number of times)")
        # N, the same every epoch: the shard order changes, the caps and repeats do not
        self.total = sum(self.sizes) if self.resampled else sum(t for _, t in self.sequence(0))

    def sequence(self, epoch: int) -> list[tuple[int, int]]:
        """The epoch's shards in order as (shard, samples taken)."""
        order = []
        for i, src in enumerate(self.shard_source):
            order.extend([i] * int(self.sources[src].weight))
        if self.shuffle:
            random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        used = Counter()  # samples taken so far per source index
        seq = []
        for i in order:
            s = self.shard_source[i]
            cap = self.sources[s].max_samples
            take = self.sizes[i] if cap is None else min(self.sizes[i], cap - used[s])
            if take > 0:
                used[s] += take
                seq.append((i, take))
        return seq

    def per_rank(self) -> int:
        """Samples per rank per epoch (q), the same on every rank."""
        W, b = self.world_size, self.batch_size
        if self.resampled:
            return math.ceil(math.ceil((self.epoch_samples or self.total) / W) / b) * b
        if self.drop_last:
            return self.total // (W * b) * b
        return math.ceil(self.total / W)

    def batches(self) -> int:
        return math.ceil(self.per_rank() / self.batch_size)

    def worker(self, epoch: int, rank: int, k: int) -> WorkerPlan:
        q, b, K = self.per_rank(), self.batch_size, self.num_workers
        B = self.batches()
        all_sizes = [b] * B
        if B:
            all_sizes[-1] = q - (B - 1) * b
        mine = all_sizes[k::K]
        if self.resampled:
            return WorkerPlan([], mine, sum(mine))
        # this worker's sub-range of the rank's range: the batches of workers < k come first
        start = rank * q + sum(sum(all_sizes[i::K]) for i in range(k))
        end_real = min(rank * q + q, self.total)
        lo, hi = min(start, end_real), min(start + sum(mine), end_real)
        pieces, pos = [], 0
        for shard, take in self.sequence(epoch):
            a, z = max(lo, pos), min(hi, pos + take)
            if a < z:
                pieces.append(Piece(shard, a - pos, z - a))
            pos += take
            if pos >= hi:
                break
        return WorkerPlan(pieces, mine, hi - lo)


# ------------------------------------------------------------------------- uniform task blocks
class BlockMixture:
    """``data.task_sampling: uniform`` (the authors' stage-2 mixture): the stream is blocks of
    ``block`` samples, each from ONE source (a task's shards), the source drawn with probability
    ∝ its ``weight`` (all 1: uniformly, whatever its size), not in proportion to its samples.

    Every rank reads only its own contiguous share of each source, cycling through it when it
    runs out (small tasks recur, as in the authors' all_exhausted interleaving), so ranks never
    read the same sample in a pass.  ``shared``: every rank draws the same source for block g
    (``data.batch_composition: shared``: one global step holds few tasks, each split over the
    ranks, as the authors' shared seed does); otherwise each rank draws its own sequence.

    Pure arithmetic on (seed, rank, block index): where a worker starts after a resume is
    computed, never replayed from data."""

    CHUNK = 1024  # blocks drawn per RNG call (cached)

    def __init__(self, plan: "Plan", block: int, rank: int, shared: bool):
        self.block, self.rank, self.shared = block, rank, shared
        self.seed = plan.seed
        self.weights = [s.weight for s in plan.sources]
        if min(self.weights) <= 0:
            raise ValueError("data.task_sampling=uniform: every source needs weight > 0")
        W = plan.world_size
        self.shards: list[list[tuple[int, int]]] = []   # per source: (shard, samples) in order, capped
        self.slices: list[tuple[int, int]] = []         # per source: this rank's [lo, hi) of its samples
        for s, src in enumerate(plan.sources):
            left = src.max_samples if src.max_samples is not None else float("inf")
            mine = []
            for i, n in enumerate(plan.sizes):
                if plan.shard_source[i] == s and left > 0:
                    mine.append((i, int(min(n, left))))
                    left -= mine[-1][1]
            total = sum(n for _, n in mine)
            if total < W:
                raise ValueError(f"source {src.name} has {total} samples, fewer than the {W} ranks that each need "
                                 "a share of it (data.task_sampling=uniform)")
            self.shards.append(mine)
            self.slices.append((rank * total // W, (rank + 1) * total // W))
        self._chunks: dict[int, list[int]] = {}
        self._counts: dict[int, list[int]] = {}  # per chunk: blocks of each source before it

    def _chunk(self, c: int) -> list[int]:
        if c not in self._chunks:
            who = "all" if self.shared else f"rank{self.rank}"
            rng = random.Random(f"{self.seed}:blocks:{who}:{c}")
            self._chunks[c] = rng.choices(range(len(self.weights)), weights=self.weights, k=self.CHUNK)
        return self._chunks[c]

    def source_of(self, g: int) -> int:
        """The source of global block ``g``."""
        return self._chunk(g // self.CHUNK)[g % self.CHUNK]

    def blocks_before(self, s: int, g: int) -> int:
        """How many of blocks 0 … g-1 come from source ``s``."""
        c = g // self.CHUNK
        for k in range(len(self._counts), c + 1):  # cumulative counts at each chunk start, built once
            prev = self._counts[k - 1] if k else [0] * len(self.weights)
            here = Counter(self._chunk(k - 1)) if k else Counter()
            self._counts[k] = [prev[i] + here[i] for i in range(len(self.weights))]
        return self._counts[c][s] + self._chunk(c)[: g % self.CHUNK].count(s)

    def pieces(self, g: int) -> tuple[int, list[Piece]]:
        """(source, the pieces to read) for block ``g`` of this rank: the next ``block`` samples
        of its share of the source, wrapping around at the end of the share."""
        s = self.source_of(g)
        lo, hi = self.slices[s]
        n = hi - lo
        start = self.blocks_before(s, g) * self.block
        wanted = [lo + (start + i) % n for i in range(self.block)]
        out: list[Piece] = []
        for j in wanted:  # sample j of the source → (shard, offset); consecutive runs merge
            pos = j
            for shard, size in self.shards[s]:
                if pos < size:
                    break
                pos -= size
            if out and out[-1].shard == shard and out[-1].skip + out[-1].take == pos:
                out[-1] = Piece(shard, out[-1].skip, out[-1].take + 1)
            else:
                out.append(Piece(shard, pos, 1))
        return s, out
