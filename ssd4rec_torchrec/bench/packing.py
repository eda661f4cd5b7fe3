"""Benchmark suite ``packing``: packed varlen batches vs padding to the batch max, on ML-1M's real lengths.

Users' training histories (truncated to their most recent `--max-history` items, as the ML-1M config does)
are shuffled and cut into batches of B users, as the cloze loader does. Per batch the encoder (the config's
model, default configs/ml1m_cloze.yaml) runs one training step on

* packed: the B histories as jagged segments, sum(L) tokens (what this project does), and
* padded: B segments of the batch's longest length Lmax, B*Lmax tokens (what padding to [B, Lmax] costs:
  the padding tokens are encoded too; a padded implementation masks them but still computes them).

Reported: useful (non-padding) tokens/s of both, their ratio, and the padding waste
`(B*Lmax - sum L) / (B*Lmax)` - of tokens and, since every encoder FLOP is per token (`mfu` suite's count),
of FLOPs - for the whole epoch (exact, from the lengths) and for the timed batches.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd4rec_torchrec.bench.encoder_step import Point, step
from ssd4rec_torchrec.ops import offsets_from_lengths

log = logging.getLogger(__name__)

FULL = {"batch_size": 64, "batches": 8, "repeats": 3, "max_history": 200}
QUICK = {"batch_size": 8, "batches": 2, "repeats": 1, "max_history": 50}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the packing suite (defaults: ML-1M, B=64, histories <= 200 items, 8 timed batches)."""
    parser.add_argument("--config", default="configs/ml1m_cloze.yaml", help="training config: dataset and model")
    parser.add_argument("--batch-size", type=int, default=None, help="users per batch (default 64)")
    parser.add_argument("--max-history", type=int, default=None, help="most recent items kept (default 200)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds over the batches (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (B=8, 2 batches, histories <= 50)")


