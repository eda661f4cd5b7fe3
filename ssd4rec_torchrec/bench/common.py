"""Helpers shared by the benchmark suites: power-law fits, target verdicts, activation-memory counting."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ssd4rec_torchrec.ops.ssd import KernelOverride, override_kernel

__all__ = ["SavedBytes", "fit_power_law", "scan_free", "target_verdict"]


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of `log y = log c + k log x`; returns `{"k", "c", "r2"}`.

    Used for the cost exponent `time ∝ L^k` (k = 1: linear in sequence length, 2: quadratic).
    Needs at least two distinct x; all values must be positive.
    """
    if len(xs) != len(ys) or len({float(x) for x in xs}) < 2:
        raise ValueError(f"need >= 2 distinct x values with matching y, got {list(xs)} / {list(ys)}")
    if any(v <= 0 for v in (*xs, *ys)):
        raise ValueError("power-law fit needs positive values")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    k = sxy / sxx
    b = my - k * mx
    ss_res = sum((v - (b + k * a)) ** 2 for a, v in zip(lx, ly, strict=True))
    ss_tot = sum((v - my) ** 2 for v in ly)
    return {"k": k, "c": math.exp(b), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def target_verdict(name: str, value: float | None, target: float, *, higher_is_better: bool, unit: str = "") -> dict:
    """A target check as a JSON-able dict plus a one-line `text`: met, or missed and by how much.

    `margin` is value - target for "higher is better" targets and target - value otherwise (>= 0: met);
    `factor` is how many times better (> 1) or worse (< 1) the value is than the target.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"name": name, "target": target, "value": None, "met": None, "margin": None, "factor": None,
                "text": f"{name}: not measured (target {'>=' if higher_is_better else '<='} {target:g}{unit})"}
    margin = value - target if higher_is_better else target - value
    met = margin >= 0
    factor = None
    if value > 0 and target > 0:
        factor = value / target if higher_is_better else target / value
    op = ">=" if higher_is_better else "<="
    how = "met" if met else "MISSED"
    extra = "" if factor is None else f", {factor:.2f}x of target"
    text = f"{name} = {value:.4g}{unit} (target {op} {target:g}{unit}): {how} by {abs(margin):.4g}{unit}{extra}"
    return {"name": name, "target": target, "value": value, "met": met, "margin": margin, "factor": factor,
            "text": text}


class SavedBytes:
    """Bytes of distinct tensor storages autograd saves for backward while active (a context manager).

    That is the activation memory a training step holds between forward and backward, independent of the
    allocator (RSS deltas are not, once glibc keeps freed memory for reuse; see runtime.py). Transient
    work buffers that are freed inside forward are not included.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            return t
        if key not in self._seen and key[0] != 0:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    @contextmanager
    def track(self) -> Any:
        """Count the storages saved inside the block (hooks removed on exit)."""
        unpack: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        with torch.autograd.graph.saved_tensors_hooks(self._pack, unpack):
            yield self


@contextmanager
def scan_free(enabled: bool = True) -> Iterator[KernelOverride | None]:
    """While enabled, every SSD scan is only its D skip (`y = D x`, `ssd_scan(kernel="skip")`): the scan-free
    floor of a benchmark. Yields the override (its `calls` counts the replaced scans), or None when disabled."""
    if not enabled:
        yield None
        return
    with override_kernel("skip") as override:
        yield override
