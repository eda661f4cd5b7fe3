"""The user tower for serving: item lookup + Bi-SSD encoder + read-out as one ``torch.export``-able module.

The training ops (``ssd4rec_torchrec.ops``) are written for speed and memory in training: they validate
offsets with a host sync, branch in Python on token counts, loop over blocks of chunks inside a custom
autograd Function and recurse over chunk states to a data-dependent depth. None of that traces to one
graph with a symbolic token count. :class:`UserTower` re-states the *inference* path of
:class:`~ssd4rec_torchrec.nn.BiSSDEncoder` with the same parameters (it holds references to the
encoder's modules) with the ops' traceable forms (branch-free tensor ops):

- segment ids by ``searchsorted`` over the offsets (no ``repeat_interleave`` output size, empty segments fine);
- the causal conv as W shifted slices of a front-padded copy (``ops.conv.varlen_conv_silu_traceable``);
- the gated RMSNorm as its plain formula (``ops.norm.gated_rms_norm_traceable``);
- the SSD scan in the chunked dual form with the model's chunk size, the recurrence over chunk end states
  solved densely (``ops.ssd.ssd_scan_traceable``); the prefix-reverse branch by
  ``ops.prefix_reverse.prefix_reverse_scan_traceable``;
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
from ..nn.baselines import JaggedTransformerEncoder
from ..nn.layers import BiSSDLayer
from ..nn.mixer import SSDMixer
from ..ops.attention import windowed_attention_traceable
from ..ops.conv import varlen_conv_silu_traceable
from ..ops.norm import gated_rms_norm_traceable
from ..ops.prefix_reverse import prefix_reverse_scan_traceable
from ..ops.ssd import ssd_scan_traceable

__all__ = ["READOUTS", "TransformerTower", "UserTower", "build_tower"]

READOUTS = ("last", "append_mask")


def _segment_ids(offsets: Tensor, n_tokens: int) -> Tensor:
    """Segment of every token (int64, (T,)); tokens of empty segments do not exist, so those are skipped."""
    t = torch.arange(n_tokens, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets, t, right=True) - 1


def _gated_rms_norm(norm: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """``GatedRMSNorm`` (its parameters and settings) through the traceable op."""
    return gated_rms_norm_traceable(x, norm.weight, z, eps=norm.eps, group_size=norm.group_size,
                                    norm_before_gate=norm.norm_before_gate)


def _mixer(m: SSDMixer, x: Tensor, seg: Tensor, pos: Tensor) -> Tensor:
    """``SSDMixer.forward`` (fp32 between the projections) with the branch-free conv and scan."""
    z, xBC, dt = torch.split(m.in_proj(x).float(), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    conv_b = None if m.conv1d.bias is None else m.conv1d.bias.float()
    xBC = varlen_conv_silu_traceable(xBC, m.conv1d.weight.float().squeeze(1), conv_b, pos)
    xs, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    dt = F.softplus(dt + m.dt_bias.float())
    A = -torch.exp(m.A_log.float())
    D = m.D.float().view(m.nheads, m.headdim) if m.D_has_hdim else m.D.float()
    # unflatten splits the last (unit-stride) dimension: a reshape of these column slices would guard on T != 1
    y = ssd_scan_traceable(xs.unflatten(-1, (m.nheads, m.headdim)), dt, A, B.unflatten(-1, (m.ngroups, m.d_state)),
                           C.unflatten(-1, (m.ngroups, m.d_state)), seg, D, m.chunk_size)
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


def _layer(layer: BiSSDLayer, x: Tensor, seg: Tensor, pos: Tensor, rev: Tensor) -> Tensor:
    """``BiSSDLayer.forward`` in eval mode: both directions, one after the other."""
    fwd = _mixer(layer.forward_ssd, x, seg, pos)
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
    bwd = _mixer(bwd_mixer, x[rev], seg, pos)
    if layer.flip_back:
        bwd = bwd[rev]
    h = layer.LayerNorm(fwd + layer.beta * bwd + x)
    ffn = layer.ffn
    return ffn.LayerNorm(ffn.w_2(ffn.activation(ffn.w_1(h))) + h)


def _check_tower_args(table: Tensor, num_items: int, readout: str) -> None:
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if table.shape[0] != num_items + 2:
        raise ValueError(f"table has {table.shape[0]} rows, expected num_items + 2 = {num_items + 2}")


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
        _check_tower_args(table, num_items, readout)
        self.item_embedding = nn.Embedding.from_pretrained(table.detach().float(), freeze=True)
        self.encoder = encoder
        self.num_items = num_items
        self.readout = readout
        self.l2_normalize = l2_normalize

    def forward(self, item_indices: Tensor, offsets: Tensor) -> Tensor:
        tokens, offsets, ends = _readout_tokens(item_indices, offsets, self.readout, self.num_items + 1)
        enc = self.encoder
        n_tok = tokens.shape[0]
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
            h = _layer(layer, h, seg, pos, rev)
        user = h.index_select(0, ends).float()  # (h[ends] would guard on T != 1)
        return F.normalize(user, dim=-1) if self.l2_normalize else user


def _readout_tokens(item_indices: Tensor, offsets: Tensor, readout: str, mask_token: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens, offsets, ends)`` the encoder reads: ``append_mask`` inserts ``mask_token`` after every
    history (a scatter, no padding) and shifts the offsets; ``ends`` is each history's read-out token."""
    if readout != "append_mask":
        return item_indices, offsets, offsets[1:] - 1
    n_seg = offsets.shape[0] - 1
    seg = _segment_ids(offsets, item_indices.shape[0])
    offsets = offsets + torch.arange(n_seg + 1, device=offsets.device, dtype=offsets.dtype)
    tokens = torch.full((item_indices.shape[0] + n_seg,), mask_token, dtype=item_indices.dtype,
                        device=item_indices.device)
    tokens = tokens.index_put((torch.arange(item_indices.shape[0], device=seg.device) + seg,), item_indices)
    return tokens, offsets, offsets[1:] - 1


