"""Kernel checks of the GPU path (the `kernels` stage of `device_check`), run on one device.

* SSD parity: `ssd_scan(kernel="mamba")` (mamba-ssm's `mamba_chunk_scan_combined` with `seq_idx`) against
  `ssd_scan(kernel="torch")` on the same device and inputs, forward and backward, fp32 and bf16, with 1 to
  1000 segments and lengths 1, chunk, chunk±1 and long; fp32 cases also report both paths' error against a
  float64 run of the torch path (sums over many tokens differ by their order of addition). On CUDA, Triton
  compiles fp32 `tl.dot` as IEEE fp32 in this stage (its default is TF32, ~1e-3): the 1e-5 / 1e-4 targets
  are about the algorithm; the benchmark stage checks the TF32 default at a looser tolerance. Autotuning is
  limited to the config with the smallest blocks here (compile time; results are the same up to rounding).
  On CPU the kernels run under the Triton interpreter at tiny sizes, fp32 only.
* Varlen conv: the device result (causal_conv1d where installed and usable, else our path) against a float64
  CPU run of the torch path, forward and backward, segments ending at 63/64/65 and 255/256/257.
* Encoder: `BiSSDEncoder` (eval) per kernel on the device: packed versus each segment alone (packing
  invariance), a perturbed segment leaves the others unchanged (isolation), and the device result versus the
  same weights on the CPU.

Order: fp32 parity, conv, encoder, bf16 parity (a stage cut off by its time budget loses the least).
`python -m ssd4rec_torchrec.bench.device_kernels --device cuda --json FILE`; the JSON is rewritten after every
check, so a run cut short keeps what it measured. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssd4rec_torchrec.ops import compat
from ssd4rec_torchrec.ops.segments import offsets_from_lengths

log = logging.getLogger(__name__)

# Tolerances (relative error in the max norm, see `rel_err`). fp32: the parity targets.
SSD_TOL = {"float32": {"y": 1e-5, "grad": 1e-4}, "bfloat16": {"y": 3e-2, "grad": 5e-2}}
CONV_TOL = 1e-5
ENCODER_TOL = {"packing_y": 1e-5, "packing_grad": 1e-4, "isolation": 1e-5, "cpu_y": 1e-4, "cpu_grad": 1e-3}
TF32_TOL = 1e-2  # fp32 parity with Triton's default TF32 dot (used by the benchmark stage)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`max|actual - expected| / max|expected|` in float64 on the CPU (the absolute error if expected is 0)."""
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def offsets_of(lengths: list[int]) -> torch.Tensor:
    """int64 jagged offsets `[0, cumsum(lengths)]`."""
    return offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ SSD parity


@dataclass(frozen=True)
class SSDCase:
    """One parity case: segment lengths and the scan's shape (heads, groups, head dim, state, chunk)."""

    name: str
    lengths: tuple[int, ...]
    H: int
    G: int
    P: int
    N: int
    chunk: int
    D_kind: str | None
    dtypes: tuple[str, ...]


def _mixed_lengths(count: int, chunk: int, seed: int) -> tuple[int, ...]:
    """`count` segment lengths mixing 1, chunk-1, chunk, chunk+1 and short random lengths."""
    g = torch.Generator().manual_seed(seed)
    picks = (1, 2, chunk - 1, chunk, chunk + 1)
    out = []
    for _ in range(count):
        i = int(torch.randint(len(picks) + 1, (1,), generator=g))
        out.append(picks[i] if i < len(picks) else int(torch.randint(3, 65, (1,), generator=g)))
    return tuple(out)


def ssd_cases(device: torch.device, quick: bool) -> list[SSDCase]:
    """CUDA: the encoder's scan shape at d=64 (8 heads of 16, state 64, chunk 256) plus one grouped shape.
    CPU (interpreted Triton): tiny shapes, fp32 only."""
    if device.type == "cpu":
        q = 16
        if quick:  # one case with every length kind (the interpreter takes seconds per case)
            return [SSDCase("boundaries", (1, q - 1, q, q + 1, 1, 2, 1, 21), 2, 1, 8, 8, q, "h", ("float32",))]
        return [
            SSDCase("boundaries", (1, q - 1, q, q + 1, 1, 40), 2, 1, 8, 8, q, "h", ("float32",)),
            SSDCase("many_segments", _mixed_lengths(12, q, seed=1), 2, 1, 8, 8, q, "h", ("float32",)),
        ]
    q = 256
    both = ("float32", "bfloat16")
    cases = [
        SSDCase("boundaries", (1, q - 1, q, q + 1, 1, 2, 2 * q + 1, 3000), 8, 1, 16, 64, q, "h", both),
        SSDCase("1000_segments", _mixed_lengths(1000, q, seed=1), 8, 1, 16, 64, q, "h", both),
    ]
    if not quick:
        cases += [
            SSDCase("one_long_segment", (16384,), 8, 1, 16, 64, q, "h", both),
            SSDCase("groups_Dhp", (1, 63, 64, 65, 1, 500), 4, 2, 32, 16, 64, "hp", ("float32",)),
        ]
    return cases


