"""Streaming WebDataset loader: exact epochs, the same number of batches on every rank,
corrupt data skipped and counted, exact mid-epoch resume.

Public API
----------
::

    from pipeline.data import build_loader, open_shards

    loader = build_loader(cfg, rank, world, plan=plan, collate_fn=collate)   # a run's: cfg.data
    loader = open_shards("data/qa/train-{000000..000007}.tar", kind="qa", batch_size=8,
                         rank=rank, world_size=world, num_workers=2, seed=0)  # the same, by hand
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                 # len(loader) batches, identical on every rank
            ...
        metrics.update(loader.metrics())     # data/corrupt_samples, …/corrupt_shards, …/lost_samples, …/padded_samples
    ckpt["data"] = loader.state_dict()       # at any step, mid-epoch included
    loader.load_state_dict(ckpt["data"])     # the next iter(loader) continues exactly there

``build_loader(cfg, rank, world, ...)`` is the one way the trainer, the evaluation and the
throughput benchmark get a loader: from ``cfg.data`` and the run's batch plan (or a batch size
and ``evaluation=True``), it sets the batch size, prefetch, pinning and hand-over
(:mod:`pipeline.data.loader`).  ``open_shards(shards, kind, batch_size, ...)`` takes the settings
one by one: ``shards`` is a brace pattern, a list of patterns or shard paths, a shard folder
written by ``data_prep/shard.py`` (its ``manifest.json`` names the pattern), several sources
joined by ``::`` (open_clip style, with ``weights="1::2"``), or a list of
``pipeline.config.DataSource``; ``rank``/``world_size`` default to the launcher environment
(``RANK``/``WORLD_SIZE``, SLURM).  This package never calls ``torch.distributed``.

Samples (what ``collate_fn`` receives, a list of these per batch; the default collate returns
that list).  Images are decoded to RGB ``PIL.Image``::

    pair  {"image": PIL, "text": str, "kind": "pair", "meta": dict, "__key__", "__source__", "__pad__"}
    qa    {"image": PIL, "conversations": [{"question", "answer"}, ...], "meta", ...}
    mmeb  {"task": str, "query": {"text": str | None, "image": PIL | None}, "positive": {...},
           "negatives": [{...}, ...], "meta", ...}

``__pad__`` is True for a sample that repeats an earlier one to keep the counts equal (the
remainder of an epoch that does not divide by the world size, corrupt data); a trainer may
down-weight it, evaluation must ignore it.

How an epoch is cut, and why every rank yields the same number of batches without any
collective: see :mod:`pipeline.data.plan`.  In short, ranks split the epoch's sample sequence
(shard order permuted from ``(seed, epoch)``) into equal ranges, workers split their rank's
range, and missing slots are filled with marked repeats.

Resampled mode (``resampled=True``): each worker draws shards with replacement (probability
∝ source weight x shard size) from a stream seeded by ``(seed, epoch, rank, worker)``;
``epoch_samples`` (global, default ``N``) sets the epoch length — ``webdataset``'s
``with_epoch``, but per rank and already divided among the workers.

Resume: ``state_dict()`` is ``{"epoch", "batches"}`` (batches consumed this epoch, the same
on every rank) plus the plan's parameters.  Worker ``k`` replays its stream and discards its
first ``batches_k * b`` samples before decoding, so the continuation is exactly what the
uninterrupted run would have produced.  With another world size, worker count or batch size
the plan differs: the loader warns and resumes at the same fraction of the epoch.

Modules: :mod:`~pipeline.data.plan` (the epoch plan: shards, sizes, ranges, task blocks),
:mod:`~pipeline.data.shards` (reading and decoding, in the workers), :mod:`~pipeline.data.workers`
(the DataLoader worker plumbing), :mod:`~pipeline.data.loader` (the loader and the trainer's
batch source).
"""
from pipeline.data.loader import (BatchSource, LoaderSource, ShardLoader, build_loader, make_loader, open_shards,
                                  pixel_dtype)
from pipeline.data.plan import Plan, Source, expand_sources, shard_sizes
from pipeline.data.shards import (COUNTERS, KINDS, DataError, ShardDataset, data_error_reason, decode_sample,
                                  default_collate)
from pipeline.data.workers import die_with_parent, iterate, widen_result_pipe, worker_kwargs

__all__ = ["build_loader", "open_shards", "ShardLoader", "ShardDataset", "decode_sample",
           "default_collate", "Plan", "Source", "expand_sources", "shard_sizes", "KINDS", "COUNTERS",
           "DataError", "data_error_reason", "BatchSource", "LoaderSource", "make_loader",
           "pixel_dtype", "die_with_parent", "widen_result_pipe", "worker_kwargs", "iterate"]
