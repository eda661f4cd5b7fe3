"""Exact SSD dual form with per-head decay matrices: `_DecayMatmul` and the recursive segment scan.

`_DecayMatmul` is the quadratic part `(cb ∘ exp(segsum(a)) ∘ mask) @ u` with a hand-written, blocked
backward; `_segment_scan` is the diagonal linear recurrence with resets, solved blockwise in the same form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Block length of the recursive scan over chunk states: sequences up to this length are solved densely.
_SCAN_BLOCK = 16
# Upper bound on each (…, Q, Q) work buffer of the intra-chunk term (forward and backward run over blocks
# of chunks that fit; at least one chunk per block).
_BLOCK_BYTES = 8 * 2**20


def _decay_matrix(a: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`exp(a[..., j+1] + ... + a[..., i])` where `mask[..., i, j]` (lower triangle), exactly 0 elsewhere.

    The segment sums are `cs_i - cs_j` of the running sum `cs`, accumulated in float64 and split into a
    float32 head and tail, so the fp32 differences keep full relative precision even when `|cs|` is large
    (a plain fp32 cumsum would lose ~eps·|cs|). Masked entries are set to -inf before `exp`, so they are
    exact zeros (never inf · 0). Only one (…, Q, Q) buffer is used (`out` when given, which may have a
    larger, broadcast batch shape than `a`); everything else is in place.
    """
    cs = a.double().cumsum(-1)
    hi = cs.to(a.dtype)
    if out is None:
        S = hi.unsqueeze(-1) - hi.unsqueeze(-2)
    else:
        S = torch.sub(hi.unsqueeze(-1), hi.unsqueeze(-2), out=out)
    if a.dtype != torch.float64:
        lo = (cs - hi.double()).to(a.dtype)
        S.add_(lo.unsqueeze(-1)).sub_(lo.unsqueeze(-2))
    return S.masked_fill_(~mask, float("-inf")).exp_()


def _segsum_grad(dS: torch.Tensor, a_shape: torch.Size) -> torch.Tensor:
    """Gradient w.r.t. `a` of `S_ij = a_{j+1} + ... + a_i` given `dS`: `da_k = Σ_{i>=k} Σ_{j<k} dS_ij`.

    Computed as column sums of the strictly lower triangle of the row-wise running sum of `dS`, so only
    the entries that belong to `da_k` are ever added (writing it as `Σ rowsums - Σ colsums` would subtract
    a whole block from itself and leave its fp32 rounding error in `da`). Overwrites `dS`.
    """
    Q = dS.shape[-1]
    C = dS.cumsum_(-1)  # C_im = Σ_{j<=m} dS_ij
    strict = torch.ones(Q, Q, dtype=dS.dtype, device=dS.device).tril_(-1)
    col = C.mul_(strict).sum(-2)  # col_m = Σ_{i>m} C_im = da_{m+1}
    return F.pad(col[..., :-1], (1, 0)).sum_to_size(a_shape)


