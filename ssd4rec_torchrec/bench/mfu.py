"""Benchmark suite ``mfu``: model FLOP utilisation of a Bi-SSD encoder training step on this machine.

MFU = (analytic training FLOPs per token) x (measured tokens/s) / (fp32 GEMM peak measured in the same run,
best of a few large `torch.mm`). The FLOP count (`bissd_flops_per_token`) counts multiply-adds of matmuls and
the convolution as 2 FLOPs each, per token, as the torch path computes them (full Q x Q chunk blocks, masked
or not, with Q the torch path's tile `min(chunk_size, TORCH_MAX_CHUNK)`); element-wise work (exp, softplus,
SiLU, GELU, norms, dropout, masks) is not counted, as usual for MFU. With d_inner = expand*d, H =
d_inner/headdim heads, G groups of N states, chunk Q, conv width W, conv_dim = d_inner + 2GN, and
d_in_proj = 2 d_inner + 2GN + H, one mixer pass costs per token::

    in_proj       2 d d_in_proj
    conv          2 W conv_dim
    ssd_cb        2 G Q N          (C B^T inside each chunk, the full Q x Q block)
    ssd_intra     2 d_inner Q      (decay-masked (Q, Q) @ (Q, P) per head)
    ssd_states    2 d_inner N      (chunk end states, (P, Q) @ (Q, N) per head)
    ssd_passing   2 d_inner N/Q    (state recurrence over chunks: one multiply-add per state element per chunk)
    ssd_offdiag   2 d_inner N      (previous state read out by C)
    out_proj      2 d_inner d

A Bi-SSD layer runs the mixer core (conv + SSD) twice (both directions), the per-token projections once (with
shared weights `in_proj` commutes with the reversal and `out_proj` is affine, so `BiSSDLayer` computes them
once for both directions), plus the FFN (2 matmuls, 4 ffn_mult d^2 per token); layer norms are not counted.
Forward = n_layers x layer; a training step = 3 x forward (backward ~ 2 x forward:
one matmul for each input's gradient and one for each weight's).

The measured step is the `encoder` suite's (official sizes by default, realistic packed length mix). With
`--bf16` the forward runs under CPU bf16 autocast (the mixer keeps conv/scan/norm in fp32 by design) and
the bf16 GEMM peak is measured too; MFU is still quoted against the fp32 peak (the issue's definition), with
the bf16-peak ratio alongside, and the relative error of the bf16 output vs fp32 (eval mode) as a numeric
parity check. `--profile` writes a `torch.profiler` table of the top ops by self CPU time.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ssd4rec_torchrec.bench.common import target_verdict
from ssd4rec_torchrec.bench.encoder_step import Point, segment_lengths
from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig
from ssd4rec_torchrec.ops import offsets_from_lengths
from ssd4rec_torchrec.ops.ssd import TORCH_MAX_CHUNK

log = logging.getLogger(__name__)

FULL = {"dims": [64, 256], "tokens": 16384, "repeats": 3, "gemm_size": 4096, "gemm_repeats": 3}
QUICK = {"dims": [32], "tokens": 512, "repeats": 1, "gemm_size": 256, "gemm_repeats": 2}
TARGET_MFU = 0.40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the mfu suite (defaults: d in {64, 256}, 16k packed tokens, official encoder sizes)."""
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="model widths (default 64 256)")
    parser.add_argument("--tokens", type=int, default=None, help="packed tokens per step (default 16384)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per width (median kept)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=EncoderConfig.official().d_state)
    parser.add_argument("--headdim", type=int, default=EncoderConfig.official().headdim)
    parser.add_argument("--chunk-size", type=int, default=EncoderConfig.official().chunk_size)
    parser.add_argument("--median-length", type=float, default=100.0, help="median segment length of the mix")
    parser.add_argument("--max-length", type=int, default=2048, help="longest segment of the mix")
    parser.add_argument("--gemm-size", type=int, default=None, help="n of the n x n x n fp32 GEMM peak (4096)")
    parser.add_argument("--gemm-repeats", type=int, default=None, help="GEMM runs, best kept (default 3)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast forward (CPU)")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table per width to --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (d 32, 512 tokens, 256^3 GEMM)")


def bissd_flops_per_token(
    d_model: int,
    *,
    n_layers: int = 2,
    d_state: int = 64,
    headdim: int = 16,
    expand: int = 2,
    d_conv: int = 4,
    ngroups: int = 1,
    chunk_size: int = 256,
    ffn_mult: int = 4,
) -> dict[str, float]:
    """Forward FLOPs per token of a Bi-SSD encoder by term (see the module docstring), plus totals.

    Keys: the per-mixer-pass terms, `mixer` (one pass), `ffn`, `layer`, `forward`, `train_step` (= 3 x forward).
    """
    d, q, n, g = d_model, chunk_size, d_state, ngroups
    d_inner = expand * d
    heads = d_inner // headdim
    conv_dim = d_inner + 2 * g * n
    d_in_proj = 2 * d_inner + 2 * g * n + heads
    terms = {
        "in_proj": 2.0 * d * d_in_proj,
        "conv": 2.0 * d_conv * conv_dim,
        "ssd_cb": 2.0 * g * q * n,
        "ssd_intra": 2.0 * d_inner * q,
        "ssd_states": 2.0 * d_inner * n,
        "ssd_passing": 2.0 * d_inner * n / q,
        "ssd_offdiag": 2.0 * d_inner * n,
        "out_proj": 2.0 * d_inner * d,
    }
    mixer = sum(terms.values())
    ffn = 2.0 * 2.0 * d * ffn_mult * d
    projections = terms["in_proj"] + terms["out_proj"]
    layer = 2.0 * (mixer - projections) + projections + ffn  # core twice (both directions), projections once
    forward = n_layers * layer
    return {**terms, "mixer": mixer, "ffn": ffn, "layer": layer, "forward": forward, "train_step": 3.0 * forward}


def gemm_peak(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Best-of-`repeats` FLOP/s of an n x n x n `torch.mm` (one untimed warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype), "seconds": times, "flops_per_s": 2.0 * n**3 / min(times)}


def _point(d_model: int, tokens: int, args: argparse.Namespace) -> Point:
    """A train-mode encoder with this suite's sizes and `tokens` packed random tokens (encoder suite's mix)."""
    torch.manual_seed(args.seed)
    lengths = segment_lengths(tokens, median=args.median_length, max_length=args.max_length, seed=args.seed)
    cfg = EncoderConfig.official(d_model=d_model, n_layers=args.layers, d_state=args.d_state, headdim=args.headdim,
                        chunk_size=args.chunk_size, kernel="torch")
    enc = BiSSDEncoder.from_config(cfg).train()
    offsets = offsets_from_lengths(torch.tensor(lengths))
    x = torch.randn(tokens, d_model, requires_grad=True)
    return Point(d_model, tokens, lengths, enc, x, offsets)


def train_step(p: Point, bf16: bool) -> float:
    """Wall seconds of one forward (bf16 autocast when asked) + backward step of the point's encoder."""
    p.enc.zero_grad(set_to_none=True)
    p.x.grad = None
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = p.enc(p.x, p.offsets)
        loss = out[p.offsets[1:] - 1].float().pow(2).mean() + 1e-3 * out.float().pow(2).mean()
    loss.backward()
    return time.perf_counter() - t0


def bf16_output_error(p: Point) -> float:
    """Relative L2 error of the encoder's output under bf16 autocast vs fp32 (eval mode, same input).

    A numeric parity check only; whether bf16 keeps ranking quality is a training run's question.
    """
    was_training = p.enc.training
    p.enc.eval()
    with torch.no_grad():
        ref = p.enc(p.x, p.offsets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = p.enc(p.x, p.offsets).float()
    p.enc.train(was_training)
    return float((low - ref).norm() / ref.norm())


def _profile(p: Point, bf16: bool, path: Path, rows: int = 30) -> list[dict[str, Any]]:
    """Profile one step; write the op table (self CPU time) to `path`; return the top ops as dicts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        train_step(p, bf16)
    avgs = prof.key_averages()
    path.write_text(avgs.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n")
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in top]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure tokens/s per width and the GEMM peak, combine with the FLOP count into MFU."""
    preset = QUICK if args.quick else FULL
    dims = args.dims or preset["dims"]
    tokens = args.tokens or preset["tokens"]
    repeats = args.repeats or preset["repeats"]
    gemm_n = args.gemm_size or preset["gemm_size"]
    gemm_r = args.gemm_repeats or preset["gemm_repeats"]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak = gemm_peak(gemm_n, gemm_r)
    bf16_peak = gemm_peak(gemm_n, gemm_r, torch.bfloat16) if args.bf16 else None
    log.info("fp32 GEMM peak %.1f GFLOP/s (n=%d)", peak["flops_per_s"] / 1e9, gemm_n)
    points = []
    for d in dims:
        p = _point(d, tokens, args)
        train_step(p, args.bf16)  # warm-up
        points.append(p)
    for _ in range(repeats):  # interleaved rounds
        for p in points:
            p.times.append(train_step(p, args.bf16))
            log.info("d=%d: %.3f s", p.d_model, p.times[-1])
    rows = []
    for p in points:
        flops = bissd_flops_per_token(p.d_model, n_layers=args.layers, d_state=args.d_state, headdim=args.headdim,
                                      chunk_size=min(args.chunk_size, TORCH_MAX_CHUNK))
        sec = statistics.median(p.times)
        tok_s = p.total / sec
        achieved = flops["train_step"] * tok_s
        row = {
            "d_model": p.d_model, "tokens": p.total, "n_segments": len(p.lengths), "seconds_median": sec,
            "seconds_min": min(p.times), "seconds_all": p.times, "tokens_per_s": tok_s,
            "flops_per_token": flops, "train_flops_per_token": flops["train_step"],
            "achieved_flops_per_s": achieved, "mfu": achieved / peak["flops_per_s"],
            "mfu_best": flops["train_step"] * p.total / min(p.times) / peak["flops_per_s"],
        }
        if bf16_peak is not None:
            row["mfu_vs_bf16_peak"] = achieved / bf16_peak["flops_per_s"]
            row["bf16_output_rel_error"] = bf16_output_error(p)
            log.info("d=%d: bf16 autocast output rel. error vs fp32 %.2e", p.d_model, row["bf16_output_rel_error"])
        if args.profile:
            path = Path(args.out) / f"mfu_profile_d{p.d_model}{'_bf16' if args.bf16 else ''}.txt"
            row["profile_file"] = str(path)
            row["profile_top"] = _profile(p, args.bf16, path)
        rows.append(row)
    target_d = 256 if 256 in dims else max(dims)
    verdict = target_verdict(f"MFU at d={target_d}", next(r["mfu"] for r in rows if r["d_model"] == target_d),
                             TARGET_MFU, higher_is_better=True)
    log.info("MFU (%s, %d threads, fp32 peak %.1f GFLOP/s):\n%s\n%s", "bf16 autocast" if args.bf16 else "fp32",
             torch.get_num_threads(), peak["flops_per_s"] / 1e9, _table(rows), verdict["text"])
    return {
        "layers": args.layers, "d_state": args.d_state, "headdim": args.headdim, "chunk_size": args.chunk_size,
        "torch_tile": min(args.chunk_size, TORCH_MAX_CHUNK),
        "bf16_autocast": args.bf16, "num_threads": torch.get_num_threads(), "torch": torch.__version__,
        "repeats": repeats, "length_mix": {"median": args.median_length, "sigma": 1.2, "max": args.max_length},
        "gemm_peak": peak, "gemm_peak_bf16": bf16_peak, "rows": rows, "target": verdict,
        "flop_formula": "see ssd4rec_torchrec.bench.mfu docstring: matmul+conv multiply-adds x2, train = 3 x fwd",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'d':>5} {'tokens':>7} {'s/step':>8} {'tokens/s':>10} {'MFLOP/tok':>10} {'GFLOP/s':>9} {'MFU':>7}"]
    for r in rows:
        lines.append(f"{r['d_model']:>5} {r['tokens']:>7} {r['seconds_median']:>8.3f} {r['tokens_per_s']:>10.0f} "
                     f"{r['train_flops_per_token'] / 1e6:>10.3f} {r['achieved_flops_per_s'] / 1e9:>9.2f} "
                     f"{100 * r['mfu']:>6.1f}%")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """MFU per width as bars, with the 40% target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    rows = result["rows"]
    ax.bar(range(len(rows)), [100 * r["mfu"] for r in rows])
    ax.set_xticks(range(len(rows)), [f"d={r['d_model']}" for r in rows])
    ax.axhline(100 * TARGET_MFU, color="red", linestyle="--", label="target 40%")
    ax.set_xlabel("d_model")
    ax.set_ylabel("MFU (% of fp32 GEMM peak)")
    ax.set_title(f"Bi-SSD train step, peak {result['gemm_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s"
                 + (" (bf16)" if result["bf16_autocast"] else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
