"""Dropout whose CPU mask comes from integer random bits: about 3x faster than `nn.Dropout` on CPU.

`nn.Dropout` draws its mask with `bernoulli_`, which on CPU costs ~14 ms for a (7045, 256) fp32 tensor on one
thread (a float draw and a comparison per element, serially). Here one 64-bit draw (`random_()` on int64)
feeds four elements: on CPU `random_()` fills int64 with `random64() % 2**63`, i.e. 63 uniform bits and a top
bit that is always 0, so each 16-bit field keeps only its low 15 bits (all uniform; the top one would be
biased) and drops when they fall below `round(p * 2**15)`. The mask is applied as a 0/scale factor in x's dtype
(multiplying by a bool tensor takes PyTorch's slow promotion path). Backward saves only the bool mask.

With the native CPU kernels (`ops.native`, built on first use) fp32/fp64 inputs take a fused path instead:
one pass draws 15 bits per element from a counter-based hash of (a seed from torch's generator, element
index), compares, writes the mask and the scaled output (5-6x faster forward and backward). Same rate, same
quantisation and scaling, different random stream; it still follows `torch.manual_seed` and the generator
state (one 63-bit draw per call), and does not depend on the thread count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec_torchrec.ops.native import native_ops

__all__ = ["Dropout", "dropout", "quantized_drop_probability"]

_BITS = 15  # uniform bits per element (16-bit fields of a 63-bit draw, top bit of each field discarded)
_LEVELS = 1 << _BITS


def quantized_drop_probability(p: float) -> float:
    """The drop probability the CPU path really uses: `round(p * 2**15) / 2**15` (within 1.6e-5 of `p`)."""
    return round(p * _LEVELS) / _LEVELS


def _keep_mask(shape: torch.Size, threshold: int) -> torch.Tensor:
    """Bool tensor of `shape`, each element True with probability `1 - threshold / 2**15`, independently."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # 4 fields of 15 uniform bits per draw
    fields = bits.view(torch.int16)[:n].bitwise_and_(_LEVELS - 1)
    return (fields >= threshold).view(shape)


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`x * mask * scale` as `x * scale` rounds in x's dtype (`x * bool` would take a slow promotion path)."""
    if x.dtype in (torch.float32, torch.float64):
        return x * mask.to(x.dtype).mul_(scale)  # fastest on CPU: a scaled 0/scale factor, one multiply
    return torch.where(mask, x, 0.0).mul_(scale)  # half types: the scalar multiply runs in fp32 (exact scale)


class _MaskedScale(torch.autograd.Function):
    """`x * mask * scale`; backward `grad * mask * scale` from the saved bool mask alone (1 byte/element)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return _apply_mask(x, mask, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return _apply_mask(grad, mask, ctx.scale), None, None


class _NativeDropout(torch.autograd.Function):
    """The fused kernel: `x * keep * scale` with the keep mask drawn inside it; backward from the bool mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        seed = int(torch.empty((), dtype=torch.int64).random_())  # 63 bits from torch's default generator
        y, mask = native_ops().dropout_forward(x, seed, threshold, scale)
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return native_ops().scale_by_mask(grad, mask, ctx.scale), None, None


def _native_ok(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float64) and native_ops() is not None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: identity unless `training` and `p > 0`; else drops with probability
    `quantized_drop_probability(p)` and scales kept values by exactly `1 / (1 - quantized_drop_probability(p))`.

    On non-CPU devices this is `F.dropout` (exact `p`; the fused GPU kernels are already fast).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold = round(p * _LEVELS)
    if threshold == 0:
        return x
    if threshold == _LEVELS:  # p rounds to 1: everything dropped (keeps the graph, like nn.Dropout(1.0))
        return x * 0.0
    scale = 1.0 / (1.0 - threshold / _LEVELS)  # exactly the documented factor
    if _native_ok(x):
        return _NativeDropout.apply(x, threshold, scale)
    return _MaskedScale.apply(x, _keep_mask(x.shape, threshold), scale)


class Dropout(nn.Dropout):
    """Drop-in `nn.Dropout` (same constructor, `p`, train/eval behaviour, no state) with the faster CPU mask.

    The drop probability is quantised to a multiple of 2**-15 on CPU (`quantized_drop_probability`), and kept
    values are scaled by the exact inverse keep probability of that quantised threshold, so the expectation is
    preserved exactly. `inplace` is accepted for signature compatibility; the result is always a new tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
