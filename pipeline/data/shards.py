"""The per-rank sample stream: read the epoch plan's pieces of WebDataset tars, decode samples,
skip and count what cannot be read, pad to equal counts, form task blocks, collate.  Runs inside
the DataLoader workers (or the rank when ``data.workers=0``); see :mod:`pipeline.data` for the
sample formats and :mod:`pipeline.data.plan` for how an epoch is cut.
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import random
import tarfile
from collections import Counter, deque
from typing import Any, Callable, Iterator, NamedTuple, Optional

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.plan import (BlockMixture, Piece, Plan, Source, WorkerPlan, check_kind, open_tar, shard_sizes,
                                split_name)
from pipeline.imaging import open_image, reuse_image_memory, to_rgb

log = logging.getLogger(__name__)

KINDS = ("pair", "qa", "mmeb")
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm"}
# corrupt_samples: undecodable or rejected by the collator; lost_samples: listed in sizes.json
# but never read (a truncated or unreadable shard; per shard under LOST + url as well);
# padded_samples: repeats standing in for either, or filling an uneven remainder.
COUNTERS = ("corrupt_samples", "corrupt_shards", "lost_samples", "padded_samples")
LOST = "lost:"


def _info(raw: dict) -> dict:
    """A raw sample's JSON member, parsed once (task grouping and decoding both need it)."""
    if "__info__" not in raw:
        raw["__info__"] = json.loads(raw["json"]) if "json" in raw else {}
    return raw["__info__"]


def _task_of(raw: dict) -> str:
    """An mmeb sample's task ("" when its JSON is unreadable)."""
    try:
        return str(_info(raw)["task"])
    except Exception:
        return ""


def decode_sample(raw: dict, kind: str) -> dict:
    """Raw tar members (extension → bytes) → a sample as documented above.  Raises on
    anything undecodable."""
    def image(member: str) -> Image.Image:
        img = open_image(raw[member])
        img.load()
        return to_rgb(img)

    info = _info(raw)
    out = {"__key__": raw["__key__"], "__source__": raw["__source__"],
           "__pad__": raw.get("__pad__", False), "kind": kind, "meta": info.get("meta") or {}}
    if kind == "mmeb":
        def side(s: dict) -> dict:
            return {"text": s.get("text"), "image": image(s["image"]) if s.get("image") else None}

        out.update(task=info["task"], query=side(info["query"]), positive=side(info["positive"]),
                   negatives=[side(n) for n in info.get("negatives") or []])
        return out
    members = [e for e in raw if e.lower() in IMAGE_EXTS]
    if len(members) != 1:
        raise ValueError(f"expected one image member, found {sorted(e for e in raw if not e.startswith('__'))}")
    out["image"] = image(members[0])
    if kind == "pair":
        out["text"] = raw["txt"].decode("utf-8")
    else:
        out["conversations"] = info["conversations"]
    return out


def default_collate(samples: list[dict]) -> list[dict]:
    """The model-free collation: the list of samples itself."""
    return samples


class DataError(RuntimeError):
    """The data cannot feed training at all (every shard unreadable, or no sample decodes as
    the configured kind).  Raised in a loader worker; the DataLoader re-raises it in the rank
    with the worker's traceback in the message (:func:`data_error_reason` takes it back out)."""


def data_error_reason(e: DataError) -> str:
    """The message a :class:`DataError` was raised with, without the traceback text the
    DataLoader adds when it re-raises a worker's exception."""
    text = str(e).strip()
    marker = f"{DataError.__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text


class _Item(NamedTuple):
    """What a worker hands the main process: the collated batch and its counters so far (a
    NamedTuple, so the DataLoader's pin_memory reaches into the batch)."""
    batch: Any
    worker: int
    counters: dict


