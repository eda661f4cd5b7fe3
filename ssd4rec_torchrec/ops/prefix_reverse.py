"""The backward (reverse-time) SSD scan of every prefix, read at its end, for all prefixes in linear time.

SSD4Rec's backward branch scans each history in reverse. The official code does not flip that output back, so
the read-out token t of a history ``s..t`` receives the reverse scan's output after it has consumed
``t, t-1, ..., s``: its *final* output, at the history's first token. Training on every prefix (the paper's
objective) re-encodes each prefix, because that final output depends on where the prefix ends. This op
computes it for every prefix end ``t`` of every segment at once, exactly, with no re-encoding.

For a prefix ``s..t`` (Mamba-2 notation; conv taps ``w[:, W-1]`` on the current token, as in causal-conv1d, so
the reverse scan's conv at token k reads ``k, k+1, .., k+W-1`` cut at the prefix end t):

    u_k(t)  = SiLU(b + Σ_{m=0}^{W-1} w[:, W-1-m] xBC_{k+m} [k+m <= t])      = [x_k, B_k, C_k](t)
    H(t)    = Σ_{k=s}^{t} L_k Δ_k x_k(t) B_k(t)ᵀ,     L_k = Π_{j=s}^{k-1} exp(Δ_j A)
    y(t)    = H(t) C_s(t) + D x_s(t)

The decay ``L_k`` involves only tokens before k, so it does not depend on t, and for ``k <= t-W+1`` the conv
window lies inside the prefix, so ``u_k(t)`` is the whole-segment value ``û_k``. Hence

    y(t) = Σ_{k=s}^{t-W+1} L_k Δ_k (C_s·B̂_k) x̂_k          one segment-wise cumulative sum, shifted by W-1
         + Σ_{j=0}^{W-2} L_{t-j} Δ_{t-j} (C_s(t)·B^j_{t-j}) x^j_{t-j}    the last W-1 tokens, conv cut at t
         + D x_s(t)

where ``u^j_k`` is the conv of k with only its first j+1 taps (``k+j`` the prefix end) and ``C_s(t) = Ĉ_s``
once ``t >= s+W-1``. The state ``H`` is never materialised: its query ``C_s`` is one vector per segment, so
the sum runs over ``(T, heads, headdim)`` values. It runs as one autograd Function with a hand-derived
backward: for fp32 on CPU two native passes per segment (``ops.native``, double accumulators), otherwise torch
(a handful of passes over (T, d_inner) and float64 segment-wise cumulative sums); cost and memory are linear
in T. The tests check outputs and gradients against re-running the float64 reverse
recurrence on every prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd4rec_torchrec.ops.native import native_ops
from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets

__all__ = ["prefix_reverse_scan", "prefix_reverse_scan_traceable"]


def _segment_inclusive_cumsum(v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Per-segment inclusive cumulative sum over rows (float64 running total, the segment's base removed)."""
    run = torch.cumsum(v.to(torch.float64), 0)
    return run - (run - v.to(torch.float64))[start]


