"""Bidirectional SSD layer (SSD4Rec's Bi-SSD block) and its position-wise feed-forward network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.mixer import SSDMixer
from ssd4rec_torchrec.ops import reverse_segments_index
from ssd4rec_torchrec.ops.bidirectional import _AddDirections, _StackReversedSplit, reverse_rows

__all__ = ["BACKWARD_SCOPES", "BiSSDLayer", "PositionwiseFeedForward", "reverse_rows"]

# What the backward branch scans for row t: the whole sequence (SSD4Rec), or only the prefix ending at t, read at
# its end (the every-prefix objective's read-out for all t at once; the layer is then causal).
BACKWARD_SCOPES = ("sequence", "prefix")


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
    directions, and its per-token projections run once for both: `in_proj(x[rev]) = in_proj(x)[rev]`, and
    `out_proj` is affine, so `F + beta * R' = out_proj(y_f + beta * y_b') (+ beta * bias)` with `y` the
    mixer core's outputs; only the conv, scan and norm (`SSDMixer.mix`) run on both directions.

    `backward_scope="prefix"` (with `flip_back=False`) gives row t the backward branch of its own prefix
    ``s..t`` - exactly what the layer computes at the read-out token when run on that prefix alone - for every
    t in one pass: the layer is causal, and a next-item loss at every row trains every prefix's read-out.

    `mixer_kwargs` go to `SSDMixer` (d_state, headdim, chunk_size, kernel, ...).
    """

    # Shared weights and T <= this: both directions' mixer cores run as one packed call of 2T tokens (5-15%
    # faster on CPU for small batches); above it they run one after the other, which halves the scan's
    # transient memory (identical results either way).
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
        backward_scope: str = "sequence",
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        if backward_scope not in BACKWARD_SCOPES:
            raise ValueError(f"backward_scope must be one of {BACKWARD_SCOPES}, got {backward_scope!r}")
        if backward_scope == "prefix" and flip_back:
            raise ValueError("backward_scope='prefix' is the un-flipped backward branch read at each prefix's end; "
                             "it needs flip_back=False")
        self.beta = beta
        self.share_backward_weights = share_backward_weights
        self.flip_back = flip_back
        self.backward_scope = backward_scope
        self.forward_ssd = SSDMixer(d_model, **mixer_kwargs)
        self.backward_ssd = None if share_backward_weights else SSDMixer(d_model, **mixer_kwargs)
        self.LayerNorm = nn.LayerNorm(d_model, eps=ln_eps)
        self.dropout = Dropout(dropout)
        self.ffn = PositionwiseFeedForward(d_model, ffn_mult * d_model, dropout=dropout, ln_eps=ln_eps)

    def _shares_projections(self) -> bool:
        # isinstance: tests may swap in stand-in mixers that only have `forward`.
        return self.backward_ssd is None and isinstance(self.forward_ssd, SSDMixer)

    def _cores(self, zx: torch.Tensor, offsets: torch.Tensor, rev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Shared mixer core on both directions of `zx = in_proj(x)`.

        Fused: `((2T, d_inner) [y_f; y_b],)`; sequential: `(y_f, y_b)`; `y_b` in reversed token order.
        """
        m = self.forward_ssd
        n_tok = zx.shape[0]
        if n_tok <= self.fuse_directions_max_tokens:
            both_offsets = torch.cat([offsets, offsets[1:] + n_tok])
            return (m.mix_parts(*_StackReversedSplit.apply(zx, rev, m.split_sizes), both_offsets),)
        return m.mix(zx, offsets), m.mix(reverse_rows(zx, rev), offsets)

    def directions(
        self, x: torch.Tensor, offsets: torch.Tensor, rev_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(F, R')`: forward mixer output and the (optionally flipped back) backward output.

        `forward` only needs `F + beta * R'`, which it computes with one `out_proj` (see `mixed`).
        """
        n_tok = x.shape[0]
        rev = reverse_segments_index(offsets, n_tok) if rev_index is None else rev_index
        if self._shares_projections():
            m = self.forward_ssd
            ys = self._cores(m.project_in(x), offsets, rev)
            fwd, bwd = (ys[0][:n_tok], ys[0][n_tok:]) if len(ys) == 1 else ys
            fwd, bwd = m.project_out(fwd), m.project_out(bwd)
        else:
            fwd = self.forward_ssd(x, offsets)
            bwd = (self.forward_ssd if self.backward_ssd is None else self.backward_ssd)(reverse_rows(x, rev), offsets)
        if self.flip_back:
            bwd = reverse_rows(bwd, rev)
        return fwd, bwd

    def mixed(self, x: torch.Tensor, offsets: torch.Tensor, rev_index: torch.Tensor | None = None) -> torch.Tensor:
        """`F + beta * R'` (beta > 0); shared weights: `in_proj` and `out_proj` run once, on T tokens."""
        if not self._shares_projections():
            fwd, bwd = self.directions(x, offsets, rev_index)
            return fwd + self.beta * bwd
        n_tok = x.shape[0]
        rev = reverse_segments_index(offsets, n_tok) if rev_index is None else rev_index
        m = self.forward_ssd
        ys = self._cores(m.project_in(x), offsets, rev)
        if len(ys) == 1:
            y = _AddDirections.apply(ys[0], rev if self.flip_back else None, self.beta)
        else:
            y_f, y_b = ys
            y = y_f + self.beta * (reverse_rows(y_b, rev) if self.flip_back else y_b)
        return m.project_out(y, 1.0 + self.beta)

    def prefix_mixed(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`F + beta * R` with the backward branch of `backward_scope='prefix'`: row t gets the un-flipped
        backward output of the history ``s..t`` (`SSDMixer.mix_prefix_reverse`), so every row depends only on
        its segment's tokens up to itself. With shared weights `in_proj`/`out_proj` run once for both."""
        m = self.forward_ssd
        zx = m.project_in(x)
        if self.backward_ssd is None:
            y = m.mix(zx, offsets) + self.beta * m.mix_prefix_reverse(zx, offsets)
            return m.project_out(y, 1.0 + self.beta)
        b = self.backward_ssd
        return m.project_out(m.mix(zx, offsets)) + self.beta * b.project_out(
            b.mix_prefix_reverse(b.project_in(x), offsets))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rev_index: torch.Tensor | None = None) -> torch.Tensor:
        """`rev_index`: precomputed `reverse_segments_index(offsets)` (the encoder shares it across layers)."""
        if self.beta != 0 and self.backward_scope == "prefix":
            h = self.dropout(self.LayerNorm(self.prefix_mixed(x, offsets) + x))
            return self.ffn(h)
        if self.beta == 0:  # forward only: a causal layer, and the backward scan is not computed at all
            h = self.dropout(self.LayerNorm(self.forward_ssd(x, offsets) + x))
            return self.ffn(h)
        h = self.dropout(self.LayerNorm(self.mixed(x, offsets, rev_index) + x))
        return self.ffn(h)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, share_backward_weights={self.share_backward_weights}, flip_back={self.flip_back}, "
                f"backward_scope={self.backward_scope!r}")
