"""What the training loop carries between steps, and the small controls it consults.

:class:`TrainState` is saved in every checkpoint's ``progress.json`` (its field names are that file's keys)
and restored on ``--resume``. :class:`Preemption` turns SIGTERM into a checkpoint-and-stop; the learning-rate
schedule and the time budget are pure functions of the state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import TrainSection

log = logging.getLogger(__name__)

EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after writing a checkpoint; rerun with --resume
MAX_SKIPPED_LISTED = 100  # metrics.json lists at most this many skipped steps (the count is exact)


class TrainingStopped(RuntimeError):
    """The job stopped on purpose (a one-line reason; ``exit_code`` for the app)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainState:
    """Progress, early stopping and timing: everything a resumed job needs besides weights and RNG."""

    epoch: int = 0  # the epoch being trained (== epochs done)
    step: int = 0  # steps done within ``epoch``
    global_step: int = 0
    best_value: float = -math.inf
    best_epoch: int | None = None
    best_valid: dict[str, Any] | None = None
    bad_evals: int = 0
    valid_history: list[dict[str, Any]] = field(default_factory=list)
    valid_timing: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # time in training steps only (no eval / checkpoint)
    wall_seconds: float = 0.0
    stopped_early: bool = False
    stopped_by_budget: bool = False
    world_size: int = 1
    nonfinite_steps_skipped: int = 0
    nonfinite_skipped: list[dict[str, Any]] = field(default_factory=list)

    def progress(self) -> dict[str, Any]:
        """The ``progress.json`` content (``best_valid`` only once there is one)."""
        out = dataclasses.asdict(self)
        if out["best_valid"] is None:
            del out["best_valid"]
        return out

    def restore(self, progress: dict[str, Any]) -> None:
        """Take a checkpoint's progress (keys this state does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in progress.items():
            if key in names:
                setattr(self, key, value)


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


def budget_reached(seconds: float, budget: float | None) -> bool:
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
