"""Benchmark suite ``objective``: training tokens and seconds per ML-1M epoch for each training objective.

Objectives: `prefix: all` (every prefix of every history, the official code's; cost grows with the square of
history length), `prefix: k` (k sampled prefixes per user) and `cloze` (each whole history once, masked).
Tokens per epoch are exact (from the loader's epoch-0 examples, after `max_history` truncation; the
untruncated count is reported too). Seconds per epoch are EXTRAPOLATED: `--steps` timed steps (after one
warm-up) of the first batches of the shuffled epoch give seconds per encoded token, times the epoch's tokens
(a steps-based estimate, mean step time x steps per epoch, is reported next to it).

The timed step is one process, no TorchRec/DMP: batches from `TrainLoader` exactly as training gets them,
a plain `torch.nn.Embedding` item table (same rows and d as the TorchRec table), the config's encoder and
the full-softmax loss over the catalog, forward + backward + one dense Adam step. This times the encoder
and loss for each objective on equal terms; the sharded table, the fused sparse optimizer and the
pipeline's overlap are not included (`train` suite times the real job). Batch construction time is measured
separately (`loader_seconds_per_epoch`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FULL = {"steps": 10, "batch_size": None, "max_history": None}
QUICK = {"steps": 1, "batch_size": 8, "max_history": 50}
OBJECTIVES = ("prefix_all", "prefix_k", "cloze")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the objective suite (defaults: configs/ml1m_cloze.yaml's data, model, batch size, max_history)."""
    parser.add_argument("--config", default="configs/ml1m_cloze.yaml", help="training config (data, model, objective)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--prefix-k", type=int, default=8, help="prefixes per user for prefix_k (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per objective (default 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the config's)")
    parser.add_argument("--max-history", type=int, default=None, help="most recent items per input (config's)")
    parser.add_argument("--seed", type=int, default=None, help="loader seed (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (1 step, B=8, histories <= 50)")


def epoch_tokens(loader: Any) -> int:
    """Encoder input tokens of the loader's rank in epoch 0, after max_history truncation (exact)."""
    users, cuts = loader._examples(loader.rank, 0)  # the loader's own epoch plan (same seed and order)
    return int(loader.example_tokens(users, cuts).sum())


