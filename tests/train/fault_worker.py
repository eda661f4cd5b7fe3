"""Test fixture: run ``apps/train.py`` in this process with faults injected (the library has no fault hooks).

  python tests/train/fault_worker.py [--nan-at N] [--oserror-at-save K] [--sigterm-at N] [--trace FILE] -- ARGS
  SSD4REC_FAULT_AT_STEP=R:N torchx run dist.ddp -j 1x2 --script tests/train/fault_worker.py -- ARGS

- ``--nan-at N``: the loss of training step N (1-based, counted in this process) is multiplied by NaN (only
  on rank ``--nan-rank`` when given);
- ``--oserror-at-save K``: the K-th checkpoint write of this process raises ``OSError(ENOSPC)`` (inside the
  DCP save, after part of the checkpoint was written);
- ``--sigterm-at N``: the process sends itself SIGTERM during training step N (as a scheduler would; only on
  rank ``--sigterm-rank`` when given);
- ``SSD4REC_FAULT_AT_STEP=R:N`` (environment, so that it passes through TorchX/torchrun): rank R SIGKILLs
  itself when it starts writing checkpoint ``step-N``, once per run dir (a marker file
  ``.fault-injected-rankR-stepN`` in the run dir stops a restarted or resumed job from failing again);
- ``--trace FILE``: a JSON list of digests of the model's parameters (item table included) taken at the
  start of every training step (``FILE.rank<r>`` under torchrun).

Exits with the app's exit code.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KILL_ENV = "SSD4REC_FAULT_AT_STEP"


def run_faulty(train_args: Sequence[str], fault: Sequence[str] = (), timeout: float = 900
               ) -> subprocess.CompletedProcess:
    """Run this worker in a subprocess from the repo root (one thread, no malloc tuning): ``fault`` options,
    then ``apps/train.py``'s ``train_args``."""
    env = {**os.environ, "SSD4REC_NO_MALLOC_TUNING": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *fault, "--", *train_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def digest(dmp) -> str:
    """sha256 of every tensor of the model's state dict (the sharded item table's local shards included)."""
    h = hashlib.sha256()
    for name, t in sorted(dmp.state_dict().items()):
        parts = [s.tensor for s in t.local_shards()] if hasattr(t, "local_shards") else [t]
        for p in parts:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    sep = sys.argv.index("--") if "--" in sys.argv else 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--nan-rank", type=int)
    parser.add_argument("--oserror-at-save", type=int)
    parser.add_argument("--sigterm-at", type=int)
    parser.add_argument("--sigterm-rank", type=int)
    parser.add_argument("--trace")
    opts = parser.parse_args(sys.argv[1:sep])
    rank = int(os.environ.get("RANK", "0"))
    trace = f"{opts.trace}.rank{rank}" if opts.trace and "LOCAL_WORLD_SIZE" in os.environ else opts.trace
    if opts.nan_rank is not None and opts.nan_rank != rank:
        opts.nan_at = None
    if opts.sigterm_rank is not None and opts.sigterm_rank != rank:
        opts.sigterm_at = None

    import torch.distributed.checkpoint as dcp

    import ssd4rec_torchrec.job.run as job_run
    import ssd4rec_torchrec.model as model_mod
    import ssd4rec_torchrec.train.loop as loop

    stash: dict = {"steps": 0, "saves": 0, "digests": []}
    build = job_run.build_dmp

    def build_and_keep(*args, **kwargs):
        dmp, opt = build(*args, **kwargs)
        stash["dmp"] = dmp
        return dmp, opt

    job_run.build_dmp = build_and_keep
    kill = os.environ.get(KILL_ENV)
    if kill:
        kill_rank, kill_step = (int(x) for x in kill.split(":"))
        save_checkpoint = loop.save_checkpoint

        def save_or_die(root, name, *args, **kwargs):
            marker = Path(root).parent / f".fault-injected-rank{kill_rank}-step{kill_step}"
            if rank == kill_rank and name == f"step-{kill_step}" and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return save_checkpoint(root, name, *args, **kwargs)

        loop.save_checkpoint = save_or_die
    forward = model_mod.RetrievalLoss.forward

    def faulty_forward(self, *args):
        loss, extra = forward(self, *args)
        if self.training:
            stash["steps"] += 1
            if trace:
                stash["digests"].append(digest(stash["dmp"]))
                Path(trace).write_text(json.dumps(stash["digests"]))
            if stash["steps"] == opts.nan_at:
                loss = loss * float("nan")
            if stash["steps"] == opts.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss, extra

    model_mod.RetrievalLoss.forward = faulty_forward
    save = dcp.save

    def failing_save(state, *, checkpoint_id, **kwargs):
        stash["saves"] += 1
        if stash["saves"] == opts.oserror_at_save:
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, checkpoint_id=checkpoint_id, **kwargs)

    dcp.save = failing_save
    spec = importlib.util.spec_from_file_location("train_app", REPO / "apps" / "train.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app.main(sys.argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
