"""Shared helpers for the tests under tests/nn (small sizes; fp32; CPU)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ssd4rec_torchrec.nn import BiSSDEncoder

# Small but structurally complete: 4 heads of 8, 2 chunks per 32 tokens, 16-dim state.
SMALL: dict = {"d_state": 16, "headdim": 8, "chunk_size": 32}


def offsets_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """Jagged offsets (S+1,) int64 from segment lengths."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0)
    return out


def make_encoder(d_model: int = 16, n_layers: int = 2, seed: int = 0, **kw) -> BiSSDEncoder:
    """A small encoder with dropout off, in eval mode, deterministic weights."""
    torch.manual_seed(seed)
    kwargs = {**SMALL, "dropout": 0.0, **kw}
    return BiSSDEncoder(d_model, n_layers, **kwargs).eval()


class PrefixSumMixer(nn.Module):
    """Stand-in mixer whose output is known by hand: y_t = sum of x over its segment up to t.

    Written with plain Python slicing per segment, so it shares nothing with the library's helpers.
    """

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bounds = offsets.tolist()
        return torch.cat([torch.cumsum(x[s:e], 0) for s, e in itertools.pairwise(bounds)])
