"""Input checks of the ranking kernels and a user batch's jagged history as (row, column) pairs.

Item index convention (see ``ssd4rec_torchrec.data.preprocess``): ``0`` is padding, items are
``1 .. num_items``, ``num_items + 1`` is the mask token; column ``c`` is item ``c + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PROTOCOLS"]

PROTOCOLS: tuple[str, ...] = ("unfiltered", "filtered")


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
