"""Write a serving bundle from a run directory's checkpoint (collective: one process or every rank of a job).

Steps: load the checkpoint under DMP at this job's world size; every rank writes its own rows of the item
table (``eval.sharded.local_item_blocks``) straight into one memory-mapped raw file (so no process ever
holds more than its own shard); rank 0 then streams that file in bounded chunks into the safetensors item
tables (fp32, optional bf16 / int8), builds the user tower from it, exports it with ``torch.export`` and
(optionally) AOTInductor, checks both against the eager model's ``user_vectors``, measures the recall cost
of the quantised tables, and writes the manifest with every file's sha256. Everything goes into
``BUNDLE.tmp-<token>`` first and is renamed into place at the end; a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import __version__
from ..bundle import FORMAT_VERSION, ITEM_FILES, ITEM_IDS, MANIFEST, POPULARITY, TOWER, TOWER_AOTI, sha256_file
from ..config import TrainConfig
from ..data.batches import gather_segments
from ..data.loader import eval_batches
from ..data.preprocess import FIRST_ITEM_INDEX, mask_index
from ..eval.sharded import local_item_blocks
from ..job import restore
from .safetensors_stream import SafetensorsWriter
from .tower import build_tower

log = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "int8")
READOUT = {"prefix": "last", "next": "last", "cloze": "append_mask"}
CHUNK_BYTES = 64 << 20  # rows streamed per step from the raw table
PARITY_TOL = 1e-4  # export fails above this (the tests hold the tower to 1e-5)
RAW_TABLE = ".table_rows.f32"


def parse_dtypes(spec: str) -> list[str]:
    """``"fp32,bf16"`` -> ``["fp32", "bf16"]`` (fp32 always included); ValueError names an unknown one."""
    out = ["fp32"]
    for part in spec.split(","):
        d = part.strip()
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
        if d not in out:
            out.append(d)
    return out


def _rows_per_chunk(d: int) -> int:
    return max(1, CHUNK_BYTES // (4 * d))


def _broadcast_token(ctx) -> str:
    """A random suffix chosen by rank 0 and shared with every rank."""
    t = torch.tensor([secrets.randbits(62) if ctx.is_main else 0], dtype=torch.int64)
    if dist.is_initialized() and ctx.world_size > 1:
        dist.broadcast(t, src=0)
    return f"{int(t.item()):016x}"


def _gather_table(model, tmp: Path, num_items: int, d: int, ctx) -> np.memmap:
    """Every rank writes its rows 1..num_items+1 (items and the mask row) into ``tmp/RAW_TABLE`` at their
    row index; returns rank 0's read-only view (rows, d) float32 (row 0, the padding row, stays zero)."""
    from ..model import TABLE

    raw = tmp / RAW_TABLE
    rows = num_items + 2
    if ctx.is_main:
        with open(raw, "wb") as f:
            f.truncate(rows * d * 4)
    dist.barrier()
    # num_items + 1 as the "catalog size" makes local_item_blocks return the mask row as well.
    blocks = local_item_blocks(model.ec, f"embeddings.{TABLE}.weight", num_items + 1, ctx.rank, ctx.world_size)
    written = 0
    if blocks:
        out = np.memmap(raw, dtype=np.float32, mode="r+", shape=(rows, d))
        for b in blocks:
            r0 = b.first_col + FIRST_ITEM_INDEX
            out[r0:r0 + b.vectors.shape[0]] = b.vectors.detach().float().cpu().numpy()
            written += b.vectors.shape[0]
        out.flush()
        del out
    count = torch.tensor([written], dtype=torch.int64)
    dist.all_reduce(count)
    if int(count) != num_items + 1:
        raise RuntimeError(f"table shards cover {int(count)} rows, expected {num_items + 1} (items + mask)")
    log.info("rank %d wrote %d table rows in %d blocks", ctx.rank, written, len(blocks))
    return np.memmap(raw, dtype=np.float32, mode="r", shape=(rows, d))


