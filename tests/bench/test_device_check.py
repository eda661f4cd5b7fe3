"""scripts/device_check.sh in its CPU mode (the code paths of the GPU check, at tiny sizes), its command line,
the carried-wheel check and the benchmark summary. The CUDA run itself needs a GPU machine (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ssd4rec_torchrec.bench.device_check import _finish_bench, check_wheels
from ssd4rec_torchrec.bench.device_speed import VARIANTS, summarize

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "device_check.sh"


def _run(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, SSD4REC_WHEELS=str(tmp_path / "no-wheels"))
    env.pop("OUT", None)
    return subprocess.run(["nice", "-n", "5", "bash", str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_cpu_quick_mode_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(["--device", "cpu", "--quick", "--out", str(out)], tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "no wheels in" in proc.stdout
    report = json.loads((out / "device_check.json").read_text())
    assert report["ok"] is True
    assert report["mode"] == {"device": "cpu", "quick": True, "budget_s": 120.0, "autotune": "full"}
    assert {"torch", "triton", "mamba-ssm", "torch_fp32_matmul_api", "sdpa_api"} <= set(report["environment"])
    assert {name: s["status"] for name, s in report["stages"].items()} == {"kernels": "ok", "bench": "ok"}
    kernels = report["stages"]["kernels"]["result"]
    if report["environment"]["mamba-ssm"] and report["environment"]["triton"]:  # interpreted Triton kernels
        (case,) = kernels["ssd_parity"]
        assert case["dtype"] == "float32" and case["ok"] and case["min_length"] == 1
        assert case["mamba_vs_torch"]["y"] <= 1e-5
        assert set(case["mamba_vs_torch"]) >= {"y", "dx", "ddt", "dA", "dB", "dC"}
        assert kernels["setup"]["mamba_import"] in ("package", "bare")
    assert len(kernels["conv"]) == 12 and all(c["ok"] for c in kernels["conv"])
    (enc,) = kernels["encoder"]
    assert enc["ok"] and enc["isolation"] <= 1e-5
    bench = report["stages"]["bench"]["result"]
    measured = {r["variant"] for r in bench["rows"] if "skipped" not in r}
    assert measured == {"bissd_torch_fp32", "bissd_torch_bf16", "sasrec_fp32", "sasrec_bf16"}
    assert all(r["tokens_per_s"] > 0 for r in bench["rows"])
    assert bench["summary"]["fits"]["bissd_torch_fp32"]["k"] > 0
    assert len(report["targets"]) == 4
    assert any("CUDA" in s for s in report["skipped"])
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) >= 13
    assert (out / "device_bench.png").stat().st_size > 1000
    assert "device check passed" in (out / "device_check.log").read_text()


def test_help_and_bad_input(tmp_path: Path) -> None:
    proc = _run(["--help"], tmp_path, timeout=60)
    assert proc.returncode == 0 and "--device" in proc.stdout and "--quick" in proc.stdout
    for bad in (["--device", "tpu"], ["--budget-s", "-1"], ["--frobnicate"]):
        proc = _run(bad, tmp_path, timeout=60)
        assert proc.returncode == 2, bad
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("device_check: error:"), proc.stderr


def _wheel(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


def test_check_wheels(tmp_path: Path) -> None:
    assert "no wheels" in check_wheels(tmp_path)[0]
    _wheel(tmp_path / "mamba_ssm-2.3.2.post1-py3-none-any.whl", {"mamba_ssm/__init__.py": ""})
    assert check_wheels(tmp_path) == []
    _wheel(tmp_path / "ext-1.0-cp311-cp311-linux_x86_64.whl", {"ext/_c.so": "x"})
    problems = check_wheels(tmp_path)
    assert any("not a pure-Python wheel" in p for p in problems)
    assert any("compiled extensions" in p for p in problems)


LENGTHS = [256, 2048, 16384]


def _rows() -> list[dict]:
    sec = {  # seconds per step at a fixed number of tokens: Bi-SSD flat, SASRec growing like L
        "bissd_mamba_fp32": [0.01, 0.01, 0.01], "bissd_torch_fp32": [0.2, 0.2, 0.2],
        "bissd_mamba_bf16": [0.008, 0.008, 0.008], "sasrec_bf16": [0.004, 0.02, 0.1],
    }
    rows = [{"variant": v, "length": L, "seconds_median": s, "seconds_per_sequence": s * L / 16384,
             "tokens_per_s": 16384 / s, "peak_gb": 0.5} for v, times in sec.items() for L, s in zip(LENGTHS, times)]
    rows.append({"variant": "sasrec_fp32", "length": 256, "skipped": "time budget spent"})
    return rows


def test_summary_targets_from_rows() -> None:
    summary = summarize(_rows(), LENGTHS)
    assert set(summary["fits"]) == {v.name for v in VARIANTS}
    assert summary["fits"]["bissd_mamba_fp32"]["k"] == pytest.approx(1.0)
    assert summary["fits"]["sasrec_fp32"] is None
    assert summary["ratios"]["fp32"]["mamba_over_torch"][2048] == pytest.approx(20.0)
    assert summary["crossover_length_bf16"] == 2048
    mamba_over_torch, from_2k, at_16k, k = summary["targets"]
    assert mamba_over_torch["value"] == pytest.approx(20.0)
    assert from_2k["value"] == pytest.approx(2.5)  # min over L >= 2048
    assert at_16k["value"] == pytest.approx(12.5)
    assert k["value"] == pytest.approx(1.0)
    assert [t["met"] for t in summary["targets"]] == [True, True, True, True]


def test_partial_benchmark_is_summarised_and_plotted(tmp_path: Path) -> None:
    result = {"rows": _rows(), "lengths": LENGTHS, "device_name": "test", "tokens": 16384, "d_model": 64}
    _finish_bench(result, tmp_path / "bench.png")
    assert result["summary"]["crossover_length_bf16"] == 2048
    assert (tmp_path / "bench.png").stat().st_size > 1000
