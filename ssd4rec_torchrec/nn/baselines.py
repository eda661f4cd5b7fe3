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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.encoder import init_official_
from ssd4rec_torchrec.ops import segment_ids

__all__ = ["BERT4RecEncoder", "JaggedAttentionPlan", "JaggedTransformerEncoder", "SASRecEncoder", "jagged_attention"]

PositionPolicy = Literal["clamp", "recent"]


@dataclass(frozen=True)
class _Chunk:
    index: torch.Tensor  # (n * Lb,) int64 rows of the (T+1)-row source; T is the all-zero pad row
    n: int  # segments in the chunk
    length: int  # padded length Lb (its longest segment)
    key_mask: torch.Tensor | None  # (n, 1, 1, Lb) bool, True = real key; None when nothing is padded


@dataclass(frozen=True)
class JaggedAttentionPlan:
    """How to run attention over packed segments: length buckets, padded gathers and the way back.

    Segments are sorted by length (longest first) and cut into chunks whose members are all at least
    `bucket_ratio` times the chunk's longest one, so the padded token count is at most `T / bucket_ratio`
    and the attention work `sum n * Lb^2` at most `sum L^2 / bucket_ratio^2` (vs. `S * Lmax^2` when
    padding the whole batch to its longest segment). A chunk also holds at most `max_chunk_elems` query-key
    pairs per head (`n * Lb^2`, a bound on score memory on a math fallback path). Empty segments take no
    slots. Built once per forward (one host sync to read the lengths) and shared by all layers.
    """

    chunks: tuple[_Chunk, ...]
    inverse: torch.Tensor  # (T,) int64: row of token t in the concatenation of the chunks' padded rows
    num_tokens: int

    @property
    def padded_tokens(self) -> int:
        """Total padded slots (real + padding) over all chunks."""
        return sum(c.n * c.length for c in self.chunks)

    @property
    def attention_pairs(self) -> int:
        """Query-key pairs per head computed over all chunks, `sum n * Lb^2` (padding included)."""
        return sum(c.n * c.length * c.length for c in self.chunks)

    @classmethod
    def build(
        cls,
        offsets: torch.Tensor,
        num_tokens: int,
        *,
        causal: bool,
        bucket_ratio: float = 0.5,
        max_chunk_elems: int = 1 << 24,
    ) -> JaggedAttentionPlan:
        """Plan for `num_tokens` packed tokens with jagged `offsets`; validates the offsets (one sync).

        `bucket_ratio=0` gives one chunk per `max_chunk_elems` budget, i.e. plain padding to the batch's longest
        segment. Causal chunks need no key mask: with right padding, a real query at t < L only sees keys <= t.
        """
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
            raise ValueError(f"offsets must be 1-D int64 with S+1 >= 1 entries, got {offsets.dtype} {offsets.shape}")
        if not 0.0 <= bucket_ratio <= 1.0:
            raise ValueError(f"bucket_ratio must be in [0, 1], got {bucket_ratio}")
        lengths = offsets[1:] - offsets[:-1]
        head = torch.cat([offsets[:1], lengths]).tolist()  # the only host sync of a forward pass
        first, lens = head[0], head[1:]
        if first != 0 or any(n < 0 for n in lens) or sum(lens) != num_tokens:
            raise ValueError(
                f"invalid offsets for T={num_tokens}: offsets[0]={first}, lengths must be >= 0 and sum to T"
            )

        # Greedy bucketing over segments sorted by length, longest first (stable: ties keep input order).
        order = sorted((s for s in range(len(lens)) if lens[s] > 0), key=lambda s: -lens[s])
        groups: list[tuple[list[int], int]] = []
        for s in order:
            if groups:
                members, lb = groups[-1]
                if lens[s] >= bucket_ratio * lb and (len(members) + 1) * lb * lb <= max_chunk_elems:
                    members.append(s)
                    continue
            groups.append(([s], lens[s]))

        device = offsets.device
        chunks: list[_Chunk] = []
        src_parts: list[torch.Tensor] = []
        dst_parts: list[torch.Tensor] = []
        base = 0
        for members, lb in groups:
            segs = torch.tensor(members, dtype=torch.int64, device=device)
            seg_len = lengths[segs]
            j = torch.arange(lb, dtype=torch.int64, device=device)
            valid = j[None, :] < seg_len[:, None]  # (n, Lb)
            tok = offsets[segs][:, None] + j[None, :]
            index = torch.where(valid, tok, torch.full_like(tok, num_tokens)).reshape(-1)
            slots = base + torch.arange(len(members) * lb, dtype=torch.int64, device=device).view(len(members), lb)
            src_parts.append(tok[valid])
            dst_parts.append(slots[valid])
            all_full = all(lens[s] == lb for s in members)
            key_mask = None if causal or all_full else valid[:, None, None, :]
            chunks.append(_Chunk(index=index, n=len(members), length=lb, key_mask=key_mask))
            base += len(members) * lb

        inverse = torch.empty(num_tokens, dtype=torch.int64, device=device)
        if src_parts:
            inverse[torch.cat(src_parts)] = torch.cat(dst_parts)
        return cls(chunks=tuple(chunks), inverse=inverse, num_tokens=num_tokens)


def jagged_attention(
    qkv: torch.Tensor, plan: JaggedAttentionPlan, n_heads: int, *, causal: bool, dropout_p: float = 0.0
) -> torch.Tensor:
    """Multi-head attention within each segment: `qkv (T, 3d)` packed `[q | k | v]` -> context `(T, d)`.

    Each chunk of the plan is gathered into `(n, H, Lb, d/H)` and fed to `F.scaled_dot_product_attention`
    (`is_causal` for causal attention, a key-padding mask otherwise); results return in packed token order.
    Padded query rows always see at least one real or zero key, so nothing is NaN; they are dropped.
    """
    n_tok, three_d = qkv.shape
    d = three_d // 3
    if d * 3 != three_d or d % n_heads:
        raise ValueError(f"qkv width {three_d} must be 3 * d with d divisible by n_heads={n_heads}")
    if n_tok != plan.num_tokens:
        raise ValueError(f"qkv has {n_tok} tokens, the plan was built for {plan.num_tokens}")
    if not plan.chunks:
        return qkv.new_zeros(0, d)
    dh = d // n_heads
    src = torch.cat([qkv, qkv.new_zeros(1, three_d)])  # row T: the pad row
    outs = []
    for c in plan.chunks:
        q, k, v = src[c.index].view(c.n, c.length, 3, n_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=c.key_mask, dropout_p=dropout_p, is_causal=causal)
        outs.append(o.transpose(1, 2).reshape(c.n * c.length, d))
    return torch.cat(outs)[plan.inverse]


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
