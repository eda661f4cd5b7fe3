"""Test fixture: run ``apps/train.py`` in this process with faults injected (the library has no fault hooks).

  python tests/train/fault_worker.py [--nan-at N] [--oserror-at-save K] [--sigterm-at N] [--trace FILE] -- ARGS

- ``--nan-at N``: the loss of training step N (1-based, counted in this process) is multiplied by NaN (only
  on rank ``--nan-rank`` when given);
- ``--oserror-at-save K``: the K-th checkpoint write of this process raises ``OSError(ENOSPC)`` (inside the
  DCP save, after part of the checkpoint was written);
- ``--sigterm-at N``: the process sends itself SIGTERM during training step N (as a scheduler would; only on
  rank ``--sigterm-rank`` when given);
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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
    sep = sys.argv.index("--")
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

    import ssd4rec_torchrec.model as model_mod
    import ssd4rec_torchrec.train.loop as loop

    stash: dict = {"steps": 0, "saves": 0, "digests": []}
    build = loop.build_dmp

    def build_and_keep(*args, **kwargs):
        dmp, opt = build(*args, **kwargs)
        stash["dmp"] = dmp
        return dmp, opt

    loop.build_dmp = build_and_keep
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