def _write_item_tables(table: np.memmap, tmp: Path, num_items: int, dtypes: list[str],
                       l2_normalize: bool) -> dict[str, str]:
    """Stream item rows 1..n into the fp32 / bf16 / int8 safetensors files, chunk by chunk."""
    d = table.shape[1]
    writers: dict[str, SafetensorsWriter] = {}
    for dt in dtypes:
        spec = {"item_vectors": ({"fp32": "F32", "bf16": "BF16", "int8": "I8"}[dt], (num_items, d))}
        if dt == "int8":
            spec["scales"] = ("F32", (num_items,))
        writers[dt] = SafetensorsWriter(tmp / ITEM_FILES[dt], spec,
                                        metadata={"rows": "item index i+1", "l2_normalized": str(l2_normalize)})
    step = _rows_per_chunk(d)
    for s in range(0, num_items, step):
        e = min(s + step, num_items)
        v = torch.from_numpy(np.array(table[s + FIRST_ITEM_INDEX:e + FIRST_ITEM_INDEX]))
        if l2_normalize:
            v = F.normalize(v, dim=-1)
        for dt, w in writers.items():
            if dt == "fp32":
                w.write_rows("item_vectors", s, v.numpy())
            elif dt == "bf16":
                w.write_rows("item_vectors", s, v.to(torch.bfloat16).view(torch.int16).numpy())
            else:
                q, scale = quantize_int8(v)
                w.write_rows("item_vectors", s, q.numpy())
                w.write_rows("scales", s, scale.numpy())
    for w in writers.values():
        w.close()
    return {dt: ITEM_FILES[dt] for dt in dtypes}


def quantize_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``q = round(v / s)`` with ``s = max|v| / 127`` (1 for an all-zero row)."""
    scale = v.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(v / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def _dequantized_chunks(root: Path, dtype: str, num_items: int, step: int):
    """Yield ``(start, fp32 rows)`` of a stored table, chunk by chunk (int8 dequantised)."""
    from safetensors import safe_open

    with safe_open(str(root / ITEM_FILES[dtype]), framework="pt") as f:
        vec = f.get_slice("item_vectors")
        scales = f.get_slice("scales") if dtype == "int8" else None
        for s in range(0, num_items, step):
            e = min(s + step, num_items)
            v = vec[s:e].float()
            if scales is not None:
                v = v * scales[s:e][:, None]
            yield s, v


def _topk_ids(users: torch.Tensor, root: Path, dtype: str, num_items: int, k: int) -> torch.Tensor:
    """Exact top-k item columns of every user against a stored table (streamed, merged per chunk)."""
    k = min(k, num_items)
    best_s = torch.full((users.shape[0], k), -torch.inf)
    best_i = torch.zeros((users.shape[0], k), dtype=torch.int64)
    step = _rows_per_chunk(users.shape[1])
    for s, v in _dequantized_chunks(root, dtype, num_items, step):
        scores = users @ v.T
        cat_s = torch.cat([best_s, scores], dim=1)
        cat_i = torch.cat([best_i, torch.arange(s, s + v.shape[0]).expand(users.shape[0], -1)], dim=1)
        best_s, pos = cat_s.topk(k, dim=1)
        best_i = cat_i.gather(1, pos)
    return best_i


def quantization_recall(users: torch.Tensor, root: Path, dtypes: list[str], num_items: int,
                        k: int = 10) -> dict[str, dict[str, float]]:
    """recall@k of the exact top-k with each quantised table against the fp32 table's top-k."""
    exact = _topk_ids(users, root, "fp32", num_items, k)
    out = {}
    for dt in dtypes:
        if dt == "fp32":
            continue
        approx = _topk_ids(users, root, dt, num_items, k)
        hits = (approx[:, :, None] == exact[:, None, :]).any(-1).sum(-1).float()
        out[dt] = {f"recall@{k}": float((hits / exact.shape[1]).mean())}
    return out


