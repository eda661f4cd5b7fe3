"""Full-ranking kernels: pessimistic target ranks under two history protocols (pure torch).

Item index convention (see ``ssd4rec_torchrec.data.preprocess``): ``0`` is padding, items are
``1 .. num_items``, ``num_items + 1`` is the mask token. Padding and mask are never ranked, so every
function here works on *item columns*: column ``c`` is item ``c + 1`` and there are ``num_items`` columns
(callers pass ``table.weight[1 : num_items + 1]`` as ``item_vectors``).

Protocols (numbers from different protocols are not comparable, always report which one was used):

- ``"unfiltered"``: RecBole / Mamba4Rec / SSD4Rec. All items are ranked, including those the user has seen.
- ``"filtered"``: HSTU. Every item in the user's history is removed from the ranking. If the target
  itself appears in the history it is removed too, and that user counts as a **miss** (rank ``num_items``).

Ranks are 0-based and **pessimistic**: an item whose score equals the target's is ranked above it. A
constant scorer therefore never gets credit for a hit, whichever order the items happen to be stored in.

Dot-product scores (``score_ranks``) are ranked by canonical float64 scores (fixed summation order), with a
fast fp32 matmul deciding everything that is not a near-tie, so ranks do not depend on chunking, batching,
device or BLAS kernel. See ``score_ranks``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ssd4rec_torchrec.ops.canonical import (
    _cannot_overflow,
    _canonical_dot,
    _check_block,
    _check_vectors,
    _chunk_bounds,
    _compute_dtype,
    _error_margin,
    _round_outward,
    canonical_target_scores,
)
from ssd4rec_torchrec.ops.history import PROTOCOLS, _check_protocols, _check_targets, _History, _true

__all__ = [
    "PROTOCOLS",
    "block_rank_counts",
    "finish_ranks",
    "ranks_from_scores",
    "score_ranks",
    "target_ranks",
]


# --------------------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------------------


def _clear_target_columns(above: Tensor, lo: int, target_cols: Tensor) -> Tensor:
    """Set ``above[b, target_cols[b] - lo] = False`` for the targets inside columns ``lo .. lo + w - 1``."""
    inside = (target_cols >= lo) & (target_cols < lo + above.shape[-1])
    rows = inside.nonzero().squeeze(1)
    above.index_put_((rows, target_cols[rows] - lo), ~_true(above.device))
    return above


def _check_no_nan(scores: Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; ranks would be undefined")


def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based pessimistic rank of each row's target column among the non-excluded columns.

    ``rank[b] = #{j not excluded, j != t : s[b, j] > s[b, t]} + #{j not excluded, j != t : s[b, j] == s[b, t]}``
    with ``t = targets[b]``: ties count against the target. If the target column itself is excluded the
    rank is ``C`` (the number of columns), which is a miss at every cutoff ``k <= C``. Scores are compared
    exactly as given (±inf allowed).

    Args:
        scores: (B, C) floating scores; NaN raises ``ValueError``.
        targets: (B,) integer column indices in ``0 .. C - 1``.
        exclude: optional (B, C) bool; True columns are removed from the ranking.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor (B, C), got {getattr(scores, 'shape', type(scores))}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    batch, cols = scores.shape
    targets = _check_targets(targets, batch, 0, cols - 1, "column indices").to(scores.device)
    if exclude is not None:
        if exclude.dtype != torch.bool or tuple(exclude.shape) != (batch, cols):
            raise ValueError(
                f"exclude must be a bool tensor of shape {(batch, cols)}, got {exclude.dtype} {tuple(exclude.shape)}"
            )
        exclude = exclude.to(scores.device)
    _check_no_nan(scores)
    if batch == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    target_scores = scores.gather(1, targets.unsqueeze(1))
    above = _clear_target_columns(scores >= target_scores, 0, targets)
    if exclude is None:
        return above.sum(1)
    ranks = (above & ~exclude).sum(1)
    target_excluded = exclude.gather(1, targets.unsqueeze(1)).squeeze(1)
    return torch.where(target_excluded, torch.full_like(ranks, cols), ranks)


# A function of one item chunk: (column offset, chunk width) -> (B, width) bool "scores >= the target's score".
_AtOrAboveFn = Callable[[int, int], Tensor]


def _ranks_over_chunks(
    at_or_above: _AtOrAboveFn,
    bounds: Sequence[tuple[int, int]],
    num_items: int,
    batch: int,
    device: torch.device,
    target_cols: Tensor,
    history: _History,
    protocols: tuple[str, ...],
) -> dict[str, Tensor]:
    """Count, per protocol, the columns that score at or above each target, one item chunk at a time."""
    counts = {p: torch.zeros(batch, dtype=torch.long, device=device) for p in protocols}
    if batch == 0:
        return counts
    for lo, hi in bounds:
        above = _clear_target_columns(at_or_above(lo, hi), lo, target_cols)
        if "unfiltered" in counts:
            counts["unfiltered"] += above.sum(1)
        if "filtered" in counts:
            counts["filtered"] += (above & ~history.mask(lo, hi)).sum(1)
    if "filtered" in counts:
        seen = history.contains(target_cols)
        counts["filtered"] = torch.where(seen, torch.full_like(counts["filtered"], num_items), counts["filtered"])
    return counts


def block_rank_counts(
    user_vectors: Tensor,
    item_block: Tensor,
    targets: Tensor,
    target_scores: Tensor,
    *,
    first_col: int,
    num_items: int,
    history_values: Tensor,
    history_offsets: Tensor,
    protocols: Sequence[str] = PROTOCOLS,
    chunk_items: int | None = None,
) -> dict[str, Tensor]:
    """Per protocol, how many items of one block of columns score at or above each user's target.

    ``item_block`` holds the vectors of item columns ``first_col .. first_col + n - 1`` (items
    ``first_col + 1 ..``); ``target_scores`` are the targets' canonical scores (``canonical_target_scores``,
    summed over blocks). The target column itself is never counted; ``"filtered"`` skips the user's
    history. Summing the counts of disjoint blocks that cover the catalog and applying ``finish_ranks``
    gives exactly ``score_ranks`` - that is how a row-wise sharded table is ranked without any rank holding
    the whole table.
    """
    _check_vectors(user_vectors, item_block)
    protocols = _check_protocols(protocols)
    _check_block(first_col, item_block.shape[0], num_items)
    batch, device = user_vectors.shape[0], user_vectors.device
    targets = _check_targets(targets, batch, 1, num_items, "item indices").to(device)
    bounds = [(first_col + lo, first_col + hi) for lo, hi in _chunk_bounds(item_block.shape[0], chunk_items)]
    history = _History(history_values, history_offsets, batch, num_items, device,
                       chunked=bounds != [(0, num_items)])
    counts = {p: torch.zeros(batch, dtype=torch.long, device=device) for p in protocols}
    if batch == 0 or item_block.shape[0] == 0:
        return counts
    dtype = _compute_dtype(user_vectors, item_block)
    users = user_vectors.to(dtype)
    users_t = user_vectors.to(torch.float64).T.contiguous()
    block_t = item_block.to(torch.float64).T.contiguous()
    target_scores = target_scores.to(device=device, dtype=torch.float64)
    margin = _error_margin(users_t, block_t, dtype, device)
    upper = _round_outward(target_scores + margin, dtype, up=True).unsqueeze(1)
    lower = _round_outward(target_scores - margin, dtype, up=False).unsqueeze(1)
    target_cols = targets - 1
    bounded = _cannot_overflow(users_t, block_t, dtype)

    for lo, hi in bounds:
        scores = users @ item_block[lo - first_col : hi - first_col].to(dtype).T
        if not bounded and not bool(torch.isfinite(scores).all()):
            raise ValueError("scores overflowed to inf / NaN; rescale the vectors or pass float64")
        above = scores > upper
        near_rows, near_cols = ((scores >= lower) & ~above).nonzero(as_tuple=True)
        if near_rows.numel():
            exact = _canonical_dot(users_t, block_t, near_rows, near_cols + (lo - first_col))
            exact = exact >= target_scores[near_rows]
            above.index_put_((near_rows, near_cols), exact)
        above = _clear_target_columns(above, lo, target_cols)
        above_count = above.sum(1)
        if "unfiltered" in counts:
            counts["unfiltered"] += above_count
        if "filtered" in counts:  # minus the (distinct) history items counted above
            rows, cols = history.pairs(lo, hi)
            counts["filtered"] += above_count - torch.bincount(rows[above[rows, cols]], minlength=batch)
    return counts


def finish_ranks(counts: dict[str, Tensor], targets: Tensor, *, num_items: int, history_values: Tensor,
                 history_offsets: Tensor) -> dict[str, Tensor]:
    """Block counts summed over the whole catalog -> ranks: a filtered target inside the history is a miss."""
    if "filtered" not in counts:
        return dict(counts)
    batch = counts["filtered"].numel()
    device = counts["filtered"].device
    targets = _check_targets(targets, batch, 1, num_items, "item indices").to(device)
    history = _History(history_values, history_offsets, batch, num_items, device)
    seen = history.contains(targets - 1)
    out = dict(counts)
    out["filtered"] = torch.where(seen, torch.full_like(counts["filtered"], num_items), counts["filtered"])
    return out


def score_ranks(
    user_vectors: Tensor,
    item_vectors: Tensor,
    targets: Tensor,
    *,
    history_values: Tensor,
    history_offsets: Tensor,
    protocols: Sequence[str] = PROTOCOLS,
    chunk_items: int | None = None,
) -> dict[str, Tensor]:
    """Pessimistic 0-based rank of each user's target under each protocol, scoring by dot product.

    Args:
        user_vectors: (B, d) user representations.
        item_vectors: (num_items, d); row ``r`` is item ``r + 1`` (no padding / mask rows).
        targets: (B,) item indices in ``1 .. num_items``.
        history_values, history_offsets: the users' histories, jagged ((H,) item indices, (B + 1,) offsets).
            0 (padding) and ``num_items + 1`` (mask) are ignored. Only used by ``"filtered"`` (always validated).
        protocols: any of ``"unfiltered"`` (RecBole: nothing filtered) and ``"filtered"`` (HSTU: the user's
            history is excluded; a target inside the history is a miss, rank ``num_items``).
        chunk_items: score ``chunk_items`` items at a time, so memory is O(B * chunk_items) rather than
            O(B * num_items). Ranks are identical with or without chunking.

    How ties stay exact: scores are ``user_vectors @ item_vectors.T`` with at least fp32 accumulation, but a
    matmul's rounding depends on its shape and kernel, so two items with equal scores can come out a few ulps
    apart in one chunking and not in another. The matmul therefore only decides items that are above or below
    the target by more than a rigorous error bound (``(2 u_in + (d + 2) u) * |user| * max |item|``, doubled);
    the few inside that band, and the target itself, are re-scored with a fixed-order float64 dot product
    (``canonical_scores``) and compared exactly. The rank is thus the pessimistic rank under those canonical
    scores, independent of chunking, batching, sharding, device and BLAS. Returns ``{protocol: (B,) int64}``.
    A sharded table is ranked block by block: ``block_rank_counts`` + ``finish_ranks``.
    """
    _check_vectors(user_vectors, item_vectors)
    num_items = item_vectors.shape[0]
    if num_items < 1:
        raise ValueError("item_vectors must have at least one item row")
    protocols = _check_protocols(protocols)
    _chunk_bounds(num_items, chunk_items)
    batch, device = user_vectors.shape[0], user_vectors.device
    targets = _check_targets(targets, batch, 1, num_items, "item indices").to(device)
    if batch == 0:
        _History(history_values, history_offsets, batch, num_items, device)
        return {p: torch.zeros(0, dtype=torch.long, device=device) for p in protocols}
    target_scores, _ = canonical_target_scores(user_vectors, item_vectors, targets)
    counts = block_rank_counts(user_vectors, item_vectors, targets, target_scores, first_col=0, num_items=num_items,
                               history_values=history_values, history_offsets=history_offsets, protocols=protocols,
                               chunk_items=chunk_items)
    return finish_ranks(counts, targets, num_items=num_items, history_values=history_values,
                        history_offsets=history_offsets)


def _shared_score_ranks(scores: Tensor, target_cols: Tensor, history: _History, num_items: int,
                        protocols: tuple[str, ...]) -> dict[str, Tensor]:
    """``ranks_from_scores`` for one (num_items,) score vector shared by every user, in O(num_items) memory
    whatever the batch: the scores are sorted once and each target's count of items at or above it is a
    binary search; the filtered count subtracts the user's distinct history items at or above it."""
    target_scores = scores[target_cols]
    at_or_above = num_items - torch.searchsorted(torch.sort(scores).values, target_scores, side="left")
    out = {}
    if "unfiltered" in protocols:
        out["unfiltered"] = at_or_above - 1  # the target itself is not counted
    if "filtered" in protocols:
        rows, cols = history.rows, history.cols
        hit = (scores[cols] >= target_scores[rows]) & (cols != target_cols[rows])
        filtered = at_or_above - 1 - torch.bincount(rows[hit], minlength=target_cols.numel())
        seen = history.contains(target_cols)
        out["filtered"] = torch.where(seen, torch.full_like(filtered, num_items), filtered)
    return {p: out[p] for p in protocols}


