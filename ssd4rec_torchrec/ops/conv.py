"""Causal depthwise conv1d over packed variable-length sequences (Mamba-2's short conv with `seq_idx`).

`y_t = bias + Σ_{k=0}^{W-1} weight[:, W-1-k] * x_{t-k}` where only tokens `x_{t-k}` of the same segment
as t count (the causal-conv1d convention: `weight[:, -1]` multiplies the current token). The torch path
sums W shifted row slices of x in place over the flat token axis, in cache-sized row blocks with bias
and SiLU fused (a custom autograd Function), and recomputes the first W-1 rows of every segment from
their in-segment taps only, so tokens of different segments are never mixed. On CUDA the
`causal_conv1d` package is used when installed. For fp32 on CPU the native kernels (`ops.native`) do the
same per row in one pass (taps limited by the row's position in its segment, SiLU fused; about 3x faster
forward and backward), with the torch Function as their fallback and reference.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssd4rec_torchrec.ops.native import native_ops
from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets

__all__ = ["causal_conv1d_available", "varlen_causal_conv1d", "varlen_conv_silu_traceable"]

logger = logging.getLogger(__name__)

# "mamba" is accepted as an alias of "auto" so that a model can forward one `kernel` setting to both the
# conv and `ssd_scan`; "causal_conv1d" insists on the CUDA kernel and raises when it cannot be used.
CONV_KERNELS = ("auto", "torch", "mamba", "causal_conv1d")
ACTIVATIONS = (None, "silu", "swish")
# Elements per row block of the torch path (rows = this // C): a block of x, the output and the backward
# scratch stay in L2 while the W taps, bias and SiLU run over it.
_BLOCK_ELEMS = 1 << 18


@functools.lru_cache(maxsize=1)
def _load_causal_conv1d() -> Any:
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn


@functools.lru_cache(maxsize=1)
def causal_conv1d_available() -> bool:
    """True when the `causal_conv1d` CUDA package imports (cached: a failing import is tried once)."""
    try:
        _load_causal_conv1d()
    except Exception as exc:  # ImportError or a broken CUDA extension
        logger.info("causal_conv1d unavailable, varlen_causal_conv1d uses the torch path: %r", exc)
        return False
    return True


def _cuda_kernel_unusable_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why `causal_conv1d_fn` cannot take this input (None when it can)."""
    if not x.is_cuda:
        return "x is not on CUDA"
    if not 2 <= weight.shape[1] <= 4:
        return f"kernel width {weight.shape[1]} not in 2..4"
    if x.shape[1] % 8 != 0:
        return f"channels {x.shape[1]} not a multiple of 8 (channel-last layout)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} not supported"
    if not causal_conv1d_available():
        return "causal_conv1d is not installed"
    return None


