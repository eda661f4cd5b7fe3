"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

One checkpoint = one directory ``<run>/checkpoints/step-<global_step>/`` (or ``best``) holding:

- DCP shards of ``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}``: the sharded item
  table (ShardedTensor), the fused sparse optimizer state (``momentum1``, a ShardedTensor), dense
  weights and the AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``; replicated, saved once). DCP
  re-shards ShardedTensors on load, so a checkpoint written by 2 ranks loads on 1 and vice versa;
- ``rng-rank<r>.pt``: each rank's torch RNG state (dropout), restored only at the same world size;
- ``progress.json``: epoch, step within the epoch, global step, early-stopping state, world size.

Atomicity: everything is written into ``.tmp-<name>``; after a barrier rank 0 writes ``manifest.json``
(size and sha256 of every file), then ``progress.json`` (both fsynced) and renames the directory to
``<name>``. A write error on any rank (disk full, an ``OSError``) is agreed on by every rank: the ``.tmp-``
directory is removed and :class:`CheckpointWriteError` raised everywhere, so the previous complete
checkpoint stays the latest. :func:`resume_checkpoint` checks the manifest and falls back past a
truncated or corrupted checkpoint to the previous complete one, with a warning naming the bad one.
A directory counts as a checkpoint only when its name
matches and it holds ``progress.json`` and DCP's ``.metadata``, so a crash at any point leaves either
the previous checkpoints or a ``.tmp-`` directory that :func:`latest_checkpoint` ignores and
:func:`clean_temp` removes. Replacing ``best`` goes through ``.old-best`` (restored by
:func:`clean_temp` if a crash hits between the two renames); rotated-out checkpoints are renamed to
``.tmp-`` names before deletion.

Not saved: param_groups (the learning rates are constant), numpy/python RNGs (the loader derives its
randomness from ``(seed, epoch, rank, step)``, so the data position is just ``(epoch, step)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.fused import FusedOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS = "progress.json"
MANIFEST = "manifest.json"
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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (raised on every rank; nothing of it is left behind)."""


def _any_rank(flag: bool) -> bool:
    """Collective when distributed: True on every rank if ``flag`` is True on any."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _manifest(directory: Path) -> dict[str, Any]:
    """Size and sha256 of every file in a checkpoint directory (but the manifest and progress files)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, PROGRESS))
    return {"files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is damaged (a missing, truncated or altered file), or None when it
    matches its manifest. A checkpoint written without a manifest cannot be checked and passes."""
    try:
        json.loads((path / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        return f"{PROGRESS} unreadable ({type(e).__name__})"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if _sha256(f) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def resume_checkpoint(root: Path, rank: int) -> Path | None:
    """Collective: the newest complete checkpoint that matches its manifest (rank 0 checks, every rank
    gets its answer); a damaged newer one is skipped with a warning that names it."""
    choice: list[str | None] = [None]
    if rank == 0:
        for path in reversed(list_checkpoints(root)):
            reason = verify_checkpoint(path)
            if reason is None:
                choice[0] = str(path)
                break
            log.warning("checkpoint %s is damaged (%s): falling back to the previous complete one", path, reason)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


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

    ``keep``: afterwards delete all but the newest ``keep`` ``step-<n>`` checkpoints. An error while
    writing, on any rank, raises :class:`CheckpointWriteError` on every rank and leaves the existing
    checkpoints as they were.
    """
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        error = e
    _abort_if_failed(error, rank, tmp, final)
    try:
        state: dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp.save(state, checkpoint_id=str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
    except Exception as e:  # an OSError, or DCP's CheckpointException wrapping one rank's
        error = e
    _abort_if_failed(error, rank, tmp, final)  # also the barrier: all shards and RNG files are on disk
    try:
        if rank == 0:
            _write_durable(tmp / MANIFEST, json.dumps(_manifest(tmp), indent=1, sort_keys=True) + "\n")
            _write_durable(tmp / PROGRESS, json.dumps({**progress, "world_size": _world_size()}, indent=2,
                                                      sort_keys=True) + "\n")
            old = root / f"{OLD_PREFIX}{name}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)  # the commit point
    except OSError as e:
        error = e
    _abort_if_failed(error, rank, tmp, final)
    if rank == 0:
        try:
            _fsync_dir(root)
        except OSError as e:
            log.warning("could not fsync %s after writing %s: %s", root, final, e)
        shutil.rmtree(root / f"{OLD_PREFIX}{name}", ignore_errors=True)
    if rank == 0 and keep is not None:
        for stale in list_checkpoints(root)[:-keep]:
            try:
                _remove(stale)
            except OSError as e:
                log.warning("could not delete the old checkpoint %s: %s", stale, e)
    _barrier()
    return final


def _abort_if_failed(error: BaseException | None, rank: int, tmp: Path, final: Path) -> None:
    """Collective: if any rank failed, remove the half-written directory and raise on every rank."""
    if not _any_rank(error is not None):
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        if old.is_dir() and not final.exists():
            old.rename(final)  # a failure between the two renames: the previous one comes back
    if error is None:
        reason = "it failed on another rank"
    else:
        text = str(error).splitlines()[0][:300] if str(error) else ""
        reason = f"{type(error).__name__}: {text}"
    raise CheckpointWriteError(f"checkpoint {final} was not written ({reason}); the previous checkpoints are "
                               f"unchanged")


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
