"""Full-ranking evaluation of a (possibly sharded) model: users split across ranks, metrics reduced.

The item table is never gathered: each rank scores every batch's users against its own table rows and
the per-rank counts are reduced (``eval.sharded``); results equal a single-process brute-force ranking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import TrainConfig
from ..data.batches import gather_segments
from ..data.loader import eval_batches, eval_user_sample
from ..data.preprocess import LeaveOneOut
from ..job.distributed import DistContext
from .metrics import DEFAULT_KS, PROTOCOLS, RankingMetrics, popularity_scores, ranks_from_scores
from .sharded import ItemBlock, local_item_blocks, sharded_score_ranks

if TYPE_CHECKING:
    from ..model import SSD4Rec


def eval_histories(split: LeaveOneOut, which: str, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged (values, offsets) of the eval input histories of ``users`` (for the filtered protocol)."""
    off, items = (split.train_offsets, split.train_items) if which == "valid" else (split.test_offsets,
                                                                                     split.test_items)
    lengths = off[users + 1] - off[users]
    values = gather_segments(items, off[users], lengths).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return torch.from_numpy(values), torch.from_numpy(offsets)


def item_blocks(model: SSD4Rec, ctx: DistContext) -> list[ItemBlock]:
    """This rank's rows of the model's item table (its shards; a replicated table split by rank)."""
    from ..model import TABLE

    return local_item_blocks(model.ec, f"embeddings.{TABLE}.weight", model.num_items, ctx.rank, ctx.world_size,
                             normalize=model.l2_normalize)


@dataclass
class EvalBatch:
    """One batch of evaluated users: their user vectors, targets and input histories (on the job's device)."""

    users: np.ndarray  # (B,) user indices
    vectors: torch.Tensor  # (B, d) float32
    targets: torch.Tensor  # (B,) item indices
    history_values: torch.Tensor  # jagged input histories (the filtered protocol removes these items)
    history_offsets: torch.Tensor


def eval_user_batches(model: SSD4Rec, split: LeaveOneOut, which: str, cfg: TrainConfig, ctx: DistContext,
                      num_items: int, users: np.ndarray | None = None) -> Iterator[EvalBatch]:
    """The evaluation loop every evaluator shares: this rank's share of ``users`` (default: all) in batches of
    ``train.eval_batch_users``, encoded by ``model`` (call under ``torch.no_grad()`` in eval mode)."""
    for batch in eval_batches(split, num_items, which, objective=cfg.objective.name,
                              batch_users=cfg.train.eval_batch_users, max_history=cfg.objective.max_history,
                              rank=ctx.rank, world_size=ctx.world_size, users=users):
        vectors = model.user_vectors(batch.to(ctx.device))
        keep = batch.weights > 0
        kept = batch.users[keep].numpy()
        hv, ho = eval_histories(split, which, kept)
        yield EvalBatch(kept, vectors[keep.to(ctx.device)].float(), batch.targets[keep].to(ctx.device),
                        hv.to(ctx.device), ho.to(ctx.device))


@torch.no_grad()
def evaluate(model: SSD4Rec, split: LeaveOneOut, which: str, cfg: TrainConfig, ctx: DistContext,
             num_items: int, ks=DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Full-ranking metrics over all users, or ``train.eval_sample_users`` of them (split across ranks,
    reduced); both protocols. Collective."""
    was_training = model.training
    model.eval()
    blocks = item_blocks(model, ctx)
    metrics = {p: RankingMetrics(ks) for p in PROTOCOLS}
    sample = eval_user_sample(len(split.valid_targets), cfg.train.eval_sample_users, cfg.seed)
    for b in eval_user_batches(model, split, which, cfg, ctx, num_items, users=sample):
        ranks = sharded_score_ranks(b.vectors, b.targets, b.history_values, b.history_offsets, blocks, num_items)
        for p in PROTOCOLS:
            metrics[p].update(ranks[p])
    model.train(was_training)
    return {p: m.all_reduce().compute() for p, m in metrics.items()}


def popularity_baseline(split: LeaveOneOut, which: str, ctx: DistContext, num_items: int,
                        ks=DEFAULT_KS, sample_users: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Everyone gets the training-popularity ranking: the floor a sequence model must clearly beat
    (``sample_users``: on the same user sample as :func:`evaluate` with ``train.eval_sample_users``)."""
    scores = popularity_scores(torch.from_numpy(np.asarray(split.train_items, dtype=np.int64)), num_items)
    targets = split.valid_targets if which == "valid" else split.test_targets
    sample = eval_user_sample(len(targets), sample_users, seed)
    users = (np.arange(len(targets)) if sample is None else sample)[ctx.rank::ctx.world_size]
    metrics = {p: RankingMetrics(ks) for p in PROTOCOLS}
    for start in range(0, len(users), 2048):
        u = users[start:start + 2048]
        hv, ho = eval_histories(split, which, u)
        ranks = ranks_from_scores(scores, torch.from_numpy(np.asarray(targets[u], dtype=np.int64)),
                                  history_values=hv, history_offsets=ho)
        for p in PROTOCOLS:
            metrics[p].update(ranks[p])
    return {p: m.all_reduce().compute() for p, m in metrics.items()}
