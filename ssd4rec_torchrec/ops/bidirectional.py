"""Row gathers by a self-inverse segment reversal, for the two scan directions of a Bi-SSD layer.

`rev = reverse_segments_index(offsets)` reverses every segment in place. Each Function here gathers rows by
`rev` (alone, stacked after the rows themselves, or added back to the forward direction) and, because `rev`
is an involution, its backward is the same kind of gather instead of autograd's scatter-add.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["reverse_rows"]


# Segment reversal is an involution (rev[rev] = identity), so the gradient of a gather by `rev` is the same
# gather: no scatter-add (autograd's default backward for `x[rev]`) is needed. The Functions below use that.


class _ReverseRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rev)
        return x.index_select(0, rev)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rev,) = ctx.saved_tensors
        return grad.index_select(0, rev), None


def reverse_rows(x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """`x[rev]` for a self-inverse `rev` (`reverse_segments_index`), with a gather (not a scatter) as backward."""
    return _ReverseRows.apply(x, rev)


def _stack_reversed(x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """`cat([x, x[rev]])` written into one buffer."""
    n = x.shape[0]
    out = x.new_empty((2 * n, *x.shape[1:]))
    out[:n].copy_(x)
    torch.index_select(x, 0, rev, out=out[n:])
    return out


class _StackReversed(torch.autograd.Function):
    """(T, C) -> (2T, C) `cat([x, x[rev]])` in one buffer; backward `g[:T] + g[T:][rev]`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rev)
        return _stack_reversed(x, rev)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rev,) = ctx.saved_tensors
        n = grad.shape[0] // 2
        return grad[n:].index_select(0, rev).add_(grad[:n]), None


class _StackReversedSplit(torch.autograd.Function):
    """(T, C) -> the column blocks (widths `sizes`) of `cat([x, x[rev]])` (2T rows), views of one buffer.

    Backward writes the (T, C) gradient column block by column block, `g[:T] + g[T:][rev]` each, so the blocks'
    gradients are never concatenated into a (2T, C) tensor (what autograd's `split` backward would do).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rev: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(rev)
        ctx.sizes = sizes
        return tuple(_stack_reversed(x, rev).split(sizes, 1))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rev,) = ctx.saved_tensors
        n = rev.shape[0]
        dx = grads[0].new_empty(n, sum(ctx.sizes))
        for g, block in zip(grads, dx.split(ctx.sizes, 1), strict=True):
            torch.add(g[:n], g[n:].index_select(0, rev), out=block)
        return dx, None, None


class _AddDirections(torch.autograd.Function):
    """(2T, C) -> (T, C) `y[:T] + beta * y[T:][rev]` (`rev=None`: no reversal); backward writes one buffer."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, rev: torch.Tensor | None, beta: float) -> torch.Tensor:
        if rev is not None:
            ctx.save_for_backward(rev)
        ctx.beta, ctx.flip = beta, rev is not None
        n = y.shape[0] // 2
        bwd = y[n:] if rev is None else y[n:].index_select(0, rev)
        return torch.add(y[:n], bwd, alpha=beta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        n = grad.shape[0]
        out = grad.new_empty((2 * n, *grad.shape[1:]))
        out[:n].copy_(grad)
        if ctx.flip:
            (rev,) = ctx.saved_tensors
            torch.index_select(grad, 0, rev, out=out[n:]).mul_(ctx.beta)
        else:
            torch.mul(grad, ctx.beta, out=out[n:])
        return out, None, None
