"""Full-ranking evaluation: pessimistic target ranks under two history protocols, and HR / NDCG / MRR.

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

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "PROTOCOLS",
    "RankingMetrics",
    "block_rank_counts",
    "block_topk",
    "canonical_scores",
    "canonical_target_scores",
    "evaluate_protocols",
    "evaluate_scores",
    "finish_ranks",
    "merge_topk",
    "popularity_scores",
    "ranks_from_scores",
    "score_ranks",
    "target_ranks",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)
PROTOCOLS: tuple[str, ...] = ("unfiltered", "filtered")

# A score function for ``evaluate_scores``: (start, end) user slice -> (end - start, num_items) scores,
# or (num_items,) scores shared by every user of the slice.
ScoresFn = Callable[[int, int], Tensor]


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------


def _check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    protocols = tuple(protocols)
    if not protocols:
        raise ValueError("protocols must not be empty")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; expected a subset of {PROTOCOLS}")
    if len(set(protocols)) != len(protocols):
        raise ValueError(f"protocols must be unique, got {protocols}")
    return protocols


def _check_int_vector(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    return t.long()


def _check_targets(targets: Tensor, batch: int, low: int, high: int, what: str) -> Tensor:
    """``targets`` as int64 of length ``batch`` with values in ``[low, high]``."""
    targets = _check_int_vector("targets", targets)
    if targets.numel() != batch:
        raise ValueError(f"targets has {targets.numel()} entries but there are {batch} users")
    if batch and (int(targets.min()) < low or int(targets.max()) > high):
        raise ValueError(
            f"targets must be {what} in [{low}, {high}], got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    return targets


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must be unique, got {ks}")
    return tuple(sorted(ks))


def _check_offsets(history_values: Tensor, history_offsets: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Validate a jagged (values, offsets) pair for ``batch`` users; returns both as int64."""
    values = _check_int_vector("history_values", history_values)
    offsets = _check_int_vector("history_offsets", history_offsets)
    if offsets.numel() != batch + 1:
        raise ValueError(f"history_offsets must have B + 1 = {batch + 1} entries, got {offsets.numel()}")
    if int(offsets[0]) != 0:
        raise ValueError(f"history_offsets[0] must be 0, got {int(offsets[0])}")
    if int(offsets[-1]) != values.numel():
        raise ValueError(
            f"history_offsets[-1] must equal len(history_values) = {values.numel()}, got {int(offsets[-1])}"
        )
    if batch and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("history_offsets must be non-decreasing")
    return values, offsets


# --------------------------------------------------------------------------------------------------------------
# history filter
# --------------------------------------------------------------------------------------------------------------


def _true(device: torch.device) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=device)


