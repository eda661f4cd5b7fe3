"""Non-finite loss and gradient detection in the training step (``train.on_nonfinite``).

:class:`GuardedTrainPipeline` is TorchRec's ``TrainPipelineSparseDist`` with two checks:

- before backward, the step's loss: a NaN or inf loss on any rank (the flag is all-reduced, so every rank
  decides alike) skips backward on every rank, so neither the item table's fused optimizer (which updates
  in backward) nor the dense optimizer changes anything;
- before the optimizer step, the dense gradients (identical on every rank after DDP's all-reduce): a
  non-finite one skips the dense step.

What happens then is the caller's choice: ``on_nonfinite="stop"`` raises :class:`NonFiniteError` naming
the quantity; ``"skip"`` records it in :attr:`GuardedTrainPipeline.skipped` and the step returns normally.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

log = logging.getLogger(__name__)

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or inf loss or gradient (``quantity`` names it)."""

    def __init__(self, quantity: str) -> None:
        super().__init__(quantity)
        self.quantity = quantity


def _all_ranks_finite(finite: bool, device: torch.device) -> bool:
    """Collective when distributed: True only if ``finite`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return finite
    flag = torch.tensor([0 if finite else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def _describe(t: torch.Tensor) -> str:
    return "nan" if bool(torch.isnan(t).any()) else "inf"


def first_nonfinite_grad(params: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """``"gradient of NAME (nan|inf)"`` for the first parameter with a non-finite gradient, or None."""
    grads = [(n, p.grad) for n, p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm([g for _, g in grads])
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return None
    for (name, grad), norm in zip(grads, norms):
        if not bool(torch.isfinite(norm)) and not bool(torch.isfinite(grad).all()):
            return f"gradient of {name} ({_describe(grad)})"
    return None  # a finite gradient whose norm overflowed


class GuardedTrainPipeline(TrainPipelineSparseDist):
    """``TrainPipelineSparseDist`` that drops (``skip``) or refuses (``stop``) a step with a non-finite loss or
    dense gradient, consistently on every rank (see the module doc)."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device, *,
                 on_nonfinite: str = "stop", **kwargs: Any) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        super().__init__(model, optimizer, device, **kwargs)
        self.on_nonfinite = on_nonfinite
        self.skipped: str | None = None  # what made the last step skip its update (None: it was applied)
        self._guard_device = device
        self._dense = [(n, p) for n, p in model.named_parameters()
                       if p.requires_grad and not hasattr(p, "_in_backward_optimizers")]

    def _refuse(self, quantity: str) -> None:
        if self.on_nonfinite == "stop":
            raise NonFiniteError(quantity)
        self.skipped = quantity

    def _backward(self, losses: torch.Tensor) -> None:
        self.skipped = None
        loss = torch.sum(losses, dim=0)
        finite = bool(torch.isfinite(loss.detach()).all())
        if _all_ranks_finite(finite, self._guard_device):
            super()._backward(losses)
            return
        self._refuse(f"loss ({_describe(loss.detach())})" if not finite else "loss (non-finite on another rank)")

    def _optimizer_step(self) -> None:
        if self.skipped is None:
            bad = first_nonfinite_grad(self._dense)
            if bad is not None:
                self._refuse(bad)
        if self.skipped is None:
            super()._optimizer_step()


__all__ = ["ON_NONFINITE", "GuardedTrainPipeline", "NonFiniteError", "first_nonfinite_grad"]
