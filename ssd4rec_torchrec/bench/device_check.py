"""One prepared check of the GPU path: kernel parity and encoder speed on a CUDA device, or the same code paths
on the CPU (`--device cpu --quick`, run by the test suite). Usually started by `scripts/device_check.sh`,
which first installs the carried wheels from `.wheels/` (`make device-wheels`) without a package index.

Stages, each in its own Python process (Triton settings are per process, and a crash or hang in one stage
does not lose the others' results):
  kernels  mamba-ssm SSD kernel vs our torch scan (fwd+bwd, fp32/bf16, 1-1000 segments), varlen conv,
           BiSSDEncoder packing invariance / isolation / CPU agreement   (bench/device_kernels.py)
  bench    encoder fwd+bwd tokens/s and peak memory of Bi-SSD (mamba, torch) and SASRec (SDPA, flash),
           fp32 and bf16 autocast, L = 256 ... 64k at fixed tokens per step, cost exponent, targets
           (bench/device_speed.py)
The whole run keeps to --budget-s (stages are cut off and benchmark points skipped, and say so).

Writes to --out (default $OUT, else results/device_check): device_check.json (environment, every stage's
results, target verdicts), device_bench.png and device_check.log. Exit status: 0 when every correctness
check that ran passed (speed targets are reported, not enforced), 1 otherwise, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger("device_check")

STAGES = ("kernels", "bench")
MODULES = {"kernels": "ssd4rec_torchrec.bench.device_kernels", "bench": "ssd4rec_torchrec.bench.device_speed"}
# Whole-run budgets (seconds) per (device, quick): the GPU run must end within 6 minutes, installs included.
BUDGETS = {("cuda", False): 330.0, ("cuda", True): 200.0, ("cpu", False): 600.0, ("cpu", True): 120.0}
KERNELS_SHARE = 0.45  # at most this share of the budget for the kernels stage; the benchmark gets the rest
FINISH_S = 20.0  # kept back from the benchmark's last point for writing its results and the plot
WHEELS_MAX_BYTES = 48 * 2**20  # the working tree travels to the GPU machine with at most 64 MiB in all
REQUIRED_WHEELS = ("mamba_ssm",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        print(f"device_check: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scripts/device_check.sh", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU mode CI runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default $OUT if set, else results/device_check)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run in seconds (default 330 on CUDA, 120 CPU quick)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default all)")
    parser.add_argument("--autotune", choices=("full", "first"), default="full",
                        help="benchmark's Triton autotuning: every config (default) or each kernel's first")
    parser.add_argument("--check-wheels", type=Path, default=None, metavar="DIR",
                        help="only check that DIR holds pure-Python wheels small enough to carry, then exit")
    parser.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_wheels(folder: Path) -> list[str]:
    """Problems with the carried wheels in `folder` (empty: fine): missing, platform-specific or too large."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"no wheels in {folder} (run `make device-wheels`)"]
    problems = []
    total = sum(w.stat().st_size for w in wheels)
    if total > WHEELS_MAX_BYTES:
        problems.append(f"wheels take {total / 2**20:.1f} MiB, more than {WHEELS_MAX_BYTES / 2**20:.0f} MiB")
    for w in wheels:
        if not w.name.endswith("-none-any.whl"):
            problems.append(f"{w.name} is not a pure-Python wheel")
        with zipfile.ZipFile(w) as z:
            binaries = [n for n in z.namelist() if n.endswith((".so", ".pyd"))]
        if binaries:
            problems.append(f"{w.name} holds compiled extensions ({binaries[0]}, ...)")
    names = {w.name.split("-")[0].lower() for w in wheels}
    problems += [f"no {n} wheel in {folder}" for n in REQUIRED_WHEELS if n not in names]
    for w in wheels:
        log.info("wheel %s (%.2f MiB)", w.name, w.stat().st_size / 2**20)
    log.info("%d wheels, %.2f MiB in all", len(wheels), total / 2**20)
    return problems


def environment(device: str) -> dict[str, Any]:
    """Versions, the device and which side of each version difference (`ops.compat`) this install is on."""
    import torch

    from ssd4rec_torchrec.ops import compat

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        **{name: compat.package_version(name) for name in ("triton", "mamba-ssm", "causal-conv1d", "einops")},
        "torch_fp32_matmul_api": "fp32_precision" if hasattr(torch.backends.cuda.matmul, "fp32_precision")
        else "allow_tf32",
        "sdpa_api": "torch.nn.attention.sdpa_kernel" if _has("torch.nn.attention", "sdpa_kernel")
        else "torch.backends.cuda.sdp_kernel",
        "flash_attention_impl": compat.flash_attention_impl(),
        "triton_knobs": _has("triton", "knobs"),
        "wheels_installed": os.environ.get("SSD4REC_WHEELS_INSTALLED") or None,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 1e9,
                   multiprocessors=props.multi_processor_count)
    return env


def _has(module: str, attr: str) -> bool:
    try:
        return hasattr(__import__(module, fromlist=[attr]), attr)
    except ImportError:
        return False