class ShardDataset(IterableDataset):
    """The per-rank stream (an IterableDataset yielding collated batches).  Use
    :func:`open_shards`; :class:`ShardLoader` sets ``epoch``/``skip_batches`` before each
    iteration."""

    def __init__(self, sources: list[Source], kind: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 drop_last: bool = True, resampled: bool = False, epoch_samples: Optional[int] = None,
                 task_batch_size: Optional[int] = None, collate_fn: Optional[Callable] = None,
                 task_sampling: str = "proportional", shared_blocks: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if task_batch_size and (kind != "mmeb" or batch_size % task_batch_size):
            raise ValueError(f"task_batch_size={task_batch_size} needs kind='mmeb' and to divide "
                             f"batch_size={batch_size}")
        if task_sampling not in ("proportional", "uniform"):
            raise ValueError(f"data.task_sampling={task_sampling!r}: use proportional or uniform")
        uniform = task_sampling == "uniform"
        if uniform and not task_batch_size:
            raise ValueError("data.task_sampling=uniform draws blocks of data.task_batch_size samples from one "
                             "source: set data.task_batch_size (the authors': 64) and one source per task")
        if shared_blocks and not uniform:
            raise ValueError("data.batch_composition=shared needs data.task_sampling=uniform")
        self.kind, self.rank = kind, rank
        self.shuffle_buffer, self.task_batch_size = shuffle_buffer, task_batch_size
        self.collate_fn = collate_fn or default_collate
        check_kind(sources, kind)
        urls = [u for s in sources for u in s.urls]
        source_of = [i for i, s in enumerate(sources) for _ in s.urls]
        # uniform blocks are an endless stream (an "epoch" is its nominal length): resampled sizing
        self.plan = Plan(urls, source_of, shard_sizes(urls), sources,
                         batch_size, world_size, max(1, num_workers), seed, shuffle, drop_last,
                         resampled or uniform, epoch_samples)
        self.mixture = BlockMixture(self.plan, task_batch_size, rank, shared_blocks) if uniform else None
        self.epoch = 0
        self.skip_batches = 0
        if self.plan.batches() == 0:
            log.warning("%d samples make no batch of %d on each of %d ranks (drop_last): every epoch is "
                        "empty; use drop_last=False or a smaller batch", self.plan.total, batch_size, world_size)

    # --------------------------------------------------------------------------- raw stream
    def _read(self, piece: Piece, ctx: Counter) -> Iterator[dict]:
        """Up to ``piece.take`` raw samples after skipping ``piece.skip``; any failure or
        shortfall counts the shard as corrupt (the caller pads)."""
        url = self.plan.shard_urls[piece.shard]
        source = self.plan.sources[self.plan.shard_source[piece.shard]].name
        seen, got, cur = 0, 0, None
        try:
            with open_tar(url) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = split_name(m.name)
                    if cur is None or key != cur["__key__"]:
                        if cur is not None and seen > piece.skip:
                            yield cur
                            got += 1
                            if got == piece.take:
                                return
                        seen += 1
                        cur = {"__key__": key, "__source__": source}
                    if seen > piece.skip:
                        cur[ext] = tf.extractfile(m).read()
            if cur is not None and seen > piece.skip and got < piece.take:
                yield cur
                got += 1
        except (OSError, EOFError, tarfile.TarError) as e:
            log.warning("shard %s unreadable after %d samples (%s: %s): its %d other samples lost, slots padded",
                        url, seen, type(e).__name__, e, piece.take - got)
            self._lost(url, piece.take - got, ctx)
            return
        if got < piece.take:
            log.warning("shard %s: %d samples where sizes.json promised %d: %d lost, slots padded",
                        url, got, piece.take, piece.take - got)
            self._lost(url, piece.take - got, ctx)

    @staticmethod
    def _lost(url: str, n: int, ctx: Counter) -> None:
        ctx["corrupt_shards"] += 1
        ctx["lost_samples"] += n
        ctx[LOST + url] += n

    # A fallback search that collates as well gives up after this many samples that decode but
    # do not collate: past that it is the configuration (model.max_length, the collator's kind),
    # not a few bad samples, and scanning the whole dataset one sample at a time would look like a hang.
    FALLBACK_COLLATE_TRIES = 256

    def _fallback(self, collate: bool = False) -> dict:
        """The first decodable sample of the dataset (that also collates on its own, with
        ``collate``): the filler for a worker left with nothing."""
        first_error, failed = None, 0
        every_sample = itertools.chain.from_iterable(
            self._read(Piece(i, 0, n), Counter()) for i, n in enumerate(self.plan.sizes))
        for raw in every_sample:
            try:
                s = decode_sample(raw, self.kind)
            except Exception as e:  # noqa: BLE001 — whatever a bad sample raises
                first_error = first_error or f"{raw.get('__key__')}: {type(e).__name__}: {e}"
                continue
            if not collate:
                return raw
            try:
                self.collate_fn([s])
                return raw
            except Exception as e:  # noqa: BLE001 — whatever the collator raises
                first_error = first_error or f"{raw.get('__key__')}: {type(e).__name__}: {e}"
                failed += 1
                if failed >= self.FALLBACK_COLLATE_TRIES:
                    break
        names = sorted({s.name for s in self.plan.sources})
        if not first_error:
            reason = "every shard is unreadable (see the warnings above)"
        elif collate:
            reason = (f"samples do not decode as {self.kind} or the collator rejects them (first: {first_error}); "
                      "check data.kind and the model settings (model.max_length, model.max_pixels)")
        else:
            reason = f"samples do not decode as {self.kind} (first: {first_error}); check data.kind"
        raise DataError(f"no usable {self.kind} sample in any of the {len(self.plan.sizes)} shards of "
                        f"source(s) {names}: {reason}")

    def _raw(self, wp: WorkerPlan, k: int, ctx: Counter) -> Iterator[dict]:
        produced, keep = 0, []
        if self.plan.resampled:
            rng = random.Random(f"{self.plan.seed}:resample:{self.epoch}:{self.rank}:{k}")
            shards = [i for i, n in enumerate(self.plan.sizes) if n > 0]
            cum = list(itertools.accumulate(
                self.plan.sources[self.plan.shard_source[i]].weight * self.plan.sizes[i] for i in shards))
            misses = 0
            while produced < wp.quota and shards and misses <= 2 * len(shards):
                i = rng.choices(shards, cum_weights=cum)[0]
                before = produced
                for raw in self._read(Piece(i, 0, self.plan.sizes[i]), ctx):
                    yield raw
                    produced += 1
                    if len(keep) < 16:
                        keep.append(raw)
                    if produced == wp.quota:
                        return
                misses = misses + 1 if produced == before else 0
        else:
            for piece in wp.pieces:
                for raw in self._read(piece, ctx):
                    yield raw
                    produced += 1
                    if len(keep) < 16:
                        keep.append(raw)
        if produced < wp.quota:  # drop_last=False remainder, corrupt or short shards
            keep = keep or [self._fallback()]
            for i in range(wp.quota - produced):
                ctx["padded_samples"] += 1
                yield dict(keep[i % len(keep)], __pad__=True)

    # --------------------------------------------------------------------------- stages
    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1 or not self.plan.shuffle:
            yield from it
            return
        buf = []
        for x in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            i = rng.randrange(len(buf))
            yield buf[i]
            buf[i] = x
        rng.shuffle(buf)
        yield from buf

    def _task_runs(self, it: Iterator[dict]) -> Iterator[dict]:
        """Reorder into runs of ``task_batch_size`` samples of one task (the tail of the
        stream, where no task has a full run left, comes out in task order)."""
        t, pools = self.task_batch_size, {}
        for x in it:
            pool = pools.setdefault(_task_of(x), [])
            pool.append(x)
            if len(pool) == t:
                yield from pool
                pool.clear()
        for task in sorted(pools):
            yield from pools[task]

    def _decoded(self, it: Iterator[dict], ctx: Counter) -> Iterator[dict]:
        """Decode; a sample that fails is replaced by the last good one of the same task (so a
        task-homogeneous run stays homogeneous), or by the next good one if none yet."""
        last: dict[str, dict] = {}
        owed: list[str] = []
        for raw in it:
            task = _task_of(raw) if self.kind == "mmeb" else ""
            try:
                s = decode_sample(raw, self.kind)
            except Exception as e:
                if not raw.get("__pad__"):  # a pad repeating a bad sample: counted once, as padding
                    log.warning("sample %s in %s undecodable (%s: %s): replaced by a repeat",
                                raw.get("__key__"), raw.get("__source__"), type(e).__name__, e)
                    ctx["corrupt_samples"] += 1
                    ctx["padded_samples"] += 1
                rep = last.get(task) or next(iter(last.values()), None)
                if rep is None:
                    owed.append(task)
                else:
                    yield dict(rep, __pad__=True)
                continue
            last[task] = s
            yield s
            while owed:
                owed.pop()
                yield dict(s, __pad__=True)
        if owed:
            s = decode_sample(self._fallback(), self.kind)
            for _ in owed:
                yield dict(s, __pad__=True)

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        reuse_image_memory()  # this worker decodes image after image: keep Pillow's freed blocks
        if info is not None and not gc.isenabled():
            # forked from a trainer that runs its loop with automatic GC off (pipeline/train.py's
            # manual_gc, which collects on the trainer's schedule): a worker collects by itself
            gc.enable()
        K = self.plan.num_workers
        if info is not None and info.num_workers != K:
            raise RuntimeError(f"ShardDataset planned for {K} workers, DataLoader runs {info.num_workers}")
        # The DataLoader asks its workers round-robin starting at worker 0, and the next batch
        # due is batch skip_batches, dealt to plan worker skip_batches % K: rotate so that
        # DataLoader worker 0 plays that plan worker (matters after a mid-epoch resume).
        k = ((info.id if info is not None else 0) + self.skip_batches) % K
        wp = self.plan.worker(self.epoch, self.rank, k)
        skip = len(range(k, self.skip_batches, K))  # this worker's batches already consumed
        ctx = Counter()
        if self.mixture is not None:  # uniform task blocks: the position is computed, nothing re-read
            yield from self._batches(self._decoded(self._blocks(k, skip, ctx), ctx), wp.batch_sizes[skip:], k,
                                     ctx, Counter())
            return
        rng = random.Random(f"{self.plan.seed}:buffer:{self.epoch}:{self.rank}:{k}")
        it = self._shuffled(self._raw(wp, k, ctx), rng)
        if self.task_batch_size:
            it = self._task_runs(it)
        # Batches consumed before a resume: read past their raw samples (same shuffle state),
        # undecoded.  What reading them counted (corrupt or short shards, padding) is already
        # in the checkpoint's counters, so it is reported from here on as a delta only.
        deque(itertools.islice(it, sum(wp.batch_sizes[:skip])), maxlen=0)  # consume, undecoded
        yield from self._batches(self._decoded(it, ctx), wp.batch_sizes[skip:], k, ctx, Counter(ctx))

    def _batches(self, samples: Iterator[dict], sizes: list[int], k: int, ctx: Counter, base: Counter
                 ) -> Iterator[_Item]:
        """Collated batches of ``sizes`` from decoded ``samples``, each with the counters since ``base``."""
        good: dict[str, dict] = {}
        for size in sizes:
            batch = list(itertools.islice(samples, size))
            yield _Item(self._collate(batch, good, ctx), k, dict(ctx - base))

    def _blocks(self, k: int, skip: int, ctx: Counter) -> Iterator[dict]:
        """data.task_sampling=uniform: raw samples of this worker's batches (k, k + K, … of the
        epoch, from its ``skip``-th on), each batch ``batch_size / task_batch_size`` blocks of one
        source (plan.BlockMixture).  The global block index runs on across epochs: one
        stream, as the authors' run is.  A block a damaged shard left short is padded (counted)."""
        per_epoch, K, B = self.plan.batches(), self.plan.num_workers, self.task_batch_size
        nb = self.plan.batch_size // B
        for t in list(range(k, per_epoch, K))[skip:]:
            first = (self.epoch * per_epoch + t) * nb
            for g in range(first, first + nb):
                _, pieces = self.mixture.pieces(g)
                got = [raw for p in pieces for raw in self._read(p, ctx)]
                fill = got or [self._fallback()]
                for i in range(B - len(got)):
                    ctx["padded_samples"] += 1
                    got.append(dict(fill[i % len(fill)], __pad__=True))
                yield from got

    def _task(self, s: dict) -> str:
        return str(s.get("task", "")) if self.kind == "mmeb" else ""

    def _collate(self, batch: list[dict], good: dict[str, dict], ctx: Counter) -> Any:
        """``collate_fn(batch)``; a sample the collator rejects although it decoded (an image
        the processor refuses, a conversation without a question, a side with neither text nor
        image, …) is counted corrupt and replaced like an undecodable one: by a good sample of
        the batch of the same task, else of any task, else the worker's last good one (``good``,
        task → sample, kept up to date here), else the dataset's first usable sample."""
        try:
            out = self.collate_fn(batch)
        except Exception as e:  # noqa: BLE001 — whatever the collator raises
            if self.collate_fn is default_collate:
                raise
            error = e
        else:
            for s in batch:
                good[self._task(s)] = s
            return out
        rejected = {}
        for i, s in enumerate(batch):
            try:
                self.collate_fn([s])
            except Exception as e:  # noqa: BLE001
                rejected[i] = e
        if not rejected:  # every sample collates alone: the batch as a whole is the problem
            raise error
        ok = [s for i, s in enumerate(batch) if i not in rejected]
        for s in ok:
            good[self._task(s)] = s
        fixed = []
        for i, s in enumerate(batch):
            if i not in rejected:
                fixed.append(s)
                continue
            e = rejected[i]
            log.warning("sample %s in %s rejected by the collator (%s: %s): replaced by a repeat",
                        s.get("__key__"), s.get("__source__"), type(e).__name__, e)
            ctx["corrupt_samples"] += 1
            ctx["padded_samples"] += 1
            task = self._task(s)
            rep = (next((x for x in ok if self._task(x) == task), None) or (ok[0] if ok else None)
                   or good.get(task) or next(iter(good.values()), None))
            if rep is None:
                rep = decode_sample(self._fallback(collate=True), self.kind)
                good[self._task(rep)] = rep
            fixed.append(dict(rep, __pad__=True))
        return self.collate_fn(fixed)
