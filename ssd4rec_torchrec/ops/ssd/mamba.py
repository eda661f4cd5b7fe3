"""mamba-ssm glue: the lazily imported Triton SSD kernel (`kernel="mamba"`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from ssd4rec_torchrec.ops.compat import load_mamba_chunk_scan

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _load_mamba_chunk_scan() -> Any:
    """Import mamba-ssm's `mamba_chunk_scan_combined` lazily (it pulls in triton and the mamba package).

    With CUDA available, a pure-Python mamba-ssm wheel (no `selective_scan_cuda`) also works: see
    `compat.load_mamba_chunk_scan`.
    """
    return load_mamba_chunk_scan()


@functools.lru_cache(maxsize=1)
def mamba_ssd_available() -> bool:
    """True when mamba-ssm's Triton SSD kernel can be imported (it is only *used* by "auto" on CUDA).

    Cached, so a failing import is attempted (and logged) once per process.
    """
    try:
        _load_mamba_chunk_scan()
    except Exception as exc:  # ImportError, or a CUDA extension failing at package import
        logger.info("mamba-ssm SSD kernel unavailable, ssd_scan(kernel='auto') uses the torch path: %r", exc)
        return False
    return True


def _ssd_scan_mamba(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """mamba-ssm's fused Triton SSD with `seq_idx` segment resets (batch of one packed sequence)."""
    if x.shape[0] == 0:
        return x * 0
    try:
        scan = _load_mamba_chunk_scan()
    except Exception as exc:
        raise ImportError(
            "ssd_scan(kernel='mamba') needs mamba-ssm's Triton kernels (mamba_ssm.ops.triton.ssd_combined). "
            "On a CPU-only build, mamba_ssm's package __init__ needs a `selective_scan_cuda` stub module and "
            "the kernels need TRITON_INTERPRET=1 set before import; use kernel='torch' or 'auto' otherwise."
        ) from exc
    seq_idx = seg.to(torch.int32).unsqueeze(0).contiguous()
    y = scan(
        x.unsqueeze(0).contiguous(),
        dt.unsqueeze(0).contiguous(),
        A.contiguous(),
        B.unsqueeze(0).contiguous(),
        C.unsqueeze(0).contiguous(),
        chunk_size,
        D=None if D is None else D.contiguous(),
        seq_idx=seq_idx,
    )
    return y[0].to(x.dtype)
