"""One optimizer step of each stage, on every rank in lock-step.

* stage 1: ``accumulation`` micro-batches, each ``engine(**batch).loss`` → ``engine.backward``
  → ``engine.step`` (DeepSpeed applies the update at the accumulation boundary);
* stage 2, per-rank batch in one forward: ``q, k, scale = engine(**batch)`` →
  ``coma_kernels.gathered_infonce`` (negatives from every rank) → backward → step;
* stage 2, embedding cache (GradCache): no-grad forward of every chunk, the gathered loss and
  its gradients w.r.t. the embeddings, then chunk by chunk re-forward (same RNG state as the
  first pass, so dropout masks match) and backward of ``<emb, d_emb>`` inside
  ``engine.coalesce_grad_reduction()`` so ZeRO-2/3 reduce gradients once per step.

Each returns ``{"loss": float, "applied": bool}``; ``applied`` is the same on
every rank (DeepSpeed skips an update whose gradient norm is not finite on all ranks; the cache
path decides with an all-reduce before its backward).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pipeline import dist
from pipeline.config import Config

log = logging.getLogger("coma.train")


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps taken (applied or skipped)
    samples_seen: int = 0         # global samples consumed
    skipped_steps: int = 0        # non-finite steps skipped so far
    bad_in_row: int = 0
    last_checkpoint: Optional[str] = None

    _SAVED = ("step", "samples_seen", "skipped_steps")  # what a checkpoint's client state holds

    def to_client(self) -> dict:
        return {k: getattr(self, k) for k in self._SAVED}

    @classmethod
    def from_client(cls, client: dict, checkpoint: str) -> "TrainState":
        return cls(**{k: int(client.get(k, 0)) for k in cls._SAVED}, last_checkpoint=checkpoint)


@contextmanager
def _fork_rng(state: Optional[dict]):
    """``state`` None: capture the current RNG state (yielded) and let the body advance it as
    usual.  ``state`` given: run the body from that state, then put the outer state back, so a
    re-forward replays the first pass's dropout masks without disturbing the main sequence."""
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_dev = acc.device_name() != "cpu"
    outer = {"cpu": torch.get_rng_state(), "dev": acc.get_rng_state() if on_dev else None}
    if state is None:
        yield outer
        return
    torch.set_rng_state(state["cpu"])
    if on_dev:
        acc.set_rng_state(state["dev"])
    try:
        yield state
    finally:
        torch.set_rng_state(outer["cpu"])
        if on_dev:
            acc.set_rng_state(outer["dev"])


def num_samples(batch: Any) -> int:
    """Queries (contrastive batch) or sequences (stage-1 / embedding batch) in one collated batch."""
    if "num_queries" in batch:
        return int(batch["num_queries"])
    return int(batch["input_ids"].shape[0])


class StepRunner:
    """Runs one optimizer step for the configured stage; returns per-rank step statistics."""

    def __init__(self, cfg: Config, engine: Any, plan: Any):
        self.cfg, self.engine, self.plan = cfg, engine, plan

    def _device_batch(self, batch):
        from pipeline.collate import to_device

        return to_device(batch, self.engine.device)

    # ``loss_hook(loss, state) -> loss`` sees every loss before its backward: the robustness
    # tests put their faults there (tests/faults.py: a NaN loss, a rank killed mid-step); None in
    # training.
    loss_hook: Optional[Callable[[Any, "TrainState"], Any]] = None

    def _inject(self, loss, state: TrainState):
        return loss if self.loss_hook is None else self.loss_hook(loss, state)

    # stage 1 ------------------------------------------------------------------------------
    def stage1(self, micro_batches: list, state: TrainState) -> dict:
        eng = self.engine
        losses = []
        # DeepSpeed scales each backward by 1/accumulation: every micro-batch's mean CE weighs
        # the same (not token-weighted across micro-batches, as in HF Trainer's default).
        for b in micro_batches:
            out = eng(**self._device_batch(b))
            loss = self._inject(out.loss, state)
            eng.backward(loss)
            eng.step()
            losses.append(loss.detach())
        # one host sync per step, not per micro-batch (tokens are counted on the CPU batch)
        return {"loss": float(sum(losses)) / len(losses), "applied": eng.was_step_applied()}

    # stage 2 ------------------------------------------------------------------------------
    def _loss(self, q, k, scale):
        import coma_kernels

        return coma_kernels.gathered_infonce(q, k, scale, symmetric=self.cfg.loss.symmetric,
                                        backend=self.cfg.loss.backend)

    def stage2(self, chunks: list, state: TrainState) -> dict:
        if len(chunks) == 1 and self.plan.cache_chunk is None:
            eng = self.engine
            q, k, scale = eng(**self._device_batch(chunks[0]))
            loss = self._inject(self._loss(q, k, scale), state)
            eng.backward(loss)
            eng.step()
            return {"loss": float(loss.detach()), "applied": eng.was_step_applied()}
        return self._stage2_cached(chunks, state)

    def _stage2_cached(self, chunks: list, state: TrainState) -> dict:
        """Embedding cache (GradCache): exact gradients of the full per-rank batch with the
        activation memory of one chunk."""
        import torch

        eng = self.engine
        chunks = [self._device_batch(c) for c in chunks]
        qs, pos, negs, rngs, scale = [], [], [], [], None
        # 1. no-grad forward of every chunk, remembering each chunk's RNG state so the
        #    re-forward draws the same dropout masks.
        with torch.no_grad():
            for c in chunks:
                with _fork_rng(None) as st:
                    q, k, scale = eng(**c)
                rngs.append(st)
                n = num_samples(c)
                qs.append(q)
                pos.append(k[:n])
                negs.append(k[n:])
        # 2. loss over the whole per-rank batch (keys gathered from every rank) and its
        #    gradients w.r.t. the embeddings and the logit scale.  Keys are laid out as all
        #    positives (row i = query i's) then all hard negatives, which gathered_infonce expects.
        Q = torch.cat(qs).detach().requires_grad_(True)
        K = torch.cat(pos + negs).detach().requires_grad_(True)
        # (scale came out of a no-grad forward: whether it trains is the config's call)
        S = scale.detach().requires_grad_(bool(self.cfg.loss.learnable_scale))
        with torch.enable_grad():
            loss = self._inject(self._loss(Q, K, S), state)
        bad = dist.any_true(not math.isfinite(float(loss.detach())))
        if bad:  # every rank skips the same step: no backward, no update
            return {"loss": float(loss.detach()), "applied": False}
        loss.backward()
        dQ, dK = Q.grad, K.grad
        dS = S.grad if S.requires_grad else None
        n_pos = sum(p.shape[0] for p in pos)
        dpos = list(torch.split(dK[:n_pos], [p.shape[0] for p in pos]))
        dneg = list(torch.split(dK[n_pos:], [x.shape[0] for x in negs]))
        dq = list(torch.split(dQ, [x.shape[0] for x in qs]))
        # 3. re-forward chunk by chunk with grad; backward of the surrogate <emb, d_emb> has
        #    exactly the parameter gradient of the full-batch loss.  One reduction per step.
        with eng.coalesce_grad_reduction():
            for i, c in enumerate(chunks):
                with _fork_rng(rngs[i]):
                    q, k, s = eng(**c)
                n = dq[i].shape[0]
                sur = (q * dq[i]).sum() + (k[:n] * dpos[i]).sum()
                if k.shape[0] > n:
                    sur = sur + (k[n:] * dneg[i]).sum()
                if dS is not None and i == 0:
                    sur = sur + s * dS
                eng.backward(sur)
        eng.step()
        return {"loss": float(loss.detach()), "applied": eng.was_step_applied()}


