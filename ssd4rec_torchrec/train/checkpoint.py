"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

One checkpoint = one directory ``<run>/checkpoints/step-<global_step>/`` (or ``best``) holding:

- DCP shards of ``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}``: the sharded item
  table (ShardedTensor), the fused sparse optimizer state (``momentum1``, a ShardedTensor), dense
  weights and the AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``; replicated, saved once). DCP
  re-shards ShardedTensors on load, so a checkpoint written by 2 ranks loads on 1 and vice versa;
- ``rng-rank<r>.pt``: each rank's torch RNG state (dropout), restored only at the same world size;
- ``progress.json``: epoch, step within the epoch, global step, early-stopping state, world size.

Atomicity: everything is written into ``.tmp-<name>``; after a barrier rank 0 writes ``progress.json``
(fsynced) and renames the directory to ``<name>``. A directory counts as a checkpoint only when its name
matches and it holds ``progress.json`` and DCP's ``.metadata``, so a crash at any point leaves either
the previous checkpoints or a ``.tmp-`` directory that :func:`latest_checkpoint` ignores and
:func:`clean_temp` removes. Replacing ``best`` goes through ``.old-best`` (restored by
:func:`clean_temp` if a crash hits between the two renames); rotated-out checkpoints are renamed to
``.tmp-`` names before deletion.

Not saved: param_groups (the learning rates are constant), numpy/python RNGs (the loader derives its
randomness from ``(seed, epoch, rank, step)``, so the data position is just ``(epoch, step)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.fused import FusedOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS = "progress.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_complete(path: Path) -> bool:
    """True for a fully written checkpoint directory (``progress.json`` and DCP ``.metadata``)."""
    return path.is_dir() and (path / PROGRESS).is_file() and (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-<n>`` checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete ``step-<n>`` checkpoint, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint is ever visible under its real name."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, optimizer: KeyedOptimizer | None,
                    progress: dict[str, Any], *, rank: int, keep: int | None = None) -> Path:
    """Collective (every rank calls it): write ``root/name`` atomically; returns the final directory.

    ``keep``: afterwards delete all but the newest ``keep`` ``step-<n>`` checkpoints.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    _barrier()  # all shards and RNG files are on disk
    if rank == 0:
        _write_durable(tmp / PROGRESS, json.dumps({**progress, "world_size": _world_size()}, indent=2,
                                                  sort_keys=True) + "\n")
        old = root / f"{OLD_PREFIX}{name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)  # the commit point
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            for stale in list_checkpoints(root)[:-keep]:
                _remove(stale)
    _barrier()
    return final


def init_optimizer_state(optimizer: KeyedOptimizer) -> None:
    """Materialise lazily created optimizer state (AdamW's moments) so DCP can load into it in place.

    ``KeyedOptimizer.init_state`` runs a step with zero gradients; it only runs on sub-optimizers whose
    state is incomplete, and the caller must load parameters afterwards (weight decay moves them). The
    fused sparse optimizer's state exists from construction and is skipped.
    """
    if isinstance(optimizer, CombinedOptimizer):
        for _, opt in optimizer.optimizers:
            init_optimizer_state(opt)
        return
    if isinstance(optimizer, FusedOptimizer):
        return
    trainable = [p for p in optimizer.params.values() if getattr(p, "requires_grad", False)]
    if trainable and len(optimizer.state) < len(trainable):
        optimizer.init_state()
        optimizer.zero_grad(set_to_none=True)


def has_optimizer_state(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds optimizer state (``best`` does not)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return any(k.startswith("optim.") for k in meta.state_dict_metadata)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: KeyedOptimizer | None, *,
                    rank: int, restore_rng: bool = True) -> dict[str, Any]:
    """Collective: load model (+ optimizer) state in place, re-sharding as needed; returns the progress.

    The RNG state is restored only when the checkpoint was written with the current world size (a rank
    of another layout has no matching stream).
    """
    progress = json.loads((path / PROGRESS).read_text())
    if optimizer is not None:
        init_optimizer_state(optimizer)
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    saved_world = progress.get("world_size", _world_size())
    if saved_world != _world_size():
        log.warning("checkpoint %s was written by %d ranks, loading on %d: state re-sharded, RNG not restored",
                    path, saved_world, _world_size())
    elif restore_rng:
        rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return progress


def clean_temp(root: Path) -> None:
    """Rank 0 at start-up: remove half-written/half-deleted checkpoints, undo a half-done ``best`` swap."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(OLD_PREFIX):
            final = root / p.name[len(OLD_PREFIX):]
            if not final.exists() and is_complete(p):
                p.rename(final)
            else:
                shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            log.info("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def evaluate_checkpoint(cfg: TrainConfig, path: str | Path, *, load_optimizer: bool | None = None,
                        splits: tuple[str, ...] = ("valid", "test")) -> dict[str, Any]:
    """Collective: build the model for this job's world size, load ``path`` and evaluate it.

    Works with any world size (DCP re-shards). ``load_optimizer`` (default: when the checkpoint has
    optimizer state) also loads the optimizer state, to check that it re-shards. Returns
    ``{split: metrics, "progress": ..., "world_size": ...}``; the model and optimizer are returned under
    ``"_dmp"`` / ``"_optimizer"`` for inspection.
    """
    from ..eval.model_eval import evaluate
    from ..model import SSD4Rec
    from .distributed import build_dmp, init_distributed
    from .loop import prepare_data

    path = Path(path)
    ctx = init_distributed()
    ds = prepare_data(cfg, ctx)
    split = ds.leave_one_out()
    torch.manual_seed(cfg.seed)
    dmp, optimizer = build_dmp(SSD4Rec(ds.num_items, cfg.model, cfg.loss, device="meta"), cfg.train, ctx)
    if load_optimizer is None:
        load_optimizer = has_optimizer_state(path)
    progress = load_checkpoint(path, dmp, optimizer if load_optimizer else None, rank=ctx.rank, restore_rng=False)
    out: dict[str, Any] = {s: evaluate(dmp.module, split, s, cfg, ctx, ds.num_items) for s in splits}
    out.update(progress=progress, world_size=ctx.world_size, _dmp=dmp, _optimizer=optimizer)
    return out