def padding_waste(lengths: Sequence[int], batch_size: int) -> dict[str, Any]:
    """Token counts of consecutive batches of `batch_size` segments, packed vs padded to each batch's max.

    Returns `useful` (sum of lengths), `padded` (sum over batches of size * max length), `waste_fraction`
    (padding tokens / padded tokens) and the per-batch lists `batch_useful` / `batch_padded`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arr = np.asarray(lengths, dtype=np.int64)
    useful, padded = [], []
    for s in range(0, len(arr), batch_size):
        b = arr[s:s + batch_size]
        useful.append(int(b.sum()))
        padded.append(int(len(b) * b.max()) if len(b) else 0)
    total_u, total_p = sum(useful), sum(padded)
    return {"useful": total_u, "padded": total_p, "waste_fraction": (total_p - total_u) / total_p if total_p else 0.0,
            "batch_useful": useful, "batch_padded": padded}


def _points(enc: torch.nn.Module, lengths: np.ndarray, d_model: int) -> tuple[Point, Point]:
    """(packed, padded) points of one batch sharing the encoder."""
    offsets = offsets_from_lengths(torch.as_tensor(lengths, dtype=torch.int64))
    total = int(offsets[-1])
    packed = Point(d_model, total, [int(n) for n in lengths], enc, torch.randn(total, d_model, requires_grad=True),
                   offsets)
    lmax, b = int(lengths.max()), len(lengths)
    pad_off = torch.arange(0, b * lmax + 1, lmax, dtype=torch.int64)
    padded = Point(d_model, b * lmax, [lmax] * b, enc, torch.randn(b * lmax, d_model, requires_grad=True), pad_off)
    return packed, padded


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time packed vs padded steps on the first batches of a shuffled epoch; exact epoch waste."""
    from ssd4rec_torchrec.bench.mfu import bissd_flops_per_token
    from ssd4rec_torchrec.config import load_train_config, to_dict
    from ssd4rec_torchrec.job import load_dataset
    from ssd4rec_torchrec.model import build_encoder

    preset = QUICK if args.quick else FULL
    bs = args.batch_size or preset["batch_size"]
    n_batches = args.batches or preset["batches"]
    repeats = args.repeats or preset["repeats"]
    max_hist = args.max_history or preset["max_history"]
    cfg = load_train_config(args.config)
    if cfg.data.dataset == "synthetic":
        log.warning("%s uses a synthetic dataset: its length distribution is not a real one", args.config)
    split = load_dataset(cfg).leave_one_out()
    lengths = np.minimum(np.diff(split.train_offsets), max_hist)
    order = np.random.default_rng(args.seed).permutation(len(lengths))
    lengths = lengths[order]
    epoch = padding_waste(lengths, bs)
    torch.manual_seed(args.seed)
    model_cfg = cfg.model
    enc = build_encoder(model_cfg).train()
    d = model_cfg.d_model
    pairs = [_points(enc, lengths[i * bs:(i + 1) * bs], d) for i in range(min(n_batches, -(-len(lengths) // bs)))]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for packed, padded in pairs:  # warm-up
        step(packed)
        step(padded)
    for _ in range(repeats):  # interleaved: each batch packed then padded, every round
        for packed, padded in pairs:
            for p in (packed, padded):
                wall, cpu = step(p)
                p.times.append(wall)
                p.cpu_times.append(cpu)
    rows = []
    for i, (packed, padded) in enumerate(pairs):
        tp, tq = float(np.median(packed.times)), float(np.median(padded.times))
        rows.append({"batch": i, "users": len(packed.lengths), "useful_tokens": packed.total,
                     "padded_tokens": padded.total, "max_length": padded.lengths[0],
                     "waste_fraction": 1 - packed.total / padded.total, "packed_seconds": tp, "padded_seconds": tq,
                     "packed_useful_tokens_per_s": packed.total / tp, "padded_useful_tokens_per_s": packed.total / tq,
                     "speedup": tq / tp})
    useful = sum(r["useful_tokens"] for r in rows)
    padded_tok = sum(r["padded_tokens"] for r in rows)
    sec_p = sum(r["packed_seconds"] for r in rows)
    sec_q = sum(r["padded_seconds"] for r in rows)
    flops = bissd_flops_per_token(d, n_layers=model_cfg.n_layers, d_state=model_cfg.d_state,
                                  headdim=model_cfg.headdim, expand=model_cfg.expand, d_conv=model_cfg.d_conv,
                                  chunk_size=model_cfg.chunk_size) if model_cfg.name == "ssd4rec" else None
    summary = {
        "epoch_useful_tokens": epoch["useful"], "epoch_padded_tokens": epoch["padded"],
        "epoch_waste_fraction": epoch["waste_fraction"],
        "epoch_wasted_train_gflop": None if flops is None
        else (epoch["padded"] - epoch["useful"]) * flops["train_step"] / 1e9,
        "timed_waste_fraction": 1 - useful / padded_tok,
        "packed_useful_tokens_per_s": useful / sec_p, "padded_useful_tokens_per_s": useful / sec_q,
        "speedup": sec_q / sec_p, "speedup_if_cost_per_token": padded_tok / useful,
    }
    log.info("packing (%s, B=%d, histories <= %d, %s d=%d, %d threads):\n%s\nepoch: %.1f%% of padded tokens (and "
             "FLOPs) are padding; timed batches: packed %.0f vs padded %.0f useful tokens/s = %.2fx (%.2fx if cost "
             "were exactly per token)", cfg.data.dataset, bs, max_hist, model_cfg.name, d, torch.get_num_threads(),
             _table(rows), 100 * summary["epoch_waste_fraction"], summary["packed_useful_tokens_per_s"],
             summary["padded_useful_tokens_per_s"], summary["speedup"], summary["speedup_if_cost_per_token"])
    return {
        "dataset": cfg.data.dataset, "config": args.config, "model": to_dict(model_cfg), "batch_size": bs,
        "max_history": max_hist, "timed_batches": len(rows),
        "repeats": repeats, "num_threads": torch.get_num_threads(), "torch": torch.__version__,
        "length_stats": {"users": len(lengths), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
                         "max": int(lengths.max())},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows, "summary": summary,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'batch':>5} {'useful':>7} {'padded':>7} {'waste':>6} {'packed s':>9} {'padded s':>9} "
             f"{'packed tok/s':>12} {'padded tok/s':>12} {'speedup':>7}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['useful_tokens']:>7} {r['padded_tokens']:>7} {r['waste_fraction']:>6.1%} "
                     f"{r['packed_seconds']:>9.3f} {r['padded_seconds']:>9.3f} "
                     f"{r['packed_useful_tokens_per_s']:>12.0f} {r['padded_useful_tokens_per_s']:>12.0f} "
                     f"{r['speedup']:>7.2f}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Useful tokens/s per timed batch, packed vs padded, with each batch's waste fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [r["packed_useful_tokens_per_s"] for r in rows], 0.4, label="packed (varlen)")
    ax.bar(x + 0.2, [r["padded_useful_tokens_per_s"] for r in rows], 0.4, label="padded to batch max")
    ax.set_xticks(x, [f"{r['waste_fraction']:.0%}" for r in rows])
    ax.set_xlabel("batch (label: padding waste)")
    ax.set_ylabel("useful tokens/s (fwd+bwd)")
    s = result["summary"]
    ax.set_title(f"{result['dataset']}, B={result['batch_size']}: epoch waste {s['epoch_waste_fraction']:.0%}, "
                 f"packed {s['speedup']:.2f}x", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