def ranks_from_scores(
    scores: Tensor,
    targets: Tensor,
    *,
    history_values: Tensor,
    history_offsets: Tensor,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, Tensor]:
    """Like ``score_ranks`` but from precomputed scores over the item columns, compared exactly as given.

    ``scores`` is (B, num_items), or (num_items,) shared by every user (e.g. ``popularity_scores``), in which
    case B is ``targets.numel()``. Column ``c`` is item ``c + 1``. NaN raises ``ValueError``.
    """
    if not isinstance(scores, Tensor) or scores.dim() not in (1, 2) or not scores.dtype.is_floating_point:
        raise ValueError(
            "scores must be a floating (B, num_items) or (num_items,) tensor, got "
            f"{getattr(scores, 'shape', type(scores))} {getattr(scores, 'dtype', '')}"
        )
    protocols = _check_protocols(protocols)
    batch = targets.numel() if scores.dim() == 1 else scores.shape[0]
    num_items, device = scores.shape[-1], scores.device
    if num_items < 1:
        raise ValueError("scores must cover at least one item")
    targets = _check_targets(targets, batch, 1, num_items, "item indices").to(device)
    history = _History(history_values, history_offsets, batch, num_items, device)
    _check_no_nan(scores)
    target_cols = targets - 1
    if scores.dim() == 1:
        return _shared_score_ranks(scores, target_cols, history, num_items, protocols)
    scores = scores.expand(batch, num_items)
    target_scores = scores.gather(1, target_cols.unsqueeze(1)) if batch else None

    def at_or_above(lo: int, hi: int) -> Tensor:
        return scores[:, lo:hi] >= target_scores

    return _ranks_over_chunks(at_or_above, [(0, num_items)], num_items, batch, device, target_cols, history, protocols)
