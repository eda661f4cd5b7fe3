"""The pure-torch chunked dual-form SSD (`kernel="torch"`): factored where the decays allow it, exact elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd4rec_torchrec.ops.ssd.decay import _DecayMatmul, _masked_exp, _segment_scan
from ssd4rec_torchrec.ops.ssd.factored import (
    _chunk_cumsum,
    _chunk_layout,
    _chunk_starts,
    _FactoredScan,
    _intra_chunk_factored,
    _pad_tokens,
    _SegmentCumsum,
)

# Chunks whose log-decays stay within ±this of their midpoint (per head) use the factored intra-chunk form
# (`_intra_chunk_factored`): e^60 ≈ 1e26 leaves ~1e12 of fp32 headroom for the matmul's partial sums.
# 0 disables it (every chunk then uses the exact per-head decay matrices).
_FACTORED_MAX_LOG = 60.0


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
