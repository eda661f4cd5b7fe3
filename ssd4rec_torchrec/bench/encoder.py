"""Encoder speed benchmark: forward+backward tokens/s of a 2-layer Bi-SSD encoder versus packed length.

For each width d and each total length T (tokens packed from many segments of a realistic length mix),
time one training step of `BiSSDEncoder` (forward, scalar loss, backward) and report tokens/s and the cost
ratio time(T_max)/time(T_min); a linear-in-T encoder gives T_max/T_min (8.0 for 8k -> 64k). With CUDA, the
same steps also run with the torch kernels and with the mamba (Triton) kernels and their time ratio is
reported. Used by `apps/bench.py encoder`; `python -m ssd4rec_torchrec.bench.encoder` also works.

CPU notes. Lengths are timed in interleaved rounds and wall, best and CPU times are all kept, because other
processes on a shared machine disturb single runs a lot. glibc serves large tensors with fresh mmaps that are
page-faulted again on every step; with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` freed
memory is reused (as a caching allocator would), which was ~5x faster at d=64 with a lower peak on the
team's VM. The result records any `MALLOC_*` variables and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig

log = logging.getLogger(__name__)

FULL = {"dims": [64, 256], "totals": [8192, 65536], "repeats": 3}
QUICK = {"dims": [64], "totals": [1024, 4096], "repeats": 1}
# A point is skipped when its step is predicted (linearly from the previous, shorter point) to need more
# than this fraction of the memory still available: an out-of-memory kill would lose the whole run.
MEMORY_HEADROOM = 0.85


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the encoder suite (defaults: d in {64, 256}, T in {8k, 64k}, 3 timed repeats)."""
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="model widths (default 64 256)")
    parser.add_argument(
        "--totals", type=int, nargs="+", default=None, help="packed tokens per step (default 8192 65536)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per point; median is kept")
    parser.add_argument("--layers", type=int, default=2, help="Bi-SSD layers (default 2, official ML-1M)")
    parser.add_argument("--chunk-size", type=int, default=256, help="SSD chunk length (default 256, official)")
    parser.add_argument(
        "--checkpoint", action="store_true", help="per-layer gradient checkpointing (less memory, more compute)"
    )
    parser.add_argument(
        "--median-length",
        type=float,
        default=100.0,
        help="median segment length of the log-normal length mix (default 100)",
    )
    parser.add_argument("--max-length", type=int, default=2048, help="longest segment (default 2048)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cuda if available, else cpu)")
    parser.add_argument("--kernel", default="auto", help="ops kernel for the main table (default auto)")
    parser.add_argument(
        "--memory-headroom",
        type=float,
        default=MEMORY_HEADROOM,
        help="skip a length predicted to need more than this fraction of available memory (0: never skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (d 64, T 1k/4k, 1 repeat)")


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
    enc: BiSSDEncoder
    x: torch.Tensor
    offsets: torch.Tensor
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


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
    cfg = EncoderConfig(
        d_model=d_model, n_layers=layers, kernel=kernel, chunk_size=chunk_size, gradient_checkpointing=checkpoint
    )
    enc = BiSSDEncoder.from_config(cfg).to(device).train()
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    x = torch.randn(total, d_model, device=device, requires_grad=True)
    return Point(d_model, total, lengths, enc, x, offsets.to(device))


