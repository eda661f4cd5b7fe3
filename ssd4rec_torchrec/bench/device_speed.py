"""Encoder speed on one device (the `bench` stage of `device_check`): Bi-SSD (mamba kernel), Bi-SSD (torch path)
and SASRec (`scaled_dot_product_attention`), in fp32 and under bf16 autocast.

Every step encodes the same number of tokens (`--tokens`, default 64k) as segments of one length L, for L in
`--lengths` (default 256 ... 64k), 2 layers at d=64 (official Bi-SSD sizes; SASRec with d/32 heads and no
attention dropout, so SDPA takes a fused kernel). Per point: forward+backward tokens/s (median of the timed
steps after warm-up, which also absorbs Triton compilation and autotuning) and peak allocated memory. Per
variant: the exponent k of time per sequence ∝ L^k (1: linear in L, 2: quadratic). SASRec in bf16 runs with
SDPA restricted to flash attention on CUDA (a step flash cannot serve fails instead of falling back).

Targets (reported, never fatal): mamba path >= 10x the torch path at every L, Bi-SSD faster than
SASRec-flash from L = 2k and >= 3x at L = 16k (both bf16), k <= 1.1. On CUDA the stage first checks
`ssd_scan(kernel="mamba")` against the torch path with Triton's default (TF32) fp32 dot, at a TF32
tolerance. On CPU the mamba variants are skipped (Triton kernels need CUDA; the kernels stage runs them
interpreted) and SASRec uses the default SDPA backends.

`python -m ssd4rec_torchrec.bench.device_speed --device cuda --json FILE --png FILE`; the JSON is rewritten
after every point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssd4rec_torchrec.bench.common import fit_power_law, target_verdict
from ssd4rec_torchrec.ops import compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: model, SSD kernel (Bi-SSD), SDPA backends (SASRec, CUDA) and precision."""

    name: str
    model: str
    kernel: str | None
    precision: str
    sdpa: tuple[str, ...] | None = None


