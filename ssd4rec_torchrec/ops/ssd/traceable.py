"""The SSD scan for ``torch.export``: branch-free tensor ops with a symbolic token count.

The training path (``dispatcher.ssd_scan``) validates offsets with a host sync, branches in Python on token
counts, loops over blocks of chunks inside custom autograd Functions and recurses over chunk states to a
data-dependent depth; none of that traces to one graph. ``ssd_scan_traceable`` computes the same scan in
plain tensor ops (used by ``export.tower.UserTower``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd4rec_torchrec.ops.ssd.decay import _masked_exp

__all__ = ["ssd_scan_traceable"]


def _dense_decay_matrix(a: Tensor, mask: Tensor) -> Tensor:
    """``exp(a[j+1] + ... + a[i])`` where ``mask[i, j]``, exactly 0 elsewhere; a: (..., L) -> (..., L, L).

    The running sum is accumulated in float64 and split into an fp32 head and tail (as ``decay._decay_matrix``
    does, here without in-place updates), so differences of large running sums keep full relative precision.
    """
    cs = a.double().cumsum(-1)
    hi = cs.to(a.dtype)
    lo = (cs - hi.double()).to(a.dtype)
    s = (hi.unsqueeze(-1) - hi.unsqueeze(-2)) + (lo.unsqueeze(-1) - lo.unsqueeze(-2))
    return torch.exp(torch.where(mask, s, torch.full_like(s, float("-inf"))))


def ssd_scan_traceable(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seg: Tensor, D: Tensor | None,
                       chunk_size: int) -> Tensor:
    """``ssd_scan`` for inference graphs (``torch.export``): the chunked dual form without data-dependent
    control flow, host syncs or custom autograd Functions.

    x (T, H, P), dt (T, H), A (H,), B/C (T, G, N), seg (T,) non-decreasing segment ids (from the offsets),
    D None, (H,) or (H, P). The token axis is padded to whole chunks of ``chunk_size`` (padding is its own
    segment) and the recurrence over chunk end states is solved densely as one ``(nc, nc)`` decay matrix per
    head (nc = chunks; at serving batch sizes a few hundred at most). Same mathematics as ``ssd_scan``,
    different summation order.
    """
    n_tok, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    Q = chunk_size
    nc = (n_tok + Q - 1) // Q + 1  # one spare chunk: nc >= 2 provably, so no size-1 special case is traced
    pad = nc * Q - n_tok
    x_in = x
    x = F.pad(x, (0, 0, 0, 0, 0, pad))
    dt = F.pad(dt, (0, 0, 0, pad))  # dt = 0 on padding: no decay, no input
    B = F.pad(B, (0, 0, 0, 0, 0, pad))
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
    seg = F.pad(seg, (0, pad), value=-1)  # padding: a segment of its own (not ordered, never compared as such)
    a = (dt * A).view(nc, Q, G, R).permute(0, 2, 3, 1)  # (nc, G, R, Q) log-decay per token
    xdt = (x * dt.unsqueeze(-1)).view(nc, Q, G, R, P).permute(0, 2, 3, 1, 4)  # (nc, G, R, Q, P)
    Bg = B.view(nc, Q, G, N).transpose(1, 2)  # (nc, G, Q, N)
    Cg = C.view(nc, Q, G, N).transpose(1, 2)
    segc = seg.view(nc, Q)

    # 1) Intra-chunk term: (L ∘ C Bᵀ)(dt ⊙ X).
    tri = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same = (tri & (segc[:, :, None] == segc[:, None, :]))[:, None, None]  # (nc, 1, 1, Q, Q)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2)).unsqueeze(2)  # (nc, G, 1, Q, Q)
    y = torch.matmul(_dense_decay_matrix(a, same) * CB, xdt).permute(0, 3, 1, 2, 4)  # (nc, Q, G, R, P)

    # 2) Each chunk's end state from its own tokens of its last segment.
    suffix = F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # decay to the chunk end (exclusive)
    w = _masked_exp(suffix, (segc == segc[:, -1:])[:, None, None])  # (nc, G, R, Q)
    xw = (xdt * w.unsqueeze(-1)).permute(0, 1, 2, 4, 3).reshape(nc, G, R * P, Q)
    states = torch.matmul(xw, Bg).reshape(nc, H, P * N)
    # 3) Recurrence over chunk end states, reset where the last segment changes: dense (nc, nc) per head.
    cs = torch.cumsum(a, dim=-1)  # (nc, G, R, Q) decay from the chunk start, inclusive
    seg_last = segc[:, -1]
    chunk_decay = cs[..., -1].reshape(nc, H).T  # (H, nc)
    tri_c = torch.ones(nc, nc, dtype=torch.bool, device=x.device).tril()
    chain = tri_c & (seg_last[:, None] == seg_last[None, :])
    h_end = torch.matmul(_dense_decay_matrix(chunk_decay, chain), states.transpose(0, 1))  # (H, nc, P·N)
    # 4) The previous chunk's end state reaches this chunk's tokens of the same segment (none for chunk 0).
    h_prev = F.pad(h_end.transpose(0, 1)[:-1], (0, 0, 0, 0, 1, 0)).reshape(nc, G, R * P, N)
    prev_last = F.pad(seg_last[:-1], (1, 0), value=-2)  # chunk 0 has no predecessor
    carry = _masked_exp(cs, (segc == prev_last[:, None])[:, None, None, :]).permute(0, 3, 1, 2).unsqueeze(-1)
    y_off = torch.matmul(Cg, h_prev.transpose(-1, -2)).view(nc, G, Q, R, P).transpose(1, 2) * carry
    keep = torch.arange(n_tok, device=x.device)  # index_select, not a slice: a slice guards on n_tok <= nc * Q
    y = (y + y_off).reshape(nc * Q, H, P).index_select(0, keep)
    if D is not None:
        y = y + x_in * (D.unsqueeze(-1) if D.dim() == 1 else D)
    return y
