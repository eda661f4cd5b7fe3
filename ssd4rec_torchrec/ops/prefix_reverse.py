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
the sum runs over ``(T, heads, headdim)`` values. Everything is plain differentiable torch; cost and memory
are linear in T. The float64 token-by-token reference in the tests checks it against re-running the reverse
recurrence on every prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets

__all__ = ["prefix_reverse_scan"]


def _shift_down(t: torch.Tensor, j: int) -> torch.Tensor:
    """Row r of the result is row r-j of t (zeros for r < j)."""
    if j == 0:
        return t
    j = min(j, t.shape[0])
    return torch.cat([t.new_zeros((j, *t.shape[1:])), t[:t.shape[0] - j]])


def _shift_up(t: torch.Tensor, j: int) -> torch.Tensor:
    """Row r of the result is row r+j of t (zeros past the end)."""
    if j == 0:
        return t
    j = min(j, t.shape[0])
    return torch.cat([t[j:], t.new_zeros((j, *t.shape[1:]))])


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
    headdim = d_inner // nheads
    W = conv_weight.shape[1]
    if T == 0:
        return xBC.new_zeros((0, nheads, headdim))

    seg = segment_ids(offsets, T)
    start = offsets[:-1][seg]  # (T,) first token of each token's segment
    pos = torch.arange(T, device=xBC.device) - start  # position inside the segment
    left = offsets[1:][seg] - 1 - torch.arange(T, device=xBC.device)  # tokens after this one in its segment

    # Anti-causal conv with its first j+1 taps, j = 0..W-1 (j = W-1: the whole-segment value û).
    pre = xBC * conv_weight[:, W - 1] if conv_bias is None else torch.addcmul(conv_bias, xBC, conv_weight[:, W - 1])
    partial = [F.silu(pre)]
    for j in range(1, W):
        nxt = _shift_up(xBC, j) * (left >= j).unsqueeze(1).to(xBC.dtype)
        pre = pre + nxt * conv_weight[:, W - 1 - j]
        partial.append(F.silu(pre))
    hpg = nheads // ngroups

    def split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, B, C = u.split([d_inner, ngroups * d_state, ngroups * d_state], 1)
        return x.reshape(-1, nheads, headdim), B.reshape(-1, ngroups, d_state), C.reshape(-1, ngroups, d_state)

    # Query C_s(t) and skip input x_s(t): the first token's conv, cut at t while t < s + W - 1.
    x_full, B_full, C_full = split(partial[W - 1])
    q, x_first = C_full[start], x_full[start]
    for j in range(W - 1):
        xj, _, Cj = split(partial[j])
        at = (pos == j)
        q = torch.where(at.view(-1, 1, 1), Cj[start], q)
        x_first = torch.where(at.view(-1, 1, 1), xj[start], x_first)

    # L_k Δ_k = exp(exclusive in-segment cumsum of Δ A) Δ_k, in float64 (a long segment's sum is large).
    dA = (dt.to(torch.float64) * A.to(torch.float64))
    incl = torch.cumsum(dA, 0)
    excl = incl - dA - (incl - dA)[start]
    coef = (torch.exp(excl) * dt.to(torch.float64)).to(xBC.dtype)  # (T, nheads)

    def weighted(x: torch.Tensor, B: torch.Tensor, query: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c_k (query·B_k) x_k per head: (T, nheads, headdim)."""
        qb = (query * B).sum(-1).repeat_interleave(hpg, dim=1)  # (T, nheads)
        return (c * qb).unsqueeze(-1) * x

    # Whole-window tokens k <= t - W + 1: a segment-wise cumulative sum (float64: the segment's base is
    # subtracted from a running total over the flat axis), read W-1 tokens back.
    v = weighted(x_full, B_full, C_full[start], coef).to(torch.float64)
    run = torch.cumsum(v, 0)
    seg_sum = run - (run - v)[start]
    y = (_shift_down(seg_sum, W - 1) * (pos >= W - 1).view(-1, 1, 1)).to(xBC.dtype)
    # The last W-1 tokens of the prefix, with the conv cut at t.
    for j in range(W - 1):
        xj, Bj, _ = split(partial[j])
        term = weighted(_shift_down(xj, j), _shift_down(Bj, j), q, _shift_down(coef, j))
        y = y + term * (pos >= j).view(-1, 1, 1).to(y.dtype)
    if D is not None:
        y = y + x_first * (D.view(1, nheads, -1) if D.dim() == 2 else D.view(1, nheads, 1))
    return y
