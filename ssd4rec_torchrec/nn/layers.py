"""Bidirectional SSD layer (SSD4Rec's Bi-SSD block) and its position-wise feed-forward network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.mixer import SSDMixer
from ssd4rec_torchrec.ops import reverse_segments_index

__all__ = ["BiSSDLayer", "PositionwiseFeedForward"]


class PositionwiseFeedForward(nn.Module):
    """SSD4Rec's PFFN: `Dropout(LayerNorm(W2(Dropout(GELU(W1 h))) + h))`.

    The final dropout comes after the LayerNorm, as in the official code (unlike Mamba4Rec).
    """

    def __init__(self, d_model: int, inner_size: int, dropout: float = 0.2, ln_eps: float = 1e-12) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.LayerNorm = nn.LayerNorm(d_model, eps=ln_eps)
        self.dropout = Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.w_2(self.dropout(self.activation(self.w_1(h))))
        return self.dropout(self.LayerNorm(out + h))


class BiSSDLayer(nn.Module):
    """One Bi-SSD block on packed sequences: `forward(x (T, d), offsets (S+1,)) -> (T, d)`.

    `F = mixer(x)`, `R = mixer_bwd(x[rev])` with every segment reversed in place,
    `H = Dropout(LayerNorm(F + beta * R' + x))`, output `PFFN(H)`, where `R' = R[rev]` when
    `flip_back=True` (position t gets the backward summary of t..end of its segment) and `R' = R` when
    `flip_back=False`, which is the official code's behaviour: position t receives the backward output of
    the mirrored position `s + e - t`. With `share_backward_weights=True` (official) one mixer serves both
    directions.

    `mixer_kwargs` go to `SSDMixer` (d_state, headdim, chunk_size, kernel, ...).
    """

    # Shared weights and T <= this: both directions run as one packed call of 2T tokens (5-15% faster on
    # CPU for small batches); above it they run one after the other, which halves the scan's transient
    # memory (identical results either way).
    fuse_directions_max_tokens: int = 16384

    def __init__(
        self,
        d_model: int,
        *,
        dropout: float = 0.2,
        beta: float = 0.1,
        share_backward_weights: bool = True,
        flip_back: bool = True,
        ffn_mult: int = 4,
        ln_eps: float = 1e-12,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.share_backward_weights = share_backward_weights
        self.flip_back = flip_back
        self.forward_ssd = SSDMixer(d_model, **mixer_kwargs)
        self.backward_ssd = None if share_backward_weights else SSDMixer(d_model, **mixer_kwargs)
        self.LayerNorm = nn.LayerNorm(d_model, eps=ln_eps)
        self.dropout = Dropout(dropout)
        self.ffn = PositionwiseFeedForward(d_model, ffn_mult * d_model, dropout=dropout, ln_eps=ln_eps)

    def directions(
        self, x: torch.Tensor, offsets: torch.Tensor, rev_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(F, R')`: forward mixer output and the (optionally flipped back) backward output."""
        n_tok = x.shape[0]
        rev = reverse_segments_index(offsets, n_tok) if rev_index is None else rev_index
        x_rev = x[rev]
        if self.backward_ssd is None and n_tok <= self.fuse_directions_max_tokens:
            both_offsets = torch.cat([offsets, offsets[1:] + n_tok])
            both = self.forward_ssd(torch.cat([x, x_rev]), both_offsets)
            fwd, bwd = both[:n_tok], both[n_tok:]
        else:
            fwd = self.forward_ssd(x, offsets)
            bwd = (self.forward_ssd if self.backward_ssd is None else self.backward_ssd)(x_rev, offsets)
        if self.flip_back:
            bwd = bwd[rev]
        return fwd, bwd

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rev_index: torch.Tensor | None = None) -> torch.Tensor:
        """`rev_index`: precomputed `reverse_segments_index(offsets)` (the encoder shares it across layers)."""
        if self.beta == 0:  # forward only: a causal layer, and the backward scan is not computed at all
            h = self.dropout(self.LayerNorm(self.forward_ssd(x, offsets) + x))
            return self.ffn(h)
        fwd, bwd = self.directions(x, offsets, rev_index)
        h = self.dropout(self.LayerNorm(fwd + self.beta * bwd + x))
        return self.ffn(h)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, share_backward_weights={self.share_backward_weights}, flip_back={self.flip_back}"
