"""Helpers for packed variable-length sequences in the TorchRec jagged convention.

A batch of S sequences is stored as one flat token axis of length T plus `offsets` (int64, shape
`(S+1,)`, `offsets[0] == 0`, non-decreasing, `offsets[-1] == T`); sequence s owns tokens
`offsets[s] .. offsets[s+1]-1`. Empty sequences (equal consecutive offsets) are allowed.
"""

from __future__ import annotations

import torch

__all__ = [
    "offsets_from_lengths",
    "reverse_segments_index",
    "segment_ids",
    "segment_positions",
    "validate_offsets",
]


def validate_offsets(offsets: torch.Tensor, total: int | None = None, *, name: str = "offsets") -> None:
    """Raise `ValueError` unless `offsets` is a valid jagged offsets tensor (for `total` tokens if given).

    Checks: 1-D int64 with at least one entry, `offsets[0] == 0`, non-decreasing and `offsets[-1] == total`.
    The value checks cost one host synchronisation (a single `.item()`), which is why hot paths that already
    validated once may skip this.
    """
    if not isinstance(offsets, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 (TorchRec jagged convention), got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with S+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    decreasing = (offsets[1:] < offsets[:-1]).sum()
    first_v, last_v, n_bad = torch.stack([offsets[0], offsets[-1], decreasing]).tolist()  # one sync
    monotone = n_bad == 0
    if first_v != 0:
        raise ValueError(f"{name}[0] must be 0, got {first_v}")
    if not monotone:
        raise ValueError(f"{name} must be non-decreasing (segment lengths >= 0)")
    if total is not None and last_v != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens T={total}, got {last_v}")


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Return int64 offsets `(S+1,)` = `[0, cumsum(lengths)]`; raises `ValueError` on negative lengths."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    out = lengths.new_zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=out[1:])
    return out


def segment_ids(offsets: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """Per-token segment index (int64, shape `(T,)`): token t belongs to segment `segment_ids[t]`.

    `T` defaults to `offsets[-1]` (one host sync); pass it when known to stay sync-free.
    """
    if T is None:
        T = int(offsets[-1])
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.arange(lengths.numel(), device=offsets.device, dtype=torch.int64)
    return torch.repeat_interleave(seg, lengths, output_size=T)


def segment_positions(offsets: torch.Tensor, T: int | None = None, seg: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token position inside its own segment (int64, 0 at each segment's first token)."""
    if seg is None:
        seg = segment_ids(offsets, T)
    return torch.arange(seg.numel(), device=offsets.device, dtype=torch.int64) - offsets[seg]


def reverse_segments_index(offsets: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """Permutation (int64, `(T,)`) that reverses every segment in place and keeps the segment order.

    `x[reverse_segments_index(offsets)]` maps a segment stored at `s..e` to `x[e], x[e-1], ..., x[s]`
    (SSD4Rec's `flip_index`). The permutation is its own inverse.
    """
    seg = segment_ids(offsets, T)
    t = torch.arange(seg.numel(), device=offsets.device, dtype=torch.int64)
    return offsets[seg] + offsets[seg + 1] - 1 - t
