"""Canonical float64 dot-product scores and the fp32 matmul error bounds that decide everything else.

A ranking is defined by canonical scores: float64 dot products summed in the fixed order k = 0 .. d-1, so a
score depends only on its two vectors (not on batch, chunking, sharding, device or BLAS). A fast matmul in
at least fp32 decides every item that is further than a rigorous error bound from the value that matters;
only the near-ties are re-scored canonically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["canonical_scores", "canonical_target_scores"]


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
