"""The training job: data -> DMP model -> pipelined epochs -> validation/early stopping -> test.

:func:`train` reads top-down like TorchRec's golden training example: start the session (process group, run
dir, data, model), restore progress, train epochs until done, finish (best checkpoint, test, metrics).
Outputs in ``run_dir``: ``config.yaml`` (resolved), ``train.log``, ``tb/`` (TensorBoard), ``checkpoints/``
and ``metrics.json``::

    {"valid": {"filtered": {"NDCG@10": ...}, "unfiltered": {...}}, "test": {...}, "best_epoch": ...,
     "train_seconds": ..., "popularity": {"test": {...}}, "valid_history": [...], "valid_timing": [...], ...}

``valid_timing[i]`` (``epoch``, ``global_step``, ``train_seconds``, ``wall_seconds``) says when
``valid_history[i]`` was measured; it is a separate list so that ``valid_history`` stays bit-identical
between an uninterrupted run and a killed/resumed one. With ``train.time_budget_s`` the job stops once
that many seconds of training steps have run (mid-epoch), validates there and sets ``stopped_by_budget``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ..config import TrainConfig
from ..data.loader import LoaderSpec, NegativeSampler, TrainLoader, item_counts
from ..eval.metrics import PROTOCOLS
from ..eval.model_eval import evaluate, popularity_baseline
from ..job import DistContext, Run, build_run, init_distributed
from ..job.checkpoint import (
    CheckpointWriteError,
    clean_temp,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from ..ops.native import native_ops
from .guard import GuardedTrainPipeline, NonFiniteError
from .state import (
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    MAX_SKIPPED_LISTED,
    Preemption,
    TrainingStopped,
    TrainState,
    budget_reached,
    dense_lr,
    set_dense_lr,
)

log = logging.getLogger(__name__)

__all__ = ["TrainingStopped", "build_train_loader", "count_tokens", "format_metrics_table", "pipeline_steps", "train"]


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run the whole job on this rank; returns the ``metrics.json`` content. Raises :class:`TrainingStopped`
    for a non-finite step (``train.on_nonfinite: stop``), a checkpoint write error (``checkpoint_errors:
    fail``) or SIGTERM (after writing a checkpoint at the current step)."""
    with Preemption() as preemption:
        session = TrainingSession.start(cfg, preemption)
        session.restore(resume)
        while session.state.epoch < cfg.train.epochs and not session.state.stopped_early:
            if not session.train_epoch():
                break
        return session.finish()


def build_train_loader(cfg: TrainConfig, split, n_items: int, ctx: DistContext) -> tuple[TrainLoader, int]:
    """This rank's `TrainLoader` for the config's objective and loss (with its negative sampler for a
    sampled loss) and the steps of one epoch (capped by `train.max_steps_per_epoch`)."""
    o = cfg.objective
    spec = LoaderSpec(objective=o.name, prefixes_per_user=o.prefixes_per_user, mask_prob=o.mask_prob,
                      p_last=o.p_last, corruption=o.corruption, max_history=o.max_history, loss=cfg.loss.name,
                      batch_size=cfg.train.batch_size)
    sampler = None
    if cfg.loss.name == "sampled":
        sampler = NegativeSampler(cfg.loss.sampler, n_items, item_counts(split.train_items, n_items),
                                  cfg.loss.num_negatives, cfg.loss.popularity_alpha)
    loader = TrainLoader(split, n_items, spec, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                         sampler=sampler)
    steps = loader.steps_per_epoch()
    if cfg.train.max_steps_per_epoch:  # a shorter epoch (smoke tests, timing a huge config)
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return loader, steps


def pipeline_steps(pipeline, batches: Iterator, before_step: Callable[[], None] | None = None
                   ) -> Iterator[tuple[torch.Tensor, float]]:
    """The one step loop every trainer shares: drive a TorchRec train pipeline over ``batches``, yielding each
    step's loss and the seconds its ``progress`` took (``before_step`` runs first, untimed: the learning rate)."""
    while True:
        if before_step is not None:
            before_step()
        t0 = time.perf_counter()
        try:
            loss, _rows = pipeline.progress(batches)
        except StopIteration:
            return
        yield loss, time.perf_counter() - t0


def count_tokens(batches, counter: list[int]):
    """Yield `batches` unchanged, adding each batch's history tokens (its examples' rows) to `counter[0]`."""
    for b in batches:
        counter[0] += int(b.features.lengths()[: b.batch_size].sum())
        yield b