class _History:
    """A user batch's history as distinct (row, column) pairs of real items, sorted by column.

    Padding (0) and the mask token (num_items + 1) are dropped; anything else outside ``1 .. num_items``
    is an error. Built from jagged (values, offsets) without ever materialising a padded [B, L] tensor.
    """

    def __init__(
        self, values: Tensor, offsets: Tensor, batch: int, num_items: int, device: torch.device, chunked: bool = False
    ) -> None:
        values, offsets = _check_offsets(values, offsets, batch)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) > num_items + 1):
            raise ValueError(
                f"history_values must be item indices in [0, {num_items + 1}] (0 = padding, "
                f"{num_items + 1} = mask), got values in [{int(values.min())}, {int(values.max())}]"
            )
        values = values.to(device)
        lengths = (offsets[1:] - offsets[:-1]).to(device)
        rows = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
        real = (values >= 1) & (values <= num_items)
        cols = values[real] - 1
        rows = rows[real]
        # distinct (row, column) pairs sorted by column: a chunk takes its slice by binary search, and a
        # count of history items above the target subtracts each item once
        key = torch.unique(cols * max(batch, 1) + rows)
        cols, rows = key // max(batch, 1), key % max(batch, 1)
        self.rows, self.cols, self.batch, self.num_items, self.sorted = rows, cols, batch, num_items, chunked

    def pairs(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """(rows, columns - lo) of the distinct history entries in columns ``lo .. hi - 1``."""
        if (lo, hi) == (0, self.num_items):
            start, end = 0, self.cols.numel()
        elif self.sorted:
            start, end = torch.searchsorted(self.cols, torch.tensor([lo, hi], device=self.cols.device)).tolist()
        else:
            raise RuntimeError("_History.mask over a column range needs chunked=True")
        return self.rows[start:end], self.cols[start:end] - lo

    def mask(self, lo: int, hi: int) -> Tensor:
        """(B, hi - lo) bool: True where column ``lo + j`` is in that user's history."""
        rows, cols = self.pairs(lo, hi)
        out = torch.zeros(self.batch, hi - lo, dtype=torch.bool, device=self.cols.device)
        out.index_put_((rows, cols), _true(out.device))
        return out

    def contains(self, target_cols: Tensor) -> Tensor:
        """(B,) bool: whether each user's target column is in their history."""
        hit = self.cols == target_cols[self.rows]
        out = torch.zeros(self.batch, dtype=torch.bool, device=self.cols.device)
        out.index_put_((self.rows[hit],), _true(out.device))
        return out


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


def _chunk_bounds(num_items: int, chunk_items: int | None) -> list[tuple[int, int]]:
    if chunk_items is None:
        return [(0, num_items)]
    if isinstance(chunk_items, bool) or not isinstance(chunk_items, int) or chunk_items < 1:
        raise ValueError(f"chunk_items must be a positive int or None, got {chunk_items!r}")
    return [(lo, min(lo + chunk_items, num_items)) for lo in range(0, num_items, chunk_items)]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Promote to at least float32 so half / bfloat16 embeddings are scored with fp32 accumulation."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


_INPUT_ROUNDOFF = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
_LEGACY_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def _fp32_matmul_input_roundoff(device: torch.device) -> float:
    """Unit roundoff of the operands of an fp32 matmul on ``device`` (0 for IEEE fp32, more with TF32 / bf16).

    Reads the backend's ``fp32_precision`` (falling back to the legacy global setting); anything unknown
    is treated as bf16, the loosest, which only makes the near-tie band wider (slower, never wrong).
    """
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    setting = getattr(backend, "fp32_precision", "none")
    if setting == "none":
        try:
            setting = _LEGACY_PRECISION.get(torch.get_float32_matmul_precision(), "bf16")
        except RuntimeError:  # legacy and new precision APIs mixed: cannot tell, assume the loosest
            setting = "bf16"
    return _INPUT_ROUNDOFF.get(setting, _INPUT_ROUNDOFF["bf16"])


def _canonical_dot(users_t: Tensor, items_t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """float64 dot products of (user ``rows[p]``, item ``cols[p]``) summed in the fixed order k = 0 .. d-1.

    Separate elementwise multiplies and adds (no fused or blocked kernels), so each value depends only on the
    two vectors: bit-identical whatever the batch, chunking, device or BLAS. ``users_t``/``items_t`` are
    (d, B) / (d, num_items) float64. Memory O(len(rows)).
    """
    acc = torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
    for k in range(users_t.shape[0]):
        acc = acc + users_t[k][rows] * items_t[k][cols]
    return acc


def _round_outward(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``x`` (float64) cast to ``dtype``, rounded towards +inf (``up``) or -inf so the bound stays valid."""
    y = x.to(dtype)
    if dtype == torch.float64:
        return y
    wrong = y.to(torch.float64) < x if up else y.to(torch.float64) > x
    step = torch.full_like(y, math.inf if up else -math.inf)
    return torch.where(wrong, torch.nextafter(y, step), y)


def _check_vectors(user_vectors: Tensor, item_vectors: Tensor) -> None:
    for name, t in (("user_vectors", user_vectors), ("item_vectors", item_vectors)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a 2-D floating tensor, got {getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}"
            )
    if user_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(f"user_vectors has d={user_vectors.shape[1]} but item_vectors has d={item_vectors.shape[1]}")
    if user_vectors.device != item_vectors.device:
        raise ValueError(f"user_vectors on {user_vectors.device} but item_vectors on {item_vectors.device}")
    for name, t in (("user_vectors", user_vectors), ("item_vectors", item_vectors)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contain NaN or inf; scores would be undefined")


def _check_block(first_col: int, block_items: int, num_items: int) -> None:
    if isinstance(first_col, bool) or not isinstance(first_col, int) or first_col < 0:
        raise ValueError(f"first_col must be a non-negative int, got {first_col!r}")
    if first_col + block_items > num_items:
        raise ValueError(f"item block columns {first_col}..{first_col + block_items - 1} exceed num_items={num_items}")


def _error_margin(users_t: Tensor, block_t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-user bound (doubled) on |fast matmul score - canonical score| for every item of the block.

    ``(2 u_in + (d + 2) u + (d + 2) 2^-53) * |user| * max |item|`` (Cauchy-Schwarz on |u_k| |i_k|), times 2.
    """
    dim = users_t.shape[0]
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    input_roundoff = _fp32_matmul_input_roundoff(device) if dtype == torch.float32 else 0.0
    rel = 2.0 * (2.0 * input_roundoff + (dim + 2) * unit + (dim + 2) * 2.0**-53)
    item_norm = torch.linalg.vector_norm(block_t, dim=0).max() if block_t.shape[1] else block_t.new_zeros(())
    return rel * torch.linalg.vector_norm(users_t, dim=0) * item_norm


def _cannot_overflow(users_t: Tensor, block_t: Tensor, dtype: torch.dtype) -> bool:
    """True when no ``dtype`` matmul score of these (finite) vectors can reach inf: |score| <= |user| |item|
    (Cauchy-Schwarz) plus rounding, far below a quarter of the dtype's range. Spares a finiteness scan of
    every score chunk."""
    if users_t.shape[1] == 0 or block_t.shape[1] == 0:
        return True
    user_norm = float(torch.linalg.vector_norm(users_t, dim=0).max())
    return user_norm * float(torch.linalg.vector_norm(block_t, dim=0).max()) < torch.finfo(dtype).max / 4


def canonical_scores(user_vectors: Tensor, item_vectors: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """float64 scores of (user ``rows[p]``, item row ``cols[p]``) summed in the fixed order k = 0 .. d-1.

    The scores every ranking here is defined by: bit-identical whatever the batch, chunking, sharding,
    device or BLAS (see ``score_ranks``).
    """
    return _canonical_dot(user_vectors.to(torch.float64).T.contiguous(), item_vectors.to(torch.float64).T.contiguous(),
                          rows, cols)


def canonical_target_scores(user_vectors: Tensor, item_block: Tensor, targets: Tensor, first_col: int = 0
                            ) -> tuple[Tensor, Tensor]:
    """Canonical scores of each user's target *if its row is in the block* (columns ``first_col ..``).

    Returns ``(scores (B,) float64, inside (B,) bool)``; scores are 0 where the target lies outside, so
    summing over disjoint blocks (e.g. an all-reduce over the ranks of a row-wise sharded table) gives
    every target's score exactly (x + 0 = x).
    """
    cols = targets.to(user_vectors.device).long() - 1 - first_col
    inside = (cols >= 0) & (cols < item_block.shape[0])
    scores = torch.zeros(targets.numel(), dtype=torch.float64, device=user_vectors.device)
    rows = inside.nonzero().squeeze(1)
    if rows.numel():
        scores[rows] = canonical_scores(user_vectors, item_block, rows, cols[rows])
    return scores, inside


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


# --------------------------------------------------------------------------------------------------------------
# top-k under canonical scores (exact, shardable)
# --------------------------------------------------------------------------------------------------------------


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
    for start, end, values, offsets in _user_batches(num_users, batch_users, history_values, history_offsets):
        ranks = score_ranks(
            user_vectors[start:end],
            item_vectors,
            targets[start:end],
            history_values=values,
            history_offsets=offsets,
            protocols=protocols,
            chunk_items=chunk_items,
        )
        for p in protocols:
            metrics[p].update(ranks[p])
    return metrics


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
    for start, end, values, offsets in _user_batches(num_users, batch_users, history_values, history_offsets):
        ranks = ranks_from_scores(
            scores_fn(start, end),
            targets[start:end],
            history_values=values,
            history_offsets=offsets,
            protocols=protocols,
        )
        for p in protocols:
            metrics[p].update(ranks[p])
    return metrics


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
