"""Transformer baselines (SASRec, BERT4Rec) on packed jagged sequences, drop-in for `BiSSDEncoder`.

Same call signature as `BiSSDEncoder`: `forward(values (T, d), offsets (S+1,) int64) -> (T, d)`, outputs in
the original packed token order. Architecture follows RecBole 1.2.1 (`SASRec` / `BERT4Rec` + their
`TransformerEncoder`): item embedding + learned absolute position within the segment, embedding
LayerNorm + Dropout, then post-LN blocks `LN(h + Dropout(MHA(h)))`, `LN(h + Dropout(W2 GELU(W1 h)))`, and the
N(0, 0.02) init. Only attention needs a rectangular layout: every per-token op (projections, FFN, LayerNorm)
runs on the packed (T, d) tokens, and attention runs on length buckets of segments (`JaggedAttentionPlan`),
so padding waste is bounded by `1 / bucket_ratio` however skewed the segment lengths are.

Objectives are wired elsewhere: SASRec's output at token t (it sees tokens <= t of its segment) predicts item
t+1 at every position; BERT4Rec's (it sees the whole segment) is trained with the cloze objective.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.encoder import init_official_
from ssd4rec_torchrec.ops import segment_ids
from ssd4rec_torchrec.ops.attention import JaggedAttentionPlan, jagged_attention

__all__ = ["BERT4RecEncoder", "JaggedAttentionPlan", "JaggedTransformerEncoder", "SASRecEncoder", "jagged_attention"]

PositionPolicy = Literal["clamp", "recent"]


class TransformerBlock(nn.Module):
    """RecBole's post-LN `TransformerLayer` on packed tokens: MHA -> Dropout -> +res, LN -> FFN -> Dropout -> +res, LN.

    Attention projections are one fused `qkv` Linear (the `nn.MultiheadAttention.in_proj` layout) + `out_proj`.
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float, attn_dropout: float, ffn_mult: int, ln_eps: float
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=ln_eps)
        self.ffn_in = nn.Linear(d_model, ffn_mult * d_model)
        self.ffn_out = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=ln_eps)

    def forward(self, h: torch.Tensor, plan: JaggedAttentionPlan, causal: bool) -> torch.Tensor:
        p = self.attn_dropout if self.training else 0.0
        a = self.out_proj(jagged_attention(self.qkv(h), plan, self.n_heads, causal=causal, dropout_p=p))
        h = self.norm1(h + self.dropout1(a))
        f = self.ffn_out(F.gelu(self.ffn_in(h)))  # exact (erf) GELU, as RecBole
        return self.norm2(h + self.dropout2(f))


class JaggedTransformerEncoder(nn.Module):
    """Transformer encoder over packed segments: `forward(values (T, d), offsets (S+1,)) -> (T, d)`.

    `causal=True` is SASRec (token t attends to tokens <= t of its own segment), `causal=False` BERT4Rec
    (whole segment). Input: `Dropout(LN(values + P[pos]))` (LN only if `norm_embedding`), `pos` = index of the
    token within its segment. Positions past the table (`pos >= max_positions`) never truncate anything;
    every token is encoded and attends over its full segment. Only the position ids are affected:
    `position_policy="clamp"` (default): they share the last row `max_positions - 1`; token t's position
    depends only on t, so a causal encoder stays prefix-consistent (outputs at t do not depend on how
    long the segment is). `"recent"`: the last `max_positions` tokens of a segment get 0..max_positions-1
    (the ids a RecBole/HSTU history truncated to its most recent `max_positions` items would get) and older
    tokens 0; ids then depend on the segment length, so causal outputs are no longer prefix-consistent.
    With histories already truncated to `max_positions` (the usual data pipeline) both policies agree.
    One host sync per forward (reading the lengths to plan the buckets).
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int = 2,
        n_heads: int = 2,
        dropout: float = 0.2,
        max_positions: int = 512,
        ffn_mult: int = 4,
        ln_eps: float = 1e-12,
        norm_embedding: bool = True,
        *,
        causal: bool | None = None,
        attn_dropout: float | None = None,
        position_policy: PositionPolicy = "clamp",
        bucket_ratio: float = 0.5,
        max_chunk_elems: int = 1 << 24,
    ) -> None:
        super().__init__()
        causal = getattr(self, "CAUSAL", None) if causal is None else causal
        if causal is None:
            raise ValueError("causal must be given (True: SASRec-style, False: BERT4Rec-style)")
        if position_policy not in ("clamp", "recent"):
            raise ValueError(f"position_policy must be 'clamp' or 'recent', got {position_policy!r}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.d_model = d_model
        self.n_layers = n_layers
        self.causal = causal
        self.max_positions = max_positions
        self.position_policy = position_policy
        self.norm_embedding = norm_embedding
        self.bucket_ratio = bucket_ratio
        self.max_chunk_elems = max_chunk_elems
        self.position_embedding = nn.Embedding(max_positions, d_model)
        self.LayerNorm = nn.LayerNorm(d_model, eps=ln_eps) if norm_embedding else None
        self.dropout = Dropout(dropout)
        p_attn = dropout if attn_dropout is None else attn_dropout
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_heads, dropout, p_attn, ffn_mult, ln_eps) for _ in range(n_layers)
        )
        self.apply(init_official_)  # RecBole `_init_weights`: N(0, 0.02), zero bias, LN (1, 0)

    def positions(self, offsets: torch.Tensor, T: int) -> torch.Tensor:
        """Position-embedding row of each token (int64, (T,)) under `position_policy`."""
        seg = segment_ids(offsets, T)
        pos = torch.arange(T, device=offsets.device, dtype=torch.int64) - offsets[seg]
        if self.position_policy == "recent":
            length = (offsets[1:] - offsets[:-1])[seg]
            return (pos - (length - self.max_positions).clamp(min=0)).clamp(min=0)
        return pos.clamp(max=self.max_positions - 1)

    def plan(self, offsets: torch.Tensor, T: int) -> JaggedAttentionPlan:
        """The attention plan this encoder uses for a batch (exposed for tests and benchmarks)."""
        return JaggedAttentionPlan.build(
            offsets, T, causal=self.causal, bucket_ratio=self.bucket_ratio, max_chunk_elems=self.max_chunk_elems
        )

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if values.dim() != 2 or values.shape[1] != self.d_model:
            raise ValueError(f"values must be (T, {self.d_model}), got {tuple(values.shape)}")
        T = values.shape[0]
        plan = self.plan(offsets, T)  # validates offsets against T
        h = values + self.position_embedding(self.positions(offsets, T))
        if self.LayerNorm is not None:
            h = self.LayerNorm(h)
        h = self.dropout(h)
        for layer in self.layers:
            h = layer(h, plan, self.causal)
        return h


class SASRecEncoder(JaggedTransformerEncoder):
    """SASRec (causal self-attention): output at token t depends on tokens <= t of its segment only, so it
    can predict item t+1 (next-item objective at every position, wired in the training code)."""

    CAUSAL = True


class BERT4RecEncoder(JaggedTransformerEncoder):
    """BERT4Rec (bidirectional self-attention within each segment), used with the cloze objective (masked
    items are replaced by a mask embedding upstream and predicted from this encoder's output there)."""

    CAUSAL = False
