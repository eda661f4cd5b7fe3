"""Bi-SSD versus SASRec at a fixed number of tokens per step over segment lengths L (`encoder --compare-sasrec`).

See the `bench.encoder` module docstring for what is measured and why; written as `encoder_vs_sasrec.json`/`.png`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ssd4rec_torchrec.bench.common import SavedBytes, fit_power_law, target_verdict
from ssd4rec_torchrec.bench.encoder_step import PeakMemory, Point, point_row, step
from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig, SASRecEncoder

__all__ = ["compare_summary", "plot_compare", "run_compare"]

log = logging.getLogger(__name__)


COMPARE_FULL = {"dims": [64], "lengths": [64, 256, 1024, 4096, 16384], "repeats": 3}
COMPARE_QUICK = {"dims": [32], "lengths": [64, 256, 1024], "repeats": 1}


def make_compare_point(model: str, d_model: int, length: int, tokens: int, args: argparse.Namespace,
                       device: torch.device, max_length: int) -> Point:
    """`tokens // length` segments of exactly `length` tokens for Bi-SSD (official sizes) or SASRec."""
    torch.manual_seed(args.seed)
    n = tokens // length
    if model in ("bissd", "bissd_noscan"):
        cfg = EncoderConfig.official(d_model=d_model, n_layers=args.layers, kernel=args.kernel,
                                     chunk_size=args.chunk_size,
                                     gradient_checkpointing=args.checkpoint)
        enc: torch.nn.Module = BiSSDEncoder.from_config(cfg)
    else:
        heads = args.sasrec_heads or max(1, d_model // 32)
        enc = SASRecEncoder(d_model, args.layers, heads, dropout=EncoderConfig().dropout, max_positions=max_length,
                            attn_dropout=args.sasrec_attn_dropout)
    enc = enc.to(device).train()
    offsets = torch.arange(0, n * length + 1, length, dtype=torch.int64, device=device)
    x = torch.randn(n * length, d_model, device=device, requires_grad=True)
    return Point(d_model, n * length, [length] * n, enc, x, offsets, model=model)


def _compare_row(p: Point) -> dict[str, Any]:
    row = point_row(p, "sdpa" if p.model == "sasrec" else "torch")
    length = p.lengths[0]
    row.update(model=p.model, length=length,
               seconds_per_sequence=row["seconds_median"] * length / p.total,
               saved_activations_gb=None if p.saved_bytes is None else p.saved_bytes / 1e9)
    return row


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Bi-SSD vs SASRec at fixed tokens per step over segment lengths L (see the module docstring)."""
    preset = COMPARE_QUICK if args.quick else COMPARE_FULL
    dims = args.dims or preset["dims"]
    lengths = sorted(set(args.lengths or preset["lengths"]))
    repeats = args.repeats or preset["repeats"]
    tokens = args.tokens_per_step or lengths[-1]
    if len(lengths) < 2:
        raise ValueError("--lengths needs at least two lengths to fit an exponent")
    if lengths[-1] > tokens:
        raise ValueError(f"--tokens-per-step {tokens} is shorter than the longest length {lengths[-1]}")
    ratio_length = args.ratio_length or (lengths[-1] if args.quick else 4096)
    if ratio_length not in lengths:
        raise ValueError(f"--ratio-length {ratio_length} is not one of --lengths {lengths}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mem = PeakMemory(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    for d in dims:
        points: list[Point] = []
        for model in ("bissd", "sasrec", "bissd_noscan"):
            prev: Point | None = None
            for length in (lengths if model != "bissd_noscan" else [ratio_length]):
                avail = mem.available_bytes()
                if args.memory_headroom > 0 and prev is not None and avail is not None:
                    # Conservative: per-token memory may grow like L (attention); tokens are fixed.
                    known = max(prev.peak_bytes or 0, prev.saved_bytes or 0)
                    need = known * length / prev.lengths[0]
                    if need > args.memory_headroom * avail:
                        why = f"needs ~{need / 1e9:.1f} GB (from L={prev.lengths[0]}), {avail / 1e9:.1f} GB available"
                        log.warning("%s d=%d L=%d skipped: %s", model, d, length, why)
                        rows.append({"model": model, "d_model": d, "length": length, "skipped": why})
                        continue
                p = make_compare_point(model, d, length, tokens, args, device, lengths[-1])
                tracked = mem.reset()
                saved = SavedBytes()
                with saved.track():
                    step(p)  # warm-up; gives the step's peak memory and its saved activations
                p.peak_bytes = mem.peak_bytes() if tracked else None
                p.saved_bytes = saved.bytes
                points.append(p)
                prev = p
        for _ in range(repeats):  # interleaved rounds: outside load hits every point alike
            for p in points:
                wall, cpu = step(p)
                p.times.append(wall)
                p.cpu_times.append(cpu)
                log.info("%s d=%d L=%d: %.3f s (cpu %.3f s)", p.model, d, p.lengths[0], wall, cpu)
        rows.extend(_compare_row(p) for p in points)
        del points
    summary = compare_summary(rows, dims, ratio_length, args.target_speedup, args.target_k)
    log.info("Bi-SSD vs SASRec, %d tokens/step, %d layers, %s, %d threads:\n%s", tokens, args.layers, device,
             torch.get_num_threads(), _compare_table(rows))
    for d, s in summary.items():
        for key in ("speedup_target", "k_target"):
            log.info("d=%s: %s", d, s[key]["text"])
        if s.get("scan_free_speedup") is not None:
            log.info("d=%s: with the scan removed (y = D x) Bi-SSD would be %.2fx SASRec at L=%d; the scan is %.0f%% "
                     "of the Bi-SSD step", d, s["scan_free_speedup"], s["speedup_at"], 100 * s["scan_share"])
    return {
        "output_name": "encoder_vs_sasrec",
        "mode": "compare_sasrec",
        "tokens_per_step": tokens,
        "lengths": lengths,
        "layers": args.layers,
        "chunk_size": args.chunk_size,
        "sasrec": {"heads": args.sasrec_heads or "max(1, d // 32)", "attn_dropout": args.sasrec_attn_dropout,
                   "max_positions": lengths[-1]},
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "rows": rows,
        "summary": summary,
    }


def compare_summary(rows: list[dict[str, Any]], dims: list[int], ratio_length: int, target_speedup: float,
                    target_k: float) -> dict[str, Any]:
    """Per width: fitted k per model (time per sequence vs L), the speed-up at `ratio_length`, target verdicts."""
    out: dict[str, Any] = {}
    for d in dims:
        entry: dict[str, Any] = {}
        done = {(r["model"], r["length"]): r for r in rows if r["d_model"] == d and "skipped" not in r}
        for model in ("bissd", "sasrec"):
            pts = sorted((L, r["seconds_per_sequence"]) for (m, L), r in done.items() if m == model)
            fit = fit_power_law(*zip(*pts)) if len({L for L, _ in pts}) >= 2 else None
            entry[model] = {"fit": fit, "lengths": [L for L, _ in pts]}
        a, b = done.get(("bissd", ratio_length)), done.get(("sasrec", ratio_length))
        speedup = b["seconds_median"] / a["seconds_median"] if a and b else None
        entry["speedup_at"] = ratio_length
        entry["bissd_speedup"] = speedup  # = SASRec step time / Bi-SSD step time (same tokens)
        entry["speedup_target"] = target_verdict(f"Bi-SSD/SASRec tokens/s at L={ratio_length}", speedup,
                                                 target_speedup, higher_is_better=True, unit="x")
        floor = done.get(("bissd_noscan", ratio_length))
        # The scan-free encoder's speed-up over SASRec: what a zero-cost scan would give (a hard ceiling).
        entry["scan_free_speedup"] = b["seconds_median"] / floor["seconds_median"] if floor and b else None
        entry["scan_share"] = 1 - floor["seconds_median"] / a["seconds_median"] if floor and a else None
        k = entry["bissd"]["fit"]["k"] if entry["bissd"]["fit"] else None
        entry["k_target"] = target_verdict("Bi-SSD exponent k", k, target_k, higher_is_better=False)
        out[str(d)] = entry
    return out


def _compare_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':>12} {'d':>4} {'L':>6} {'segs':>5} {'s/step':>8} {'best s':>8} {'s/seq':>10} "
            f"{'tokens/s':>10} {'peak GB':>8} {'saved GB':>9}")
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['model']:>12} {r['d_model']:>4} {r['length']:>6}  skipped: {r['skipped']}")
            continue
        peak = "?" if r["peak_step_gb"] is None else f"{r['peak_step_gb']:.2f}"
        saved = "?" if r["saved_activations_gb"] is None else f"{r['saved_activations_gb']:.3f}"
        lines.append(
            f"{r['model']:>12} {r['d_model']:>4} {r['length']:>6} {r['n_segments']:>5} {r['seconds_median']:>8.3f} "
            f"{r['seconds_min']:>8.3f} {r['seconds_per_sequence']:>10.5f} {r['tokens_per_s']:>10.0f} {peak:>8} "
            f"{saved:>9}"
        )
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    done = [r for r in result["rows"] if "skipped" not in r]
    for d in sorted({r["d_model"] for r in done}):
        for model in ("bissd", "sasrec"):
            pts = sorted((r["length"], r["tokens_per_s"], r["seconds_per_sequence"]) for r in done
                         if r["d_model"] == d and r["model"] == model)
            if not pts:
                continue
            fit = result["summary"][str(d)][model]["fit"]
            label = f"{model} d={d}" + (f" (k={fit['k']:.2f})" if fit else "")
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segment length L")
    ax1.set_ylabel("tokens/s (fwd+bwd)")
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds per sequence")
    ax1.set_title(f"{result['tokens_per_step']} tokens/step, {result['device']}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
