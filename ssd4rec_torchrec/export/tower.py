"""The user tower for serving: item lookup + Bi-SSD encoder + read-out as one ``torch.export``-able module.

The training ops (``ssd4rec_torchrec.ops``) are written for speed and memory in training: they validate
offsets with a host sync, branch in Python on token counts, loop over blocks of chunks inside a custom
autograd Function and recurse over chunk states to a data-dependent depth. None of that traces to one
graph with a symbolic token count. :class:`UserTower` re-states the *inference* path of
:class:`~ssd4rec_torchrec.nn.BiSSDEncoder` with the same parameters (it holds references to the
encoder's modules) in branch-free tensor ops:

- segment ids by ``searchsorted`` over the offsets (no ``repeat_interleave`` output size, empty segments fine);
- the causal conv as W shifted slices of a front-padded copy (no loop bound on T);
- the gated RMSNorm as its plain formula (the training op works over blocks of rows);
- the SSD scan in the chunked dual form with the model's chunk size, the token axis padded to whole chunks
  (padding is its own segment), and the recurrence over chunk end states solved densely as one
  ``(nc, nc)`` decay matrix per head (nc = chunks; at serving batch sizes a few hundred at most);
- read-out: ``last`` reads each segment's last token; ``append_mask`` inserts the mask token after every
  segment (a scatter, no padding) and reads it.

Same mathematics as the eager encoder, different summation order: parity is checked to 1e-5 by the tests
and again by every export. Dropout is skipped (inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BiSSDEncoder
from ..nn.layers import BiSSDLayer
from ..nn.mixer import SSDMixer
from ..ops.prefix_reverse import prefix_reverse_scan_traceable

__all__ = ["READOUTS", "UserTower"]

READOUTS = ("last", "append_mask")


def _segment_ids(offsets: Tensor, n_tokens: int) -> Tensor:
    """Segment of every token (int64, (T,)); tokens of empty segments do not exist, so those are skipped."""
    t = torch.arange(n_tokens, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets, t, right=True) - 1


def _decay_matrix(a: Tensor, mask: Tensor) -> Tensor:
    """``exp(a[j+1] + ... + a[i])`` where ``mask[i, j]``, exactly 0 elsewhere; a: (..., L) -> (..., L, L).

    The running sum is accumulated in float64 and split into an fp32 head and tail (as the training op
    does), so differences of large running sums keep full relative precision.
    """
    cs = a.double().cumsum(-1)
    hi = cs.to(a.dtype)
    lo = (cs - hi.double()).to(a.dtype)
    s = (hi.unsqueeze(-1) - hi.unsqueeze(-2)) + (lo.unsqueeze(-1) - lo.unsqueeze(-2))
    return torch.exp(torch.where(mask, s, torch.full_like(s, float("-inf"))))


def _masked_exp(x: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(torch.where(mask, x, torch.full_like(x, float("-inf"))))


def varlen_conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor) -> Tensor:
    """Segment-resetting causal depthwise conv + SiLU; x (T, C), weight (C, W) (``[:, -1]`` = current token)."""
    n_tok, width = x.shape[0], weight.shape[1]
    xp = F.pad(x, (0, 0, width - 1, 0))  # xp[t + width - 1] = x[t]
    y = x * weight[:, width - 1]
    for k in range(1, width):
        shifted = xp[width - 1 - k: width - 1 - k + n_tok]  # shifted[t] = x[t - k] (0 before the start)
        y = y + torch.where((pos >= k).unsqueeze(-1), shifted, torch.zeros_like(shifted)) * weight[:, width - 1 - k]
    if bias is not None:
        y = y + bias
    return F.silu(y)


def ssd_scan_dense_chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seg: Tensor, n_segments: int,
                          D: Tensor | None, chunk_size: int) -> Tensor:
    """Segment-resetting SSD scan (see ``ops.ssd``) without data-dependent control flow.

    x (T, H, P), dt (T, H), A (H,), B/C (T, G, N), seg (T,) non-decreasing segment ids < ``n_segments``.
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
    y = torch.matmul(_decay_matrix(a, same) * CB, xdt).permute(0, 3, 1, 2, 4)  # (nc, Q, G, R, P)

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
    h_end = torch.matmul(_decay_matrix(chunk_decay, chain), states.transpose(0, 1))  # (H, nc, P·N)
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


def _gated_rms_norm(norm: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """``GatedRMSNorm`` in plain tensor ops (the training op works over row blocks, a loop bound on T)."""
    if not norm.norm_before_gate:
        x = x * F.silu(z)
    groups = x.unflatten(-1, (-1, norm.group_size))
    out = (groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + norm.eps)).flatten(-2) * norm.weight
    return out * F.silu(z) if norm.norm_before_gate else out


