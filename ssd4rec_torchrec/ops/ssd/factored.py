"""The factored SSD forms: the decay matrix factored per token, `exp(cs_i - cs_j) = f_i g_j`.

`_FactoredScan` runs the whole chunked scan in that form as one autograd Function with a hand-written
backward; `_intra_chunk_factored` is the intra-chunk term alone (for calls that mix forms).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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
