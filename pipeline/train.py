"""The training loop shared by both stages.

    from pipeline.config import load_config
    from pipeline.train import train
    train(load_config("launch/configs/stage1_tiny.yaml", ["--train.max_steps=20"]))

Every rank runs the same loop in lock-step (ZeRO-3 needs every rank to run the same modules
the same number of times): fetch one step's batches (:class:`pipeline.data.LoaderSource`), run the stage's
step (:mod:`pipeline.step`: CE with gradient accumulation, gathered InfoNCE, or the embedding
cache), count, log, checkpoint; export at the end.

Robustness: a non-finite loss or gradient skips the step on every rank (DeepSpeed discards
an update whose gradient norm is not finite; the cache path decides before its backward) and
is counted; ``train.max_bad_steps`` in a row stop the run naming the step and the last good
checkpoint.  Run directory: ``runs/NAME/{config.yaml, metrics.jsonl, tensorboard/,
checkpoints/, export/, train.log}``.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from pipeline import dist
from pipeline.checkpoint import (CheckpointError, CheckpointManager, resolve_resume, rng_state, saved_world_size,
                                 set_rng_state, tag_for)
from pipeline.config import Config, ConfigError, check_model_init, save_yaml, to_dict, to_yaml
from pipeline.fileio import atomic_write_text, output_problem
from pipeline.flops import FlopsModel, peak_flops, target_tokens
from pipeline.metrics import Metrics, Window, count_tokens
from pipeline.runtime import (STOPPED_FILE, StopSignals, device_label, manual_gc, seed_all, set_cpu_threads,
                              setup_logging)
from pipeline.step import StepRunner, TrainState, num_samples

log = logging.getLogger("coma.train")


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); message says why."""


class StoppedOnSignal(RuntimeError):
    """A stop signal arrived; the checkpoint of the step it interrupted is saved (exit 4)."""