def _histories(split, users: np.ndarray, max_history: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed raw test-split input histories (most recent ``max_history`` items) of ``users``."""
    off, items = split.test_offsets, split.test_items
    full = off[users + 1] - off[users]
    lengths = np.minimum(full, max_history) if max_history else full
    values = gather_segments(items, off[users + 1] - lengths, lengths).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return torch.from_numpy(values), torch.from_numpy(offsets)


def served_history(cfg: TrainConfig) -> int | None:
    """The most recent items of a history the exported model reads: ``objective.max_history`` (None: all, for
    the Bi-SSD tower); a transformer tower has a fixed window, so without a training window it reads the most
    recent ``model.max_positions`` tokens (the read-out's mask token included)."""
    if cfg.model.name == "ssd4rec" or cfg.objective.max_history is not None:
        return cfg.objective.max_history
    return cfg.model.max_positions - (READOUT[cfg.objective.name] == "append_mask")


def export_tower(tower: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` with dynamic T and B. Size-oblivious reasoning keeps sizes 1 (one user, one item)
    on the general path instead of guarding them away."""
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim

    dims = ({0: Dim("T", min=1)}, {0: Dim("B", min=1) + 1})
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        return torch.export.export(tower, example, dynamic_shapes=dims, strict=False)


def _max_diff(fn, values: torch.Tensor, offsets: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fn(values, offsets) - reference).abs().max())


def _finish_on_rank0(cfg: TrainConfig, dmp, ds, split, tmp: Path, table: np.memmap, *, dtypes: list[str],
                     aoti: bool, parity: tuple[np.ndarray, torch.Tensor], recall_users: int,
                     checkpoint: Path) -> dict[str, Any]:
    model = dmp.module
    n, d = ds.num_items, cfg.model.d_model
    objective = cfg.objective.name
    readout = READOUT[objective]
    t0 = time.perf_counter()
    item_files = _write_item_tables(table, tmp, n, dtypes, model.l2_normalize)
    ids = np.asarray(ds.item_ids)
    if ids.dtype == object:
        ids = ids.astype(str)
    np.save(tmp / ITEM_IDS, ids, allow_pickle=False)
    counts = np.bincount(np.asarray(split.train_items, dtype=np.int64), minlength=n + 2)[1:n + 1].astype(np.float64)
    pop = SafetensorsWriter(tmp / POPULARITY, {"counts": ("F64", (n,))}, metadata={"what": "training interactions"})
    pop.write_rows("counts", 0, counts)
    pop.close()
    log.info("item tables written in %.1f s", time.perf_counter() - t0)

    encoder = model.encoder
    encoder.eval()
    max_history = served_history(cfg)
    window = None if max_history is None else max_history + (readout == "append_mask")
    tower = build_tower(torch.from_numpy(np.array(table)), encoder, num_items=n, readout=readout,
                        l2_normalize=model.l2_normalize, window=window).eval()
    users, eager = parity
    hv, ho = _histories(split, users, max_history)
    t0 = time.perf_counter()
    ep = export_tower(tower, (hv, ho))
    export_s = time.perf_counter() - t0
    torch.export.save(ep, str(tmp / TOWER))
    program = torch.export.load(str(tmp / TOWER)).module()
    diffs = {"exported": _max_diff(program, hv, ho, eager)}
    aoti_info: dict[str, Any] = {"present": False, "file": None}
    if not aoti:
        aoti_info["reason"] = "skipped (--no-aoti)"
    else:
        t0 = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / TOWER_AOTI))
            runner = torch._inductor.aoti_load_package(str(tmp / TOWER_AOTI))
            diffs["aoti"] = _max_diff(runner, hv, ho, eager)
            aoti_info.update(present=True, file=TOWER_AOTI, device="cpu")
        except Exception as e:  # a missing C++ toolchain or an inductor limitation: record it, keep the rest
            log.warning("AOTInductor compilation failed, the bundle has only the ExportedProgram: %s", e)
            aoti_info["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
            (tmp / TOWER_AOTI).unlink(missing_ok=True)
        aoti_info["compile_seconds"] = round(time.perf_counter() - t0, 1)
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_TOL}
    if bad:
        raise RuntimeError(f"user tower disagrees with the eager model: max |diff| {bad} > {PARITY_TOL}")
    log.info("tower parity vs eager user_vectors over %d users: %s", len(users), diffs)

    recall: dict[str, dict[str, float]] = {}
    if len(dtypes) > 1:
        num_users = len(split.test_offsets) - 1
        pick = np.unique(np.linspace(0, num_users - 1, min(recall_users, num_users)).astype(np.int64))
        with torch.no_grad():
            vectors = torch.cat([program(*_histories(split, pick[s:s + 512], max_history))
                                 for s in range(0, len(pick), 512)])
        recall = quantization_recall(vectors, tmp, dtypes, n)
        for r in recall.values():
            r["users"] = len(pick)
    (tmp / RAW_TABLE).unlink()

    metrics_path = Path(cfg.run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()).get("test") if metrics_path.is_file() else None
    import torchrec

    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "num_items": n,
        "d_model": d,
        "objective": objective,
        "readout": readout,
        "mask_index": mask_index(n),
        "max_history": max_history,
        "l2_normalize": bool(model.l2_normalize),
        "config": cfg.to_dict(),
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "versions": {"torch": torch.__version__, "torchrec": torchrec.__version__, "ssd4rec_torchrec": __version__,
                     "python": sys.version.split()[0]},
        "files": files,
        "item_vectors": item_files,
        "quantization_recall": recall,
        "user_tower": {
            "exported": TOWER,
            "inputs": {"item_indices": "int64 (T,), item indices 1..num_items, oldest first, at most max_history "
                                       "per user", "offsets": "int64 (B+1,) jagged offsets"},
            "output": "float32 (B, d_model) user vectors",
            "export_seconds": round(export_s, 1),
            "aoti": aoti_info,
            "parity_max_abs_diff": {**diffs, "users": len(users)},
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_bundle(cfg: TrainConfig, out: str | Path, *, checkpoint: str = "best", dtypes: list[str] | None = None,
                  aoti: bool = True, parity_users: int = 64, recall_users: int = 2000,
                  force: bool = False) -> dict[str, Any] | None:
    """Collective. Writes the bundle at ``out``; returns the manifest on rank 0 (None elsewhere)."""
    dtypes = dtypes or ["fp32"]
    out = Path(out)
    if cfg.objective.name not in READOUT:
        raise ValueError(f"objective {cfg.objective.name!r} has no serving read-out")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (remove it or pass --force)")
    if parity_users < 1 or recall_users < 1:
        raise ValueError("parity_users and recall_users must be >= 1")
    job = restore(cfg, checkpoint)
    ctx, ds, split, dmp, path = job.ctx, job.ds, job.split, job.dmp, job.checkpoint
    dmp.module.eval()
    # Eager reference vectors for the parity check: the lookup is collective, so every rank runs one batch.
    batch = next(iter(eval_batches(split, ds.num_items, "test", objective=cfg.objective.name,
                                   batch_users=parity_users, max_history=served_history(cfg),
                                   rank=ctx.rank, world_size=ctx.world_size)))
    eager = dmp.module.user_vectors(batch.to(ctx.device)).float().cpu()
    keep = (batch.weights > 0).numpy()
    parity = (batch.users.numpy()[keep], eager[torch.from_numpy(keep)])

    tmp = out.parent / f"{out.name}.tmp-{_broadcast_token(ctx)}"
    if ctx.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    manifest = None
    status = torch.zeros(1, dtype=torch.int64)
    try:
        table = _gather_table(dmp.module, tmp, ds.num_items, cfg.model.d_model, ctx)
        if ctx.is_main:
            try:
                manifest = _finish_on_rank0(cfg, dmp, ds, split, tmp, table, dtypes=dtypes, aoti=aoti,
                                            parity=parity, recall_users=recall_users, checkpoint=path)
                del table
                if out.exists():  # --force: swap the old bundle out only once the new one is complete
                    old = out.parent / f"{out.name}.old-{os.getpid()}"
                    out.rename(old)
                    tmp.rename(out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(out)
            except BaseException:
                status += 1
                raise
            finally:
                if dist.is_initialized() and ctx.world_size > 1:
                    dist.all_reduce(status)  # tell the other ranks whether rank 0 succeeded
        elif ctx.world_size > 1:
            dist.all_reduce(status)
            if int(status):
                raise RuntimeError("export failed on rank 0 (see its log)")
    finally:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if ctx.is_main:
        log.info("wrote bundle %s", out)
    return manifest


__all__ = ["DTYPES", "export_bundle", "export_tower", "parse_dtypes", "quantization_recall", "quantize_int8"]
