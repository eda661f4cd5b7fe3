"""Causal depthwise conv1d over packed variable-length sequences (Mamba-2's short conv with `seq_idx`).

`y_t = bias + Σ_{k=0}^{W-1} weight[:, W-1-k] * x_{t-k}` where only tokens `x_{t-k}` of the same segment
as t count (the causal-conv1d convention: `weight[:, -1]` multiplies the current token). The torch path
puts W-1 zero rows before every segment and sums W shifted slices of that buffer in place (a custom
autograd Function, SiLU fused), so tokens of different segments are never mixed. On CUDA the
`causal_conv1d` package is used when installed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets

__all__ = ["causal_conv1d_available", "varlen_causal_conv1d"]

logger = logging.getLogger(__name__)

# "mamba" is accepted as an alias of "auto" so that a model can forward one `kernel` setting to both the
# conv and `ssd_scan`; "causal_conv1d" insists on the CUDA kernel and raises when it cannot be used.
CONV_KERNELS = ("auto", "torch", "mamba", "causal_conv1d")
ACTIVATIONS = (None, "silu", "swish")


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


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """A (length, C) buffer with `x[i]` at row `rows[i]` and zeros in every other row (only those are
    zero-filled: `rows` is increasing, so the others are the gaps between consecutive entries)."""
    out = x.new_empty(length, x.shape[1])
    out.index_copy_(0, rows, x)
    gap = torch.ones(length, dtype=torch.bool, device=x.device)
    gap[rows] = False
    out[gap] = 0
    return out


def _column_dots(dy: torch.Tensor, xp: torch.Tensor, W: int, rows_per_block: int = 1024) -> torch.Tensor:
    """`out[c, W-1-k] = Σ_o dy[o, c] · xp[o + W-1-k, c]` (the weight gradient), over blocks of rows so the
    products stay in cache instead of W full-size temporaries."""
    n = dy.shape[0]
    out = dy.new_zeros(dy.shape[1], W)
    for s in range(0, n, rows_per_block):
        e = min(s + rows_per_block, n)
        blk = dy[s:e]
        for k in range(W):
            out[:, W - 1 - k] += (blk * xp[s + W - 1 - k: e + W - 1 - k]).sum(0)
    return out


class _VarlenConv(torch.autograd.Function):
    """Segment-resetting causal depthwise conv (+ optional SiLU) with a hand-written backward.

    Every segment is preceded by W-1 zero rows in one padded (T + S·(W-1), C) buffer, so each tap is a
    plain shifted slice (no per-tap mask or `where`), and the W taps are accumulated in place
    (`addcmul_`) into one output buffer; backward does the same in the transposed direction. About half
    the full-size passes of autograd over masked shifted copies. Saves the padded input and the
    pre-activation (recomputing the SiLU derivative from it).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                padded_len: int, silu: bool) -> torch.Tensor:
        W = weight.shape[1]
        xp = _scatter_rows(x, rows, padded_len)
        y = torch.mul(xp[W - 1:], weight[:, W - 1])  # output row o <-> padded input row o + W - 1
        for k in range(1, W):
            y.addcmul_(xp[W - 1 - k: padded_len - k], weight[:, W - 1 - k])
        if bias is not None:
            y.add_(bias)
        pre = y.index_select(0, rows - (W - 1))
        ctx.save_for_backward(xp, weight, rows, pre)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, weight, rows, pre = ctx.saved_tensors
        W = weight.shape[1]
        padded_len = xp.shape[0]
        if ctx.silu:
            grad = torch.ops.aten.silu_backward(grad, pre)
        dy = _scatter_rows(grad, rows - (W - 1), padded_len - W + 1)
        dxp = torch.empty_like(xp)
        dxp[: W - 1].zero_()
        torch.mul(dy, weight[:, W - 1], out=dxp[W - 1:])
        for k in range(1, W):
            dxp[W - 1 - k: padded_len - k].addcmul_(dy, weight[:, W - 1 - k])
        dweight = _column_dots(dy, xp, W)
        dbias = grad.sum(0) if ctx.has_bias else None
        return dxp.index_select(0, rows), dweight, dbias, None, None, None


def varlen_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    *,
    activation: str | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Segment-resetting causal depthwise conv over a packed token axis.

    Args:
        x: (T, C) tokens. weight: (C, W); `weight[:, -1]` multiplies the current token. bias: (C,) or None.
        offsets: (S+1,) int64 jagged offsets. activation: None or "silu" (alias "swish").
        kernel: "torch", "auto"/"mamba" (causal_conv1d on CUDA when usable, torch otherwise) or
            "causal_conv1d" (raise if it cannot be used).

    Returns (T, C) in `x.dtype` (the torch path computes in fp32 for half-precision inputs).
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
    seg = segment_ids(offsets, T)

    if kernel != "torch":
        reason = _cuda_kernel_unusable_reason(x, weight)
        if reason is None:
            fn = _load_causal_conv1d()
            seq_idx = seg.to(torch.int32).unsqueeze(0).contiguous()
            # (1, C, T) view of a contiguous (T, C) buffer = the channel-last layout seq_idx requires.
            xt = x.contiguous().T.unsqueeze(0)
            act = None if activation is None else "silu"
            w = weight.to(x.dtype).contiguous()  # some causal_conv1d releases require matching dtypes
            b = None if bias is None else bias.to(x.dtype).contiguous()
            y = fn(xt, w, b, seq_idx=seq_idx, activation=act)
            return y[0].T.to(x.dtype)
        if kernel == "causal_conv1d":
            raise RuntimeError(f"kernel='causal_conv1d' requested but unusable: {reason}")
        if x.is_cuda:
            logger.debug("varlen_causal_conv1d: falling back to torch (%s)", reason)

    cdtype = torch.promote_types(x.dtype, torch.float32)
    W = weight.shape[1]
    rows = torch.arange(T, device=x.device, dtype=torch.int64) + (W - 1) * (seg + 1)  # in the padded buffer
    padded_len = T + (W - 1) * (offsets.numel() - 1)
    y = _VarlenConv.apply(x.to(cdtype), weight.to(cdtype), None if bias is None else bias.to(cdtype), rows,
                          padded_len, activation is not None)
    return y.to(x.dtype)