# ----------------------------------------------------------------------------------- the loop
class Loop:
    """The per-step machinery of :func:`train` (fetch, step, bookkeeping, logging, checkpoint),
    separate so benchmarks/throughput.py times exactly what training runs."""

    def __init__(self, cfg: Config, built, source, metrics: Metrics, ckpt: Optional[CheckpointManager],
                 total: int, state: Optional[TrainState] = None, signals: Optional[StopSignals] = None):
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.built, self.source, self.metrics, self.ckpt = cfg, built, source, metrics, ckpt
        self.eng = built.engine
        self.total = total
        self.state = state or TrainState()
        self.runner = StepRunner(cfg, self.eng, built.plan)
        self.world = dist.get_world_size()
        self.fm = FlopsModel.from_model(getattr(built.model, "backbone", built.model),
                                        train_llm_weights=not cfg.model.lora.enabled,
                                        train_vit=not cfg.model.freeze_vision)
        self.peak = peak_flops(get_accelerator().device_name() + " " + device_label(), cfg.train.peak_tflops)
        self.config_yaml = to_yaml(cfg)
        self.window = Window()
        self._it: Optional[Iterator] = None
        self.signals = signals or StopSignals(cfg.train.stop_signals)

    def save(self) -> None:
        st = self.state
        client = {**st.to_client(), "config": to_dict(self.cfg)}
        rank_state = {"rng": rng_state(), "loader": self.source.state_dict()}
        path = self.ckpt.save(self.eng, st.step, client, rank_state, self.config_yaml)
        st.last_checkpoint = str(path)
        log.info("checkpoint %s", path)

    def step(self) -> dict:
        """One optimizer step on every rank, with its logging and checkpoint hooks."""
        cfg, st = self.cfg, self.state
        if self._it is None:
            self._it = iter(self.source)
        t0 = time.perf_counter()
        parts = next(self._it)  # a list: micro-batches (stage 1) or cache chunks (stage 2)
        t_data = time.perf_counter() - t0
        self.window.lr = float(self.eng.get_lr()[0])  # the lr this step uses (the scheduler moves in step())
        out = self.runner.stage1(parts, st) if cfg.train.stage == 1 else self.runner.stage2(parts, st)
        n_samples = sum(num_samples(p) for p in parts)
        st.step += 1
        t_gc = 0.0
        if cfg.train.gc_every > 0 and st.step % cfg.train.gc_every == 0 and not gc.isenabled():
            t_gc = time.perf_counter()
            gc.collect()  # under manual_gc: the same step on every rank
            t_gc = time.perf_counter() - t_gc
        st.samples_seen += n_samples * self.world
        # out["applied"] is the same on every rank (DeepSpeed's overflow check is global; the
        # cache path decides with an all-reduce), so all ranks count and stop identically.
        if not out["applied"]:
            st.skipped_steps += 1
            st.bad_in_row += 1
            log.warning("step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row, %d total)",
                        st.step, out["loss"], st.bad_in_row, st.skipped_steps)
            if st.bad_in_row >= cfg.train.max_bad_steps:
                raise TrainingStopped(
                    f"{st.bad_in_row} non-finite steps in a row (limit train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}) at step {st.step}; last good checkpoint: "
                    f"{st.last_checkpoint or 'none (no checkpoint saved yet)'}. Lower optim.lr or check the "
                    f"data, then resume with --train.resume=PATH")
        else:
            st.bad_in_row = 0
        tokens, seqs, patches = count_tokens(parts)
        flops = self.fm.step_flops(seqs, patches, head_tokens=sum(target_tokens(p) for p in parts))
        loss = out["loss"] if out["applied"] and math.isfinite(out["loss"]) else None  # skipped steps: no loss
        self.window.add(time.perf_counter() - t0, t_data, n_samples, tokens, flops, loss, t_gc)
        if st.step % cfg.train.log_every == 0 or st.step == self.total:
            self.last_logged = self.metrics.log_window(self.window, st, self.eng, self.source, self.peak)
            self.window = Window()
            self.stop_if_data_lost(self.last_logged["data/skipped_samples"])
        if self.ckpt is not None and st.step % cfg.train.save_every == 0 and st.step < self.total:
            self.save()
        self.stop_if_signalled()
        return out

    def stop_if_data_lost(self, skipped: float) -> None:
        """Collective (``skipped``: the cross-rank sum of the log line, the same on every rank):
        raise :class:`TrainingStopped` naming the worst shards when more than
        ``train.max_skipped_fraction`` of the samples trained (at least one epoch's worth, so a
        bad shard met early is not judged against a handful of steps) could not be delivered."""
        limit = self.cfg.train.max_skipped_fraction
        base = max(self.state.samples_seen, self.source.epoch_samples, 1)
        if skipped <= limit * base:
            return
        worst = _worst_shards(self.source) or "none lost whole: undecodable samples"
        raise TrainingStopped(
            f"{skipped:.0f} samples could not be delivered (undecodable, or lost in truncated or unreadable shards), "
            f"{skipped / base:.1%} of {base} > train.max_skipped_fraction={limit}; worst shards: {worst}. Rewrite "
            f"them (data_prep/shard.py redoes missing shards: delete the damaged ones and rerun it), or raise "
            f"train.max_skipped_fraction to train on what is left")

    def stop_if_signalled(self, save: bool = True) -> None:
        """Collective: when any rank got a stop signal, save this step (unless just saved, or
        ``save=False``: a signal during set-up) and raise :class:`StoppedOnSignal`."""
        if not (self.signals.installed and dist.any_true(self.signals.received is not None)):
            return
        st = self.state
        if save and self.ckpt is not None and (st.last_checkpoint is None
                                               or Path(st.last_checkpoint).name != tag_for(st.step)):
            self.save()
        who = f"this rank got {self.signals.received}" if self.signals.received else "another rank got a stop signal"
        when = f"during step {st.step}" if save else f"before step {st.step + 1} (during set-up)"
        saved = (f"checkpoint {st.last_checkpoint} saved" if st.last_checkpoint
                 else "no checkpoint yet (the rerun starts from the beginning)")
        msg = f"{who} {when}: {saved}; the same command with --train.resume=auto continues from it"
        if self.ckpt is not None and dist.is_main():
            # For launch/slurm/common.sh, whatever the launcher does to exit codes: requeue the job.
            atomic_write_text(self.ckpt.root.parent / STOPPED_FILE, msg + "\n")
        raise StoppedOnSignal(msg)


def train(cfg: Config, model_loader=None, loader_factory=None) -> Path:
    """Run one stage end to end on every rank; returns the run directory.  ``model_loader`` /
    ``loader_factory`` replace ``pipeline.model.load_model`` / :func:`pipeline.data.make_loader`."""
    # Configuration errors first, before any process group exists: every rank reaches the same
    # verdict from the same config and launcher environment, and exits 2 with one line.
    if not cfg.model.init:
        raise ConfigError("model.init is empty: set it to a Hugging Face VLM directory or hub id, or a previous "
                          "stage's export (e.g. --model.init=runs/NAME/export)")
    check_model_init(cfg.model.init)
    # From here on a stop signal is recorded, not fatal: model load, engine build and a universal
    # conversion can take minutes, and SLURM's warning may come during them.
    signals = StopSignals(cfg.train.stop_signals)
    keep_handlers = False
    try:
        return _run(cfg, signals, model_loader, loader_factory)
    except StoppedOnSignal:
        keep_handlers = True  # a late signal must not kill the exit that follows
        raise
    finally:
        if not keep_handlers:
            signals.restore()


