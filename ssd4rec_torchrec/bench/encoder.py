"""Encoder speed benchmark: forward+backward tokens/s of a 2-layer Bi-SSD encoder versus packed length.

For each width d and each total length T (tokens packed from many segments of a realistic length mix),
time one training step of `BiSSDEncoder` (forward, scalar loss, backward) and report tokens/s and the cost
ratio time(T_max)/time(T_min); a linear-in-T encoder gives T_max/T_min (8.0 for 8k -> 64k). With CUDA, the
same steps also run with the torch kernels and with the mamba (Triton) kernels and their time ratio is
reported. Used by `apps/bench.py encoder`; `python -m ssd4rec_torchrec.bench.encoder` also works.

`--compare-sasrec` (written as `encoder_vs_sasrec.json`/`.png`): Bi-SSD versus our SASRec at a fixed number
of tokens per step (`--tokens-per-step`, default the longest length), every segment of one length
L in `--lengths` (default 64 256 1k 4k 16k). Both have the same d, layers and dropout; SASRec gets
`max(1, d // 32)` heads (2 at d=64 like RecBole's default, head width 32, close to Bi-SSD's headdim 16) and
attention dropout 0 by default, so that `scaled_dot_product_attention` takes its fused O(L)-memory CPU kernel
(with attention dropout it falls back to materialising every (L, L) score matrix: slower, and out of memory at
16k) - this favours SASRec. With tokens fixed, the time to encode one sequence is step time * L / tokens; its
fitted exponent k (time ∝ L^k, least squares on log-log) is 1 for a linear encoder and tends to 2 for
attention. Reported: tokens/s, RSS peak delta and autograd-saved activation bytes per point, k per model,
the Bi-SSD speed-up over SASRec at L=4096 and the issue's targets (speed-up >= 3, k <= 1.1) with margins.
A third model, `bissd_noscan`, is the same Bi-SSD encoder with the SSD scan replaced by its D skip (`y = D x`,
everything else - projections, conv, norms, FFN, both directions - kept) at the ratio length: its speed-up
over SASRec is the ceiling any scan implementation could reach on this machine (`scan_free_speedup`).

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
import os
from pathlib import Path
from typing import Any

import torch

from ssd4rec_torchrec.bench.encoder_compare import plot_compare, run_compare
from ssd4rec_torchrec.bench.encoder_step import PeakMemory, Point, make_point, point_row, step
from ssd4rec_torchrec.nn import EncoderConfig

__all__ = ["add_arguments", "main", "plot", "run"]

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
    g = parser.add_argument_group("Bi-SSD vs SASRec (--compare-sasrec)")
    g.add_argument("--compare-sasrec", action="store_true",
                   help="fixed tokens per step, equal-length segments: Bi-SSD vs SASRec per length L")
    g.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="segment lengths L (default 64 256 1024 4096 16384; quick 64 256 1024)")
    g.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per step (default: the longest L, so it is one segment)")
    g.add_argument("--sasrec-heads", type=int, default=None, help="SASRec heads (default max(1, d // 32))")
    g.add_argument("--sasrec-attn-dropout", type=float, default=0.0,
                   help="SASRec attention dropout (default 0: fused SDPA kernel; > 0 materialises L x L scores)")
    g.add_argument("--ratio-length", type=int, default=None,
                   help="L at which the speed-up is checked (default 4096; quick: the longest L)")
    g.add_argument("--target-speedup", type=float, default=3.0, help="target Bi-SSD/SASRec tokens/s ratio (3)")
    g.add_argument("--target-k", type=float, default=1.1, help="target Bi-SSD exponent k, time ∝ L^k (1.1)")


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
        by_total = {p.total: point_row(p, kernel) for p in points}
        for total in totals:
            rows.append(
                by_total.get(total)
                or {"d_model": d, "total_tokens": total, "kernel": kernel, "skipped": skipped[total]}
            )
        del points
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite; returns a JSON-able dict (rows, per-width cost ratios, optional CUDA kernel ratios)."""
    if getattr(args, "compare_sasrec", False):
        return run_compare(args)
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
        "config": {k: v for k, v in EncoderConfig.official().to_dict().items() if k not in ("d_model", "n_layers")},
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
    """tokens/s versus packed length, one line per width (log-x); Bi-SSD vs SASRec in --compare-sasrec mode."""
    if result.get("mode") == "compare_sasrec":
        plot_compare(result, path)
        return
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