def step(p: Point) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward+backward step."""
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


def _row(p: Point, kernel: str) -> dict[str, Any]:
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


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("d", 5), ("tokens", 8), ("segs", 6), ("kernel", 7), ("s/step", 9), ("best s", 9), ("cpu s", 9)]
    head = " ".join(f"{name:>{w}}" for name, w in [*cols, ("tokens/s", 11), ("peak GB", 8)])
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['d_model']:>5} {r['total_tokens']:>8}  skipped: {r['skipped']}")
            continue
        peak = "?" if r["peak_step_gb"] is None else f"{r['peak_step_gb']:.2f}"
        lines.append(
            f"{r['d_model']:>5} {r['total_tokens']:>8} {r['n_segments']:>6} {r['kernel']:>7} "
            f"{r['seconds_median']:>9.3f} {r['seconds_min']:>9.3f} {r['cpu_seconds_median']:>9.3f} "
            f"{r['tokens_per_s']:>11.0f} {peak:>8}"
        )
    return "\n".join(lines)


def _sweep(
    dims: list[int], totals: list[int], kernel: str, common: dict[str, Any], headroom: float = MEMORY_HEADROOM
) -> list[dict[str, Any]]:
    """Measure every (d, T). Per width: one warm-up step per length, shortest first, skipping lengths
    predicted (linearly from the previous one's peak) not to fit in memory; then `repeats` rounds that time
    one step of every length in turn, so load from other processes hits all lengths alike."""
    common = dict(common)
    repeats = common.pop("repeats")
    device = common["device"]
    mem = PeakMemory(device)
    rows = []
    for d in dims:
        points: list[Point] = []
        skipped: dict[int, str] = {}
        for total in totals:
            prev = points[-1] if points else None
            avail = mem.available_bytes()
            if headroom > 0 and prev is not None and prev.peak_bytes is not None and avail is not None:
                need = prev.peak_bytes * total / prev.total
                if need > headroom * avail:
                    skipped[total] = (
                        f"needs ~{need / 1e9:.1f} GB (linear from T={prev.total}), {avail / 1e9:.1f} GB available"
                    )
                    log.warning("d=%d T=%d skipped: %s", d, total, skipped[total])
                    continue
            p = make_point(d, total, kernel=kernel, **common)
            tracked = mem.reset()
            step(p)  # warm-up (first-call costs), also gives the peak memory of a step
            p.peak_bytes = mem.peak_bytes() if tracked else None
            points.append(p)
        for _ in range(repeats):
            for p in points:
                wall, cpu = step(p)
                p.times.append(wall)
                p.cpu_times.append(cpu)
                log.info("d=%d T=%d: %.3f s (cpu %.3f s)", d, p.total, wall, cpu)
        by_total = {p.total: _row(p, kernel) for p in points}
        for total in totals:
            rows.append(
                by_total.get(total)
                or {"d_model": d, "total_tokens": total, "kernel": kernel, "skipped": skipped[total]}
            )
        del points
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite; returns a JSON-able dict (rows, per-width cost ratios, optional CUDA kernel ratios)."""
    preset = QUICK if args.quick else FULL
    dims = args.dims or preset["dims"]
    totals = sorted(args.totals or preset["totals"])
    repeats = args.repeats or preset["repeats"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(totals) < 2:
        raise ValueError("--totals needs at least two lengths to form a cost ratio")
    common = {
        "layers": args.layers,
        "chunk_size": args.chunk_size,
        "checkpoint": args.checkpoint,
        "device": device,
        "repeats": repeats,
        "median": args.median_length,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = _sweep(dims, totals, args.kernel, common, args.memory_headroom)
    ratios: dict[str, Any] = {}
    for d in dims:
        done = {r["total_tokens"]: r for r in rows if r["d_model"] == d and "skipped" not in r}
        both = totals[0] in done and totals[-1] in done
        lo, hi = done.get(totals[0]), done.get(totals[-1])
        ratios[str(d)] = {
            # median: typical step; min: least disturbed by other load on a shared machine
            "time_ratio": hi["seconds_median"] / lo["seconds_median"] if both else None,
            "time_ratio_min": hi["seconds_min"] / lo["seconds_min"] if both else None,
            "cpu_time_ratio": hi["cpu_seconds_median"] / lo["cpu_seconds_median"] if both else None,
            "linear_would_be": totals[-1] / totals[0],
        }
    log.info(
        "encoder fwd+bwd (%d layers, chunk %d, checkpointing %s, %s, %d threads):\n%s",
        args.layers,
        args.chunk_size,
        args.checkpoint,
        device,
        torch.get_num_threads(),
        _table(rows),
    )
    for d, r in ratios.items():
        if r["time_ratio"] is not None:
            log.info(
                "d=%s: time(%d)/time(%d) = %.2f median, %.2f best, %.2f cpu (linear: %.1f)",
                d,
                totals[-1],
                totals[0],
                r["time_ratio"],
                r["time_ratio_min"],
                r["cpu_time_ratio"],
                r["linear_would_be"],
            )
    result: dict[str, Any] = {
        "layers": args.layers,
        "chunk_size": args.chunk_size,
        "gradient_checkpointing": args.checkpoint,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "length_mix": {"median": args.median_length, "sigma": 1.2, "max": args.max_length},
        "config": {k: v for k, v in EncoderConfig().to_dict().items() if k not in ("d_model", "n_layers")},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "rows": rows,
        "cost_ratio": ratios,
        "kernel_ratio": None,
    }
    if device.type == "cuda":
        result["kernel_ratio"] = _kernel_ratios(dims, totals, common, args.memory_headroom)
    return result


def _kernel_ratios(dims: list[int], totals: list[int], common: dict[str, Any], headroom: float) -> list[dict[str, Any]]:
    """CUDA only: time with the pure-torch kernels / time with the mamba (Triton) kernels, per point."""
    torch_rows = _sweep(dims, totals, "torch", common, headroom)
    mamba_rows = _sweep(dims, totals, "mamba", common, headroom)
    out = []
    for a, b in zip(torch_rows, mamba_rows, strict=True):
        entry: dict[str, Any] = {"d_model": a["d_model"], "total_tokens": a["total_tokens"]}
        if "skipped" in a or "skipped" in b:
            entry["skipped"] = a.get("skipped") or b.get("skipped")
        else:
            entry.update(
                torch_s=a["seconds_median"],
                mamba_s=b["seconds_median"],
                torch_over_mamba=a["seconds_median"] / b["seconds_median"],
            )
            log.info(
                "d=%d T=%d: torch %.4f s, mamba %.4f s, ratio %.2f",
                a["d_model"],
                a["total_tokens"],
                a["seconds_median"],
                b["seconds_median"],
                entry["torch_over_mamba"],
            )
        out.append(entry)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """tokens/s versus packed length, one line per width (log-x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    done = [r for r in result["rows"] if "skipped" not in r]
    for d in sorted({r["d_model"] for r in done}):
        pts = sorted((r["total_tokens"], r["tokens_per_s"]) for r in done if r["d_model"] == d)
        ax.plot(*zip(*pts), marker="o", label=f"d={d}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("packed tokens per step")
    ax.set_ylabel("tokens/s (fwd+bwd)")
    ax.set_title(f"Bi-SSD encoder, {result['layers']} layers, chunk {result['chunk_size']}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
