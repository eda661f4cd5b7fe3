"""The job layer: process group and DMP, checkpoints, and standing up a run (data + model [+ checkpoint])."""

from .checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from .distributed import DistContext, build_dmp, init_distributed
from .run import Run, build_run, load_dataset, prepare_data, resolve_checkpoint, restore

__all__ = [
    "CheckpointWriteError",
    "DistContext",
    "Run",
    "build_dmp",
    "build_run",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset",
    "prepare_data",
    "resolve_checkpoint",
    "restore",
    "resume_checkpoint",
    "save_checkpoint",
]