def _setup_logging(run_dir: Path, ctx: DistContext) -> None:
    fmt = logging.Formatter(f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    if ctx.is_main:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


class TrainingSession:
    """One rank's training job: the stood-up run, its state, and the steps :func:`train` calls in order."""

    def __init__(self, cfg: TrainConfig, job: Run, preemption: Preemption, job_start: float) -> None:
        self.cfg, self.job, self.ctx, self.preemption = cfg, job, job.ctx, preemption
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.job_start = job_start
        self.loader, self.steps_per_epoch = build_train_loader(cfg, job.split, job.num_items, job.ctx)
        self.state = TrainState(world_size=job.ctx.world_size)
        self.wall_offset = 0.0  # a resumed job continues the wall clock of the checkpoint it resumes
        self.writer = None
        self.pipeline: GuardedTrainPipeline | None = None
        self.bars: list[tqdm] = []  # the open progress bar, closed before a stop so that the stop line comes last

    # ------------------------------------------------------------------------------------------------ steps

    @classmethod
    def start(cls, cfg: TrainConfig, preemption: Preemption) -> TrainingSession:
        """Process group, threads, run dir (resolved config, logging), native kernels, data and model."""
        job_start = time.perf_counter()
        ctx = init_distributed()
        for noisy in ("torchrec", "fbgemm_gpu"):  # per-step INFO chatter from the pipeline and planner
            logging.getLogger(noisy).setLevel(logging.WARNING)
        torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
        run_dir = Path(cfg.run_dir)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            clean_temp(run_dir / "checkpoints")
        dist.barrier()
        _setup_logging(run_dir, ctx)
        log.info("world size %d (%s), run dir %s", ctx.world_size, ctx.backend, run_dir)
        if ctx.device.type == "cpu":
            native_ops()  # build/load the fused CPU kernels now, so that a first build never counts as training time
        return cls(cfg, build_run(cfg, ctx), preemption, job_start)

    def restore(self, resume: bool) -> None:
        """``--resume``: model, optimizer, state and (same world size) RNG from the latest good checkpoint;
        else ``train.init_from``'s weights, if set. Then open TensorBoard and the guarded pipeline."""
        cfg, ctx, dmp = self.cfg, self.ctx, self.job.dmp
        latest = resume_checkpoint(self.ckpt_root, ctx.rank) if resume else None
        if latest is None and cfg.train.init_from:
            load_checkpoint(Path(cfg.train.init_from), dmp, None, rank=ctx.rank, restore_rng=False)
            log.info("model weights initialised from %s", cfg.train.init_from)
        if latest is not None:
            # restores model, sparse+dense optimizer state, early-stopping state, data position (epoch, step)
            # and, at the same world size, each rank's RNG (load_checkpoint compares progress["world_size"])
            self.state.restore(load_checkpoint(latest, dmp, self.job.optimizer, rank=ctx.rank))
            log.info("resumed from %s (epoch %d, step %d)", latest, self.state.epoch, self.state.step)
            self.state.world_size = ctx.world_size
        self.wall_offset = self.state.wall_seconds
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
            log.info("%d users, %d items; %d steps/epoch of %d examples per rank", self.job.ds.num_users,
                     self.job.num_items, self.steps_per_epoch, cfg.train.batch_size)
        self.pipeline = GuardedTrainPipeline(dmp, self.job.optimizer, ctx.device, on_nonfinite=cfg.train.on_nonfinite)

    def train_epoch(self) -> bool:
        """Train (the rest of) one epoch, then validate when due and checkpoint. False when the time budget
        was already spent before the epoch (resuming a run it stopped; with a larger budget it trains on)."""
        state, cfg, budget = self.state, self.cfg, self.cfg.train.time_budget_s
        self._stop_if_preempted(f"before epoch {state.epoch}")  # the previous epoch's checkpoint is the state
        state.stopped_by_budget = budget_reached(state.train_seconds, budget)
        if state.stopped_by_budget:
            return False
        epoch = state.epoch
        out_of_time = self._run_steps(epoch)
        if out_of_time:
            state.stopped_by_budget = True
            log.info("time budget %.0f s reached at epoch %d step %d/%d (%.1f s of training steps)", budget, epoch,
                     state.step, self.steps_per_epoch, state.train_seconds)
        if not out_of_time or state.step >= self.steps_per_epoch:  # a complete epoch
            state.epoch, state.step = epoch + 1, 0
        complete = state.step == 0
        if out_of_time or (complete and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs)):
            self.validate(epoch)  # a budget stop always validates, so the final state is evaluated (and can be best)
        self.save()
        return True

    def finish(self) -> dict:
        """Reload the best checkpoint, test it (and the popularity floor), write ``metrics.json``."""
        cfg, ctx, job, state = self.cfg, self.ctx, self.job, self.state
        best = self.ckpt_root / "best"
        if best.is_dir():
            load_checkpoint(best, job.dmp, None, rank=ctx.rank, restore_rng=False)
        valid = state.best_valid or evaluate(job.model, job.split, "valid", cfg, ctx, job.num_items)
        test = evaluate(job.model, job.split, "test", cfg, ctx, job.num_items)
        epochs_trained = state.epoch + state.step / max(self.steps_per_epoch, 1)  # fractional after a budget stop
        result = {
            "valid": valid,
            "test": test,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "epochs_trained": round(epochs_trained, 4),
            "stopped_early": state.stopped_early,
            "stopped_by_budget": state.stopped_by_budget,
            "time_budget_s": cfg.train.time_budget_s,
            "train_seconds": round(state.train_seconds, 3),
            "wall_seconds": round(self.wall(), 3),
            "seconds_per_epoch": round(state.train_seconds / (epochs_trained or 1), 3),
            "popularity": {"test": popularity_baseline(job.split, "test", ctx, job.num_items,
                                                       sample_users=cfg.train.eval_sample_users, seed=cfg.seed)},
            "valid_history": state.valid_history,
            "valid_timing": state.valid_timing,
            "nonfinite_steps_skipped": state.nonfinite_steps_skipped,
            "nonfinite_skipped": state.nonfinite_skipped,
            "world_size": ctx.world_size,
            "dataset": {"name": cfg.data.dataset, **{k: job.ds.stats[k] for k in ("users", "items", "interactions")}},
            "model_parameters": sum(p.numel() for n, p in job.model.named_parameters() if not n.startswith("ec.")),
        }
        if ctx.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            if self.writer is not None:
                for p in PROTOCOLS:
                    for k in ("NDCG@10", "HR@10"):
                        self.writer.add_scalar(f"test_{p}/{k}", test[p][k], 0)
                self.writer.close()
            log.info("test:\n%s", format_metrics_table(result))
        dist.barrier()
        return result

    # ------------------------------------------------------------------------------------------------ parts

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.job_start

    def _run_steps(self, epoch: int) -> bool:
        """The epoch's remaining training steps; True when the time budget ran out inside the epoch."""
        state, cfg, ctx, pipeline = self.state, self.cfg, self.ctx, self.pipeline
        assert pipeline is not None
        budget, every, steps_per_epoch = cfg.train.time_budget_s, cfg.train.checkpoint_every_steps, self.steps_per_epoch
        self.job.dmp.train()
        tokens = [0]  # history tokens handed to the pipeline this epoch (it runs <= 2 batches ahead)
        batches = count_tokens(itertools.islice(self.loader.epoch(epoch, state.step),
                                                 max(steps_per_epoch - state.step, 0)), tokens)
        bar = tqdm(total=steps_per_epoch, initial=state.step, desc=f"epoch {epoch}", disable=not ctx.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        self.bars[:] = [bar]
        epoch_seconds, loss_sum, loss_n = 0.0, 0.0, 0  # time spent in training steps only (no eval/checkpoint)
        out_of_time = False
        def set_lr() -> None:
            set_dense_lr(self.job.optimizer, dense_lr(state.global_step, cfg.train.epochs * steps_per_epoch, cfg.train))

        try:
            for loss, seconds in pipeline_steps(pipeline, batches, before_step=set_lr):
                epoch_seconds += seconds
                state.step += 1
                state.global_step += 1
                if pipeline.skipped is not None:
                    self._record_skipped(epoch, pipeline.skipped)
                else:
                    loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
                    bar.set_postfix(loss=f"{float(loss):.4f}",
                                    tok_s=f"{tokens[0] * ctx.world_size / epoch_seconds:.0f}")
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", float(loss), state.global_step)
                bar.update(1)
                if budget_reached(state.train_seconds + epoch_seconds, budget):
                    out_of_time = True
                    break
                if every and state.step % every == 0 and state.step < steps_per_epoch:
                    state.train_seconds += epoch_seconds
                    epoch_seconds = 0.0
                    self.save()
                if state.step < steps_per_epoch and self.preemption.requested():
                    state.train_seconds += epoch_seconds
                    epoch_seconds = 0.0
                    self.save()
                    self._stop_if_preempted(f"at epoch {epoch} step {state.step}")
        except NonFiniteError as e:
            raise self._stop(
                f"non-finite {e.quantity} at epoch {epoch} step {state.step + 1} (global step "
                f"{state.global_step + 1}); stopped (train.on_nonfinite: stop), latest checkpoint: "
                f"{latest_checkpoint(self.ckpt_root) or 'none'}", EXIT_NONFINITE) from None
        pipeline.detach()
        bar.close()
        state.train_seconds += epoch_seconds
        tok_s = tokens[0] * ctx.world_size / max(epoch_seconds, 1e-9)
        if self.writer is not None:
            self.writer.add_scalar("train/epoch_loss", loss_sum / max(loss_n, 1), epoch)
            self.writer.add_scalar("train/tokens_per_second", tok_s, epoch)
        log.info("epoch %d: loss %.4f, %.0f tokens/s", epoch, loss_sum / max(loss_n, 1), tok_s)
        return out_of_time

    def _record_skipped(self, epoch: int, quantity: str) -> None:
        state = self.state
        state.nonfinite_steps_skipped += 1
        if len(state.nonfinite_skipped) < MAX_SKIPPED_LISTED:
            state.nonfinite_skipped.append({"epoch": epoch, "step": state.step, "global_step": state.global_step,
                                            "quantity": quantity})
        log.warning("non-finite %s at epoch %d step %d: update skipped on every rank (train.on_nonfinite: skip)",
                    quantity, epoch, state.step)

    def validate(self, epoch: int) -> None:
        """Validate, record history and timing, update best/early stopping (``epoch``: the one trained)."""
        state, cfg, job = self.state, self.cfg, self.job
        timing = {"epoch": epoch, "global_step": state.global_step,
                  "train_seconds": round(state.train_seconds, 3), "wall_seconds": round(self.wall(), 3)}
        valid = evaluate(job.model, job.split, "valid", cfg, self.ctx, job.num_items)
        value = float(valid[cfg.train.protocol][cfg.train.metric])
        state.valid_history.append({"epoch": epoch, **{p: valid[p] for p in PROTOCOLS}})
        state.valid_timing.append(timing)
        if self.writer is not None:
            for p in PROTOCOLS:
                for k in ("NDCG@10", "HR@10", "MRR@10"):
                    self.writer.add_scalar(f"valid_{p}/{k}", valid[p][k], epoch)
        log.info("epoch %d valid %s %s = %.4f (best %.4f)", epoch, cfg.train.protocol, cfg.train.metric, value,
                 state.best_value)
        if value > state.best_value:
            state.best_value, state.best_epoch, state.bad_evals, state.best_valid = value, epoch, 0, valid
            self._guarded_save("best", None)
        else:
            state.bad_evals += 1
            if state.bad_evals >= cfg.train.patience:
                state.stopped_early = True
                log.info("early stop after epoch %d (no improvement in %d validations)", epoch, cfg.train.patience)

    def save(self, name: str = "") -> None:
        """A resumable checkpoint (model, optimizer, state) named ``step-<global step>`` unless ``name``."""
        self.state.wall_seconds = self.wall()
        self._guarded_save(name or f"step-{self.state.global_step}", self.job.optimizer)

    def _guarded_save(self, name: str, optimizer) -> None:
        """Write a checkpoint; a write error fails the job or, with ``checkpoint_errors: warn``, is logged."""
        try:
            save_checkpoint(self.ckpt_root, name, self.job.dmp, optimizer, self.state.progress(), rank=self.ctx.rank,
                            keep=self.cfg.train.keep_checkpoints if optimizer is not None else None)
        except CheckpointWriteError as e:
            if self.cfg.train.checkpoint_errors == "fail":
                raise self._stop(f"{e} (train.checkpoint_errors: fail)", EXIT_CHECKPOINT) from None
            log.warning("%s; training goes on (train.checkpoint_errors: warn)", e)

    def _stop(self, message: str, exit_code: int) -> TrainingStopped:
        for b in self.bars:
            b.close()
        return TrainingStopped(message, exit_code)

    def _stop_if_preempted(self, where: str) -> None:
        if self.preemption.requested():
            latest = latest_checkpoint(self.ckpt_root)
            raise self._stop(f"preempted by SIGTERM {where}; " + (f"checkpoint {latest} written, continue with "
                                                                  "--resume" if latest else "no checkpoint yet"),
                             EXIT_PREEMPTED)


def format_metrics_table(result: dict, ks=(10, 20)) -> str:
    """A small text table of test metrics, both protocols, plus the popularity floor."""
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")]
    lines = [f"{'':<22}" + "".join(f"{c:>10}" for c in cols)]
    for p in PROTOCOLS:
        lines.append(f"{'test ' + p:<22}" + "".join(f"{result['test'][p][c]:>10.4f}" for c in cols))
    for p in PROTOCOLS:
        lines.append(f"{'popularity ' + p:<22}" + "".join(f"{result['popularity']['test'][p][c]:>10.4f}"
                                                          for c in cols))
    return "\n".join(lines)
