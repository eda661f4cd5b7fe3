"""Segment helpers: ids, in-segment positions, per-segment reversal, offsets validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_reference import offsets_of

from ssd4rec_torchrec.ops import (
    offsets_from_lengths,
    reverse_segments_index,
    segment_ids,
    segment_positions,
    validate_offsets,
)


def test_examples() -> None:
    off = offsets_of([2, 0, 3, 1])
    assert segment_ids(off).tolist() == [0, 0, 2, 2, 2, 3]
    assert segment_ids(off, 6).tolist() == [0, 0, 2, 2, 2, 3]
    assert segment_positions(off).tolist() == [0, 1, 0, 1, 2, 0]
    assert reverse_segments_index(off).tolist() == [1, 0, 4, 3, 2, 5]
    assert offsets_from_lengths(torch.tensor([2, 0, 3, 1])).tolist() == off.tolist()
    assert offsets_from_lengths(torch.tensor([2, 0, 3, 1])).dtype == torch.int64


def test_empty() -> None:
    off = offsets_of([])
    assert segment_ids(off).numel() == 0
    assert reverse_segments_index(off).numel() == 0
    validate_offsets(off, 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=30))
def test_reverse_is_involution_and_reverses(lengths: list[int]) -> None:
    off = offsets_of(lengths)
    T = sum(lengths)
    rev = reverse_segments_index(off)
    assert torch.equal(rev[rev], torch.arange(T))
    values = torch.arange(T)
    expected = torch.cat([values[int(off[s]):int(off[s + 1])].flip(0) for s in range(len(lengths))]) \
        if lengths else values
    assert torch.equal(values[rev], expected)
    assert torch.equal(segment_ids(off)[rev], segment_ids(off))  # segment order kept


@pytest.mark.parametrize(
    ("offsets", "total", "match"),
    [
        (torch.tensor([0, 2, 5], dtype=torch.int32), 5, "int64"),
        (torch.tensor([], dtype=torch.int64), 0, "1-D"),
        (torch.tensor([[0, 5]]), 5, "1-D"),
        (torch.tensor([2, 5]), 5, r"\[0\] must be 0"),
        (torch.tensor([0, 3, 2, 5]), 5, "non-decreasing"),
        (torch.tensor([0, 2, 5]), 6, "T=6"),
        ([0, 2, 5], 5, "torch.Tensor"),
    ],
)
def test_validate_offsets_errors(offsets, total: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_offsets(offsets, total)


def test_offsets_from_lengths_rejects_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        offsets_from_lengths(torch.tensor([1, -1]))
