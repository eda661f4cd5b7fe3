"""`ssd_scan`: argument checks and the choice of implementation (torch, mamba-ssm, or the scan-free skip).

`kernel="skip"` is not a scan: it returns only the D skip (`y = D x`) with dt, A, B and C kept in the autograd
graph at zero weight, so benchmarks can time a model without its scan (the floor any scan could reach).
`override_kernel` applies a kernel to every `ssd_scan` call inside a block, whatever its callers ask for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ssd4rec_torchrec.ops.segments import segment_ids, validate_offsets
from ssd4rec_torchrec.ops.ssd.chunked import _ssd_scan_torch
from ssd4rec_torchrec.ops.ssd.mamba import _ssd_scan_mamba, mamba_ssd_available

__all__ = ["KERNELS", "TORCH_MAX_CHUNK", "KernelOverride", "override_kernel", "ssd_scan"]

KERNELS = ("auto", "torch", "mamba", "skip")
# Largest tile of the torch path (chunk_size is a tiling choice: it does not change what is computed).
TORCH_MAX_CHUNK = 64


class KernelOverride:
    """The kernel every `ssd_scan` call runs while `override_kernel` is active; `calls` counts those calls."""

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.calls = 0


_override: KernelOverride | None = None


@contextlib.contextmanager
def override_kernel(kernel: str) -> Iterator[KernelOverride]:
    """Inside the block every `ssd_scan` call uses `kernel` (e.g. "skip" for a scan-free benchmark floor),
    whatever kernel its caller passes; the previous override (if any) is restored on exit. Process-wide."""
    global _override
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    previous, _override = _override, KernelOverride(kernel)
    try:
        yield _override
    finally:
        _override = previous


def _skip_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor | None) -> torch.Tensor:
    """`kernel="skip"`: the D skip alone, `y = D x` (x itself without D); dt, A, B and C stay in the graph
    (zero-weighted) so their producers still get a backward pass."""
    keep = (dt.sum() + A.sum() + B.sum() + C.sum()) * 0
    return x * (D.view(1, -1, 1) if D is not None and D.dim() == 1 else (1.0 if D is None else D)) + keep


def _check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    offsets: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    kernel: str,
) -> None:
    """Raise `ValueError` with a precise message for any inconsistent argument."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (T, H, P), got shape {tuple(x.shape)}")
    T, H, P = x.shape
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if dt.shape != (T, H):
        raise ValueError(f"dt must be (T, H) = {(T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be (H,) = {(H,)}, got {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[0] != T:
        raise ValueError(f"B must be (T, G, N) with T={T}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    G = B.shape[1]
    if G < 1 or H % G != 0:
        raise ValueError(f"number of heads H={H} must be a multiple of the number of groups G={G}")
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"D must be None, (H,) = {(H,)} or (H, P) = {(H, P)}, got {tuple(D.shape)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if offsets.device != x.device:
        raise ValueError(f"offsets is on {offsets.device} but x is on {x.device}")
    validate_offsets(offsets, T)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    offsets: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
    kernel: str = "auto",
) -> torch.Tensor:
    """Segment-resetting SSD scan over a packed token axis; returns y `(T, H, P)` in `x.dtype`.

    Args:
        x: (T, H, P) inputs. dt: (T, H) positive step sizes (softplus/bias already applied).
        A: (H,) negative decay rates. B, C: (T, G, N) with H % G == 0; head h uses group h // (H // G).
        offsets: (S+1,) int64 jagged offsets (`offsets[0] == 0`, non-decreasing, `offsets[-1] == T`).
        D: optional skip, (H,) or (H, P). chunk_size: tokens per chunk (any positive int for the torch path,
            which tiles with `min(chunk_size, TORCH_MAX_CHUNK)`: the result is the same up to rounding, and
            on a CPU larger tiles only add quadratic work and make the factored form fall back more often).
        kernel: "torch" (pure-torch chunked dual form), "mamba" (mamba-ssm Triton kernel, also on CPU tensors
            under TRITON_INTERPRET=1), "auto" (mamba on CUDA tensors when importable, torch otherwise) or
            "skip" (no scan: `y = D x`, for benchmarks). Inside `override_kernel` its kernel is used instead.

    The torch path computes in fp32 for half-precision inputs (float64 stays float64) and is differentiable
    with respect to x, dt, A, B, C and D.
    """
    if _override is not None:
        _override.calls += 1
        kernel = _override.kernel
    _check_inputs(x, dt, A, B, C, offsets, D, chunk_size, kernel)
    if kernel == "skip":
        return _skip_scan(x, dt, A, B, C, D)
    T = x.shape[0]
    seg = segment_ids(offsets, T)
    use_mamba = kernel == "mamba" or (kernel == "auto" and x.is_cuda and mamba_ssd_available())
    if use_mamba:
        return _ssd_scan_mamba(x, dt, A, B, C, seg, D, chunk_size)
    cdtype = torch.promote_types(x.dtype, torch.float32)
    y = _ssd_scan_torch(
        x.to(cdtype),
        dt.to(cdtype),
        A.to(cdtype),
        B.to(cdtype),
        C.to(cdtype),
        seg,
        None if D is None else D.to(cdtype),
        min(chunk_size, TORCH_MAX_CHUNK),
    )
    return y.to(x.dtype)
