"""One rank's loader and the trainer's batch source.

* :func:`build_loader` ``(cfg, rank, world)`` — the loader a run's config describes, the one entry
  the trainer, the evaluation and the throughput benchmark share: it decides everything that
  follows from the run rather than from ``cfg.data`` (the batch size from the batch plan, the
  prefetch, pinned memory) and the evaluation setting (every sample once, in shard order).
* :func:`open_shards` — the same over explicit shard patterns and keyword settings (tools, tests).
* :class:`ShardLoader` — epochs, equal batch counts on every rank, exact resume, over
  :class:`pipeline.data.shards.ShardDataset`; with workers and a collate function, each batch
  travels from its worker as one packed buffer (:class:`pipeline.collate.Packed`).
* :func:`make_loader` → :class:`LoaderSource` — the trainer's batch source: one optimizer step's
  batches at a time.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader

from pipeline.collate import Packed, PackedCollate
from pipeline.config import Config, ConfigError
from pipeline.data.plan import KindMismatch, expand_sources
from pipeline.data.shards import COUNTERS, LOST, ShardDataset
from pipeline.data.workers import iterate, worker_kwargs

log = logging.getLogger(__name__)


def _identity(x):
    return x


class ShardLoader:
    """Iterates one rank's batches epoch by epoch (see module docstring); wraps a
    ``torch.utils.data.DataLoader`` over :class:`ShardDataset`.  A batch a worker packed
    (:class:`pipeline.collate.PackedCollate`) is unpacked here: callers see the collated batch."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.batches_done = 0, 0
        self._done_counters = Counter()          # finished epochs
        self._worker_counters: dict[int, dict] = {}  # current epoch, latest snapshot per worker

    def __len__(self) -> int:
        return self.dataset.plan.batches()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch than the current one starts fresh
        (the same one keeps a restored mid-epoch position)."""
        if epoch != self.epoch:
            self._fold()
            self.epoch, self.batches_done = epoch, 0

    def _fold(self) -> None:
        for c in self._worker_counters.values():
            self._done_counters.update(c)
        self._worker_counters = {}

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        ds.epoch, ds.skip_batches = self.epoch, self.batches_done
        kwargs = worker_kwargs(self.num_workers)
        if self.num_workers > 0 and self.prefetch_factor:
            kwargs["prefetch_factor"] = self.prefetch_factor
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.pin_memory, **kwargs)
        for item in iterate(dl):
            self._worker_counters[item.worker] = item.counters
            self.batches_done += 1
            yield item.batch.unpack() if isinstance(item.batch, Packed) else item.batch
        if self.batches_done >= len(self):
            self._fold()
            self.epoch, self.batches_done = self.epoch + 1, 0

    def _totals(self) -> Counter:
        total = Counter(self._done_counters)
        for c in self._worker_counters.values():
            total.update(c)
        return total

    def metrics(self) -> dict[str, int]:
        """Cumulative data-health counters for the trainer's metrics (``data/…`` keys)."""
        total = self._totals()
        return {f"data/{k}": int(total.get(k, 0)) for k in COUNTERS}

    def lost_by_shard(self) -> dict[str, int]:
        """Samples of each shard that this rank's reads could not deliver (``sizes.json`` counts
        them), cumulative over epochs: ``{url: n}``, only shards that lost some."""
        return {k[len(LOST):]: int(v) for k, v in self._totals().items() if k.startswith(LOST) and v}

    def _plan_params(self) -> dict:
        p = self.dataset.plan
        return {"world_size": p.world_size, "num_workers": p.num_workers, "batch_size": p.batch_size,
                "seed": p.seed, "shuffle": p.shuffle, "drop_last": p.drop_last, "resampled": p.resampled,
                "total_samples": p.total, "batches_per_epoch": len(self)}

    def state_dict(self) -> dict:
        """Where this rank stands; equal on every rank (they consume batches in lockstep), so
        rank 0's copy in the checkpoint restores all of them."""
        epoch, batches = self.epoch, self.batches_done
        if batches >= len(self):  # the last batch was handed out: the next one opens the next epoch
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches,
                "counters": {k: int(v) for k, v in self._totals().items() if v}, **self._plan_params()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, batches = int(state["epoch"]), int(state["batches"])
        self._done_counters = Counter(state.get("counters", {}))
        self._worker_counters = {}
        mine = self._plan_params()
        changed = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if changed:
            old = state.get("batches_per_epoch") or 1
            batches = min(len(self), round(batches * len(self) / old))
            log.warning("loader state saved with %s; resuming at batch %d of %d of epoch %d, "
                        "not the exact sample sequence", ", ".join(f"{k}={a} (now {b})" for k, (a, b)
                                                                  in changed.items()),
                        batches, len(self), self.epoch)
        self.batches_done = batches