def run_stage(name: str, args: list[str], env: dict[str, str], timeout_s: float, result_path: Path) -> dict[str, Any]:
    """Run one stage's module in a fresh interpreter, relaying its output to the log; kill it at `timeout_s`."""
    cmd = [sys.executable, "-m", MODULES[name], *args, "--json", str(result_path)]
    if timeout_s < 5:
        log.error("stage %s skipped: the time budget is spent", name)
        return {"status": "skipped", "reason": "time budget spent", "seconds": 0.0}
    log.info("stage %s (timeout %.0f s): %s", name, timeout_s, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("[%s] %s", name, line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc, status = None, "timeout"
        log.error("stage %s killed after %.0f s (its results so far are kept)", name, timeout_s)
    reader.join(timeout=10)
    out: dict[str, Any] = {"status": status, "returncode": rc, "seconds": time.perf_counter() - t0}
    try:
        out["result"] = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        out["result"] = None
        out["status"] = "crashed" if status != "timeout" else status
        log.error("stage %s left no readable result: %s", name, exc)
    return out


def _finish_bench(result: dict[str, Any], png: Path) -> None:
    """Summary (fits, ratios, targets) and plot of a benchmark stage that was stopped before writing them."""
    from ssd4rec_torchrec.bench import device_speed

    try:
        result["summary"] = device_speed.summarize(result["rows"], result["lengths"])
        if not png.exists():
            device_speed.plot(result, png)
    except Exception as exc:  # the measured rows are kept either way
        log.error("could not summarise the partial benchmark: %s: %s", type(exc).__name__, exc)


def checks_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every correctness check as {"check", "ok", "value"}: kernel checks, the TF32 parity, stage errors."""
    out: list[dict[str, Any]] = []
    stages = report["stages"]
    k = (stages.get("kernels") or {}).get("result") or {}
    for c in k.get("ssd_parity", []):
        worst = max(c["mamba_vs_torch"].values())
        out.append({"check": f"ssd parity {c['name']} {c['dtype']} ({c['segments']} segments)", "ok": c["ok"],
                    "value": worst})
    for c in k.get("conv", []):
        out.append({"check": f"conv {c['path']} boundary {c['boundary']} {c['activation']}", "ok": c["ok"],
                    "value": max(c["vs_cpu_fp64"].values())})
    for c in k.get("encoder", []):
        out.append({"check": f"encoder {c['kernel']}", "ok": c["ok"],
                    "value": max(v for key, v in c.items() if key.startswith(("packing", "isolation", "cpu_"))
                                 and isinstance(v, float))})
    b = (stages.get("bench") or {}).get("result") or {}
    if "tf32_parity" in b:
        t = b["tf32_parity"]
        out.append({"check": "ssd parity TF32 (benchmark precision)", "ok": t["ok"],
                    "value": max(t["mamba_vs_torch"].values())})
    for name, stage in stages.items():
        for e in (stage.get("result") or {}).get("errors", []):
            out.append({"check": f"{name}: {e['check']}", "ok": False, "value": e["error"]})
        if stage["status"] in ("failed", "timeout", "crashed", "skipped"):
            out.append({"check": f"stage {name}", "ok": False, "value": stage["status"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.parse_only:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    if args.check_wheels is not None:
        problems = check_wheels(args.check_wheels)
        for p in problems:
            log.error("%s", p)
        return 1 if problems else 0
    t_start = time.time()
    budget = args.budget_s or BUDGETS[(args.device, args.quick)]
    out = args.out or Path(os.environ.get("OUT") or "results/device_check")
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "device_check.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but torch %s sees no CUDA device (use --device cpu)", torch.__version__)
        return 2
    report: dict[str, Any] = {"mode": {"device": args.device, "quick": args.quick, "budget_s": budget,
                                       "autotune": args.autotune}, "environment": environment(args.device),
                              "stages": {}, "skipped": []}
    log.info("environment: %s", json.dumps(report["environment"]))
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        common = ["--device", args.device] + (["--quick"] if args.quick else [])
        for name in args.stages:
            left = t_start + budget - time.time()
            env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(Path(tmp) / f"triton_{name}"))
            if args.device == "cuda":
                env["SSD4REC_NATIVE"] = "0"  # the CPU reference runs the pure-torch path (no C++ build there)
            if name == "kernels":
                cap = KERNELS_SHARE * budget if "bench" in args.stages else left
                stage_args, timeout = common, min(left, cap)
            else:
                stage_args = [*common, "--png", str(out / "device_bench.png"), "--autotune", args.autotune,
                              "--deadline", str(t_start + budget - FINISH_S)]
                timeout = left
            report["stages"][name] = run_stage(name, stage_args, env, timeout, Path(tmp) / f"{name}.json")
    bench = (report["stages"].get("bench") or {}).get("result") or {}
    if bench.get("rows") and "summary" not in bench:  # cut off mid-way: summarise and plot what it measured
        _finish_bench(bench, out / "device_bench.png")
    report["targets"] = (bench.get("summary") or {}).get("targets", [])
    for name, stage in report["stages"].items():
        report["skipped"] += [f"{name}: {s}" for s in (stage.get("result") or {}).get("skipped", [])]
    report["checks"] = checks_of(report)
    report["ok"] = all(c["ok"] for c in report["checks"]) and bool(report["checks"])
    report["seconds"] = time.time() - t_start
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    for c in report["checks"]:
        log.info("check %-60s %s (%s)", c["check"], "ok" if c["ok"] else "FAILED", c["value"])
    for t in report["targets"]:
        log.info("target: %s", t["text"])
    for s in report["skipped"]:
        log.info("skipped: %s", s)
    log.info("device check %s in %.0f s; results in %s", "passed" if report["ok"] else "FAILED", report["seconds"], out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