# In order of importance: a run cut short by its time budget loses the last ones.
VARIANTS = (
    Variant("bissd_mamba_fp32", "bissd", "mamba", "fp32"),
    Variant("bissd_torch_fp32", "bissd", "torch", "fp32"),
    Variant("bissd_mamba_bf16", "bissd", "mamba", "bf16"),
    Variant("sasrec_bf16", "sasrec", None, "bf16", ("flash",)),
    Variant("sasrec_fp32", "sasrec", None, "fp32"),
    Variant("bissd_torch_bf16", "bissd", "torch", "bf16"),
)
PRESETS = {
    ("cuda", False): {"d_model": 64, "lengths": [256 << i for i in range(9)], "tokens": 65536, "warmup": 2,
                      "repeats": 5},
    ("cuda", True): {"d_model": 64, "lengths": [256, 1024, 4096, 16384], "tokens": 16384, "warmup": 1, "repeats": 3},
    ("cpu", False): {"d_model": 64, "lengths": [64, 256, 1024], "tokens": 1024, "warmup": 1, "repeats": 3},
    ("cpu", True): {"d_model": 32, "lengths": [32, 64, 128], "tokens": 256, "warmup": 1, "repeats": 1},
}
SPEEDUP_FROM = 2048  # Bi-SSD must beat SASRec-flash from this length on
SPEEDUP_AT = 16384
TARGETS = {"mamba_over_torch": 10.0, "bissd_over_sasrec_from": 1.0, "bissd_over_sasrec_at": 3.0, "k": 1.1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def skip_reason(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run on this device (None: it can)."""
    if variant.kernel == "mamba" and device.type != "cuda":
        return "mamba Triton kernels need CUDA (the kernels stage runs them interpreted on CPU)"
    return None


class Point:
    """A fresh encoder and `tokens // length` equal segments of random inputs, timed step by step."""

    def __init__(self, variant: Variant, d_model: int, length: int, tokens: int, max_length: int,
                 device: torch.device) -> None:
        from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig, SASRecEncoder

        torch.manual_seed(0)
        self.variant, self.length, self.device = variant, length, device
        n = max(1, tokens // length)
        if variant.model == "bissd":
            cfg = EncoderConfig.official(d_model=d_model, n_layers=2, kernel=variant.kernel or "auto",
                                autocast="bf16" if variant.precision == "bf16" else "none")
            self.enc: torch.nn.Module = BiSSDEncoder.from_config(cfg)
        else:
            self.enc = SASRecEncoder(d_model, 2, max(1, d_model // 32), dropout=0.2, max_positions=max_length,
                                     attn_dropout=0.0)
        self.enc = self.enc.to(device).train()
        self.offsets = torch.arange(0, n * length + 1, length, dtype=torch.int64, device=device)
        self.x = torch.randn(n * length, d_model, device=device, requires_grad=True)
        self.segments = n

    def context(self) -> contextlib.ExitStack:
        """SASRec's autocast and SDPA backend restriction (Bi-SSD autocasts by its own `autocast` option)."""
        stack = contextlib.ExitStack()
        v = self.variant
        if v.model == "sasrec" and v.precision == "bf16":
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        if v.model == "sasrec" and v.sdpa and self.device.type == "cuda":
            stack.enter_context(compat.sdpa_backends(v.sdpa))
        return stack

    def step(self) -> float:
        """Seconds of one forward + backward."""
        self.enc.zero_grad(set_to_none=True)
        self.x.grad = None
        _sync(self.device)
        t0 = time.perf_counter()
        with self.context():
            out = self.enc(self.x, self.offsets)
        out = out.float()
        loss = out[self.offsets[1:] - 1].pow(2).mean() + 1e-3 * out.pow(2).mean()
        loss.backward()
        _sync(self.device)
        return time.perf_counter() - t0


def measure(variant: Variant, length: int, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One point: warm-up steps (the first compiles and autotunes), then `repeats` timed steps, over which the
    peak memory above the memory held before them is taken (so autotuning's scratch buffers do not count)."""
    from ssd4rec_torchrec.bench.encoder_step import PeakMemory

    p = Point(variant, cfg["d_model"], length, cfg["tokens"], max(cfg["lengths"]), device)
    first = p.step()
    for _ in range(cfg["warmup"] - 1):
        p.step()
    mem = PeakMemory(device)
    tracked = mem.reset()
    times = [p.step() for _ in range(cfg["repeats"])]
    peak = mem.peak_bytes() if tracked else None
    sec = statistics.median(times)
    tokens = p.segments * length
    return {
        "variant": variant.name, "model": variant.model, "kernel": variant.kernel, "precision": variant.precision,
        "sdpa": list(variant.sdpa) if variant.sdpa and device.type == "cuda" else "default",
        "d_model": cfg["d_model"], "length": length, "segments": p.segments, "tokens": tokens,
        "seconds_median": sec, "seconds_min": min(times), "first_step_seconds": first, "tokens_per_s": tokens / sec,
        "seconds_per_sequence": sec * length / tokens, "peak_gb": None if peak is None else peak / 1e9,
    }


def _ratio(rows: dict[tuple[str, int], dict[str, Any]], slow: str, fast: str, length: int) -> float | None:
    a, b = rows.get((slow, length)), rows.get((fast, length))
    return a["seconds_median"] / b["seconds_median"] if a and b else None


def summarize(rows: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Fitted exponents, speed ratios per length and the target verdicts."""
    done = {(r["variant"], r["length"]): r for r in rows if "skipped" not in r}
    fits: dict[str, Any] = {}
    for v in VARIANTS:
        pts = sorted((L, done[(v.name, L)]["seconds_per_sequence"]) for L in lengths if (v.name, L) in done)
        fits[v.name] = fit_power_law(*zip(*pts)) if len(pts) >= 2 else None
    out: dict[str, Any] = {"fits": fits, "ratios": {}}
    for prec in ("fp32", "bf16"):
        mamba, torch_path, sasrec = f"bissd_mamba_{prec}", f"bissd_torch_{prec}", f"sasrec_{prec}"
        bissd = mamba if any(k[0] == mamba for k in done) else torch_path
        out["ratios"][prec] = {
            "mamba_over_torch": {L: _ratio(done, torch_path, mamba, L) for L in lengths},
            "bissd_variant": bissd,
            "bissd_over_sasrec": {L: _ratio(done, sasrec, bissd, L) for L in lengths},
        }
    r32, r16 = out["ratios"]["fp32"], out["ratios"]["bf16"]
    m_over_t = [v for v in r32["mamba_over_torch"].values() if v is not None]
    long = {L: v for L, v in r16["bissd_over_sasrec"].items() if L >= SPEEDUP_FROM}
    from_value = min(long.values()) if long and None not in long.values() else None
    k_fit = fits.get(r32["bissd_variant"])
    out["crossover_length_bf16"] = _crossover(r16["bissd_over_sasrec"])
    out["targets"] = [
        target_verdict("mamba/torch Bi-SSD step time, fp32, min over L", min(m_over_t) if m_over_t else None,
                       TARGETS["mamba_over_torch"], higher_is_better=True, unit="x"),
        target_verdict(f"Bi-SSD/SASRec-flash tokens/s, bf16, min over L >= {SPEEDUP_FROM}", from_value,
                       TARGETS["bissd_over_sasrec_from"], higher_is_better=True, unit="x"),
        target_verdict(f"Bi-SSD/SASRec-flash tokens/s, bf16, L = {SPEEDUP_AT}",
                       r16["bissd_over_sasrec"].get(SPEEDUP_AT), TARGETS["bissd_over_sasrec_at"],
                       higher_is_better=True, unit="x"),
        target_verdict(f"Bi-SSD cost exponent k ({r32['bissd_variant']})", k_fit["k"] if k_fit else None,
                       TARGETS["k"], higher_is_better=False),
    ]
    return out


def _crossover(speedups: dict[int, float | None]) -> int | None:
    """Smallest L from which Bi-SSD is faster at every measured longer L (None: never or not measured)."""
    best = None
    for L in sorted(speedups, reverse=True):
        v = speedups[L]
        if v is None or v <= 1.0:
            break
        best = L
    return best


def plot(result: dict[str, Any], path: Path) -> None:
    """tokens/s and peak memory versus L, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in result["rows"] if "skipped" not in r]
    for v in VARIANTS:
        pts = sorted((r["length"], r["tokens_per_s"], r["peak_gb"]) for r in rows if r["variant"] == v.name)
        if not pts:
            continue
        fit = result["summary"]["fits"].get(v.name)
        label = v.name + (f" (k={fit['k']:.2f})" if fit else "")
        style = "-" if v.precision == "fp32" else "--"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        mem = [(p[0], p[2]) for p in pts if p[2] is not None and p[2] > 0]
        if mem:
            ax2.plot([m[0] for m in mem], [m[1] for m in mem], style, marker="o", label=v.name)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("segment length L")
    ax1.set_ylabel("tokens/s (forward + backward)")
    ax2.set_ylabel("peak memory of a step (GB)")
    ax1.set_title(f"{result['device_name']}, {result['tokens']} tokens/step, d={result['d_model']}", fontsize=9)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tf32_parity(device: torch.device) -> dict[str, Any]:
    """`ssd_scan` mamba vs torch with Triton's default fp32 dot (TF32 on CUDA), at the TF32 tolerance."""
    from ssd4rec_torchrec.bench.device_kernels import TF32_TOL, run_ssd_case, ssd_cases

    case = ssd_cases(device, quick=True)[0]
    out = run_ssd_case(case, "float32", device)
    worst = max(out["mamba_vs_torch"].values())
    out.update(tolerance={"y": TF32_TOL, "grad": TF32_TOL}, ok=worst <= TF32_TOL,
               triton_fp32_dot=compat.triton_fp32_default() or "default (tf32)")
    return out


def run(device: torch.device, cfg: dict[str, Any], deadline: float, path: Path) -> dict[str, Any]:
    """All points, in `VARIANTS` order; the result is rewritten to `path` after each."""
    result: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "layers": 2, **cfg, "torch_fp32_matmul": compat.fp32_matmul_precision(),
        "triton_autotune_limit": None, "flash_attention_impl": compat.flash_attention_impl(), "rows": [],
        "skipped": [], "errors": [],
    }

    def save() -> None:
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if device.type == "cuda":
        try:
            result["triton_autotune_limit"] = compat.triton_autotune_limit()
            result["tf32_parity"] = tf32_parity(device)
        except Exception as exc:
            log.exception("TF32 parity check failed")
            result["errors"].append({"check": "tf32 parity", "error": f"{type(exc).__name__}: {exc}"[:2000]})
    else:
        result["skipped"].append("tf32 parity: CUDA only")
    save()
    for v in VARIANTS:
        why = skip_reason(v, device)
        if why is not None:
            result["skipped"].append(f"{v.name}: {why}")
            continue
        for L in cfg["lengths"]:
            row_head = {"variant": v.name, "length": L}
            if time.time() > deadline:
                result["rows"].append({**row_head, "skipped": "time budget spent"})
                continue
            try:
                row = measure(v, L, cfg, device)
                log.info("%s L=%d: %.4f s/step, %.0f tokens/s, peak %s GB", v.name, L, row["seconds_median"],
                         row["tokens_per_s"], "?" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}")
            except torch.OutOfMemoryError as exc:
                row = {**row_head, "skipped": f"out of memory: {str(exc).splitlines()[0][:200]}"}
            except Exception as exc:
                log.exception("%s L=%d failed", v.name, L)
                row = {**row_head, "skipped": f"error: {type(exc).__name__}: {exc}"[:2000]}
                result["errors"].append({"check": f"{v.name} L={L}", "error": row["skipped"]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["rows"].append(row)
            save()
    result["summary"] = summarize(result["rows"], cfg["lengths"])
    for t in result["summary"]["targets"]:
        log.info("target: %s", t["text"])
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller points")
    parser.add_argument("--json", type=Path, required=True, help="result file (rewritten after every point)")
    parser.add_argument("--png", type=Path, default=None, help="plot of tokens/s and peak memory versus L")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="segment lengths L")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: the preset's)")
    parser.add_argument("--autotune", choices=("full", "first"), default="full",
                        help="Triton autotuning: every config (default) or each kernel's first (faster start)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="Unix time after which no new point starts (the rest are recorded as skipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    cfg = dict(PRESETS[(device.type, args.quick)])
    cfg["lengths"] = sorted(set(args.lengths or cfg["lengths"]))
    cfg["tokens"] = args.tokens or cfg["tokens"]
    if len(cfg["lengths"]) < 2 or min(cfg["lengths"]) < 1:
        parser.error("--lengths needs at least two positive lengths (to fit an exponent)")
    if cfg["tokens"] < max(cfg["lengths"]):
        parser.error(f"--tokens {cfg['tokens']} is below the longest length {max(cfg['lengths'])}")
    if device.type == "cuda" and args.autotune == "first":
        compat.set_triton_autotune_limit(1)
    result = run(device, cfg, args.deadline, args.json)
    if args.png is not None:
        plot(result, args.png)
    return 1 if result["errors"] or not result.get("tf32_parity", {"ok": True})["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