def _mixer(m: SSDMixer, x: Tensor, seg: Tensor, n_segments: int, pos: Tensor) -> Tensor:
    """``SSDMixer.forward`` (fp32 between the projections) with the branch-free conv and scan."""
    z, xBC, dt = torch.split(m.in_proj(x).float(), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    conv_b = None if m.conv1d.bias is None else m.conv1d.bias.float()
    xBC = varlen_conv_silu(xBC, m.conv1d.weight.float().squeeze(1), conv_b, pos)
    xs, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    dt = F.softplus(dt + m.dt_bias.float())
    A = -torch.exp(m.A_log.float())
    D = m.D.float().view(m.nheads, m.headdim) if m.D_has_hdim else m.D.float()
    # unflatten splits the last (unit-stride) dimension: a reshape of these column slices would guard on T != 1
    y = ssd_scan_dense_chunks(xs.unflatten(-1, (m.nheads, m.headdim)), dt, A, B.unflatten(-1, (m.ngroups, m.d_state)),
                              C.unflatten(-1, (m.ngroups, m.d_state)), seg, n_segments, D, m.chunk_size)
    y = y.flatten(-2)
    y = _gated_rms_norm(m.norm, y, z) if m.rmsnorm else y * F.silu(z)
    return m.out_proj(y.to(x.dtype))


def _mixer_prefix_reverse(m: SSDMixer, x: Tensor, start: Tensor, pos: Tensor, left: Tensor) -> Tensor:
    """``SSDMixer.project_out(mix_prefix_reverse(...))``: the reverse scan of every prefix, read at its end."""
    z, xBC, dt = torch.split(m.in_proj(x).float(), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    conv_b = None if m.conv1d.bias is None else m.conv1d.bias.float()
    D = m.D.float().view(m.nheads, m.headdim) if m.D_has_hdim else m.D.float()
    y = prefix_reverse_scan_traceable(xBC, m.conv1d.weight.float().squeeze(1), conv_b,
                                      F.softplus(dt + m.dt_bias.float()), -torch.exp(m.A_log.float()), D, start, pos,
                                      left, nheads=m.nheads, ngroups=m.ngroups, d_state=m.d_state).flatten(-2)
    z_first = z.index_select(0, start)
    y = _gated_rms_norm(m.norm, y, z_first) if m.rmsnorm else y * F.silu(z_first)
    return m.out_proj(y.to(x.dtype))


def _layer(layer: BiSSDLayer, x: Tensor, seg: Tensor, n_segments: int, pos: Tensor, rev: Tensor) -> Tensor:
    """``BiSSDLayer.forward`` in eval mode: both directions, one after the other."""
    fwd = _mixer(layer.forward_ssd, x, seg, n_segments, pos)
    if layer.backward_scope == "prefix":
        bwd_mixer = layer.forward_ssd if layer.backward_ssd is None else layer.backward_ssd
        t = torch.arange(x.shape[0], device=x.device, dtype=torch.int64)
        start = t - pos
        left = rev - start  # rev[t] = start + end - t, so rows after t = end - t = rev - start
        bwd = _mixer_prefix_reverse(bwd_mixer, x, start, pos, left)
        h = layer.LayerNorm(fwd + layer.beta * bwd + x)
        ffn = layer.ffn
        return ffn.LayerNorm(ffn.w_2(ffn.activation(ffn.w_1(h))) + h)
    bwd_mixer = layer.forward_ssd if layer.backward_ssd is None else layer.backward_ssd
    bwd = _mixer(bwd_mixer, x[rev], seg, n_segments, pos)
    if layer.flip_back:
        bwd = bwd[rev]
    h = layer.LayerNorm(fwd + layer.beta * bwd + x)
    ffn = layer.ffn
    return ffn.LayerNorm(ffn.w_2(ffn.activation(ffn.w_1(h))) + h)


class UserTower(nn.Module):
    """``forward(item_indices (T,) int64, offsets (B+1,) int64) -> (B, d) float32`` user vectors.

    ``item_indices`` are item indices 1..num_items, oldest first, already truncated to the maximum
    history; ``offsets`` are jagged offsets into them. ``readout="last"`` reads each history's last item
    (needs non-empty histories); ``"append_mask"`` appends the mask token ``num_items + 1`` to every
    history and reads it (an empty history then is just the mask token).
    """

    def __init__(self, table: Tensor, encoder: BiSSDEncoder, *, num_items: int, readout: str,
                 l2_normalize: bool) -> None:
        super().__init__()
        if not isinstance(encoder, BiSSDEncoder):
            raise ValueError(f"only the Bi-SSD encoder can be exported, got {type(encoder).__name__}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if table.shape[0] != num_items + 2:
            raise ValueError(f"table has {table.shape[0]} rows, expected num_items + 2 = {num_items + 2}")
        self.item_embedding = nn.Embedding.from_pretrained(table.detach().float(), freeze=True)
        self.encoder = encoder
        self.num_items = num_items
        self.readout = readout
        self.l2_normalize = l2_normalize

    def forward(self, item_indices: Tensor, offsets: Tensor) -> Tensor:
        n_seg = offsets.shape[0] - 1
        if self.readout == "append_mask":
            seg = _segment_ids(offsets, item_indices.shape[0])
            offsets = offsets + torch.arange(n_seg + 1, device=offsets.device, dtype=offsets.dtype)
            ends = offsets[1:] - 1
            n_tok = item_indices.shape[0] + n_seg
            tokens = torch.full((n_tok,), self.num_items + 1, dtype=item_indices.dtype, device=item_indices.device)
            tokens = tokens.index_put((torch.arange(item_indices.shape[0], device=seg.device) + seg,), item_indices)
        else:
            ends = offsets[1:] - 1
            tokens, n_tok = item_indices, item_indices.shape[0]
        enc = self.encoder
        seg = _segment_ids(offsets, n_tok)
        t = torch.arange(n_tok, device=offsets.device, dtype=torch.int64)
        pos = t - offsets[seg]
        rev = offsets[seg] + offsets[seg + 1] - 1 - t
        h = self.item_embedding(tokens)
        if enc.position_embedding is not None:
            h = h + enc.position_embedding(pos.clamp(max=enc.max_positions - 1))
        if enc.norm_embedding:
            h = enc.LayerNorm(h)
        for layer in enc.layers:
            h = _layer(layer, h, seg, n_seg, pos, rev)
        user = h.index_select(0, ends).float()  # (h[ends] would guard on T != 1)
        return F.normalize(user, dim=-1) if self.l2_normalize else user