class _Trainer:
    """Plain item table + encoder + full softmax; `step(batch)` returns (seconds, tokens)."""

    def __init__(self, cfg: Any, num_items: int) -> None:
        from ssd4rec_torchrec.data.preprocess import table_rows
        from ssd4rec_torchrec.model import build_encoder

        self.num_items = num_items
        self.table = torch.nn.Embedding(table_rows(num_items), cfg.model.d_model)
        torch.nn.init.normal_(self.table.weight, std=cfg.model.embedding_init_std)
        self.encoder = build_encoder(cfg.model).train()
        params = [*self.table.parameters(), *self.encoder.parameters()]
        self.opt = torch.optim.Adam(params, lr=cfg.train.lr)

    def step(self, batch: Any) -> tuple[float, int]:
        hist = batch.features["history"]
        values, offsets = hist.values(), hist.offsets().long()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        hidden = self.encoder(self.table(values), offsets)
        catalog = self.table.weight[1:self.num_items + 1]  # items 1..num_items (FIRST_ITEM_INDEX = 1)
        logits = hidden[batch.readout] @ catalog.T
        loss = F.cross_entropy(logits, batch.targets - 1)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, int(values.numel())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/epoch (exact) and seconds/epoch (extrapolated from timed steps) for each objective."""
    from ssd4rec_torchrec.config import load_train_config
    from ssd4rec_torchrec.data.loader import LoaderSpec, TrainLoader
    from ssd4rec_torchrec.job import load_dataset

    preset = QUICK if args.quick else FULL
    cfg = load_train_config(args.config)
    if cfg.model.name != "ssd4rec":
        raise ValueError(f"objective suite times the Bi-SSD encoder; {args.config} has model {cfg.model.name!r}")
    steps = args.steps or preset["steps"]
    bs = args.batch_size or preset["batch_size"] or cfg.train.batch_size
    max_hist = args.max_history or preset["max_history"] or cfg.objective.max_history
    seed = cfg.seed if args.seed is None else args.seed
    ds = load_dataset(cfg)
    split = ds.leave_one_out()
    n_items = ds.num_items
    rows = []
    for name in args.objectives:
        spec = LoaderSpec(objective="cloze" if name == "cloze" else "prefix",
                          prefixes_per_user="all" if name == "prefix_all" else args.prefix_k,
                          mask_prob=cfg.objective.mask_prob, p_last=cfg.objective.p_last, max_history=max_hist,
                          loss="full", batch_size=bs)
        loader = TrainLoader(split, n_items, spec, seed=seed)
        torch.manual_seed(seed)
        trainer = _Trainer(cfg, n_items)
        batches = loader.epoch(0)
        times, toks, load_s = [], [], []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            batch = next(batches, None)
            load_s.append(time.perf_counter() - t0)
            if batch is None:
                break
            sec, n = trainer.step(batch)
            if i > 0:  # the first step is a warm-up
                times.append(sec)
                toks.append(n)
            log.info("%s step %d: %d tokens, %.3f s", name, i, n, sec)
        if not times:
            raise ValueError(f"{name}: the epoch has fewer than 2 steps; nothing was timed")
        n_steps = loader.steps_per_epoch()
        tokens = epoch_tokens(loader)
        sec_per_token = sum(times) / sum(toks)
        load_per_step = float(np.mean(load_s[1:len(times) + 1]))
        rows.append({
            "objective": name, "prefixes_per_user": spec.prefixes_per_user if spec.objective == "prefix" else None,
            "examples_per_epoch": len(loader._examples(loader.rank, 0)[0]), "steps_per_epoch": n_steps,
            "tokens_per_epoch": tokens,
            "tokens_per_epoch_untruncated": loader.tokens_per_epoch(), "timed_steps": len(times),
            "timed_tokens": sum(toks), "step_seconds": times, "tokens_per_s": sum(toks) / sum(times),
            "seconds_per_epoch": sec_per_token * tokens,
            "seconds_per_epoch_from_steps": float(np.mean(times)) * n_steps,
            "loader_seconds_per_epoch": load_per_step * n_steps, "extrapolated": True,
        })
    base = next((r for r in rows if r["objective"] == "prefix_all"), None)
    for r in rows:
        r["tokens_vs_prefix_all"] = None if base is None else r["tokens_per_epoch"] / base["tokens_per_epoch"]
    log.info("objectives on %s (B=%d, max_history %s, %d timed steps each; seconds/epoch EXTRAPOLATED):\n%s",
             cfg.data.dataset, bs, max_hist, steps, _table(rows))
    return {"dataset": cfg.data.dataset, "config": args.config, "batch_size": bs, "max_history": max_hist,
            "prefix_k": args.prefix_k, "num_items": n_items, "num_users": ds.num_users,
            "num_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "note": "seconds_per_epoch extrapolated from timed steps x exact epoch tokens; plain nn.Embedding, "
                    "one process, no DMP",
            "rows": rows}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'objective':>11} {'examples':>9} {'steps':>6} {'tokens/epoch':>13} {'vs all':>7} {'tokens/s':>9} "
             f"{'s/epoch*':>9} {'loader s':>9}"]
    for r in rows:
        rel = "-" if r["tokens_vs_prefix_all"] is None else f"{r['tokens_vs_prefix_all']:.3f}"
        lines.append(f"{r['objective']:>11} {r['examples_per_epoch']:>9} {r['steps_per_epoch']:>6} "
                     f"{r['tokens_per_epoch']:>13} {rel:>7} {r['tokens_per_s']:>9.0f} "
                     f"{r['seconds_per_epoch']:>9.1f} {r['loader_seconds_per_epoch']:>9.1f}")
    lines.append("* extrapolated from the timed steps")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens and (extrapolated) seconds per epoch per objective, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.bar(x, [r["tokens_per_epoch"] for r in rows])
    ax2.bar(x, [r["seconds_per_epoch"] for r in rows])
    for ax in (ax1, ax2):
        ax.set_xticks(x, [r["objective"] for r in rows])
        ax.set_yscale("log")
    ax1.set_ylabel("tokens per epoch")
    ax2.set_ylabel("seconds per epoch (extrapolated)")
    fig.suptitle(f"{result['dataset']}, B={result['batch_size']}, max_history {result['max_history']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