class TransformerTower(nn.Module):
    """The baselines' (SASRec, BERT4Rec) user tower: same contract as :class:`UserTower`.

    Each history is encoded over a fixed ``window`` of its most recent tokens (the mask token included),
    the window the model was trained and evaluated on: positions count from the window's first token and
    attention runs on a ``(B, window)`` layout (``ops.attention.windowed_attention_traceable``). Dropout is
    skipped (inference).
    """

    def __init__(self, table: Tensor, encoder: JaggedTransformerEncoder, *, num_items: int, readout: str,
                 l2_normalize: bool, window: int) -> None:
        super().__init__()
        if not isinstance(encoder, JaggedTransformerEncoder):
            raise ValueError(f"expected a SASRec/BERT4Rec encoder, got {type(encoder).__name__}")
        _check_tower_args(table, num_items, readout)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.item_embedding = nn.Embedding.from_pretrained(table.detach().float(), freeze=True)
        self.encoder = encoder
        self.num_items, self.readout, self.l2_normalize, self.window = num_items, readout, l2_normalize, window

    def forward(self, item_indices: Tensor, offsets: Tensor) -> Tensor:
        tokens, offsets, ends = _readout_tokens(item_indices, offsets, self.readout, self.num_items + 1)
        enc, n_tok, n_seg = self.encoder, tokens.shape[0], offsets.shape[0] - 1
        seg = _segment_ids(offsets, n_tok)
        pos = torch.arange(n_tok, device=offsets.device, dtype=torch.int64) - offsets[seg]
        length = (offsets[1:] - offsets[:-1])[seg]
        slot = pos - (length - self.window).clamp(min=0)  # < 0: older than the window
        h = self.item_embedding(tokens) + enc.position_embedding(slot.clamp(min=0, max=enc.max_positions - 1))
        if enc.LayerNorm is not None:
            h = enc.LayerNorm(h)
        for block in enc.layers:
            qkv = block.qkv(h)
            a = block.out_proj(windowed_attention_traceable(qkv, seg, slot, n_seg, self.window, block.n_heads,
                                                            causal=enc.causal))
            h = block.norm1(h + a)
            h = block.norm2(h + block.ffn_out(F.gelu(block.ffn_in(h))))
        user = h.index_select(0, ends).float()
        return F.normalize(user, dim=-1) if self.l2_normalize else user


def build_tower(table: Tensor, encoder: nn.Module, *, num_items: int, readout: str, l2_normalize: bool,
                window: int | None) -> nn.Module:
    """The serving tower of a trained encoder: :class:`UserTower` (Bi-SSD, any history length) or
    :class:`TransformerTower` (``window``: the most recent tokens it reads, the read-out's mask included)."""
    if isinstance(encoder, BiSSDEncoder):
        return UserTower(table, encoder, num_items=num_items, readout=readout, l2_normalize=l2_normalize)
    if window is None:
        raise ValueError("a transformer tower needs a window (its training history length)")
    return TransformerTower(table, encoder, num_items=num_items, readout=readout, l2_normalize=l2_normalize,
                            window=window)
