"""SSD (Mamba-2) scan over packed variable-length sequences.

`ssd_scan` computes, independently for every segment of a packed token axis (state reset to 0 at each
segment start),

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t        (h: (H, P, N) per token)
    y_t = h_t · C_t + D * x_t

which is what `mamba_ssm`'s `mamba_chunk_scan_combined(..., seq_idx=...)` computes for an already positive
`dt`. Two implementations: the Triton kernel from mamba-ssm (`kernel="mamba"`) and a pure-torch chunked
"dual form" (`kernel="torch"`) that runs anywhere and is differentiable by autograd:

* inside each chunk of Q tokens, the output is a masked attention-like matmul
  `Y = (L ∘ C Bᵀ)(dt ⊙ X)` with `L_ij = exp(a_{j+1} + ... + a_i)` for `j <= i` in the same segment;
* chunk end states are propagated by a linear recurrence over chunks, itself evaluated blockwise in the
  same dual form (`_segment_scan`, recursive), so there is no Python loop over tokens, segments or chunks
  and memory stays O(T·Q·H) (never O(T²)).

The quadratic part is one custom autograd Function (`_DecayMatmul`) that runs forward and backward over
blocks of chunks in two reused work buffers of at most `_BLOCK_BYTES` each (on CPU a fresh large buffer
costs more than the arithmetic, and small blocks stay in cache), recomputing the (Q, Q) decay matrices in
backward instead of saving them, so its cost is linear in T with bounded temporaries; the rest is plain
autograd over (T, H, P)- and (T/Q, H, P, N)-sized tensors.

When every chunk's decays span at most `2 * _FACTORED_MAX_LOG` (the usual case), the whole torch path is
instead one autograd Function with a hand-written backward (`_FactoredScan`): the decay matrix is factored
per token (`exp(cs_i - cs_j) = f_i g_j`), so a chunk needs one (Q, Q) matrix per group instead of one per
head, the previous chunk's state enters through the same factors, and every step is a batched matmul or
an element-wise op in the token-major layout.

Segment boundaries need not align with chunks: a segment-equality mask is applied inside chunks and a
state is only carried into tokens of the segment it belongs to. Decays are exponentiated only after
masking (`exp(where(mask, s, -inf))`), so masked terms have exactly zero value and zero gradient.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssd4rec_torchrec.ops.compat import load_mamba_chunk_scan
from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets

__all__ = ["mamba_ssd_available", "ssd_scan"]

logger = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "mamba")
# Block length of the recursive scan over chunk states: sequences up to this length are solved densely.
_SCAN_BLOCK = 16
# Upper bound on each (…, Q, Q) work buffer of the intra-chunk term (forward and backward run over blocks
# of chunks that fit; at least one chunk per block).
_BLOCK_BYTES = 8 * 2**20
# Largest tile of the torch path (chunk_size is a tiling choice: it does not change what is computed).
TORCH_MAX_CHUNK = 64
# Chunks whose log-decays stay within ±this of their midpoint (per head) use the factored intra-chunk form
# (`_intra_chunk_factored`): e^60 ≈ 1e26 leaves ~1e12 of fp32 headroom for the matmul's partial sums.
# 0 disables it (every chunk then uses the exact per-head decay matrices).
_FACTORED_MAX_LOG = 60.0


@functools.lru_cache(maxsize=1)
def _load_mamba_chunk_scan() -> Any:
    """Import mamba-ssm's `mamba_chunk_scan_combined` lazily (it pulls in triton and the mamba package).

    With CUDA available, a pure-Python mamba-ssm wheel (no `selective_scan_cuda`) also works: see
    `compat.load_mamba_chunk_scan`.
    """
    return load_mamba_chunk_scan()


@functools.lru_cache(maxsize=1)
def mamba_ssd_available() -> bool:
    """True when mamba-ssm's Triton SSD kernel can be imported (it is only *used* by "auto" on CUDA).

    Cached, so a failing import is attempted (and logged) once per process.
    """
    try:
        _load_mamba_chunk_scan()
    except Exception as exc:  # ImportError, or a CUDA extension failing at package import
        logger.info("mamba-ssm SSD kernel unavailable, ssd_scan(kernel='auto') uses the torch path: %r", exc)
        return False
    return True


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


class _SegmentCumsum(torch.autograd.Function):
    """float64 running sum of `a` along the chunk that restarts in every segment: `cs_k = Σ a_m` over
    `start(k) < m <= k` (the first token of a segment, and of the chunk, contributes nothing: its decay
    never enters a same-segment pair inside the chunk). Differences `cs_i - cs_j` of same-segment pairs
    are the usual segment sums.

    The backward is the segment-restricted reverse sum `da_m = Σ_{k >= m, same segment} dcs_k` (0 at
    starts), written so that a segment whose `dcs` are all zero passes exactly zero to every other one:
    per-token factoring must not leak rounding noise across sequences.
    a (n, ..., Q); starts (n, Q) bool (segment starts, and position 0).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        Q = a.shape[-1]
        n = starts.shape[0]
        view = (n,) + (1,) * (a.dim() - 2) + (Q,)
        keep = (~starts).view(view)
        pos = torch.arange(Q, device=a.device)
        start_of = torch.where(starts, pos, 0).cummax(-1).values  # (n, Q) index of the token's segment start
        later = torch.where(starts, pos, Q)  # next start strictly after k: suffix min from k + 1
        next_start = F.pad(later.flip(-1).cummin(-1).values.flip(-1)[:, 1:], (0, 1), value=Q)
        cs = (a.double() * keep).cumsum(-1)
        cs = cs - cs.gather(-1, start_of.view(view).expand(cs.shape))
        ctx.save_for_backward(keep, next_start)
        ctx.a_dtype = a.dtype
        return cs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dcs: torch.Tensor) -> tuple[torch.Tensor, None]:
        keep, next_start = ctx.saved_tensors
        suffix = F.pad(dcs.flip(-1).cumsum(-1).flip(-1), (0, 1))  # suffix[k] = Σ_{m >= k} dcs_m; suffix[Q] = 0
        view = next_start.shape[:1] + (1,) * (dcs.dim() - 2) + next_start.shape[1:]
        tail = suffix.gather(-1, next_start.view(view).expand(dcs.shape))
        return ((suffix[..., :-1] - tail) * keep).to(ctx.a_dtype), None


