"""Each user's top-k items under canonical scores: exact, per block of item columns, mergeable across blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
)
from ssd4rec_torchrec.ops.history import _History

__all__ = ["block_topk", "merge_topk"]


def _order_candidates(scores: Tensor, cols: Tensor, targets: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Rows of candidates sorted by score descending, then (pessimistic ties) the target after its tied
    items, then column ascending; the first ``k`` of each row."""
    order = torch.argsort(cols, dim=1, stable=True)
    scores, cols = scores.gather(1, order), cols.gather(1, order)
    if targets is not None:
        is_target = (cols == (targets.to(cols.device).long() - 1).unsqueeze(1)).to(torch.int8)
        order = torch.argsort(is_target, dim=1, stable=True)
        scores, cols = scores.gather(1, order), cols.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), cols.gather(1, order)


def block_topk(
    user_vectors: Tensor,
    item_block: Tensor,
    k: int,
    *,
    first_col: int = 0,
    num_items: int | None = None,
    history_values: Tensor | None = None,
    history_offsets: Tensor | None = None,
    targets: Tensor | None = None,
    chunk_items: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Each user's top-``min(k, n)`` items of one block of columns under canonical scores.

    Returns ``(scores (B, k') float64, cols (B, k') int64 global item columns)`` ordered by score descending,
    ties by column ascending except that a user's ``targets`` item (if given) goes after the items tied with
    it - the pessimistic convention of the ranks, so a dump reproduces the metrics even with ties. With a
    history, those items are excluded (score ``-inf``; they appear only if fewer than ``k`` others exist).
    Exact: candidates are every item within the fast matmul's error bound of the k-th fast score, re-scored
    canonically. ``merge_topk`` of the blocks' results equals the top-k of the whole catalog.
    """
    _check_vectors(user_vectors, item_block)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    num_items = item_block.shape[0] + first_col if num_items is None else num_items
    _check_block(first_col, item_block.shape[0], num_items)
    batch, device = user_vectors.shape[0], user_vectors.device
    history = None
    if history_values is not None:
        history = _History(history_values, history_offsets, batch, num_items, device,
                           chunked=(first_col, item_block.shape[0]) != (0, num_items) or chunk_items is not None)
    dtype = _compute_dtype(user_vectors, item_block)
    users = user_vectors.to(dtype)
    users_t = user_vectors.to(torch.float64).T.contiguous()
    block_t = item_block.to(torch.float64).T.contiguous()
    margin = _error_margin(users_t, block_t, dtype, device).unsqueeze(1)
    bounded = _cannot_overflow(users_t, block_t, dtype)
    best_scores = torch.zeros(batch, 0, dtype=torch.float64, device=device)
    best_cols = torch.zeros(batch, 0, dtype=torch.long, device=device)
    for lo, hi in _chunk_bounds(item_block.shape[0], chunk_items) if item_block.shape[0] else []:
        fast = users @ item_block[lo:hi].to(dtype).T
        if not bounded and not bool(torch.isfinite(fast).all()):
            raise ValueError("scores overflowed to inf / NaN; rescale the vectors or pass float64")
        if history is not None:  # finite scores above, so afterwards -inf marks exactly the excluded items
            fast.index_put_(history.pairs(first_col + lo, first_col + hi),
                            torch.tensor(-math.inf, dtype=fast.dtype, device=device))
        kk = min(k, hi - lo)
        kth = torch.topk(fast, kk, dim=1).values[:, -1:].to(torch.float64)
        # fast >= kth - margin, compared in the fast dtype: for a value x of that dtype, x >= t exactly when
        # x >= the smallest representable value >= t
        threshold = _round_outward(kth - margin, dtype, up=True)
        rows, cols = (fast >= threshold).nonzero(as_tuple=True)
        exact = _canonical_dot(users_t, block_t, rows, cols + lo)
        if history is not None:
            exact = exact.masked_fill(fast[rows, cols] == -math.inf, -math.inf)
        # Order only the candidates (>= kk per row), packed row by row; padding (score -inf, column past the
        # catalog) sorts after every real column. Same result as ordering the whole chunk with non-candidates
        # at -inf: a row whose k-th fast score is finite has >= kk finite candidates, one whose k-th is -inf
        # has every column as a candidate.
        per_row = torch.bincount(rows, minlength=batch)
        width = max(int(per_row.max()) if rows.numel() else 0, kk)
        slot = torch.arange(rows.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[rows]
        cand_scores = torch.full((batch, width), -math.inf, dtype=torch.float64, device=device)
        cand_cols = torch.full((batch, width), num_items, dtype=torch.long, device=device)
        cand_scores[rows, slot] = exact
        cand_cols[rows, slot] = cols + (first_col + lo)
        scores, picked = _order_candidates(cand_scores, cand_cols, targets, kk)
        best_scores, best_cols = merge_topk([best_scores, scores], [best_cols, picked], k, targets=targets)
    return best_scores, best_cols


def merge_topk(scores: Sequence[Tensor], cols: Sequence[Tensor], k: int, *, targets: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
    """Merge per-block (or per-rank) top-k lists of the same users into the overall top-k (same order rule
    as ``block_topk``)."""
    return _order_candidates(torch.cat(list(scores), dim=1), torch.cat(list(cols), dim=1), targets, k)
