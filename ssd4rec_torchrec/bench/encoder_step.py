"""One timed training step of an encoder on packed tokens: the points, inputs and memory probes of the encoder
benchmarks (`bench.encoder`, `bench.encoder_compare`, `bench.mfu`, `bench.packing`)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ssd4rec_torchrec.bench.common import scan_free
from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig
from ssd4rec_torchrec.ops import offsets_from_lengths

__all__ = ["PeakMemory", "Point", "make_point", "point_row", "segment_lengths", "step"]


def segment_lengths(total: int, *, median: float, max_length: int, seed: int) -> list[int]:
    """Log-normal segment lengths (sigma 1.2, clipped to [1, max_length]) summing exactly to `total`.

    A heavy-tailed mix like prefix lengths of real histories (ML-1M: mean prefix ~200, max 2,277).
    """
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    left = total
    while left > 0:
        draw = math.exp(math.log(median) + 1.2 * torch.randn(1, generator=gen).item())
        n = min(left, max(1, min(max_length, round(draw))))
        lengths.append(n)
        left -= n
    return lengths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a step above the memory in use before it (CPU: VmHWM, Linux only; CUDA: allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return True
        rss = _proc_kb("/proc/self/status", "VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        except OSError:
            return False
        self.base = 1024 * (rss or 0)
        return rss is not None

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm = _proc_kb("/proc/self/status", "VmHWM")
        return None if hwm is None else 1024 * hwm - self.base

    def available_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        avail = _proc_kb("/proc/meminfo", "MemAvailable")
        return None if avail is None else 1024 * avail


@dataclass
class Point:
    """One (width, packed length) point: its encoder and input, and the step times measured so far."""

    d_model: int
    total: int
    lengths: list[int]
    enc: torch.nn.Module
    x: torch.Tensor
    offsets: torch.Tensor
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    model: str = "bissd"
    saved_bytes: int | None = None


def make_point(
    d_model: int,
    total: int,
    *,
    layers: int,
    kernel: str,
    chunk_size: int,
    checkpoint: bool,
    device: torch.device,
    median: float,
    max_length: int,
    seed: int,
) -> Point:
    """A fresh official-shaped encoder (train mode, dropout on) and `total` packed random tokens."""
    torch.manual_seed(seed)
    lengths = segment_lengths(total, median=median, max_length=max_length, seed=seed)
    cfg = EncoderConfig.official(
        d_model=d_model, n_layers=layers, kernel=kernel, chunk_size=chunk_size, gradient_checkpointing=checkpoint
    )
    enc = BiSSDEncoder.from_config(cfg).to(device).train()
    offsets = offsets_from_lengths(torch.tensor(lengths))
    x = torch.randn(total, d_model, device=device, requires_grad=True)
    return Point(d_model, total, lengths, enc, x, offsets.to(device))


def step(p: Point) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward+backward step."""
    with scan_free(p.model == "bissd_noscan"):
        return _step(p)


def _step(p: Point) -> tuple[float, float]:
    p.enc.zero_grad(set_to_none=True)
    p.x.grad = None
    _sync(p.x.device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = p.enc(p.x, p.offsets)
    # Loss on the read-out tokens plus a small all-token term so every position gets a gradient.
    loss = out[p.offsets[1:] - 1].pow(2).mean() + 1e-3 * out.pow(2).mean()
    loss.backward()
    _sync(p.x.device)
    return time.perf_counter() - t0, time.process_time() - c0


def point_row(p: Point, kernel: str) -> dict[str, Any]:
    sec = statistics.median(p.times)
    return {
        "d_model": p.d_model,
        "total_tokens": p.total,
        "n_segments": len(p.lengths),
        "max_segment": max(p.lengths),
        "kernel": kernel,
        "device": str(p.x.device),
        "seconds_median": sec,
        "seconds_min": min(p.times),
        "seconds_all": p.times,
        "cpu_seconds_median": statistics.median(p.cpu_times),
        "tokens_per_s": p.total / sec,
        "peak_step_gb": None if p.peak_bytes is None else p.peak_bytes / 1e9,
    }
