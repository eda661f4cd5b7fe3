"""Subprocess helper for tests/export: the eager (DMP) model of a run on given histories.

  python tests/export/eager_worker.py RUN_DIR HISTORIES.safetensors OUT.safetensors

HISTORIES holds packed raw histories (``values``, ``offsets``: item indices, oldest first). OUT gets the
eager ``user_vectors`` (``vectors``; the read-out rule of the run's objective applied here, as in
``eval_batches``) and the table rows looked up through the sharded table (``items``, ``mask_row``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ssd4rec_torchrec.config import load_train_config
from ssd4rec_torchrec.data.batches import make_batch
from ssd4rec_torchrec.data.preprocess import mask_index
from ssd4rec_torchrec.job import prepare_data, resolve_checkpoint
from ssd4rec_torchrec.job.checkpoint import load_checkpoint
from ssd4rec_torchrec.job.distributed import build_dmp, init_distributed
from ssd4rec_torchrec.model import SSD4Rec


def main(run: str, histories: str, out: str) -> None:
    cfg = load_train_config(Path(run) / "config.yaml", [f"run_dir={run}"])
    ctx = init_distributed()
    ds = prepare_data(cfg, ctx)
    n = ds.num_items
    dmp, _ = build_dmp(SSD4Rec(n, cfg.model, cfg.loss, device="meta"), cfg.train, ctx)
    load_checkpoint(resolve_checkpoint(Path(run), "best"), dmp, None, rank=0, restore_rng=False)
    model = dmp.module.eval()
    h = load_file(histories)
    values, offsets = h["values"].numpy(), h["offsets"].numpy()
    lengths = np.diff(offsets)
    if cfg.objective.name == "cloze":
        values = np.insert(values, offsets[1:], mask_index(n))
        lengths = lengths + 1
    b = len(lengths)
    batch = make_batch(values, lengths, np.cumsum(lengths) - 1, np.ones(b, dtype=np.int64), np.ones(b, dtype=np.int64))
    vectors = model.user_vectors(batch).float().contiguous()
    mask_batch = make_batch(np.array([mask_index(n)]), np.array([1]), np.array([0]), np.ones(1, dtype=np.int64),
                            np.ones(1, dtype=np.int64))
    with torch.no_grad():
        mask_row = model.ec(mask_batch.features)["history"].values().float().contiguous()
    save_file({"vectors": vectors, "items": model.item_vectors().float().contiguous(), "mask_row": mask_row}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