def _rows(t: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """Rows `s:e` of the blocked (leading) dimension, or `t` itself where that dimension is broadcast."""
    return t if t is None or t.shape[0] == 1 else t[s:e]


def _put(dst: torch.Tensor | None, s: int, e: int, src: torch.Tensor) -> None:
    """Store a block's gradient into `dst` (accumulated where `dst`'s leading dimension is broadcast)."""
    if dst is None:
        return
    if dst.shape[0] == 1:
        dst.add_(src)
    else:
        dst[s:e].copy_(src)


class _DecayMatmul(torch.autograd.Function):
    """`y = (cb ∘ exp(segsum(a)) ∘ mask) @ u` with a hand-written backward.

    This is the quadratic ("attention-like") part of the SSD dual form. With `S_ij = cs_i - cs_j`:
    `dS = dM ∘ M`, `dcs = rowsum(dS) - colsum(dS)`, `da = reverse_cumsum(dcs)`.
    Shapes broadcast: a (..., Q), cb (..., Q, Q) or None, u (..., Q, F), mask (..., Q, Q) bool.

    Forward and backward run over blocks of the leading batch dimension (chunks) so that no (…, Q, Q)
    temporary exceeds `_BLOCK_BYTES`; the two (block, …, Q, Q) work buffers are allocated once per call and
    reused by every block (on CPU, touching a fresh large buffer costs more than the arithmetic). Nothing of
    size (…, Q, Q) is saved for backward: the decay matrix is recomputed there, block by block, from `a`
    (bit-identical to the forward one), so memory between forward and backward is only the inputs.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, cb: torch.Tensor | None, u: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        Q = a.shape[-1]
        # Give all operands the same number of batch dimensions, so the leading one can be blocked.
        nb = max(a.dim() - 1, u.dim() - 2, mask.dim() - 2, -1 if cb is None else cb.dim() - 2, 1)
        a_ = a.reshape((1,) * (nb + 1 - a.dim()) + a.shape)
        u_ = u.reshape((1,) * (nb + 2 - u.dim()) + u.shape)
        mask_ = mask.reshape((1,) * (nb + 2 - mask.dim()) + mask.shape)
        cb_ = None if cb is None else cb.reshape((1,) * (nb + 2 - cb.dim()) + cb.shape)
        batch = torch.broadcast_shapes(a_.shape[:-1], u_.shape[:-2], mask_.shape[:-2],
                                       () if cb_ is None else cb_.shape[:-2])
        ctx.save_for_backward(a_, cb_, u_, mask_)
        ctx.orig_shapes = (a.shape, None if cb is None else cb.shape, u.shape)
        ctx.batch = batch
        y = u_.new_empty(batch + (Q, u_.shape[-1]))
        if y.numel() == 0:
            return y.reshape(torch.broadcast_shapes(a.shape[:-1], u.shape[:-2], mask.shape[:-2])
                             + (Q, u.shape[-1]))
        work = _work_buffer(u_, batch, Q)
        for s, e in _blocks(batch[0], work.shape[0]):
            M = _decay_matrix(_rows(a_, s, e), _rows(mask_, s, e), out=work[: e - s])
            if cb_ is not None:
                M.mul_(_rows(cb_, s, e))
            torch.matmul(M, _rows(u_, s, e), out=y[s:e])
        out_batch = torch.broadcast_shapes(a.shape[:-1], u.shape[:-2], mask.shape[:-2],
                                           () if cb is None else cb.shape[:-2])
        out_shape = out_batch + (Q, u.shape[-1])
        # Not a view when no reshape is needed, so callers may update the result in place.
        return y if y.shape == out_shape else y.reshape(out_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a_, cb_, u_, mask_ = ctx.saved_tensors
        need_a, need_cb, need_u, _ = ctx.needs_input_grad
        need_cb = need_cb and cb_ is not None
        batch = ctx.batch
        Q = a_.shape[-1]
        dy = dy.reshape(batch + dy.shape[-2:])
        filled = dy.numel() > 0  # then every row of a non-broadcast gradient is written below

        def grad_buffer(t: torch.Tensor) -> torch.Tensor:
            full = filled and t.shape[0] == batch[0] > 1
            return t.new_empty(t.shape) if full else t.new_zeros(t.shape)

        da = grad_buffer(a_) if need_a else None
        dcb = grad_buffer(cb_) if need_cb else None
        du = grad_buffer(u_) if need_u else None
        if filled and (need_a or need_cb or need_u):
            work_l = _work_buffer(u_, batch, Q)
            work_e = torch.empty_like(work_l)
            for s, e in _blocks(batch[0], work_l.shape[0]):
                a_b, cb_b, u_b, dy_b = _rows(a_, s, e), _rows(cb_, s, e), _rows(u_, s, e), dy[s:e]
                Lm = _decay_matrix(a_b, _rows(mask_, s, e), out=work_l[: e - s])
                if need_u:
                    M = Lm if cb_b is None else torch.mul(Lm, cb_b, out=work_e[: e - s])
                    _put(du, s, e, torch.matmul(M.transpose(-1, -2), dy_b).sum_to_size(u_b.shape))
                if need_a or need_cb:
                    E = torch.matmul(dy_b, u_b.transpose(-1, -2), out=work_e[: e - s]).mul_(Lm)  # dM ∘ Lm
                    if need_cb:
                        _put(dcb, s, e, E.sum_to_size(cb_b.shape))  # copied out before E is overwritten
                    if need_a:
                        dS = E if cb_b is None else E.mul_(cb_b)  # dM ∘ M; masked entries are 0
                        _put(da, s, e, _segsum_grad(dS, a_b.shape))
        a_shape, cb_shape, u_shape = ctx.orig_shapes
        return (None if da is None else da.reshape(a_shape),
                None if dcb is None else dcb.reshape(cb_shape),
                None if du is None else du.reshape(u_shape), None)


def _work_buffer(like: torch.Tensor, batch: torch.Size, Q: int) -> torch.Tensor:
    """An uninitialised (rows, *batch[1:], Q, Q) buffer with as many leading rows as `_BLOCK_BYTES` allows."""
    per_row = like.element_size() * Q * Q
    for d in batch[1:]:
        per_row *= d
    rows = max(1, min(batch[0], _BLOCK_BYTES // max(per_row, 1)))
    return like.new_empty((rows,) + tuple(batch[1:]) + (Q, Q))


def _blocks(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _masked_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`exp(logits)` where `mask`, exactly 0 elsewhere (with zero gradient, no inf/NaN)."""
    return torch.exp(torch.where(mask, logits, torch.full_like(logits, float("-inf"))))


def _segment_scan(
    a: torch.Tensor, u: torch.Tensor, seg: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """Diagonal linear recurrence with resets: `h_l = exp(a_l) * h_{l-1} * [seg_l == seg_{l-1}] + u_l`.

    a: (L, H) log-decays, u: (L, H, F) inputs, seg: (L,) non-decreasing segment ids -> h: (L, H, F).
    Sequences of at most `block` steps are solved densely (an (L, L) decay matrix per head); longer ones are
    split into blocks solved densely, whose end states are combined by a recursive call on the much
    shorter sequence of blocks. Work and memory are O(L·block·H·F).
    """
    block = max(2, _SCAN_BLOCK if block is None else block)
    L, H, Fdim = u.shape
    if block >= L:
        tri = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
        mask = tri & (seg[:, None] == seg[None, :])
        return _DecayMatmul.apply(a.T, None, u.transpose(0, 1), mask).transpose(0, 1)
    nb = -(-L // block)
    pad = nb * block - L
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        seg = torch.cat([seg, (seg[-1:] + 1).expand(pad)])  # padding is its own segment
    a_b = a.view(nb, block, H)
    u_b = u.view(nb, block, H, Fdim).transpose(1, 2)  # (nb, H, K, F)
    seg_b = seg.view(nb, block)
    tri = torch.ones(block, block, dtype=torch.bool, device=a.device).tril()
    mask = (tri & (seg_b[:, :, None] == seg_b[:, None, :])).unsqueeze(1)  # (nb, 1, K, K)
    h = _DecayMatmul.apply(a_b.transpose(1, 2), None, u_b, mask)  # (nb, H, K, F): within-block part
    cs = torch.cumsum(a_b, dim=1)  # (nb, K, H) decay from block start (inclusive)
    seg_last = seg_b[:, -1]
    h_end = _segment_scan(cs[:, -1], h[:, :, -1], seg_last, block)  # (nb, H, F)
    # Carry the previous block's end state into the tokens of the same segment.
    carry = _masked_exp(cs[1:], (seg_b[1:] == seg_last[:-1, None]).unsqueeze(-1))  # (nb-1, K, H)
    h_in = carry.transpose(1, 2).unsqueeze(-1) * h_end[:-1].unsqueeze(2)  # (nb-1, H, K, F)
    h = torch.cat([h[:1], h[1:] + h_in])
    return h.transpose(1, 2).reshape(nb * block, H, Fdim)[:L]