def _run(cfg: Config, signals: StopSignals, model_loader, loader_factory) -> Path:
    """:func:`train` after its config checks, with ``signals`` recording stop signals."""
    from pipeline import engine as engine_mod
    from pipeline.data import expand_sources, make_loader  # torch: imported when a run starts, not for --help
    from pipeline.export import export_engine  # transformers: likewise

    world = dist.read_env().world_size
    ds = engine_mod.build_ds_config(cfg, world)  # config errors surface before the process group
    plan = engine_mod.plan_batches(cfg, world)
    run_dir = Path(cfg.train.run_root) / cfg.train.name
    if problem := output_problem(run_dir, folder=True):
        raise ConfigError(f"train.run_root/train.name: the run directory {run_dir} cannot be written: {problem}")
    if cfg.data.sources and loader_factory is None:  # missing shards too
        try:
            expand_sources(cfg.data.sources)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"data.sources: {e}") from None
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.train.keep_last)
    try:
        resume_path = resolve_resume(cfg.train.resume, ckpt.root)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(str(e)) from None
    saved_world = saved_world_size(resume_path) if resume_path is not None else 0
    reshard = bool(saved_world) and saved_world != world
    if reshard:  # ZeRO partitions of another world size: load DeepSpeed's universal form of them
        ds.setdefault("checkpoint", {})["load_universal"] = True
    env = dist.init(cfg.train.dist_timeout_s)
    setup_logging(run_dir, env.rank)
    set_cpu_threads(cfg, env)
    seed_all(cfg.train.seed, cfg.train.deterministic)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # this start is the continuation it asked for
    source = (loader_factory or make_loader)(cfg, plan, env)
    total = cfg.train.max_steps or source.steps_per_epoch * cfg.train.epochs
    if total <= 0:
        raise ConfigError(f"nothing to train: train.max_steps={cfg.train.max_steps}, "
                          f"{source.steps_per_epoch} steps per epoch × train.epochs={cfg.train.epochs}")
    built = engine_mod.build(cfg, env.world_size, total, model_loader=model_loader, ds=ds, plan=plan)
    state = TrainState()
    if resume_path is not None:
        universal = ckpt.universal(resume_path) if reshard else None
        if universal is not None:
            log.info("%s was saved by %d ranks, this run has %d: its ZeRO partitions are loaded from the "
                     "universal form %s; the per-rank RNG streams are reseeded", resume_path, saved_world,
                     env.world_size, universal)
        client, rank_state = ckpt.load(built.engine, resume_path, universal=universal)
        state = TrainState.from_client(client, str(resume_path))
        if "loader" in rank_state:
            source.load_state_dict(rank_state["loader"])
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:  # another world size saved it: distinct streams per rank (dropout masks), new per resume
            seed_all(cfg.train.seed + 1000 * env.rank + state.step, cfg.train.deterministic)
        log.info("resumed from %s at step %d (%d samples seen)", resume_path, state.step, state.samples_seen)
    else:
        # A different seed per rank from here on (dropout); the model init above was identical.
        seed_all(cfg.train.seed + 1000 * env.rank, cfg.train.deterministic)

    metrics = Metrics(run_dir, enabled=env.rank == 0, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb,
                      wandb_project=cfg.train.wandb_project, run_name=cfg.train.name, config=to_dict(cfg))
    loop = Loop(cfg, built, source, metrics, ckpt, total, state, signals)
    log.info("run %s: stage %d, %d steps, world %d, run dir %s", cfg.train.name, cfg.train.stage, total,
             env.world_size, run_dir)
    built.engine.train()
    try:
        loop.stop_if_signalled(save=False)  # during set-up: nothing new to save; the rerun starts as this did
        with manual_gc(cfg.train.gc_every):
            while state.step < total:
                loop.step()
        if state.last_checkpoint is None or Path(state.last_checkpoint).name != tag_for(state.step):
            loop.save()
        export_dir = export_engine(built, run_dir / "export")
        skipped = dist.all_reduce_dict({"s": float(source.skipped_samples)}, "sum")["s"]
        worst = _worst_shards(source)
        log.info("done: %d steps (%d skipped as non-finite), %d samples skipped as undecodable or lost "
                 "(data/skipped_samples%s); export in %s", state.step, state.skipped_steps, skipped,
                 f"; worst shards: {worst}" if worst else "", export_dir)
        if env.rank == 0:
            _plot_losses(run_dir)
    finally:
        metrics.close()
    return run_dir


def _worst_shards(source, most: int = 5) -> str:
    """Collective: 'url (n lost), …' over every rank's shards that lost samples, worst first; ''."""
    lost = Counter()
    for per_rank in dist.all_gather_object(source.lost_by_shard()):
        lost.update(per_rank)
    return ", ".join(f"{url} ({n} lost)" for url, n in lost.most_common(most))


def _plot_losses(run_dir: Path) -> None:
    """run_dir/loss.png from metrics.jsonl (pipeline/plots.py); a chart must never fail a finished run."""
    try:
        from pipeline.plots import plot_run

        log.info("loss chart: %s", plot_run(str(run_dir)))
    except Exception as e:  # matplotlib missing or a broken metrics line: the run itself is done
        log.warning("loss chart not written: %s", e)
