"""Multi-head attention within each segment of packed (jagged) sequences, on length buckets of segments.

`JaggedAttentionPlan` groups segments of similar length into padded chunks (built once per forward, shared by
all layers); `jagged_attention` runs `F.scaled_dot_product_attention` per chunk and returns the context in
packed token order, so padding waste is bounded by `1 / bucket_ratio` however skewed the lengths are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["JaggedAttentionPlan", "jagged_attention", "windowed_attention_traceable"]


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


def windowed_attention_traceable(qkv: torch.Tensor, seg: torch.Tensor, slot: torch.Tensor, num_segments: int,
                                 window: int, n_heads: int, *, causal: bool) -> torch.Tensor:
    """:func:`jagged_attention` (inference) in a ``torch.export``-able form over a fixed window.

    Token ``i`` of segment ``seg[i]`` sits at ``slot[i]`` in ``0..window-1`` of its segment's row of a
    ``(num_segments, window)`` layout; a token with ``slot < 0`` is outside the window (it attends to nothing
    and its output is zero). Every kept token attends to the kept tokens of its segment (only to earlier slots
    when ``causal``). Same mathematics as the bucketed eager op, without its data-dependent bucketing:
    ``qkv (T, 3d)`` -> context ``(T, d)``.
    """
    three_d = qkv.shape[1]
    d = three_d // 3
    dh = d // n_heads
    trash = num_segments * window  # the one row every out-of-window token is written to (and never read)
    flat = torch.where(slot >= 0, seg * window + slot, torch.full_like(slot, trash))
    rows = qkv.new_zeros(trash + 1, three_d).index_put((flat,), qkv)
    valid = torch.zeros(trash + 1, dtype=torch.bool, device=qkv.device).index_put(
        (flat,), torch.ones_like(flat, dtype=torch.bool))
    q, k, v = rows[:trash].view(num_segments, window, 3, n_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    eye = torch.eye(window, dtype=torch.bool, device=qkv.device)
    mask = valid[:trash].view(num_segments, 1, 1, window)
    if causal:
        mask = mask & torch.ones(window, window, dtype=torch.bool, device=qkv.device).tril()
    mask = mask | eye  # padded query rows see themselves: no row is empty, nothing is NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(trash, d)
    return torch.cat([out, out.new_zeros(1, d)]).index_select(0, flat)