def _ssd_inputs(case: SSDCase, seed: int) -> dict[str, torch.Tensor]:
    """Realistic fp32 CPU inputs: dt = softplus(N(-2, 1)), A in [-8, -0.5], B and C of unit-order dot products."""
    g = torch.Generator().manual_seed(seed)
    T = sum(case.lengths)
    out = {
        "x": torch.randn(T, case.H, case.P, generator=g),
        "dt": F.softplus(torch.randn(T, case.H, generator=g) - 2.0),
        "A": -(0.5 + 7.5 * torch.rand(case.H, generator=g)),
        "B": torch.randn(T, case.G, case.N, generator=g) / case.N**0.5,
        "C": torch.randn(T, case.G, case.N, generator=g) / case.N**0.5,
    }
    if case.D_kind == "h":
        out["D"] = torch.randn(case.H, generator=g)
    elif case.D_kind == "hp":
        out["D"] = torch.randn(case.H, case.P, generator=g)
    return out


def _scan_run(inputs: dict[str, torch.Tensor], offsets: torch.Tensor, gy: torch.Tensor, kernel: str, chunk: int,
              device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of `ssd_scan` on `device`; x, dt, B, C in `dtype` (A and D stay fp32 below fp32)."""
    from ssd4rec_torchrec.ops import ssd_scan

    low = dtype in (torch.bfloat16, torch.float16)
    leaves = {k: v.to(device, torch.float32 if low and k in ("A", "D") else dtype, copy=True).requires_grad_()
              for k, v in inputs.items()}
    y = ssd_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], offsets.to(device),
                 D=leaves.get("D"), chunk_size=chunk, kernel=kernel)
    y.backward(gy.to(device, y.dtype))
    _sync(device)
    return y.detach(), {"d" + k: v.grad for k, v in leaves.items()}


def run_ssd_case(case: SSDCase, dtype_name: str, device: torch.device) -> dict[str, Any]:
    """mamba vs torch path (and, for fp32, both vs a float64 torch run) for one case and dtype."""
    t0 = time.perf_counter()
    inputs = _ssd_inputs(case, seed=len(case.lengths))
    offsets = offsets_of(list(case.lengths))
    gy = torch.randn(sum(case.lengths), case.H, case.P, generator=torch.Generator().manual_seed(7))
    dtype = DTYPES[dtype_name]
    y_t, g_t = _scan_run(inputs, offsets, gy, "torch", case.chunk, device, dtype)
    y_m, g_m = _scan_run(inputs, offsets, gy, "mamba", case.chunk, device, dtype)
    errors = {"y": rel_err(y_m, y_t), **{k: rel_err(g_m[k], g_t[k]) for k in g_t}}
    tol = SSD_TOL[dtype_name]
    out: dict[str, Any] = {
        "name": case.name, "dtype": dtype_name, "segments": len(case.lengths), "tokens": sum(case.lengths),
        "min_length": min(case.lengths), "max_length": max(case.lengths), "chunk": case.chunk,
        "shape": {"H": case.H, "G": case.G, "P": case.P, "N": case.N, "D": case.D_kind},
        "mamba_vs_torch": errors, "tolerance": tol,
    }
    if dtype_name == "float32":
        y_r, g_r = _scan_run(inputs, offsets, gy, "torch", case.chunk, device, torch.float64)
        out["mamba_vs_fp64"] = {"y": rel_err(y_m, y_r), **{k: rel_err(g_m[k], g_r[k]) for k in g_r}}
        out["torch_vs_fp64"] = {"y": rel_err(y_t, y_r), **{k: rel_err(g_t[k], g_r[k]) for k in g_r}}
    worst_grad = max(v for k, v in errors.items() if k != "y")
    out["ok"] = errors["y"] <= tol["y"] and worst_grad <= tol["grad"]
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------- conv


def _conv_path(device: torch.device, channels: int) -> str:
    from ssd4rec_torchrec.ops import causal_conv1d_available
    from ssd4rec_torchrec.ops.native import native_ops

    if device.type == "cuda":
        return "causal_conv1d" if channels % 8 == 0 and causal_conv1d_available() else "torch"
    return "native" if native_ops() is not None else "torch"


def run_conv_check(boundary: int, activation: str | None, device: torch.device) -> dict[str, Any]:
    """varlen_causal_conv1d on `device` (fp32, kernel "auto") vs the float64 torch path on the CPU."""
    from ssd4rec_torchrec.ops import varlen_causal_conv1d

    lengths = [1, 2, 3, 4, 5, boundary, boundary, 1]
    channels, width = 64, 4
    g = torch.Generator().manual_seed(boundary)
    x0 = torch.randn(sum(lengths), channels, generator=g)
    w0, b0 = torch.randn(channels, width, generator=g), torch.randn(channels, generator=g)
    gy = torch.randn(x0.shape, generator=g)
    offsets = offsets_of(lengths)
    results = {}
    for name, dev, dtype, kernel in (("ref", torch.device("cpu"), torch.float64, "torch"),
                                     ("dev", device, torch.float32, "auto")):
        x, w, b = (t.to(dev, dtype, copy=True).requires_grad_() for t in (x0, w0, b0))
        y = varlen_causal_conv1d(x, w, b, offsets.to(dev), activation=activation, kernel=kernel)
        y.backward(gy.to(dev, dtype))
        results[name] = {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad}
    errors = {k: rel_err(results["dev"][k], results["ref"][k]) for k in results["ref"]}
    return {"boundary": boundary, "activation": activation, "path": _conv_path(device, channels),
            "vs_cpu_fp64": errors, "tolerance": CONV_TOL, "ok": max(errors.values()) <= CONV_TOL}


# ------------------------------------------------------------------------------------------ encoder


def _encoder(d_model: int, chunk: int, kernel: str) -> torch.nn.Module:
    from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig

    torch.manual_seed(0)
    cfg = EncoderConfig.official(d_model=d_model, n_layers=2, chunk_size=chunk, kernel=kernel)
    return BiSSDEncoder.from_config(cfg).eval()


def _encode(enc: torch.nn.Module, x: torch.Tensor, offsets: torch.Tensor, gy: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, input gradient and parameter gradients of `sum(enc(x) * gy)`."""
    enc.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = enc(x, offsets)
    (y * gy).sum().backward()
    _sync(x.device)
    grads = {n: p.grad.detach().clone() for n, p in enc.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def run_encoder_check(kernel: str, device: torch.device, quick: bool) -> dict[str, Any]:
    """Packing invariance, segment isolation and (off the CPU) agreement with the CPU for one kernel."""
    if device.type == "cpu":
        d_model, chunk, lengths = 32, 16, [1, 3, 15, 16, 17, 40]
    else:
        d_model, chunk = 64, 256
        lengths = [1, 3, 255, 256, 257, 40] if quick else [1, 3, 255, 256, 257, 700, 40, 1500]
    t0 = time.perf_counter()
    enc = _encoder(d_model, chunk, kernel).to(device)
    g = torch.Generator().manual_seed(3)
    T = sum(lengths)
    x = torch.randn(T, d_model, generator=g)
    gy = torch.randn(T, d_model, generator=g)
    offsets = offsets_of(lengths)
    off = offsets.tolist()
    y, dx, dparams = _encode(enc, x.to(device), offsets.to(device), gy.to(device))
    pack_y, pack_dx = [], []
    for s in range(len(lengths)):
        a, b = off[s], off[s + 1]
        y_s, dx_s, _ = _encode(enc, x[a:b].to(device), offsets_of([b - a]).to(device), gy[a:b].to(device))
        pack_y.append(rel_err(y[a:b], y_s))
        pack_dx.append(rel_err(dx[a:b], dx_s))
    k = len(lengths) // 2  # perturb one middle segment; every other segment must not move
    x2 = x.clone()
    x2[off[k]:off[k + 1]] += torch.randn(off[k + 1] - off[k], d_model, generator=g)
    with torch.no_grad():
        y2 = enc(x2.to(device), offsets.to(device))
    others = torch.ones(T, dtype=torch.bool)
    others[off[k]:off[k + 1]] = False
    isolation = rel_err(y2[others.to(device)], y[others.to(device)])
    tol = ENCODER_TOL
    out: dict[str, Any] = {
        "kernel": kernel, "d_model": d_model, "chunk": chunk, "lengths": lengths,
        "packing_y": max(pack_y), "packing_dx": max(pack_dx), "isolation": isolation, "tolerance": tol,
    }
    ok = out["packing_y"] <= tol["packing_y"] and out["packing_dx"] <= tol["packing_grad"]
    ok = ok and isolation <= tol["isolation"]
    if device.type != "cpu":
        cpu = _encoder(d_model, chunk, "torch")
        cpu.load_state_dict({n: t.cpu() for n, t in enc.state_dict().items()})
        y_c, dx_c, dparams_c = _encode(cpu, x, offsets, gy)
        out["cpu_y"] = rel_err(y, y_c)
        out["cpu_dx"] = rel_err(dx, dx_c)
        out["cpu_dparams"] = max(rel_err(dparams[n], dparams_c[n]) for n in dparams_c)
        ok = ok and out["cpu_y"] <= tol["cpu_y"] and max(out["cpu_dx"], out["cpu_dparams"]) <= tol["cpu_grad"]
    else:
        out["cpu_compare"] = "skipped: the device is the CPU"
    out["ok"] = ok
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------- driver


class Report:
    """The stage's JSON result, rewritten to `path` after every update."""

    def __init__(self, path: Path, **head: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {**head, "ssd_parity": [], "conv": [], "encoder": [], "skipped": [],
                                     "errors": []}
        self.write()

    def add(self, section: str, item: Any) -> None:
        self.data[section].append(item)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _guarded(report: Report, section: str, what: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one check; an exception is recorded as a failed check (the stage goes on)."""
    try:
        result = fn()
    except Exception as exc:
        log.exception("%s failed", what)
        report.add("errors", {"check": what, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        return
    report.add(section, result)
    log.info("%s: %s", what, "ok" if result.get("ok") else "FAILED")


def _prepare_triton(device: torch.device) -> dict[str, Any]:
    """Triton set-up before any kernel is defined; returns what was set (for the report)."""
    if device.type == "cpu":
        compat.install_triton_cpu_interpreter()
        return {"triton": "interpreter (TRITON_INTERPRET=1)", "autotune_configs": 1}
    compat.set_triton_fp32_default("ieee")
    compat.set_triton_autotune_limit(1, smallest=True)  # the quickest to compile; results agree up to rounding
    compat.set_fp32_matmul_precision("ieee")
    return {"triton_fp32_dot": "ieee", "autotune_configs": "1 (smallest blocks)", "torch_fp32_matmul": "ieee"}


def run(device: torch.device, quick: bool, report: Report) -> None:
    """All checks of the stage, in order of importance."""
    try:
        report.data["setup"] = _prepare_triton(device)
        compat.load_mamba_chunk_scan(bare_package=True)
        report.data["setup"]["mamba_import"] = compat.mamba_import_mode()
        mamba_error = None
    except Exception as exc:  # triton or mamba-ssm missing / broken
        mamba_error = f"{type(exc).__name__}: {exc}"
    if mamba_error is not None:
        if device.type == "cuda":
            report.add("errors", {"check": "import mamba-ssm SSD kernels", "error": mamba_error})
        else:
            report.add("skipped", f"ssd parity: mamba-ssm / triton not importable here ({mamba_error})")

    def parity(dtype_name: str) -> None:
        for case in ssd_cases(device, quick):
            if mamba_error is None and dtype_name in case.dtypes:
                _guarded(report, "ssd_parity", f"ssd parity {case.name} {dtype_name}",
                         lambda c=case: run_ssd_case(c, dtype_name, device))

    parity("float32")  # the parity targets first: a stage cut short by its budget loses the least
    for boundary in (63, 64, 65, 255, 256, 257):
        for act in (None, "silu"):
            _guarded(report, "conv", f"conv boundary {boundary} {act}",
                     lambda b=boundary, a=act: run_conv_check(b, a, device))
    kernels = ("mamba", "torch") if device.type == "cuda" else ("auto",)
    if device.type == "cpu":
        report.add("skipped", "encoder kernel='mamba': CUDA only (on CPU 'auto' is the torch path)")
    for kernel in kernels:
        if kernel == "mamba" and mamba_error is not None:
            continue
        _guarded(report, "encoder", f"encoder {kernel}", lambda k=kernel: run_encoder_check(k, device, quick))
    if device.type == "cuda":
        parity("bfloat16")
    else:
        report.add("skipped", "ssd parity bf16: CUDA only (the Triton interpreter runs fp32 cases)")


def ok(data: dict[str, Any]) -> bool:
    """True when no check raised and every check passed."""
    checks = [c for s in ("ssd_parity", "conv", "encoder") for c in data.get(s, [])]
    return not data.get("errors") and all(c.get("ok") for c in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--json", type=Path, required=True, help="result file (rewritten after every check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    report = Report(args.json, device=str(device), quick=args.quick, tolerances={
        "ssd": SSD_TOL, "conv": CONV_TOL, "encoder": ENCODER_TOL})
    t0 = time.perf_counter()
    run(device, args.quick, report)
    report.data["seconds"] = time.perf_counter() - t0
    report.data["ok"] = ok(report.data)
    report.write()
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
