"""Offline evaluation of a finished run: metrics of a checkpoint and, on request, every user's top-K.

Works at any world size (users are split across ranks and the results reduced / concatenated). The
top-K dump uses raw ids (the dataset's id maps), so it can be joined with the source data.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..job import restore
from .model_eval import eval_user_batches, evaluate, item_blocks
from .sharded import sharded_topk

log = logging.getLogger(__name__)

DUMP_COLUMNS = ("user_id", "rank", "item_id", "score", "target_item_id")


@torch.no_grad()
def _topk_rows(model, split, which: str, cfg: TrainConfig, ctx, num_items: int, k: int, protocol: str,
               user_ids: np.ndarray, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """This rank's users' top-K rows (exact, from the ranks' own table shards; see ``eval.sharded``)."""
    model.eval()
    blocks = item_blocks(model, ctx)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in DUMP_COLUMNS}
    k = min(k, num_items)
    for b in eval_user_batches(model, split, which, cfg, ctx, num_items):
        filtered = protocol == "filtered"
        top_scores, top_cols = sharded_topk(b.vectors, b.targets, blocks, num_items, k,
                                            history_values=b.history_values if filtered else None,
                                            history_offsets=b.history_offsets if filtered else None)
        users, targets = b.users, b.targets.cpu()
        if not len(users):
            continue
        b = len(users)
        cols["user_id"].append(np.repeat(user_ids[users], k))
        cols["rank"].append(np.tile(np.arange(1, k + 1), b))
        cols["item_id"].append(item_ids[top_cols.cpu().numpy().ravel()])
        cols["score"].append(top_scores.cpu().numpy().ravel())
        cols["target_item_id"].append(np.repeat(item_ids[targets.numpy() - 1], k))
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in cols.items()}


def _write_table(columns: dict[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa

    table = pa.table({c: columns[c] for c in DUMP_COLUMNS})
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)


def evaluate_run(cfg: TrainConfig, checkpoint: str = "best", split: str = "test", *, dump_topk: str | None = None,
                 k: int = 100, protocol: str | None = None) -> dict:
    """Collective. Returns ``{"split", "checkpoint", "metrics": {protocol: {...}}, "dump": path | None}``."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    protocol = protocol or cfg.train.protocol
    if dump_topk is not None and Path(dump_topk).suffix not in (".csv", ".parquet"):
        raise ValueError(f"--dump-topk {dump_topk}: use a .csv or .parquet file name")
    job = restore(cfg, checkpoint)
    ctx, ds, data, dmp = job.ctx, job.ds, job.split, job.dmp
    metrics = evaluate(dmp.module, data, split, cfg, ctx, ds.num_items)
    result = {"split": split, "checkpoint": str(job.checkpoint), "metrics": metrics, "dump": None}
    if dump_topk is not None:
        out = Path(dump_topk)
        parts = out.parent / f".{out.name}.parts"
        if ctx.is_main:
            shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir(parents=True)
        dist.barrier()
        rows = _topk_rows(dmp.module, data, split, cfg, ctx, ds.num_items, k, protocol,
                          np.asarray(ds.user_ids), np.asarray(ds.item_ids))
        np.savez(parts / f"rank{ctx.rank}.npz", **{c: v for c, v in rows.items()})
        dist.barrier()
        if ctx.is_main:
            merged: dict[str, list[np.ndarray]] = {c: [] for c in DUMP_COLUMNS}
            for r in range(ctx.world_size):
                with np.load(parts / f"rank{r}.npz", allow_pickle=False) as z:
                    for c in DUMP_COLUMNS:
                        merged[c].append(z[c])
            _write_table({c: np.concatenate(v) for c, v in merged.items()}, out)
            shutil.rmtree(parts, ignore_errors=True)
        result["dump"] = {"path": str(out), "k": k, "protocol": protocol}
    dist.barrier()
    return result
