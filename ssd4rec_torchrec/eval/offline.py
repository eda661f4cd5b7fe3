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
from ..data.loader import eval_batches
from ..train.checkpoint import latest_checkpoint, load_checkpoint
from ..train.distributed import build_dmp, init_distributed
from ..train.loop import prepare_data
from .model_eval import eval_histories, evaluate, item_blocks
from .sharded import sharded_topk

log = logging.getLogger(__name__)

DUMP_COLUMNS = ("user_id", "rank", "item_id", "score", "target_item_id")


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` | ``latest`` | a path -> a checkpoint directory (clear error if missing)."""
    ckpts = run_dir / "checkpoints"
    path = latest_checkpoint(ckpts) if which == "latest" else (ckpts / "best" if which == "best" else Path(which))
    if path is None or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{run_dir}: no {which!r} checkpoint found (looked in {ckpts})")
    return path


@torch.no_grad()
def _topk_rows(model, split, which: str, cfg: TrainConfig, ctx, num_items: int, k: int, protocol: str,
               user_ids: np.ndarray, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """This rank's users' top-K rows (exact, from the ranks' own table shards; see ``eval.sharded``)."""
    model.eval()
    blocks = item_blocks(model, ctx)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in DUMP_COLUMNS}
    k = min(k, num_items)
    for batch in eval_batches(split, num_items, which, objective=cfg.objective.name,
                              batch_users=cfg.train.eval_batch_users, max_history=cfg.objective.max_history,
                              rank=ctx.rank, world_size=ctx.world_size):
        keep = (batch.weights > 0).numpy()
        vectors = model.user_vectors(batch.to(ctx.device)).float()[torch.from_numpy(keep).to(ctx.device)]
        users = batch.users.numpy()[keep]
        targets = batch.targets[torch.from_numpy(keep)]
        hv = ho = None
        if protocol == "filtered":
            hv, ho = (t.to(ctx.device) for t in eval_histories(split, which, users))
        top_scores, top_cols = sharded_topk(vectors, targets.to(ctx.device), blocks, num_items, k,
                                            history_values=hv, history_offsets=ho)
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
    from ..model import SSD4Rec

    run_dir = Path(cfg.run_dir)
    path = resolve_checkpoint(run_dir, checkpoint)
    ctx = init_distributed()
    ds = prepare_data(cfg, ctx)
    data = ds.leave_one_out()
    torch.manual_seed(cfg.seed)
    dmp, _ = build_dmp(SSD4Rec(ds.num_items, cfg.model, cfg.loss, device="meta"), cfg.train, ctx)
    load_checkpoint(path, dmp, None, rank=ctx.rank, restore_rng=False)
    metrics = evaluate(dmp.module, data, split, cfg, ctx, ds.num_items)
    result = {"split": split, "checkpoint": str(path), "metrics": metrics, "dump": None}
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
