"""Standing up a run: the one recipe shared by training, evaluation, export and the benchmarks.

``init distributed -> prepare data -> leave-one-out -> seed -> DMP model on meta (-> load a checkpoint)``.
:func:`build_run` gives a fresh model (training), :func:`restore` one loaded from a checkpoint (evaluation,
export); both return a :class:`Run` holding everything the callers need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer

from ..config import TrainConfig
from ..data import FileFormat, PreprocessParams, SequenceDataset, prepare
from ..data.preprocess import LeaveOneOut
from ..model import SSD4Rec
from .checkpoint import latest_checkpoint, load_checkpoint
from .distributed import DistContext, build_dmp, init_distributed

log = logging.getLogger(__name__)

__all__ = ["Run", "build_run", "load_dataset", "prepare_data", "resolve_checkpoint", "restore"]


def load_dataset(cfg: TrainConfig) -> SequenceDataset:
    """The config's dataset, prepared or found in the cache (one process; see :func:`prepare_data`)."""
    d = cfg.data
    return prepare(
        d.dataset,
        params=PreprocessParams(user_k=d.user_k, item_k=d.item_k, duplicates=d.duplicates, time_key=d.time_key),
        file_format=FileFormat(d.format, d.user_col, d.item_col, d.time_col),
        synthetic=d.synthetic if d.dataset == "synthetic" else None,
        full_catalog=d.full_catalog,
    )


def prepare_data(cfg: TrainConfig, ctx: DistContext) -> SequenceDataset:
    """Rank 0 prepares (or finds cached) the dataset; the others wait, then open the same artifact."""
    if ctx.is_main:
        ds = load_dataset(cfg)
    if dist.is_initialized():
        dist.barrier()
    if not ctx.is_main:
        ds = load_dataset(cfg)
    return ds


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` | ``latest`` | a path -> a checkpoint directory (clear error if missing)."""
    ckpts = run_dir / "checkpoints"
    path = latest_checkpoint(ckpts) if which == "latest" else (ckpts / "best" if which == "best" else Path(which))
    if path is None or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{run_dir}: no {which!r} checkpoint found (looked in {ckpts})")
    return path


@dataclass
class Run:
    """A stood-up run on this rank: its config, process group, data, split and DMP-wrapped model."""

    cfg: TrainConfig
    ctx: DistContext
    ds: SequenceDataset
    split: LeaveOneOut
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    checkpoint: Path | None = None  # the checkpoint it was restored from

    @property
    def model(self) -> SSD4Rec:
        return self.dmp.module

    @property
    def num_items(self) -> int:
        return self.ds.num_items


def build_run(cfg: TrainConfig, ctx: DistContext | None = None, *,
              data: tuple[SequenceDataset, LeaveOneOut] | None = None) -> Run:
    """Collective: data, split, seeds, and a freshly initialised DMP model with its combined optimizer
    (``data``: the dataset and split when the caller prepared them already)."""
    ctx = ctx or init_distributed()
    if data is None:
        ds = prepare_data(cfg, ctx)
        split = ds.leave_one_out()
    else:
        ds, split = data
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dmp, optimizer = build_dmp(SSD4Rec(ds.num_items, cfg.model, cfg.loss, device="meta"), cfg.train, ctx)
    return Run(cfg, ctx, ds, split, dmp, optimizer)


def restore(cfg: TrainConfig, checkpoint: str | Path, *, load_optimizer: bool = False,
            ctx: DistContext | None = None) -> Run:
    """Collective: :func:`build_run`, then load ``checkpoint`` (``best``, ``latest`` or a directory; names
    are looked up in ``cfg.run_dir``) at any world size (DCP re-shards). The RNG state is not restored."""
    path = resolve_checkpoint(Path(cfg.run_dir), str(checkpoint))
    run = build_run(cfg, ctx)
    run.checkpoint = path
    load_checkpoint(path, run.dmp, run.optimizer if load_optimizer else None, rank=run.ctx.rank,
                    restore_rng=False)
    log.info("restored %s", path)
    return run
