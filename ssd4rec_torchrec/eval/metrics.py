"""Full-ranking evaluation: HR / NDCG / MRR over the pessimistic target ranks of ``ops.ranking``.

Ranks come from ``ssd4rec_torchrec.ops.ranking`` (item columns, the ``"unfiltered"`` / ``"filtered"``
protocols and the pessimistic tie rule are described there); this module accumulates them into metrics,
per user batch, mergeable across batches and ranks. Numbers from different protocols are not comparable:
always report which one was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..ops.history import PROTOCOLS, _check_int_vector, _check_offsets, _check_protocols, _check_targets
from ..ops.ranking import ranks_from_scores, score_ranks

__all__ = [
    "DEFAULT_KS",
    "PROTOCOLS",
    "RankingMetrics",
    "evaluate_protocols",
    "evaluate_scores",
    "popularity_scores",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)

# A score function for ``evaluate_scores``: (start, end) user slice -> (end - start, num_items) scores,
# or (num_items,) scores shared by every user of the slice.
ScoresFn = Callable[[int, int], Tensor]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must be unique, got {ks}")
    return tuple(sorted(ks))


# --------------------------------------------------------------------------------------------------------------
# metrics accumulator
# --------------------------------------------------------------------------------------------------------------


class RankingMetrics:
    """Running sums of HR@k, NDCG@k and MRR@k over users, in float64, mergeable across batches and ranks.

    For a 0-based rank ``r`` and cutoff ``k``: HR@k = [r < k], NDCG@k = [r < k] / log2(r + 2) (one relevant
    item, so IDCG = 1), MRR@k = [r < k] / (r + 1). ``compute`` divides the sums by the user count.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks: tuple[int, ...] = _check_ks(ks)
        # rows: HR, NDCG, MRR; one column per k. Kept on CPU; moved only for the collective.
        self.sums = torch.zeros(3, len(self.ks), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def reset(self) -> None:
        """Zero all sums and the count."""
        self.sums.zero_()
        self.count.zero_()

    def update(self, ranks: Tensor) -> None:
        """Add a batch of 0-based ranks (any non-negative integers; ``>= k`` is a miss at k)."""
        ranks = _check_int_vector("ranks", ranks)
        if ranks.numel() == 0:
            return
        if int(ranks.min()) < 0:
            raise ValueError("ranks must be non-negative")
        r = ranks.to(torch.float64).unsqueeze(0)  # (1, n)
        ks = torch.tensor(self.ks, dtype=torch.float64, device=r.device).unsqueeze(1)  # (K, 1)
        hit = (r < ks).to(torch.float64)  # (K, n)
        ndcg = hit / torch.log2(r + 2.0)
        mrr = hit / (r + 1.0)
        self.sums += torch.stack([hit.sum(1), ndcg.sum(1), mrr.sum(1)]).cpu()
        self.count += ranks.numel()

    def merge(self, other: RankingMetrics) -> RankingMetrics:
        """Add another accumulator's sums (same ks) into this one; returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge metrics with ks {other.ks} into ks {self.ks}")
        self.sums += other.sums
        self.count += other.count
        return self

    def all_reduce(self, group: torch.distributed.ProcessGroup | None = None) -> RankingMetrics:
        """SUM the sums and counts over ``group`` (in place); a no-op without an initialised process group.

        One collective on a single float64 buffer. With the NCCL backend the buffer goes through the
        current CUDA device. Returns self.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        buf = torch.cat([self.sums.reshape(-1), self.count.reshape(1)])
        if dist.get_backend(group) == "nccl":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        buf = buf.cpu()
        self.sums.copy_(buf[:-1].reshape(self.sums.shape))
        self.count.copy_(buf[-1])
        return self

    def compute(self) -> dict[str, float]:
        """``{"HR@k", "NDCG@k", "MRR@k"}`` for every k as means over users, plus ``"count"``.

        With no users the means are NaN (there is nothing to average), not an error.
        """
        n = float(self.count)
        out: dict[str, float] = {}
        for name, row in zip(("HR", "NDCG", "MRR"), self.sums.tolist()):
            for k, total in zip(self.ks, row):
                out[f"{name}@{k}"] = total / n if n > 0 else math.nan
        out["count"] = n
        return out


# --------------------------------------------------------------------------------------------------------------
# batched evaluation
# --------------------------------------------------------------------------------------------------------------


def _check_batch_users(batch_users: int) -> None:
    if isinstance(batch_users, bool) or not isinstance(batch_users, int) or batch_users < 1:
        raise ValueError(f"batch_users must be a positive int, got {batch_users!r}")


def _user_batches(
    num_users: int, batch_users: int, history_values: Tensor, history_offsets: Tensor
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """(start, end, values, local offsets) for each user slice of the jagged history."""
    values, offsets = _check_offsets(history_values, history_offsets, num_users)
    for start in range(0, num_users, batch_users):
        end = min(start + batch_users, num_users)
        o = offsets[start : end + 1]
        yield start, end, values[int(o[0]) : int(o[-1])], o - o[0]


# (start, end, history values, local offsets) of one user slice -> {protocol: (end - start,) ranks}
_RankBatchFn = Callable[[int, int, Tensor, Tensor], dict[str, Tensor]]


def _accumulate(metrics: dict[str, RankingMetrics], rank_batch: _RankBatchFn, num_users: int, batch_users: int,
                history_values: Tensor, history_offsets: Tensor) -> dict[str, RankingMetrics]:
    """Rank every user slice of ``batch_users`` users with ``rank_batch`` and add its ranks to ``metrics``."""
    for start, end, values, offsets in _user_batches(num_users, batch_users, history_values, history_offsets):
        ranks = rank_batch(start, end, values, offsets)
        for p in metrics:
            metrics[p].update(ranks[p])
    return metrics


def evaluate_protocols(
    user_vectors: Tensor,
    item_vectors: Tensor,
    targets: Tensor,
    history_values: Tensor,
    history_offsets: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    batch_users: int = 1024,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    chunk_items: int | None = None,
) -> dict[str, RankingMetrics]:
    """Rank every user's target (``score_ranks``) in user batches; one accumulator per protocol.

    Arguments are as in ``score_ranks`` for all users at once; the jagged history is sliced per batch by
    its offsets. The accumulators are local: call ``all_reduce`` on each when users are sharded over ranks.
    """
    _check_batch_users(batch_users)
    protocols = _check_protocols(protocols)
    metrics = {p: RankingMetrics(ks) for p in protocols}
    num_users = user_vectors.shape[0]
    targets = _check_targets(targets, num_users, 1, item_vectors.shape[0], "item indices")

    def rank_batch(start: int, end: int, values: Tensor, offsets: Tensor) -> dict[str, Tensor]:
        return score_ranks(user_vectors[start:end], item_vectors, targets[start:end], history_values=values,
                           history_offsets=offsets, protocols=protocols, chunk_items=chunk_items)

    return _accumulate(metrics, rank_batch, num_users, batch_users, history_values, history_offsets)


def evaluate_scores(
    scores_fn: ScoresFn,
    targets: Tensor,
    history_values: Tensor,
    history_offsets: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    batch_users: int = 1024,
    *,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, RankingMetrics]:
    """``evaluate_protocols`` for any scorer: ``scores_fn(start, end)`` returns the item-column scores of users
    ``start .. end - 1``, either (end - start, num_items) or (num_items,) shared by all of them.

    Popularity baseline: ``evaluate_scores(lambda s, e: popularity_scores(train_values, n), ...)``.
    """
    _check_batch_users(batch_users)
    protocols = _check_protocols(protocols)
    metrics = {p: RankingMetrics(ks) for p in protocols}
    num_users = _check_int_vector("targets", targets).numel()

    def rank_batch(start: int, end: int, values: Tensor, offsets: Tensor) -> dict[str, Tensor]:
        return ranks_from_scores(scores_fn(start, end), targets[start:end], history_values=values,
                                 history_offsets=offsets, protocols=protocols)

    return _accumulate(metrics, rank_batch, num_users, batch_users, history_values, history_offsets)


def popularity_scores(train_values: Tensor, num_items: int) -> Tensor:
    """(num_items,) float64 interaction counts of items ``1 .. num_items`` in ``train_values``.

    The popularity baseline scores every user with these counts. Padding (0) and mask (num_items + 1)
    entries are ignored; float64 keeps counts exact (float32 would merge counts above 2**24 into ties).
    """
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    values = _check_int_vector("train_values", train_values)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > num_items + 1):
        raise ValueError(
            f"train_values must be in [0, {num_items + 1}], got [{int(values.min())}, {int(values.max())}]"
        )
    counts = torch.bincount(values, minlength=num_items + 2)
    return counts[1 : num_items + 1].to(torch.float64)