def open_shards(shards: Any, kind: str, batch_size: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None, num_workers: int = 2, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, drop_last: bool = True,
                 resampled: bool = False, epoch_samples: Optional[int] = None,
                 task_batch_size: Optional[int] = None, weights: Any = None,
                 collate_fn: Optional[Callable[[list[dict]], Any]] = None,
                 pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                 task_sampling: str = "proportional", batch_composition: str = "per_rank") -> ShardLoader:
    """The loader for one rank over explicit shards.  ``batch_size`` is per rank (the micro
    batch); ``shuffle=False, drop_last=False`` is the evaluation setting (every sample once, in
    shard order per worker).  With workers and a ``collate_fn``, batches are packed in the
    workers and unpacked by the loader: the DataLoader sends every tensor through its own
    shared-memory segment and file descriptor, a cost per tensor paid in the trainer and counted
    as data wait; one buffer per batch is one transfer (benchmarks/README.md).  See
    :mod:`pipeline.data` for everything else."""
    if rank is None or world_size is None:
        from pipeline.dist import read_env

        env = read_env()
        rank = env.rank if rank is None else rank
        world_size = env.world_size if world_size is None else world_size
    if num_workers > 0 and collate_fn is not None:
        collate_fn = PackedCollate(collate_fn)
    ds = ShardDataset(expand_sources(shards, weights), kind, batch_size, rank, world_size, num_workers,
                      seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                      resampled=resampled, epoch_samples=epoch_samples, task_batch_size=task_batch_size,
                      collate_fn=collate_fn, task_sampling=task_sampling,
                      shared_blocks=_composition(batch_composition) == "shared")
    return ShardLoader(ds, num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def _composition(value: str) -> str:
    if value not in ("per_rank", "shared"):
        raise ValueError(f"data.batch_composition={value!r}: use per_rank or shared")
    return value


def build_loader(cfg: Config, rank: int, world: int, *, collate_fn: Optional[Callable] = None,
                 plan=None, batch_size: Optional[int] = None, evaluation: bool = False) -> ShardLoader:
    """The loader of ``cfg.data`` for ``rank`` of ``world`` ranks.

    ``plan`` (a :class:`pipeline.engine.BatchPlan`): a training loader; its batch is one forward
    of stage 1 (``plan.micro``) or one rank's whole step of stage 2 (``plan.per_rank``, split
    into cache chunks by the collate), with prefetch for a whole optimizer step and the next
    (stage 1 takes ``accumulation`` batches per step, and the DataLoader's default of 2 per
    worker would leave a step waiting on the rest) and pinned memory when batches go to a CUDA
    device (``to_device`` copies without blocking).  ``evaluation=True``: every sample once in
    shard order (no shuffle, resampling or dropped remainder; repeats that even out the ranks
    are marked ``__pad__``), batches of ``batch_size``.  ``collate_fn``: samples → batch (default:
    the list of decoded samples).  Raises ``ValueError`` (``KindMismatch`` among them) or
    ``FileNotFoundError`` for sources that cannot be read; callers name their own setting."""
    import torch

    d = cfg.data
    if not d.sources:
        raise ValueError("data.sources is empty: set data.sources[0].shards to a shard pattern or folder")
    if (plan is None) == (batch_size is None):
        raise TypeError("build_loader takes the run's batch plan (training) or a batch_size, not both")
    stage1 = cfg.train.stage == 1
    batch = batch_size if plan is None else plan.micro if stage1 else plan.per_rank
    per_step = plan.accumulation if plan is not None and stage1 else 1
    workers = d.workers
    return open_shards(list(d.sources), kind=d.kind, batch_size=batch, rank=rank, world_size=world,
                       num_workers=workers, seed=d.seed, shuffle=not evaluation, shuffle_buffer=d.shuffle_buffer,
                       drop_last=not evaluation, resampled=d.resampled and not evaluation,
                       epoch_samples=d.epoch_samples, task_batch_size=d.task_batch_size, collate_fn=collate_fn,
                       task_sampling="proportional" if evaluation else d.task_sampling,
                       batch_composition="per_rank" if evaluation else d.batch_composition,
                       prefetch_factor=max(2, -(-2 * per_step // workers)) if workers > 0 else None,
                       pin_memory=workers > 0 and torch.cuda.is_available())


# ------------------------------------------------------------------ the trainer's batch source
class BatchSource:
    """What :class:`Loop` reads batches from.  Iterating yields one optimizer step's batch (stage 1:
    the list of ``accumulation`` micro-batches; stage 2: the per-rank batch or its cache chunks)
    forever; ``steps_per_epoch`` sizes the run when ``train.max_steps`` is unset;
    ``skipped_samples`` feeds the ``data/skipped_samples`` metric and, with ``epoch_samples`` and
    ``lost_by_shard``, the ``train.max_skipped_fraction`` stop; ``state_dict`` goes into every
    checkpoint and ``load_state_dict`` restores it on resume.  The defaults describe a stateless,
    endless source with nothing skipped (synthetic and in-memory batches); :class:`LoaderSource`
    overrides them for real shards."""

    steps_per_epoch: int = 10**9
    skipped_samples: int = 0
    epoch_samples: int = 0

    def lost_by_shard(self) -> dict[str, int]:
        return {}

    def __iter__(self) -> Iterator:
        raise TypeError(f"{type(self).__name__} must define __iter__")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""


class LoaderSource(BatchSource):
    """One step's worth of batches at a time from :class:`ShardLoader`,
    epoch after epoch: stage 1 yields ``accumulation`` micro-batches, stage 2 the per-rank
    batch as cache chunks.  Every rank yields the same number of steps (the loader equalises
    batch counts across ranks; corrupt samples are replaced by repeats and counted)."""

    def __init__(self, cfg: Config, plan, env, collator):
        from pipeline.collate import ChunkCollate

        self.stage = cfg.train.stage
        self.acc = plan.accumulation  # plan_batches sets 1 for stage 2
        batch = plan.micro if self.stage == 1 else plan.per_rank
        collate = collator if self.stage == 1 else ChunkCollate(collator, plan.cache_chunk or plan.per_rank)
        try:
            self.loader = build_loader(cfg, env.rank, env.world_size, collate_fn=collate, plan=plan)
        except KindMismatch as e:
            raise ConfigError(f"data.sources: {e}: point data.sources at {e.wanted} shards, or set "
                              f"data.kind={e.found} if this stage trains on {e.found} samples") from None
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.sources: {e}") from None
        self.steps_per_epoch = len(self.loader) // self.acc
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.sources: an epoch has {len(self.loader)} batches of {batch} per rank, fewer "
                              f"than one optimizer step ({self.acc}); add data or lower train.global_batch_size")

    @property
    def skipped_samples(self) -> int:
        """This rank's samples of sizes.json not delivered: undecodable, or lost with a shard."""
        m = self.loader.metrics()
        return int(m["data/corrupt_samples"] + m["data/lost_samples"])

    @property
    def epoch_samples(self) -> int:
        return self.loader.dataset.plan.total

    def lost_by_shard(self) -> dict[str, int]:
        return self.loader.lost_by_shard()

    def _batches(self) -> Iterator:
        while True:  # ShardLoader moves to the next epoch by itself at the end of one
            yield from self.loader

    def __iter__(self) -> Iterator[list]:
        it = self._batches()
        while True:
            batch = next(it)
            yield [batch] + [next(it) for _ in range(self.acc - 1)] if self.stage == 1 else batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def pixel_dtype(cfg: Config):
    """The dtype training batches carry ``pixel_values`` in: the model's (bit-identical, as the
    vision tower casts to it first; half the bytes of float32 for a bf16/fp16 model)."""
    from pipeline.model import DTYPES

    return DTYPES[cfg.model.dtype]


def make_loader(cfg: Config, plan, env) -> LoaderSource:
    """The per-rank batch source of a run: shards from ``cfg.data`` through the model's
    collator (stage 1: ``[X][C][D]`` + labels; stage 2: query/candidate chunks)."""
    from pipeline.collate import Collator
    from pipeline.processing import Processor

    m = cfg.model
    proc = Processor.from_pretrained(m.init, m.num_compression_tokens, m.family, m.min_pixels, m.max_pixels)
    kind = cfg.data.kind
    mode = "stage1" if cfg.train.stage == 1 else "contrastive"
    try:
        # loss.hard_negatives=false: in-batch negatives only (the samples' hard negatives dropped)
        collator = Collator(proc, m, kind=kind, mode=mode,
                            max_negatives=None if cfg.loss.hard_negatives else 0, pixel_dtype=pixel_dtype(cfg))
    except ValueError as e:
        raise ConfigError(f"data.kind={kind} with train.stage={cfg.train.stage}: {e}") from None
    return LoaderSource(cfg, plan, env, collator)