def _segment_suffix_cumsum(v: torch.Tensor, start: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Per-segment inclusive suffix sum over rows: ``out[t] = Σ_{t <= k <= last(t)} v[k]`` (float64)."""
    run = torch.cumsum(v.to(torch.float64), 0)
    return run[last] - (run - v.to(torch.float64))


_LOG_DECAY_FLOOR = -60.0


class _Layout:
    """Token layout of one call: segment start / last row / position / rows left, per token, and the head rows."""

    def __init__(self, offsets: torch.Tensor, T: int, W: int) -> None:
        self.offsets = offsets
        seg = segment_ids(offsets, T)
        ar = torch.arange(T, device=offsets.device)
        self.start = offsets[:-1][seg]
        self.last = offsets[1:][seg] - 1
        self.pos = ar - self.start
        self.left = self.last - ar
        # rows whose query / skip input is the first token's conv cut short (position j < W-1)
        self.head = [torch.nonzero(self.pos == j).flatten() for j in range(W - 1)]


def _segment_cumsum_rows(v: torch.Tensor, lay: _Layout, reverse: bool) -> torch.Tensor:
    """Per-segment cumulative sum over rows in ``v``'s dtype (``reverse``: suffix sums). fp32 on CPU: one native
    pass with double accumulators; otherwise a float64 running total with the segment's base removed."""
    if v.dtype == torch.float32 and v.device.type == "cpu" and native_ops() is not None:
        flat = v.reshape(v.shape[0], -1)
        return native_ops().segment_cumsum(flat, lay.offsets, reverse).view(v.shape)
    out = _segment_suffix_cumsum(v, lay.start, lay.last) if reverse else _segment_inclusive_cumsum(v, lay.start)
    return out.to(v.dtype)


class _PrefixReverseScan(torch.autograd.Function):
    """See :func:`prefix_reverse_scan`; inputs are validated there. Hand-derived backward."""

    @staticmethod
    def forward(ctx, xBC, w, bias, dt, A, D, offsets, nheads: int, ngroups: int, d_state: int):
        T, Ch = xBC.shape
        W = w.shape[1]
        H, G, N = nheads, ngroups, d_state
        d_inner = Ch - 2 * G * N
        P = d_inner // H
        hpg = H // G
        lay = _Layout(offsets, T, W)
        # anti-causal conv with the first j+1 taps (pre-activations), j = 0..W-1
        pres = [xBC * w[:, W - 1] if bias is None else torch.addcmul(bias, xBC, w[:, W - 1])]
        for j in range(1, W):
            pre = pres[-1].clone()
            if j < T:
                ok = (lay.left[:T - j] >= j).unsqueeze(1).to(xBC.dtype)
                pre[:T - j].addcmul_(xBC[j:] * ok, w[:, W - 1 - j])
            pres.append(pre)
        U = [F.silu(p) for p in pres]

        def parts(u):
            return (u[:, :d_inner].view(T, H, P), u[:, d_inner:d_inner + G * N].view(T, G, N),
                    u[:, d_inner + G * N:].view(T, G, N))

        xs, Bs, Cs = zip(*(parts(u) for u in U))
        xh, Bh, Ch_ = xs[W - 1], Bs[W - 1], Cs[W - 1]
        q, xf = Ch_[lay.start], xh[lay.start]
        for j in range(W - 1):
            r = lay.head[j]
            q[r], xf[r] = Cs[j][lay.start[r]], xs[j][lay.start[r]]
        dA = dt.to(torch.float64) * A.to(torch.float64)
        excl = _segment_inclusive_cumsum(dA, lay.start) - dA
        # A decay below e^-60 (~1e-26 of the segment's first token) is stored as 0: the dropped terms lie far
        # below fp32 resolution, and underflowing products would otherwise fill the buffers with denormals,
        # which CPUs process ~100x slower.
        E = torch.where(excl > _LOG_DECAY_FLOOR, torch.exp(excl), 0.0).to(xBC.dtype)
        c = E * dt
        # whole-window tokens: segment cumsum of a_k x̂_k, read W-1 rows back
        g = (Ch_[lay.start] * Bh).sum(-1)  # (T, G)
        a = c * g.repeat_interleave(hpg, 1)
        y = xBC.new_zeros(T, H, P)
        if T > W - 1:
            M = _segment_cumsum_rows(a.unsqueeze(-1) * xh, lay, reverse=False)
            keep = (lay.pos[W - 1:] >= W - 1).view(-1, 1, 1)
            y[W - 1:] = (M[:T - W + 1] * keep).to(y.dtype)
        # the last W-1 tokens, conv cut at t: row t += c_{t-j} (q_t · B^j_{t-j}) x^j_{t-j}
        coefK = []
        for j in range(min(W - 1, T)):
            r = (q[j:] * Bs[j][:T - j]).sum(-1).repeat_interleave(hpg, 1)  # (T-j, H)
            ck = c[:T - j] * r * (lay.pos[j:] >= j).unsqueeze(1).to(c.dtype)
            y[j:] += ck.unsqueeze(-1) * xs[j][:T - j]
            coefK.append((ck, r))
        if D is not None:
            y = y + xf * (D.view(1, H, P) if D.dim() == 2 else D.view(1, H, 1))
        ctx.save_for_backward(xBC, w, dt, A, D, *pres, E, c, a, q, xf)
        ctx.lay, ctx.coefK, ctx.dims = lay, coefK, (H, G, N, P, hpg, W, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xBC, w, dt, A, D, *rest = ctx.saved_tensors
        H, G, N, P, hpg, W, has_bias = ctx.dims
        pres, (E, c, a, q, xf) = rest[:W], rest[W:]
        lay, coefK = ctx.lay, ctx.coefK
        T = xBC.shape[0]
        d_inner = H * P
        dy = dy.contiguous()
        U = [F.silu(p) for p in pres]
        dU = [torch.zeros_like(u) for u in U]
        E_keep = (E != 0).to(torch.float64)  # the floored decays pass no gradient

        def parts(u):
            return (u[:, :d_inner].view(T, H, P), u[:, d_inner:d_inner + G * N].view(T, G, N),
                    u[:, d_inner + G * N:].view(T, G, N))

        xs, Bs, Cs = zip(*(parts(u) for u in U))
        dxs, dBs, dCs = zip(*(parts(u) for u in dU))

        def group_sum(t):  # (rows, H) -> (rows, G)
            return t.view(t.shape[0], G, hpg).sum(-1)

        dD = None
        if D is not None:
            dxf = dy * (D.view(1, H, P) if D.dim() == 2 else D.view(1, H, 1))
            dD = (dy * xf).sum(0) if D.dim() == 2 else (dy * xf).sum((0, 2))
        else:
            dxf = None
        dq = torch.zeros_like(q)
        dc = torch.zeros_like(c)
        for j, (ck, r) in enumerate(coefK):
            dyj = dy[j:]
            s_t = (dyj * xs[j][:T - j]).sum(-1) * (lay.pos[j:] >= j).unsqueeze(1).to(dy.dtype)  # d ck
            dxs[j][:T - j] += ck.unsqueeze(-1) * dyj
            dc[:T - j] += s_t * r
            dr = group_sum(s_t * c[:T - j])  # (T-j, G)
            dq[j:] += dr.unsqueeze(-1) * Bs[j][:T - j]
            dBs[j][:T - j] += dr.unsqueeze(-1) * q[j:]
        if T > W - 1:
            dyM = dy.clone()
            dyM[lay.pos < W - 1] = 0
            R = _segment_cumsum_rows(dyM, lay, reverse=True)
            dv = torch.zeros_like(dy)
            ok = (lay.left[:T - W + 1] >= W - 1).view(-1, 1, 1)
            dv[:T - W + 1] = (R[W - 1:] * ok).to(dy.dtype)
            da = (dv * xs[W - 1]).sum(-1)
            dxs[W - 1].add_(a.unsqueeze(-1) * dv)
            g = (Cs[W - 1][lay.start] * Bs[W - 1]).sum(-1)
            dc += da * g.repeat_interleave(hpg, 1)
            dg = group_sum(da * c)  # (T, G)
            dBs[W - 1].add_(dg.unsqueeze(-1) * Cs[W - 1][lay.start])
            dCs[W - 1].index_add_(0, lay.start, dg.unsqueeze(-1) * Bs[W - 1])
        # query and skip input: non-head rows read the first token's full conv, head rows its cut conv
        head_rows = torch.cat(lay.head) if lay.head else lay.start[:0]
        full = torch.ones(T, dtype=torch.bool, device=dy.device)
        full[head_rows] = False
        rows = torch.nonzero(full).flatten()
        dCs[W - 1].index_add_(0, lay.start[rows], dq[rows])
        if dxf is not None:
            dxs[W - 1].index_add_(0, lay.start[rows], dxf[rows])
        for j in range(W - 1):
            r = lay.head[j]
            dCs[j].index_add_(0, lay.start[r], dq[r])
            if dxf is not None:
                dxs[j].index_add_(0, lay.start[r], dxf[r])
        # c = exp(excl) Δ, excl_k = Σ_{i<k in segment} Δ_i A
        dexcl = (dc * c).to(torch.float64) * E_keep
        ddA = _segment_suffix_cumsum(dexcl, lay.start, lay.last) - dexcl  # Σ over later tokens k > i
        ddt = dc * E + (ddA * A.to(torch.float64)).to(dt.dtype)
        dA_ = (ddA * dt.to(torch.float64)).sum(0).to(A.dtype)
        # conv: pre_j = pre_0 + Σ_{m=1..j} w[:, W-1-m] * xBC[t+m] (rows with m tokens left)
        dpre = [torch.ops.aten.silu_backward(du, p) for du, p in zip(dU, pres)]
        suffix = dpre[W - 1]
        dw = torch.zeros_like(w)
        dx = torch.zeros_like(xBC)
        Q = [None] * W
        Q[W - 1] = suffix
        for m in range(W - 2, -1, -1):
            Q[m] = Q[m + 1] + dpre[m]
        dw[:, W - 1] = (Q[0] * xBC).sum(0)
        dx += Q[0] * w[:, W - 1]
        for m in range(1, W):
            if m >= T:
                break
            ok = (lay.left[:T - m] >= m).unsqueeze(1).to(xBC.dtype)
            Qm = Q[m][:T - m] * ok
            dw[:, W - 1 - m] = (Qm * xBC[m:]).sum(0)
            dx[m:] += Qm * w[:, W - 1 - m]
        db = Q[0].sum(0) if has_bias else None
        return dx, dw, db, ddt, dA_, dD, None, None, None, None


class _NativePrefixReverseScan(torch.autograd.Function):
    """The same as :class:`_PrefixReverseScan` in two native passes per segment (``ops.native``): fp32 CPU only."""

    @staticmethod
    def forward(ctx, xBC, w, bias, dt, A, D, offsets, nheads: int, ngroups: int, d_state: int):
        H, P = nheads, (xBC.shape[1] - 2 * ngroups * d_state) // nheads
        b = bias if bias is not None else xBC.new_zeros(xBC.shape[1])
        Dfull = xBC.new_zeros(H, P) if D is None else (D.view(H, P) if D.dim() == 2 else D.view(H, 1).expand(H, P))
        ops = native_ops()
        y = ops.prefix_reverse_forward(xBC, w, b, dt, A, Dfull, offsets, H, ngroups, d_state)
        ctx.save_for_backward(xBC, w, b, dt, A, Dfull, offsets)
        ctx.dims, ctx.has_bias, ctx.D_dim = (H, ngroups, d_state), bias is not None, None if D is None else D.dim()
        return y

    @staticmethod
    def backward(ctx, dy):
        xBC, w, b, dt, A, Dfull, offsets = ctx.saved_tensors
        dx, dw, db, ddt, dA, dD = native_ops().prefix_reverse_backward(dy.contiguous(), xBC, w, b, dt, A, Dfull,
                                                                       offsets, *ctx.dims)
        dD = None if ctx.D_dim is None else (dD if ctx.D_dim == 2 else dD.sum(1))
        return dx, dw, db if ctx.has_bias else None, ddt, dA, dD, None, None, None, None


def prefix_reverse_scan(
    xBC: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    offsets: torch.Tensor,
    *,
    nheads: int,
    ngroups: int,
    d_state: int,
) -> torch.Tensor:
    """Final output of the reverse SSD scan over every prefix ``s..t``, placed at t: ``(T, nheads, headdim)``.

    Args:
        xBC: (T, d_inner + 2·ngroups·d_state) the mixer's pre-conv ``[x, B, C]`` columns, in time order.
        conv_weight: (channels, W) depthwise conv taps (``[:, -1]`` multiplies the current token).
        conv_bias: (channels,) or None.
        dt: (T, nheads) Δ after softplus (positive).  A: (nheads,) negative.  D: (nheads,), (nheads, headdim)
            or None (no skip).
        offsets: (S+1,) int64 segment offsets; every segment is scanned on its own.

    Returns ``y`` with ``y[t]`` = the reverse scan over ``s..t`` (segment start s), read at its last step
    (token s), D skip included; the caller applies the gate and out_proj with token s's ``z``.
    """
    T, channels = xBC.shape
    d_inner = channels - 2 * ngroups * d_state
    if d_inner <= 0 or d_inner % nheads:
        raise ValueError(f"xBC has {channels} channels: not d_inner + 2*{ngroups}*{d_state} with d_inner a "
                         f"multiple of nheads={nheads}")
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} must be a multiple of ngroups={ngroups}")
    if conv_weight.shape[0] != channels:
        raise ValueError(f"conv_weight must have {channels} rows, got {tuple(conv_weight.shape)}")
    if dt.shape != (T, nheads) or A.shape != (nheads,):
        raise ValueError(f"dt must be ({T}, {nheads}) and A ({nheads},), got {tuple(dt.shape)}, {tuple(A.shape)}")
    validate_offsets(offsets, T)
    if T == 0:
        return xBC.new_zeros((0, nheads, d_inner // nheads))
    args = (xBC.contiguous(), conv_weight, conv_bias, dt.contiguous(), A, D, offsets, nheads, ngroups, d_state)
    tensors = [t for t in args[:6] if t is not None]
    if all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and native_ops() is not None:
        return _NativePrefixReverseScan.apply(*args)
    return _PrefixReverseScan.apply(*args)


def prefix_reverse_scan_traceable(
    xBC: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    start: torch.Tensor,
    pos: torch.Tensor,
    left: torch.Tensor,
    *,
    nheads: int,
    ngroups: int,
    d_state: int,
) -> torch.Tensor:
    """:func:`prefix_reverse_scan` for inference graphs (``torch.export``): the same mathematics in gathers and masks
    only - no host sync, no data-dependent shapes or loops - from per-token ``start`` (segment's first row),
    ``pos`` (position in the segment) and ``left`` (rows after it in the segment). Plain autograd, no kernels."""
    T, channels = xBC.shape
    W = conv_weight.shape[1]
    d_inner = channels - 2 * ngroups * d_state
    headdim = d_inner // nheads
    hpg = nheads // ngroups
    t = torch.arange(T, device=xBC.device)

    def rows(x: torch.Tensor, shift: int, valid: torch.Tensor) -> torch.Tensor:
        """Row ``r + shift`` of x at row r where ``valid``, else 0 (a gather, no slicing)."""
        idx = (t + shift).clamp(0, T - 1)
        return torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x.index_select(0, idx), torch.zeros_like(x))

    pre = xBC * conv_weight[:, W - 1] if conv_bias is None else torch.addcmul(conv_bias, xBC, conv_weight[:, W - 1])
    partial = [F.silu(pre)]
    for j in range(1, W):
        pre = pre + rows(xBC, j, left >= j) * conv_weight[:, W - 1 - j]
        partial.append(F.silu(pre))

    def split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, B, C = u.split([d_inner, ngroups * d_state, ngroups * d_state], 1)
        return (x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, d_state)),
                C.unflatten(-1, (ngroups, d_state)))

    x_full, B_full, C_full = split(partial[W - 1])
    q, x_first = C_full.index_select(0, start), x_full.index_select(0, start)
    for j in range(W - 1):
        xj, _, Cj = split(partial[j])
        at = (pos == j).view(-1, 1, 1)
        q = torch.where(at, Cj.index_select(0, start), q)
        x_first = torch.where(at, xj.index_select(0, start), x_first)
    dA = dt.double() * A.double()
    incl = torch.cumsum(dA, 0)
    excl = incl - dA - (incl - dA).index_select(0, start)
    coef = (torch.where(excl > _LOG_DECAY_FLOOR, torch.exp(excl), 0.0) * dt.double()).to(xBC.dtype)

    def weighted(x, B, query, c):
        qb = (query * B).sum(-1).repeat_interleave(hpg, dim=1)
        return (c * qb).unsqueeze(-1) * x

    v = weighted(x_full, B_full, C_full.index_select(0, start), coef).double()
    run = torch.cumsum(v, 0)
    seg_sum = run - (run - v).index_select(0, start)
    y = rows(seg_sum, -(W - 1), pos >= W - 1).to(xBC.dtype)
    for j in range(W - 1):
        xj, Bj, _ = split(partial[j])
        ok = pos >= j
        y = y + weighted(rows(xj, -j, ok), rows(Bj, -j, ok), q, rows(coef, -j, ok))
    if D is not None:
        y = y + x_first * (D.view(1, nheads, -1) if D.dim() == 2 else D.view(1, nheads, 1))
    return y
