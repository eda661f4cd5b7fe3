"""Every training loss: the full softmax over the whole catalog (one autograd Function, below) and the
sampled softmax (:func:`sampled_softmax_loss`: sampled and/or in-batch negatives, logQ correction).

Full softmax:
For user vectors ``u`` (R, d), catalog rows ``c`` (I, d) and target columns ``t`` (R,), the per-row loss is

    loss_r = logsumexp_i(u_r · c_i) − u_r · c_{t_r}

and, with ``p = softmax(u cᵀ)`` and upstream gradients ``g`` (R,), ``G = g_r (p_r − onehot(t_r))`` gives
``d_u = G c`` and ``d_c = Gᵀ u``.

``F.cross_entropy(u @ c.T, t, reduction="none")`` allocates four (R, I) buffers per step (logits, log-softmax,
the NLL backward's zero-filled gradient, the log-softmax backward's output) and makes several elementwise passes
over them, each streaming the whole matrix through memory. This Function allocates one (R, I) buffer and works in
it over blocks of rows that fit in L2:

* forward, per block: the matmul into the block, row max, target logit (kept before it is overwritten), then
  ``exp(x − max)`` in place as ``exp2((x − max) · log2 e)`` (``exp2`` is ~3x cheaper than ``exp`` on CPU at the
  same ~1 ulp accuracy; scaling the differences, not the logits, keeps the rounding relative to ``x − max``
  rather than to ``|x|``, so large logits are as accurate as with ``F.cross_entropy``) and the row sums ``s``.
  ``loss_r = max_r − logit[r, t_r] + log s_r`` (numerically stable; ``≥ 0`` since ``s_r ≥ 1``). Saved: the
  exp buffer ``E`` and ``s``.
* backward: ``E[r, t_r] −= s_r`` (R scattered elements), so ``G = (g / s)_r · E`` with the row scale moved out
  of the matmuls: ``d_u = (g/s) ⊙ (E c)`` and ``d_c = Eᵀ ((g/s) ⊙ u)``. No elementwise pass over (R, I) at
  all - only the two matmuls read ``E`` (per block, ``d_c`` accumulated with ``addmm_``). Rounding is that of
  the textbook ``p − onehot`` form (the target entry cancels within the row before any scaling).

The backward edits R entries of the saved buffer and restores them exactly afterwards, so ``retain_graph=True``
works; it is not itself differentiable (once-differentiable: no double backward). Computation is in the inputs'
promoted dtype, at least fp32 (float64 stays float64), with autocast off; gradients come back in each input's
dtype. ``R = 0`` gives an empty loss (whose mean is NaN, as with ``F.cross_entropy``) and zero gradients.
Unlike ``F.cross_entropy`` there is no ``ignore_index``: every target must lie in ``[0, I)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .config import LossSection

__all__ = ["full_softmax_cross_entropy", "sampled_softmax_loss"]

_LOG2E = 1.0 / math.log(2.0)

# Elements per block of rows (1 MiB of fp32): at (R, I, d) = (1475, 3416, 64) single-threaded, 2**18 measured a
# little faster than 2**17 / 2**19 (2**16 and one unblocked pass per op: ~20% slower).
_BLOCK_ELEMS = 2**18


def _row_blocks(R: int, n_cols: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` of about ``_BLOCK_ELEMS`` elements each (none when ``R == 0``)."""
    step = max(1, _BLOCK_ELEMS // max(n_cols, 1))
    for a in range(0, R, step):
        yield a, min(R, a + step)


def _compute_dtype(user: torch.Tensor, catalog: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(user.dtype, catalog.dtype), torch.float32)


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """``(user (R, d), catalog (I, d), target (R,) int64 in [0, I)) -> per-row loss (R,)``; see the module
    docstring. Inputs are validated by :func:`full_softmax_cross_entropy`."""

    @staticmethod
    def forward(ctx: Any, user: torch.Tensor, catalog: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(user, catalog)
        with torch.autocast(device_type=user.device.type, enabled=False):
            u = user.to(dtype)
            ct = catalog.to(dtype).t()
            R, n_items = user.shape[0], catalog.shape[0]
            e = u.new_empty((R, n_items))
            mx = u.new_empty((R, 1))
            tl = u.new_empty((R, 1))
            s = u.new_empty((R,))
            t = target.view(-1, 1)
            for a, b in _row_blocks(R, n_items):
                eb = e[a:b]
                torch.mm(u[a:b], ct, out=eb)
                torch.amax(eb, 1, keepdim=True, out=mx[a:b])
                torch.gather(eb, 1, t[a:b], out=tl[a:b])
                eb.sub_(mx[a:b]).mul_(_LOG2E).exp2_()  # exp(x - max), ~3x cheaper than exp_
                torch.sum(eb, 1, out=s[a:b])
            loss = mx.view(-1).sub(tl.view(-1)).add_(s.log())
        ctx.e = ctx.s = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(user, catalog, target)
            ctx.e, ctx.s = e, s
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        e, s = ctx.e, ctx.s
        user, catalog, target = ctx.saved_tensors
        need_u, need_c = ctx.needs_input_grad[:2]
        with torch.autocast(device_type=e.device.type, enabled=False):
            u, c = user.to(e.dtype), catalog.to(e.dtype)
            R = e.shape[0]
            # E[r, t_r] -= s_r: now (g/s)_r * E = G = g_r (p_r - onehot(t_r)). Undone exactly at the end, so the
            # saved buffer survives (retain_graph / gradcheck work).
            at = (torch.arange(R, device=e.device), target)
            e_target = e[at]
            e.index_put_(at, e_target - s)
            scale = grad.to(e.dtype).div(s).view(-1, 1)
            du = torch.empty_like(u, memory_format=torch.contiguous_format) if need_u else None
            dc = torch.zeros_like(c, memory_format=torch.contiguous_format) if need_c else None
            us = u * scale if need_c else None
            for a, b in _row_blocks(R, e.shape[1]):
                eb = e[a:b]
                if need_u:
                    torch.mm(eb, c, out=du[a:b])
                if need_c:
                    dc.addmm_(eb.t(), us[a:b])
            e.index_put_(at, e_target)
            if need_u:
                du = du.mul_(scale).to(user.dtype)
            if need_c:
                dc = dc.to(catalog.dtype)
        return du, dc, None


def full_softmax_cross_entropy(user: torch.Tensor, catalog: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row ``logsumexp(user @ catalog.T) - logit[target]`` (R,), i.e.
    ``F.cross_entropy(user @ catalog.T, target, reduction="none")`` computed in the inputs' dtype (at least fp32)
    with a hand-written backward that makes no elementwise pass over the (R, I) logits; see the module docstring.

    ``user`` (R, d), ``catalog`` (I, d), ``target`` (R,) integer indices into ``catalog``'s rows. Raises
    ``IndexError`` for a target outside ``[0, I)`` (there is no ``ignore_index``) and ``ValueError`` for bad shapes.
    """
    if user.dim() != 2 or catalog.dim() != 2 or user.shape[1] != catalog.shape[1]:
        raise ValueError(f"full_softmax_cross_entropy: expected user (R, d) and catalog (I, d), got "
                         f"{tuple(user.shape)} and {tuple(catalog.shape)}")
    if target.dim() != 1 or target.shape[0] != user.shape[0]:
        raise ValueError(f"full_softmax_cross_entropy: expected target of shape ({user.shape[0]},), "
                         f"got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"full_softmax_cross_entropy: target must be an integer tensor, got {target.dtype}")
    target = target.long()
    if target.numel():
        lo, hi = torch.aminmax(target)
        if lo.item() < 0 or hi.item() >= catalog.shape[0]:
            bad = lo.item() if lo.item() < 0 else hi.item()
            raise IndexError(f"Target {bad} is out of bounds (catalog has {catalog.shape[0]} rows).")
    return _FullSoftmaxCrossEntropy.apply(user, catalog, target)


def sampled_softmax_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    targets: torch.Tensor,
    neg: torch.Tensor,
    neg_ids: torch.Tensor,
    neg_logq: torch.Tensor,
    target_logq: torch.Tensor,
    cfg: LossSection,
) -> torch.Tensor:
    """Sampled softmax with sampled and/or in-batch negatives, logQ correction, accidental-hit masking,
    temperature and optional L2 normalisation. Returns the per-row loss (R,)."""
    if cfg.l2_normalize:
        user, pos, neg = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    pos_logit = (user * pos).sum(-1, keepdim=True)
    blocks = [pos_logit]
    hit_masks = [torch.zeros_like(pos_logit, dtype=torch.bool)]
    if neg.shape[0]:
        logits = user @ neg.T
        if cfg.logq_correction:
            logits = logits - neg_logq[None, :]
        blocks.append(logits)
        hit_masks.append(neg_ids[None, :] == targets[:, None])
    if cfg.in_batch_negatives and user.shape[0] > 1:
        logits = user @ pos.T
        if cfg.logq_correction:
            logits = logits - target_logq[None, :]
        blocks.append(logits)
        hit_masks.append(targets[None, :] == targets[:, None])  # includes the diagonal (the positive)
    logits = torch.cat(blocks, dim=1) / cfg.temperature
    logits = logits.masked_fill(torch.cat(hit_masks, dim=1), torch.finfo(logits.dtype).min)
    return -torch.log_softmax(logits.float(), dim=-1)[:, 0]