def _block_bounds(T: int, W: int, C: int) -> list[tuple[int, int]]:
    """Row blocks `[s, e)` covering rows W-1..T-1 (rows below W-1 are all segment heads), each of about
    `_BLOCK_ELEMS` elements so that a block of x, of the output and of the scratch stays in cache."""
    rows = max(1, _BLOCK_ELEMS // max(C, 1))
    return [(s, min(s + rows, T)) for s in range(W - 1, T, rows)]


def _segment_heads(offsets: torch.Tensor, W: int) -> tuple[torch.Tensor, ...]:
    """The rows within W-1 tokens of their segment's start ("heads", increasing) and their in-segment taps.

    Returns `head` (H,) and, one entry per (head row i, tap k <= its position in the segment),
    `pair_row` (index into `head`), `pair_src = head[pair_row] - k` and `pair_tap = W-1-k` (the weight
    column). Only O(S·W²) indices: the flat taps are wrong only at these rows.
    """
    starts = offsets[:-1]
    j = torch.arange(W - 1, device=offsets.device, dtype=torch.int64)
    keep = j < (offsets[1:] - starts).unsqueeze(1)  # (S, W-1): row start+j exists in its segment
    head = (starts.unsqueeze(1) + j)[keep]
    pos = j.expand_as(keep)[keep]
    taps = j <= pos.unsqueeze(1)  # (H, W-1): taps 0..pos stay inside the segment
    pair_row = torch.arange(head.numel(), device=offsets.device).unsqueeze(1).expand_as(taps)[taps]
    k = j.expand_as(taps)[taps]
    return head, pair_row, head[pair_row] - k, (W - 1) - k


def _flat_taps(x: torch.Tensor, wT: torch.Tensor, bias: torch.Tensor | None, s: int, e: int,
               out: torch.Tensor) -> None:
    """`out = bias + Σ_k wT[W-1-k] * x[s-k:e-k]` (needs s >= W-1): the conv over the flat token axis."""
    W = wT.shape[0]
    if bias is None:
        torch.mul(x[s:e], wT[W - 1], out=out)
    else:
        torch.addcmul(bias, x[s:e], wT[W - 1], out=out)
    for k in range(1, W):
        out.addcmul_(x[s - k: e - k], wT[W - 1 - k])


class _VarlenConv(torch.autograd.Function):
    """Segment-resetting causal depthwise conv (+ optional SiLU) with a hand-written backward.

    The W taps run over the flat token axis (in-place `addcmul_` on shifted row slices of x, no padded
    copy, x may be a strided view), in row blocks that stay in cache with the bias and SiLU fused per
    block. That is exact for every row at least W-1 tokens into its segment; the few "head" rows
    (`_segment_heads`) are then overwritten with their in-segment taps from a small gather, so no row
    ever reads another segment's token. Backward zeroes the activation gradient of the head rows in
    each block before the flat transposed taps and the weight-gradient products (so a non-head row
    only reaches its own segment) and adds the head rows' exact contributions from the same small
    gather; no gradient crosses a segment boundary. The weight gradient accumulates the products of
    every tap in one (rows, W, C) buffer with one `addcmul_` per block and is summed once at the end.
    Saves x (no copy), the pre-activation when SiLU is applied, and the small head gathers.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                offsets: torch.Tensor, silu: bool, split: tuple[int, ...] | None) -> Any:
        T, C = x.shape
        W = weight.shape[1]
        wT = weight.t().contiguous()  # (W, C): a contiguous broadcast row is much faster than a column
        head, pair_row, pair_src, pair_tap = _segment_heads(offsets, W)
        y = x.new_empty(T, C)
        pre = x.new_empty(T, C) if silu else y
        for s, e in _block_bounds(T, W, C):
            _flat_taps(x, wT, bias, s, e, pre[s:e])
            if silu:
                torch.ops.aten.silu.out(pre[s:e], out=y[s:e])
        xs = x.index_select(0, pair_src)
        pre_h = x.new_zeros(head.numel(), C) if bias is None else bias.expand(head.numel(), C).clone()
        pre_h.index_add_(0, pair_row, xs * wT.index_select(0, pair_tap))
        if silu:
            pre.index_copy_(0, head, pre_h)
        y.index_copy_(0, head, F.silu(pre_h) if silu else pre_h)
        ctx.save_for_backward(x, wT, pre if silu else None, head, pair_row, pair_src, pair_tap, xs)
        ctx.has_bias, ctx.silu, ctx.split = bias is not None, silu, split
        return y if split is None else tuple(y.split(split, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, wT, pre, head, pair_row, pair_src, pair_tap, xs = ctx.saved_tensors
        T, C = x.shape
        W = wT.shape[0]
        blocks = _block_bounds(T, W, C)
        rows = blocks[0][1] - blocks[0][0] if blocks else 0
        dx = x.new_empty(T, C)
        dx[: W - 1].zero_()
        g = x.new_empty(rows, C)
        if ctx.split is None:
            (grad,) = grads
            grad_rows = grad.__getitem__
        else:  # the column blocks' gradients are joined per row block, in cache (never a (T, C) concatenation)
            joined = x.new_empty(rows, C)
            grad_rows = lambda r: torch.cat([gi[r] for gi in grads], 1, out=joined[: r.stop - r.start])
        acc_w = x.new_empty(rows, W, C)  # per-row partial weight gradients (the first block initialises)
        acc_b = x.new_empty(rows, C) if ctx.has_bias else None
        head_list = head.tolist()
        for i, (s, e) in enumerate(blocks):
            gb = g[: e - s]
            if ctx.silu:
                torch.ops.aten.silu_backward.grad_input(grad_rows(slice(s, e)), pre[s:e], grad_input=gb)
            else:
                gb.copy_(grad_rows(slice(s, e)))
            h0, h1 = bisect.bisect_left(head_list, s), bisect.bisect_left(head_list, e)
            if h1 > h0:
                gb.index_fill_(0, head[h0:h1] - s, 0)
            torch.mul(gb, wT[W - 1], out=dx[s:e])  # rows < s were written by the previous block
            for k in range(1, W):
                dx[s - k: e - k].addcmul_(gb, wT[W - 1 - k])
            xu = x[s - W + 1: e].unfold(0, W, 1).transpose(1, 2)  # (rows, W, C): xu[r, j] = x[s+r-(W-1)+j]
            if i == 0:
                torch.mul(gb.unsqueeze(1), xu, out=acc_w[: e - s])
                if acc_b is not None:
                    acc_b[: e - s].copy_(gb)
            else:
                acc_w[: e - s].addcmul_(gb.unsqueeze(1), xu)
                if acc_b is not None:
                    acc_b[: e - s].add_(gb)
        gh = torch.cat([gi.index_select(0, head) for gi in grads], 1) if ctx.split else grads[0].index_select(0, head)
        if ctx.silu:
            gh = torch.ops.aten.silu_backward(gh, pre.index_select(0, head))
        gp = gh.index_select(0, pair_row)
        dx.index_add_(0, pair_src, gp * wT.index_select(0, pair_tap))
        dwT = acc_w.sum(0)
        dwT.index_add_(0, pair_tap, gp * xs)
        dbias = acc_b.sum(0) + gh.sum(0) if acc_b is not None else None
        return dx, dwT.t().contiguous(), dbias, None, None, None


class _NativeVarlenConv(torch.autograd.Function):
    """`_VarlenConv` (fp32 CPU) in the native kernels: one pass per row with the taps limited by the row's
    position in its segment, SiLU fused; backward recomputes the pre-activation instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor,
                silu: bool, split: tuple[int, ...] | None) -> Any:
        T = x.shape[0]
        pos = (torch.arange(T, device=x.device) - offsets[segment_ids(offsets, T)]).to(torch.int32)
        wT = weight.t().contiguous()
        y = native_ops().varlen_conv_forward(x, wT, bias, pos, silu)
        ctx.save_for_backward(x, wT, bias, pos)
        ctx.silu, ctx.split = silu, split
        return y if split is None else tuple(y.split(split, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, wT, bias, pos = ctx.saved_tensors
        blocks = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
        dx, dwT, dbias = native_ops().varlen_conv_backward(blocks, x, wT, bias, pos, ctx.silu)
        return dx, dwT.t().contiguous(), None if bias is None else dbias, None, None, None


def _native_conv_applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1 and native_ops() is not None


def varlen_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    *,
    activation: str | None = None,
    kernel: str = "auto",
    split: Sequence[int] | None = None,
) -> Any:
    """Segment-resetting causal depthwise conv over a packed token axis.

    Args:
        x: (T, C) tokens. weight: (C, W); `weight[:, -1]` multiplies the current token. bias: (C,) or None.
        offsets: (S+1,) int64 jagged offsets. activation: None or "silu" (alias "swish").
        kernel: "torch", "auto"/"mamba" (causal_conv1d on CUDA when usable, torch otherwise) or
            "causal_conv1d" (raise if it cannot be used).
        split: column widths summing to C: return `y.split(split, dim=1)` instead of y. On the torch path the
            backward then joins the blocks' gradients per cached row block instead of autograd concatenating
            them into a (T, C) tensor first.

    Returns (T, C) in `x.dtype` (the torch path computes in fp32 for half-precision inputs), or its column
    blocks when `split` is given.
    """
    if kernel not in CONV_KERNELS:
        raise ValueError(f"kernel must be one of {CONV_KERNELS}, got {kernel!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (T, C) tensor, got {x.dtype} {tuple(x.shape)}")
    T, Cch = x.shape
    if weight.dim() != 2 or weight.shape[0] != Cch or weight.shape[1] < 1:
        raise ValueError(f"weight must be (C, W) = ({Cch}, W>=1), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (Cch,):
        raise ValueError(f"bias must be None or (C,) = ({Cch},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("offsets", offsets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    validate_offsets(offsets, T)
    if split is not None:
        split = tuple(int(w) for w in split)
        if sum(split) != Cch or any(w < 0 for w in split):
            raise ValueError(f"split must be non-negative widths summing to C={Cch}, got {split}")

    if kernel != "torch":
        reason = _cuda_kernel_unusable_reason(x, weight)
        if reason is None:
            fn = _load_causal_conv1d()
            seq_idx = segment_ids(offsets, T).to(torch.int32).unsqueeze(0).contiguous()
            # (1, C, T) view of a contiguous (T, C) buffer = the channel-last layout seq_idx requires.
            xt = x.contiguous().T.unsqueeze(0)
            act = None if activation is None else "silu"
            w = weight.to(x.dtype).contiguous()  # some causal_conv1d releases require matching dtypes
            b = None if bias is None else bias.to(x.dtype).contiguous()
            y = fn(xt, w, b, seq_idx=seq_idx, activation=act)[0].T.to(x.dtype)
            return y if split is None else y.split(split, 1)
        if kernel == "causal_conv1d":
            raise RuntimeError(f"kernel='causal_conv1d' requested but unusable: {reason}")
        if x.is_cuda:
            logger.debug("varlen_causal_conv1d: falling back to torch (%s)", reason)

    cdtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(cdtype)
    fn = _NativeVarlenConv if _native_conv_applies(xc) else _VarlenConv
    y = fn.apply(xc, weight.to(cdtype), None if bias is None else bias.to(cdtype), offsets, activation is not None,
                 split)
    return y.to(x.dtype) if split is None else tuple(part.to(x.dtype) for part in y)


def varlen_conv_silu_traceable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               pos: torch.Tensor) -> torch.Tensor:
    """Segment-resetting causal depthwise conv + SiLU for ``torch.export``: x (T, C), weight (C, W) (``[:, -1]`` =
    current token), pos (T,) each token's position in its segment. W shifted slices of a front-padded copy,
    masked by position: no loop bound on T, no host sync."""
    n_tok, width = x.shape[0], weight.shape[1]
    xp = F.pad(x, (0, 0, width - 1, 0))  # xp[t + width - 1] = x[t]
    y = x * weight[:, width - 1]
    for k in range(1, width):
        shifted = xp[width - 1 - k: width - 1 - k + n_tok]  # shifted[t] = x[t - k] (0 before the start)
        y = y + torch.where((pos >= k).unsqueeze(-1), shifted, torch.zeros_like(shifted)) * weight[:, width - 1 - k]
    if bias is not None:
        y = y + bias
    return F.silu(y)
