"""The training job: data -> DMP model -> pipelined epochs -> validation/early stopping -> test.

A short, linear script over library calls (TorchRec's golden-training shape). Outputs in ``run_dir``:
``config.yaml`` (resolved), ``train.log``, ``tb/`` (TensorBoard), ``checkpoints/`` and ``metrics.json``::

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
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ..config import TrainConfig, TrainSection
from ..data import FileFormat, PreprocessParams, SequenceDataset, prepare
from ..data.loader import LoaderSpec, NegativeSampler, TrainLoader, item_counts
from ..eval.metrics import PROTOCOLS
from ..eval.model_eval import evaluate, popularity_baseline
from ..model import SSD4Rec
from ..ops.native import native_ops
from .checkpoint import (
    CheckpointWriteError,
    clean_temp,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from .distributed import DistContext, build_dmp, init_distributed
from .guard import GuardedTrainPipeline, NonFiniteError

log = logging.getLogger(__name__)

FAULT_ENV = "SSD4REC_FAULT_AT_STEP"  # test hook: "<rank>:<global step>" -> that rank SIGKILLs itself once
MAX_SKIPPED_LISTED = 100  # metrics.json lists at most this many skipped steps (the count is exact)


class TrainingStopped(RuntimeError):
    """The job stopped on purpose (a one-line reason; ``exit_code`` for the app)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after writing a checkpoint; rerun with --resume


