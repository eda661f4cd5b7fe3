"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

One checkpoint = one directory ``<run>/checkpoints/step-<global_step>/`` holding:

- DCP shards of ``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}``: the sharded item
  table (ShardedTensor), the fused sparse optimizer state (ShardedTensor), dense weights and AdamW
  state. DCP re-shards on load, so a checkpoint written by 2 ranks loads on 1 and vice versa;
- ``rng-rank<r>.pt``: each rank's torch RNG state (tensors only; loaded with ``weights_only=True``);
- ``progress.json``: epoch, step within the epoch, global step, early-stopping state - written last.

Everything is written into ``.tmp-step-<n>`` and renamed by rank 0 after a barrier, so a checkpoint
directory without the ``.tmp-`` prefix is always complete; a crash mid-write leaves only a temp dir,
which is ignored and cleaned up.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "progress.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    progress: dict, *, rank: int, keep: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in [p for p in list_checkpoints(root) if _STEP_DIR.match(p.name)][:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    rank: int, restore_rng: bool = True) -> dict:
    """Collective: load model (+ optimizer) state in place, re-sharding as needed; returns progress."""
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    rng_file = path / f"rng-rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return json.loads((path / "progress.json").read_text())


def clean_temp(root: Path) -> None:
    """Remove half-written checkpoints left by a crash (rank 0 only)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