def _chunk_starts(segc: torch.Tensor) -> torch.Tensor:
    """(n, Q) bool: the first token of each segment inside each chunk, and every chunk's first token."""
    return F.pad(segc[:, 1:] != segc[:, :-1], (1, 0), value=True)


def _intra_chunk_factored(
    cs: torch.Tensor, ref: torch.Tensor, CB: torch.Tensor, xc: torch.Tensor, dtc: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Intra-chunk term with the decay matrix factored per token: `exp(cs_i - cs_j) = f_i · g_j`.

    `f = exp(cs - r)` and `g = exp(r - cs)` with `cs` the segment-restarting running sum of the log-decays
    and `r` the middle of its range (per chunk and head), both exponentiated in float64 and rounded once to
    fp32 (relative error eps/2 each, whatever |cs - r| is). Then `Y_h = f_h ∘ ((same ∘ CB) @ (g_h ∘ U_h))`:
    the only (Q, Q) tensor is `same ∘ CB`, once per group, and the R heads of a group share one
    (Q, Q) @ (Q, R·P) matmul, instead of an exp/mask/multiply over a (Q, Q) decay matrix per head. Callers
    guarantee `|cs - r| <= _FACTORED_MAX_LOG` (no overflow, with headroom for the sums).
    Shapes: cs (float64) and dtc (n, G, R, Q), ref (n, G, R, 1), CB (n, G, Q, Q), xc (n, G, R, Q, P) (U = dt ∘ x:
    dt is folded into the per-token factor), same (n, Q, Q) bool -> (n, G, R, Q, P). Every saved tensor is
    O(T·H·P) or O(T·Q·G).
    """
    n, G, R, Q, P = xc.shape
    f = torch.exp(cs - ref).to(xc.dtype)
    g = torch.exp(ref - cs).to(xc.dtype) * dtc
    M = CB.masked_fill(~same.unsqueeze(1), 0.0)  # (n, G, Q, Q)
    v = (xc * g.unsqueeze(-1)).transpose(2, 3).reshape(n, G, Q, R * P)
    w = torch.matmul(M, v).view(n, G, Q, R, P).transpose(2, 3)  # (n, G, R, Q, P)
    return w * f.unsqueeze(-1)


def _intra_chunk(
    a: torch.Tensor, CB: torch.Tensor, xc: torch.Tensor, dtc: torch.Tensor, same: torch.Tensor, segc: torch.Tensor
) -> torch.Tensor:
    """`Y = (L ∘ CB) @ (dt ∘ x)` per chunk and head (L the masked decay matrix): the factored form for chunks
    whose decay range allows it (the usual case), the exact per-head decay matrices for the others."""
    nc = a.shape[0]
    if _FACTORED_MAX_LOG <= 0 or a.numel() == 0:
        factored = torch.zeros(nc, dtype=torch.bool, device=a.device)
    else:
        cs = _SegmentCumsum.apply(a, _chunk_starts(segc))  # (nc, G, R, Q) float64
        hi, lo = cs.detach().amax(-1, keepdim=True), cs.detach().amin(-1, keepdim=True)
        ref = (hi + lo) / 2  # per chunk and head; constant for autograd (f · g does not depend on it)
        factored = ((hi - lo) / 2 <= _FACTORED_MAX_LOG).flatten(1).all(1)  # (nc,)

    def exact(idx: torch.Tensor | None) -> torch.Tensor:
        sel = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        u = sel(xc) * sel(dtc).unsqueeze(-1)
        return _DecayMatmul.apply(sel(a), sel(CB).unsqueeze(2), u, sel(same)[:, None, None])

    n_fact = int(factored.sum())
    if n_fact == nc:
        return _intra_chunk_factored(cs, ref, CB, xc, dtc, same)
    if n_fact == 0:
        return exact(None)
    idx_f = factored.nonzero().squeeze(1)
    idx_e = (~factored).nonzero().squeeze(1)
    y_f = _intra_chunk_factored(*(t.index_select(0, idx_f) for t in (cs, ref, CB, xc, dtc, same)))
    y = torch.cat([y_f, exact(idx_e)])
    inverse = torch.empty_like(factored, dtype=torch.long)
    inverse[torch.cat([idx_f, idx_e])] = torch.arange(nc, device=a.device)
    return y.index_select(0, inverse)


def _pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` (T, ...) with zero rows appended up to `n` rows (`t` itself when T == n)."""
    if t.shape[0] == n:
        return t
    out = t.new_empty((n,) + t.shape[1:])
    out[: t.shape[0]].copy_(t)
    out[t.shape[0]:].zero_()
    return out


def _chunk_cumsum(a: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """float64 running log-decay inside each chunk, restarting in every segment that starts in the chunk.

    `cs_k = a_{s+1} + ... + a_k` for a token of the segment starting at `s` in the chunk, and
    `cs_k = a_0 + ... + a_k` for the tokens of a segment that continues from the previous chunk (their
    decays from the chunk start on, which carry the previous chunk's state in). a (n, Q, ...) any float;
    starts (n, Q) bool: segment starts, position 0 included unless the chunk continues the previous one's
    last segment.
    """
    view = starts.shape + (1,) * (a.dim() - 2)
    cum = (a.double() * (~starts).view(view)).cumsum(1)
    pos = torch.arange(starts.shape[1], device=a.device)
    start_of = torch.where(starts, pos, 0).cummax(1).values
    started = starts.gather(1, start_of)  # False only for a continuing first segment (no base to remove)
    base = cum.gather(1, start_of.view(view).expand(cum.shape)) * started.view(view)
    return cum - base


def _chunk_cumsum_backward(dcs: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Gradient of `_chunk_cumsum` w.r.t. `a`: `da_m = Σ dcs_k` over later tokens `k >= m` of m's segment
    (0 at segment starts). Written as a difference of suffix sums in float64 so that a segment whose `dcs`
    are all zero gets exactly 0 (nothing from other segments leaks in)."""
    Q = starts.shape[1]
    view = starts.shape + (1,) * (dcs.dim() - 2)
    pos = torch.arange(Q, device=dcs.device)
    later = torch.where(starts, pos, Q)  # next start strictly after k: suffix min from k + 1
    next_start = F.pad(later.flip(1).cummin(1).values.flip(1)[:, 1:], (0, 1), value=Q)
    suffix = torch.cat([dcs.flip(1).cumsum(1).flip(1), dcs.new_zeros(dcs[:, :1].shape)], 1)
    tail = suffix.gather(1, next_start.view(view).expand(dcs.shape))
    return (suffix[:, :-1] - tail) * (~starts).view(view)


def _chain(d: torch.Tensor, s: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The linear recurrence over chunk states (no autograd): `h_c = d_c * h_{c-1} + s_c`, or with
    `reverse=True` its adjoint `h_c = s_c + d_{c+1} * h_{c+1}`. d (nc, H, 1) decays (0 where the state
    resets), s (nc, H, F) -> (nc, H, F).

    A plain loop over chunks: one fused multiply-add of H·F elements each. On a CPU this beats the blockwise
    dense form (`_segment_scan`, 16x the arithmetic) at every size measured (nc 221 to 8192: 4-8x faster).
    """
    h = torch.empty_like(s)
    hs, ss, ds = h.unbind(0), s.unbind(0), d.unbind(0)
    n = s.shape[0]
    if reverse:
        hs[n - 1].copy_(ss[n - 1])
        for c in range(n - 2, -1, -1):
            torch.addcmul(ss[c], hs[c + 1], ds[c + 1], out=hs[c])
    else:
        hs[0].copy_(ss[0])
        for c in range(1, n):
            torch.addcmul(ss[c], hs[c - 1], ds[c], out=hs[c])
    return h


class _FactoredScan(torch.autograd.Function):
    """The whole chunked SSD with every chunk in the factored form, with a hand-written backward.

    Per chunk (tile of Q tokens) and head, with `cs` the `_chunk_cumsum` of the log-decays `a = dt·A` and
    `r` the middle of its range, `f = exp(cs - r)` and `g = exp(r - cs)` (so `f_i g_j = exp(cs_i - cs_j)`):

        Z = M @ V,  M = same ∘ (C Bᵀ) (one (Q, Q) matrix per group),  V = g·dt·x (all heads of a group
            side by side: (Q, R·P)),
        S = Vᵀ @ (B ∘ last)  -> chunk end state  s_c = f_{Q-1} S (the chunk's last segment only),
        h_c = exp(cs_{Q-1}) [chunk c continues c-1 as one segment] h_{c-1} + s_c   (`_chain`),
        W = Z + (C ∘ first) @ (exp(r) h_{c-1})ᵀ  (the previous chunk's state, for the tokens of the chunk's
            first segment when it continues the previous chunk; exp(r) f_i = exp(cs_i) is their decay),
        y = f ∘ W + D x.

    Everything is a batched matmul over (nc, G) or an element-wise op in the natural token-major layout;
    only O(T·H·P) and O(T·Q) tensors are saved. `r` is a constant for autograd: every product of factors
    that reaches `y` (f·g, f·exp(r), f_{Q-1}·g) is independent of it. Callers guarantee |cs - r| <=
    `_FACTORED_MAX_LOG`. Shapes: x (T, G, R, P) unpadded, dt (nc, Q, G, R) padded with zeros, A (G, R),
    B and C (nc, Q, G, N), D None, (G, R, 1) or (G, R, P); cs and r (float64) (nc, Q, G, R) and
    (nc, 1, G, R); same (nc, Q, Q) bool; first, last (nc, Q) float; cont (nc,) bool; starts (nc, Q) bool
    -> y (T, G, R, P).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, cs: torch.Tensor, r: torch.Tensor, same: torch.Tensor,
                first: torch.Tensor, last: torch.Tensor, cont: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        nc, Q, G, R = dt.shape
        T, P = x.shape[0], x.shape[-1]
        N = B.shape[-1]
        f = torch.exp(cs - r).to(x.dtype)  # (nc, Q, G, R)
        g = torch.exp(r - cs).to(x.dtype)
        u = g * dt
        v = x.new_empty(nc, G, Q, R, P)
        if G == 1:  # v is token-major: write the real tokens straight from the unpadded x
            v_tok = v.view(nc * Q, 1, R, P)
            torch.mul(x, u.view(nc * Q, 1, R, 1)[:T], out=v_tok[:T])
            v_tok[T:].zero_()
        else:
            torch.mul(_pad_tokens(x, nc * Q).view(nc, Q, G, R, P).transpose(1, 2),
                      u.transpose(1, 2).unsqueeze(-1), out=v)
        v3 = v.view(nc * G, Q, R * P)
        Bg = B.transpose(1, 2).reshape(nc * G, Q, N)
        Cg = C.transpose(1, 2).reshape(nc * G, Q, N)
        M = torch.bmm(Cg, Bg.transpose(1, 2)).view(nc, G, Q, Q).masked_fill_(~same.unsqueeze(1), 0.0)
        M3 = M.view(nc * G, Q, Q)
        W = torch.bmm(M3, v3)  # (nc·G, Q, R·P); the inter-chunk term is added in place below
        Cf = Cg.view(nc, G, Q, N) * first[:, None, :, None]
        h = S = er = d = None
        if nc > 1:
            Bl = Bg.view(nc, G, Q, N) * last[:, None, :, None]
            S = torch.bmm(v3.transpose(1, 2), Bl.view(nc * G, Q, N)).view(nc, G, R, P, N)  # local end states
            f_last = f[:, -1].unsqueeze(-1).unsqueeze(-1)  # (nc, G, R, 1, 1)
            d = (torch.exp(cs[:, -1]).to(x.dtype) * cont[:, None, None]).view(nc, G * R, 1)  # chunk decays
            h = _chain(d, (S * f_last).view(nc, G * R, P * N)).view(nc, G, R, P, N)
            er = torch.exp(r[1:, 0]).to(x.dtype)  # (nc-1, G, R)
            hp = (h[:-1] * er[..., None, None]).view((nc - 1) * G, R * P, N)
            W[G:].baddbmm_(Cf[1:].view((nc - 1) * G, Q, N), hp.transpose(1, 2))
        else:
            hp = None
        y = x.new_empty(nc * Q, G, R, P)
        torch.mul(W.view(nc, G, Q, R, P), f.transpose(1, 2).unsqueeze(-1),
                  out=y.view(nc, Q, G, R, P).transpose(1, 2))
        y = y[:T]
        if D is not None:
            y.addcmul_(x, D)
        ctx.save_for_backward(x, dt, A, B, C, D, f, g, v, M, W, Cf, S, h, hp, er, d, same, first, last, starts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, dt, A, B, C, D, f, g, v, M, W, Cf, S, h, hp, er, d, same, first, last, starts = ctx.saved_tensors
        nc, Q, G, R = dt.shape
        T, P = x.shape[0], x.shape[-1]
        N = B.shape[-1]
        dy = dy.contiguous()
        dW = dy.new_empty(nc, G, Q, R, P)
        if G == 1:  # token-major: read the real tokens of dy directly
            dW_tok = dW.view(nc * Q, 1, R, P)
            torch.mul(dy, f.view(nc * Q, 1, R, 1)[:T], out=dW_tok[:T])
            dW_tok[T:].zero_()
            df = dy.new_zeros(nc * Q, 1, R)
            torch.linalg.vecdot(dy, W.view(nc * Q, 1, R, P)[:T], out=df[:T])
            df = df.view(nc, Q, 1, R)
        else:
            dyg = _pad_tokens(dy, nc * Q).view(nc, Q, G, R, P).transpose(1, 2)  # (nc, G, Q, R, P) view
            torch.mul(dyg, f.transpose(1, 2).unsqueeze(-1), out=dW)
            df = (dyg * W.view(nc, G, Q, R, P)).sum(-1).transpose(1, 2)  # (nc, Q, G, R)
        dW3 = dW.view(nc * G, Q, R * P)
        v3 = v.view(nc * G, Q, R * P)
        Bg = B.transpose(1, 2).reshape(nc * G, Q, N)
        Cg = C.transpose(1, 2).reshape(nc * G, Q, N)
        dM = torch.bmm(dW3, v3.transpose(1, 2)).view(nc, G, Q, Q).masked_fill_(~same.unsqueeze(1), 0.0)
        dv = torch.bmm(M.view(nc * G, Q, Q).transpose(1, 2), dW3)  # (nc·G, Q, R·P)
        dM3 = dM.view(nc * G, Q, Q)
        dC = torch.bmm(dM3, Bg)  # (nc·G, Q, N)
        dB = torch.bmm(dM3.transpose(1, 2), Cg)
        dcs_last = None
        if nc > 1:
            # Inter-chunk term: W[c] += Cf[c] @ (exp(r_c) h_{c-1})ᵀ.
            dW_in = dW3[G:]
            dC.view(nc, G, Q, N)[1:] += torch.bmm(dW_in, hp).view(nc - 1, G, Q, N) * first[1:, None, :, None]
            dhp = torch.bmm(dW_in.transpose(1, 2), Cf[1:].reshape((nc - 1) * G, Q, N))  # (·, R·P, N)
            gh = torch.zeros_like(h)
            gh[:-1] = dhp.view(nc - 1, G, R, P, N) * er[..., None, None]
            # Adjoint of the chain h_c = d_c h_{c-1} + s_c, run backwards: lam_c = gh_c + d_{c+1} lam_{c+1}.
            lam = _chain(d, gh.view(nc, G * R, P * N), reverse=True).view(nc, G, R, P, N)
            dlogd = (lam[1:] * h[:-1]).sum((-1, -2)).view(nc - 1, G * R) * d[1:, :, 0]
            f_last = f[:, -1].unsqueeze(-1).unsqueeze(-1)
            dS = lam * f_last  # (nc, G, R, P, N)
            df_last = (lam * S).sum((-1, -2))  # (nc, G, R)
            df[:, -1] += df_last
            dS3 = dS.view(nc * G, R * P, N)
            dv.baddbmm_(Bg.view(nc, G, Q, N).mul(last[:, None, :, None]).view(nc * G, Q, N), dS3.transpose(1, 2))
            # Masked after the product, not multiplied: for tokens outside the last segment g_j·f_{Q-1} may
            # overflow (their pairing is meaningless), and inf · 0 would be NaN.
            not_last = (last == 0).repeat_interleave(G, 0).unsqueeze(-1)
            dB += torch.bmm(v3, dS3).masked_fill_(not_last, 0.0)
            dcs_last = dlogd.view(nc - 1, G, R)
        u = g * dt
        if G == 1:  # token-major: the real tokens only
            dv_tok = dv.view(nc * Q, 1, R, P)[:T]
            du = x.new_zeros(nc * Q, 1, R)
            torch.linalg.vecdot(dv_tok, x, out=du[:T])
            du = du.view(nc, Q, 1, R)
            dx = dv_tok * u.view(nc * Q, 1, R, 1)[:T]
        else:
            dv5 = dv.view(nc, G, Q, R, P)
            xp = _pad_tokens(x, nc * Q).view(nc, Q, G, R, P)
            du = (dv5 * xp.transpose(1, 2)).sum(-1).transpose(1, 2)  # (nc, Q, G, R)
            dx = x.new_empty(nc * Q, G, R, P)
            torch.mul(dv5, u.transpose(1, 2).unsqueeze(-1), out=dx.view(nc, Q, G, R, P).transpose(1, 2))
            dx = dx[:T]
        dD = None
        if D is not None:
            dx.addcmul_(dy, D)
            dD = (dy * x).sum(0)
            if D.shape[-1] == 1:
                dD = dD.sum(-1, keepdim=True)
        # u = g·dt, g = exp(r - cs), f = exp(cs - r)  ->  d cs = df·f - du·u, and d dt = du·g.
        ddt = du * g
        dcs = df.double() * f - (du * u).double()
        if dcs_last is not None:
            dcs[1:, -1] += dcs_last
        da = _chunk_cumsum_backward(dcs, starts).to(x.dtype)
        ddt.addcmul_(da, A)
        dA = (da * dt).sum((0, 1))
        dB3 = dB.view(nc, G, Q, N).transpose(1, 2)
        dC3 = dC.view(nc, G, Q, N).transpose(1, 2)
        return dx, ddt, dA, dB3, dC3, dD, None, None, None, None, None, None, None


def _chunk_layout(segc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-chunk token masks of the factored scan from the chunked segment ids `segc` (nc, Q).

    starts: segment starts (position 0 too unless the chunk continues the previous chunk's last segment);
    first: tokens of that continuing segment (float); last: tokens of the chunk's last segment (float);
    cont: the whole chunk continues the previous one's segment; same: (nc, Q, Q) same segment and j <= i.
    """
    Q = segc.shape[1]
    prev = torch.cat([segc[:1, :1] - 1, segc[:-1, -1:]])  # segment of each chunk's preceding token
    starts = torch.cat([segc[:, :1] != prev, segc[:, 1:] != segc[:, :-1]], 1)
    first = segc == prev
    last = (segc == segc[:, -1:]).to(torch.float32)
    tri = torch.ones(Q, Q, dtype=torch.bool, device=segc.device).tril()
    same = tri & (segc[:, :, None] == segc[:, None, :])
    return starts, first.to(torch.float32), last, first[:, -1].clone(), same


def _ssd_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Chunked dual-form SSD in the dtype of its inputs (callers upcast). See the module docstring."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    Q = chunk_size
    if T == 0:
        return x * 0
    nc = -(-T // Q)
    pad = nc * Q - T
    x_in = x
    if pad:
        # Padded tokens form an extra segment (and have dt = 0), so they never touch real tokens.
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        seg = torch.cat([seg, (seg[-1:] + 1).expand(pad)])
    segc = seg.view(nc, Q)
    if _FACTORED_MAX_LOG > 0:
        starts, first, last, cont, same = _chunk_layout(segc)
        with torch.no_grad():
            cs = _chunk_cumsum((dt * A).view(nc, Q, G, R), starts)
        hi, lo = cs.amax(1, keepdim=True), cs.amin(1, keepdim=True)
        if bool(((hi - lo) / 2 <= _FACTORED_MAX_LOG).all()):  # the usual case: one fused autograd Function
            Dv = None if D is None else D.view(G, R, -1)
            y = _FactoredScan.apply(x_in.view(T, G, R, P), dt.view(nc, Q, G, R), A.view(G, R),
                                    B.view(nc, Q, G, N), C.view(nc, Q, G, N), Dv, cs, (hi + lo) / 2, same,
                                    first, last, cont, starts)
            return y.view(T, H, P)
    x = _pad_tokens(x, nc * Q)
    a = (dt * A).view(nc, Q, G, R).permute(0, 2, 3, 1)  # (nc, G, R, Q) log-decay per token
    dtc = dt.view(nc, Q, G, R).permute(0, 2, 3, 1)  # (nc, G, R, Q)
    xc = x.view(nc, Q, G, R, P).permute(0, 2, 3, 1, 4)  # (nc, G, R, Q, P); dt is folded into per-token factors
    Bg = B.view(nc, Q, G, N).transpose(1, 2)  # (nc, G, Q, N)
    Cg = C.view(nc, Q, G, N).transpose(1, 2)  # (nc, G, Q, N)

    # 1) Intra-chunk (quadratic) term.
    tri = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same = tri & (segc[:, :, None] == segc[:, None, :])  # (nc, Q, Q)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2))  # (nc, G, Q, Q), shared by a group's heads
    y = _intra_chunk(a, CB, xc, dtc, same, segc).permute(0, 3, 1, 2, 4)  # (nc, Q, G, R, P)

    if nc > 1:
        # 2) State at the end of each chunk from its own tokens, only those of the chunk's last segment.
        #    Decay to the chunk end = exclusive suffix sum of a (a direct reverse cumsum, no cancellation).
        #    The heads of a group are stacked into one (R·P, Q) @ (Q, N) matmul per chunk.
        suffix = F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # (nc, G, R, Q)
        w = _masked_exp(suffix, (segc == segc[:, -1:])[:, None, None])  # (nc, G, R, Q)
        xw = (xc * (w * dtc).unsqueeze(-1)).permute(0, 1, 2, 4, 3).reshape(nc, G, R * P, Q)
        states = torch.matmul(xw, Bg)  # (nc, G, R·P, N)
        # 3) Linear recurrence over chunk end states (reset where the segment changes).
        cs = torch.cumsum(a, dim=-1)  # (nc, G, R, Q) decay from chunk start, inclusive
        seg_last = segc[:, -1]
        h_end = _segment_scan(cs[..., -1].reshape(nc, H), states.view(nc, H, P * N), seg_last)
        h_prev = h_end[:-1].reshape(nc - 1, G, R * P, N)
        # 4) Contribution of the previous chunk's end state to tokens of the same segment.
        carry_mask = (segc[1:] == seg_last[:-1, None])[:, None, None, :]  # (nc-1, 1, 1, Q)
        carry = _masked_exp(cs[1:], carry_mask).permute(0, 3, 1, 2).unsqueeze(-1)  # (nc-1, Q, G, R, 1)
        y_off = torch.matmul(Cg[1:], h_prev.transpose(-1, -2))  # (nc-1, G, Q, R·P)
        y_off = y_off.view(nc - 1, G, Q, R, P).transpose(1, 2) * carry  # (nc-1, Q, G, R, P)
        y[1:] += y_off  # in place: y is not saved by any backward

    y = y.reshape(nc * Q, H, P)[:T]
    if D is not None:
        y = torch.addcmul(y, x_in, D.unsqueeze(-1) if D.dim() == 1 else D)
    return y


def _ssd_scan_mamba(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """mamba-ssm's fused Triton SSD with `seq_idx` segment resets (batch of one packed sequence)."""
    if x.shape[0] == 0:
        return x * 0
    try:
        scan = _load_mamba_chunk_scan()
    except Exception as exc:
        raise ImportError(
            "ssd_scan(kernel='mamba') needs mamba-ssm's Triton kernels (mamba_ssm.ops.triton.ssd_combined). "
            "On a CPU-only build, mamba_ssm's package __init__ needs a `selective_scan_cuda` stub module and "
            "the kernels need TRITON_INTERPRET=1 set before import; use kernel='torch' or 'auto' otherwise."
        ) from exc
    seq_idx = seg.to(torch.int32).unsqueeze(0).contiguous()
    y = scan(
        x.unsqueeze(0).contiguous(),
        dt.unsqueeze(0).contiguous(),
        A.contiguous(),
        B.unsqueeze(0).contiguous(),
        C.unsqueeze(0).contiguous(),
        chunk_size,
        D=None if D is None else D.contiguous(),
        seq_idx=seq_idx,
    )
    return y[0].to(x.dtype)


def _check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    offsets: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    kernel: str,
) -> None:
    """Raise `ValueError` with a precise message for any inconsistent argument."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (T, H, P), got shape {tuple(x.shape)}")
    T, H, P = x.shape
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if dt.shape != (T, H):
        raise ValueError(f"dt must be (T, H) = {(T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be (H,) = {(H,)}, got {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[0] != T:
        raise ValueError(f"B must be (T, G, N) with T={T}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    G = B.shape[1]
    if G < 1 or H % G != 0:
        raise ValueError(f"number of heads H={H} must be a multiple of the number of groups G={G}")
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"D must be None, (H,) = {(H,)} or (H, P) = {(H, P)}, got {tuple(D.shape)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if offsets.device != x.device:
        raise ValueError(f"offsets is on {offsets.device} but x is on {x.device}")
    validate_offsets(offsets, T)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    offsets: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
    kernel: str = "auto",
) -> torch.Tensor:
    """Segment-resetting SSD scan over a packed token axis; returns y `(T, H, P)` in `x.dtype`.

    Args:
        x: (T, H, P) inputs. dt: (T, H) positive step sizes (softplus/bias already applied).
        A: (H,) negative decay rates. B, C: (T, G, N) with H % G == 0; head h uses group h // (H // G).
        offsets: (S+1,) int64 jagged offsets (`offsets[0] == 0`, non-decreasing, `offsets[-1] == T`).
        D: optional skip, (H,) or (H, P). chunk_size: tokens per chunk (any positive int for the torch path,
            which tiles with `min(chunk_size, TORCH_MAX_CHUNK)`: the result is the same up to rounding, and
            on a CPU larger tiles only add quadratic work and make the factored form fall back more often).
        kernel: "torch" (pure-torch chunked dual form), "mamba" (mamba-ssm Triton kernel, also on CPU tensors
            under TRITON_INTERPRET=1) or "auto" (mamba on CUDA tensors when importable, torch otherwise).

    The torch path computes in fp32 for half-precision inputs (float64 stays float64) and is differentiable
    with respect to x, dt, A, B, C and D.
    """
    _check_inputs(x, dt, A, B, C, offsets, D, chunk_size, kernel)
    T = x.shape[0]
    seg = segment_ids(offsets, T)
    use_mamba = kernel == "mamba" or (kernel == "auto" and x.is_cuda and mamba_ssd_available())
    if use_mamba:
        return _ssd_scan_mamba(x, dt, A, B, C, seg, D, chunk_size)
    cdtype = torch.promote_types(x.dtype, torch.float32)
    y = _ssd_scan_torch(
        x.to(cdtype),
        dt.to(cdtype),
        A.to(cdtype),
        B.to(cdtype),
        C.to(cdtype),
        seg,
        None if D is None else D.to(cdtype),
        min(chunk_size, TORCH_MAX_CHUNK),
    )
    return y.to(x.dtype)