class Preemption:
    """While active, SIGTERM (as a scheduler sends it to every rank) only sets a flag; the loop then writes a
    checkpoint at the current step and stops. :meth:`requested` is collective when distributed, so every rank
    stops after the same step even if the signal reached them at different steps."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        log.warning("SIGTERM received: checkpointing at the end of this step")

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def requested(self) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signalled
        flag = torch.tensor([int(self.signalled)], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def prepare_data(cfg: TrainConfig, ctx: DistContext) -> SequenceDataset:
    """Rank 0 prepares (or finds cached) the dataset; the others wait, then open the same artifact."""
    d = cfg.data
    kwargs = dict(
        params=PreprocessParams(user_k=d.user_k, item_k=d.item_k, duplicates=d.duplicates, time_key=d.time_key),
        file_format=FileFormat(d.format, d.user_col, d.item_col, d.time_col),
        synthetic=d.synthetic if d.dataset == "synthetic" else None,
        full_catalog=d.full_catalog,
    )
    if ctx.is_main:
        ds = prepare(d.dataset, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    if not ctx.is_main:
        ds = prepare(d.dataset, **kwargs)
    return ds


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


def _maybe_fault(global_step: int, ctx: DistContext, run_dir: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, step = (int(x) for x in spec.split(":"))
    marker = run_dir / f".fault-injected-rank{rank}-step{step}"
    if ctx.rank == rank and global_step == step and not marker.exists():
        marker.touch()
        log.warning("fault injection: rank %d SIGKILLs itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def count_tokens(batches, counter: list[int]):
    """Yield `batches` unchanged, adding each batch's history tokens (its examples' rows) to `counter[0]`."""
    for b in batches:
        counter[0] += int(b.features.lengths()[: b.batch_size].sum())
        yield b


def _metric(valid: dict, cfg: TrainConfig) -> float:
    return float(valid[cfg.train.protocol][cfg.train.metric])


def _budget_reached(seconds: float, budget: float | None) -> bool:
    """Collective when a budget is set: True on every rank once any rank's training time reached it
    (ranks time themselves, so the decision is all-reduced or they would stop at different steps)."""
    if budget is None:
        return False
    flag = torch.tensor([int(seconds >= budget)], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def dense_lr(step: int, total_steps: int, train: TrainSection) -> float:
    """The dense optimizer's learning rate at global step ``step`` (0-based) of ``total_steps``."""
    lr = train.lr
    if step < train.warmup_steps:
        return lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return lr
    span = max(total_steps - train.warmup_steps, 1)
    progress = min(max((step - train.warmup_steps) / span, 0.0), 1.0)
    return lr * (train.lr_min_ratio + (1.0 - train.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_dense_lr(optimizer, lr: float) -> None:
    """Set ``lr`` on the dense (non-fused) optimizer of a ``CombinedOptimizer`` from ``build_dmp``."""
    for _, opt in optimizer.optimizers[1:]:
        for group in opt.param_groups:
            group["lr"] = lr


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


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run the whole job on this rank; returns the ``metrics.json`` content. Raises :class:`TrainingStopped`
    for a non-finite step (``train.on_nonfinite: stop``), a checkpoint write error (``checkpoint_errors:
    fail``) or SIGTERM (after writing a checkpoint at the current step)."""
    with Preemption() as preemption:
        return _train(cfg, resume, preemption)


def _train(cfg: TrainConfig, resume: bool, preemption: Preemption) -> dict:
    job_start = time.perf_counter()
    ctx = init_distributed()
    for noisy in ("torchrec", "fbgemm_gpu"):  # per-step INFO chatter from the pipeline and planner
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        clean_temp(ckpt_root)
    dist.barrier()
    _setup_logging(run_dir, ctx)
    log.info("world size %d (%s), run dir %s", ctx.world_size, ctx.backend, run_dir)
    if ctx.device.type == "cpu":
        native_ops()  # build/load the fused CPU kernels now, so that a first build never counts as training time

    ds = prepare_data(cfg, ctx)
    split = ds.leave_one_out()
    n_items = ds.num_items
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = SSD4Rec(n_items, cfg.model, cfg.loss, device="meta")
    dmp, optimizer = build_dmp(model, cfg.train, ctx)
    loader, steps_per_epoch = build_train_loader(cfg, split, n_items, ctx)

    state = {"epoch": 0, "step": 0, "global_step": 0, "best_value": -math.inf, "best_epoch": None,
             "bad_evals": 0, "valid_history": [], "valid_timing": [], "train_seconds": 0.0, "wall_seconds": 0.0,
             "stopped_early": False, "stopped_by_budget": False, "world_size": ctx.world_size,
             "nonfinite_steps_skipped": 0, "nonfinite_skipped": []}
    latest = resume_checkpoint(ckpt_root, ctx.rank) if resume else None
    if latest is None and cfg.train.init_from:
        load_checkpoint(Path(cfg.train.init_from), dmp, None, rank=ctx.rank, restore_rng=False)
        log.info("model weights initialised from %s", cfg.train.init_from)
    if latest is not None:
        # restores model, sparse+dense optimizer state, early-stopping state, data position (epoch, step)
        # and, at the same world size, each rank's RNG (load_checkpoint compares progress["world_size"])
        state.update(load_checkpoint(latest, dmp, optimizer, rank=ctx.rank))
        log.info("resumed from %s (epoch %d, step %d)", latest, state["epoch"], state["step"])
        state["world_size"] = ctx.world_size
    wall_offset = state["wall_seconds"]  # a resumed job continues the wall clock of the checkpoint it resumes
    budget = cfg.train.time_budget_s

    def wall() -> float:
        return wall_offset + time.perf_counter() - job_start

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        log.info("%d users, %d items; %d steps/epoch of %d examples per rank", ds.num_users, n_items,
                 steps_per_epoch, cfg.train.batch_size)

    pipeline = GuardedTrainPipeline(dmp, optimizer, ctx.device, on_nonfinite=cfg.train.on_nonfinite)
    every = cfg.train.checkpoint_every_steps

    bars: list[tqdm] = []  # the open progress bar, closed before a stop so that the stop line comes last

    def stop(message: str, exit_code: int) -> TrainingStopped:
        for b in bars:
            b.close()
        return TrainingStopped(message, exit_code)

    def guarded_save(name: str, opt) -> None:
        """Write a checkpoint; a write error fails the job or, with ``checkpoint_errors: warn``, is logged."""
        try:
            save_checkpoint(ckpt_root, name, dmp, opt, state, rank=ctx.rank,
                            keep=cfg.train.keep_checkpoints if opt is not None else None)
        except CheckpointWriteError as e:
            if cfg.train.checkpoint_errors == "fail":
                raise stop(f"{e} (train.checkpoint_errors: fail)", EXIT_CHECKPOINT) from None
            log.warning("%s; training goes on (train.checkpoint_errors: warn)", e)

    def save(name: str = "") -> None:
        state["wall_seconds"] = wall()
        guarded_save(name or f"step-{state['global_step']}", optimizer)

    def validate(epoch: int) -> None:
        """Validate, record history and timing, update best/early stopping (``epoch``: the one trained)."""
        timing = {"epoch": epoch, "global_step": state["global_step"],
                  "train_seconds": round(state["train_seconds"], 3), "wall_seconds": round(wall(), 3)}
        valid = evaluate(dmp.module, split, "valid", cfg, ctx, n_items)
        value = _metric(valid, cfg)
        state["valid_history"].append({"epoch": epoch, **{p: valid[p] for p in PROTOCOLS}})
        state["valid_timing"].append(timing)
        if writer is not None:
            for p in PROTOCOLS:
                for k in ("NDCG@10", "HR@10", "MRR@10"):
                    writer.add_scalar(f"valid_{p}/{k}", valid[p][k], epoch)
        log.info("epoch %d valid %s %s = %.4f (best %.4f)", epoch, cfg.train.protocol, cfg.train.metric, value,
                 state["best_value"])
        if value > state["best_value"]:
            state.update(best_value=value, best_epoch=epoch, bad_evals=0, best_valid=valid)
            guarded_save("best", None)
        else:
            state["bad_evals"] += 1
            if state["bad_evals"] >= cfg.train.patience:
                state["stopped_early"] = True
                log.info("early stop after epoch %d (no improvement in %d validations)", epoch,
                         cfg.train.patience)

    def preempted(where: str) -> None:
        if preemption.requested():
            latest = latest_checkpoint(ckpt_root)
            raise stop(f"preempted by SIGTERM {where}; " + (f"checkpoint {latest} written, continue with --resume"
                                                             if latest else "no checkpoint yet"), EXIT_PREEMPTED)

    while state["epoch"] < cfg.train.epochs and not state["stopped_early"]:
        preempted(f"before epoch {state['epoch']}")  # the previous epoch's checkpoint is the current state
        # the budget may be spent already (resuming a run it stopped); resumed with a larger one, it trains on
        state["stopped_by_budget"] = _budget_reached(state["train_seconds"], budget)
        if state["stopped_by_budget"]:
            break
        epoch = state["epoch"]
        dmp.train()
        tokens = [0]  # history tokens handed to the pipeline this epoch (it runs <= 2 batches ahead)
        batches = count_tokens(itertools.islice(loader.epoch(epoch, state["step"]),
                                                 max(steps_per_epoch - state["step"], 0)), tokens)
        bar = tqdm(total=steps_per_epoch, initial=state["step"], desc=f"epoch {epoch}", disable=not ctx.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        bars[:] = [bar]
        epoch_seconds, loss_sum, loss_n = 0.0, 0.0, 0  # time spent in training steps only (no eval/checkpoint)
        out_of_time = False
        while True:
            set_dense_lr(optimizer, dense_lr(state["global_step"], cfg.train.epochs * steps_per_epoch, cfg.train))
            t0 = time.perf_counter()
            try:
                loss, _rows = pipeline.progress(batches)
            except StopIteration:
                break
            except NonFiniteError as e:
                latest = latest_checkpoint(ckpt_root)
                raise stop(
                    f"non-finite {e.quantity} at epoch {epoch} step {state['step'] + 1} (global step "
                    f"{state['global_step'] + 1}); stopped (train.on_nonfinite: stop), latest checkpoint: "
                    f"{latest or 'none'}", EXIT_NONFINITE) from None
            epoch_seconds += time.perf_counter() - t0
            state["step"] += 1
            state["global_step"] += 1
            if pipeline.skipped is not None:
                state["nonfinite_steps_skipped"] += 1
                if len(state["nonfinite_skipped"]) < MAX_SKIPPED_LISTED:
                    state["nonfinite_skipped"].append({"epoch": epoch, "step": state["step"],
                                                       "global_step": state["global_step"],
                                                       "quantity": pipeline.skipped})
                log.warning("non-finite %s at epoch %d step %d: update skipped on every rank "
                            "(train.on_nonfinite: skip)", pipeline.skipped, epoch, state["step"])
            else:
                loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
                bar.set_postfix(loss=f"{float(loss):.4f}",
                                tok_s=f"{tokens[0] * ctx.world_size / epoch_seconds:.0f}")
                if writer is not None:
                    writer.add_scalar("train/loss", float(loss), state["global_step"])
            bar.update(1)
            _maybe_fault(state["global_step"], ctx, run_dir)
            if _budget_reached(state["train_seconds"] + epoch_seconds, budget):
                out_of_time = True
                break
            if every and state["step"] % every == 0 and state["step"] < steps_per_epoch:
                state["train_seconds"] += epoch_seconds
                epoch_seconds = 0.0
                save()
            if state["step"] < steps_per_epoch and preemption.requested():
                state["train_seconds"] += epoch_seconds
                epoch_seconds = 0.0
                save()
                preempted(f"at epoch {epoch} step {state['step']}")
        pipeline.detach()
        bar.close()
        state["train_seconds"] += epoch_seconds
        tok_s = tokens[0] * ctx.world_size / max(epoch_seconds, 1e-9)
        if writer is not None:
            writer.add_scalar("train/epoch_loss", loss_sum / max(loss_n, 1), epoch)
            writer.add_scalar("train/tokens_per_second", tok_s, epoch)
        log.info("epoch %d: loss %.4f, %.0f tokens/s", epoch, loss_sum / max(loss_n, 1), tok_s)
        if out_of_time:
            state["stopped_by_budget"] = True
            log.info("time budget %.0f s reached at epoch %d step %d/%d (%.1f s of training steps)", budget, epoch,
                     state["step"], steps_per_epoch, state["train_seconds"])
        if not out_of_time or state["step"] >= steps_per_epoch:  # a complete epoch
            state["epoch"], state["step"] = epoch + 1, 0
        complete = state["step"] == 0
        if out_of_time or (complete and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs)):
            validate(epoch)  # a budget stop always validates, so the final state is evaluated (and can be best)
        save()

    best = ckpt_root / "best"
    if best.is_dir():
        load_checkpoint(best, dmp, None, rank=ctx.rank, restore_rng=False)
    valid = state.get("best_valid") or evaluate(dmp.module, split, "valid", cfg, ctx, n_items)
    test = evaluate(dmp.module, split, "test", cfg, ctx, n_items)
    epochs_trained = state["epoch"] + state["step"] / max(steps_per_epoch, 1)  # fractional after a budget stop
    result = {
        "valid": valid,
        "test": test,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "epochs_trained": round(epochs_trained, 4),
        "stopped_early": state["stopped_early"],
        "stopped_by_budget": state["stopped_by_budget"],
        "time_budget_s": budget,
        "train_seconds": round(state["train_seconds"], 3),
        "wall_seconds": round(wall(), 3),
        "seconds_per_epoch": round(state["train_seconds"] / (epochs_trained or 1), 3),
        "popularity": {"test": popularity_baseline(split, "test", ctx, n_items,
                                                   sample_users=cfg.train.eval_sample_users, seed=cfg.seed)},
        "valid_history": state["valid_history"],
        "valid_timing": state["valid_timing"],
        "nonfinite_steps_skipped": state["nonfinite_steps_skipped"],
        "nonfinite_skipped": state["nonfinite_skipped"],
        "world_size": ctx.world_size,
        "dataset": {"name": cfg.data.dataset, **{k: ds.stats[k] for k in ("users", "items", "interactions")}},
        "model_parameters": sum(p.numel() for n, p in dmp.module.named_parameters() if not n.startswith("ec.")),
    }
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if writer is not None:
            for p in PROTOCOLS:
                for k in ("NDCG@10", "HR@10"):
                    writer.add_scalar(f"test_{p}/{k}", test[p][k], 0)
            writer.close()
        log.info("test:\n%s", format_metrics_table(result))
    dist.barrier()
    return result


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
