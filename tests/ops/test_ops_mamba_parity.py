"""Parity of the torch paths with the optional CUDA/Triton kernels (mamba-ssm SSD, causal-conv1d).

* CPU (runs everywhere mamba-ssm and triton are installed): mamba-ssm's Triton SSD kernel is executed by
  the Triton interpreter (TRITON_INTERPRET=1) in a subprocess, because the interpreter flag must be set
  before kernels are defined and the CPU shims monkeypatch `torch.cuda`; the subprocess prints its errors
  as JSON and the assertions happen here.
* GPU (skipped without CUDA): torch path vs `kernel="mamba"` on CUDA tensors, and the torch conv vs
  `causal_conv1d_fn`.

Error metric: `rel_err(a, b) = max|a - b| / max|b|` with the torch path as `b`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ops_reference import make_ssd_inputs, offsets_of, rel_err

from ssd4rec_torchrec.ops import causal_conv1d_available, mamba_ssd_available, ssd_scan, varlen_causal_conv1d

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
# On a GPU, mamba-ssm's Triton `tl.dot` on fp32 inputs uses TF32 tensor cores by default (10-bit mantissa),
# while the torch path's fp32 matmuls do not, so GPU parity is checked at TF32 accuracy.
GPU_TOL = 1e-2
HAS_TRITON_MAMBA = all(importlib.util.find_spec(m) is not None for m in ("triton", "mamba_ssm"))
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON_MAMBA, reason="mamba-ssm / triton not installed")
def test_mamba_triton_kernel_matches_torch_on_cpu_interpreted() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(HERE / "mamba_parity_worker.py")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["cases"]) >= 3
    for case in report["cases"]:
        assert case["y"] <= OUT_TOL, case
        grads = {k: v for k, v in case.items() if k.startswith("d")}
        assert {"dx", "ddt", "dA", "dB", "dC"} <= set(grads), case
        assert all(v <= GRAD_TOL for v in grads.values()), case


@pytest.mark.skipif(not (HAS_CUDA and mamba_ssd_available()), reason="needs a CUDA GPU and mamba-ssm")
@pytest.mark.parametrize(
    ("lengths", "H", "G", "P", "N", "chunk", "D_kind"),
    [
        ([1, 63, 64, 65, 255, 256, 257, 3000, 7], 8, 1, 16, 64, 64, "h"),
        ([500, 1, 2, 900, 37], 8, 2, 16, 32, 256, "hp"),
        ([1] * 300 + [129] * 10, 4, 1, 8, 16, 128, None),
    ],
)
def test_gpu_mamba_kernel_matches_torch(lengths, H, G, P, N, chunk, D_kind) -> None:
    offsets = offsets_of(lengths).cuda()
    results = {}
    for kernel in ("torch", "mamba", "auto"):
        inp = make_ssd_inputs(lengths, H, G, P, N, D_kind, torch.float32, seed=3, requires_grad=False)
        inp = {k: None if v is None else v.cuda().requires_grad_() for k, v in inp.items()}
        y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, D=inp["D"],
                     chunk_size=chunk, kernel=kernel)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).cuda())
        results[kernel] = (y.detach(), {k: v.grad for k, v in inp.items() if v is not None})
    y_t, g_t = results["torch"]
    for kernel in ("mamba", "auto"):
        y_m, g_m = results[kernel]
        assert rel_err(y_m, y_t) <= GPU_TOL
        for k in g_t:
            assert rel_err(g_m[k], g_t[k]) <= GPU_TOL, k


@pytest.mark.skipif(not (HAS_CUDA and causal_conv1d_available()), reason="needs a CUDA GPU and causal_conv1d")
@pytest.mark.parametrize("boundary", [63, 64, 65, 255, 256, 257])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gpu_causal_conv1d_matches_torch(boundary: int, activation: str | None) -> None:
    lengths = [1, 2, 3, 4, 5, boundary, boundary, 1]
    C, W = 64, 4
    g = torch.Generator().manual_seed(boundary)
    x0 = torch.randn(sum(lengths), C, generator=g).cuda()
    w0, b0 = torch.randn(C, W, generator=g).cuda(), torch.randn(C, generator=g).cuda()
    offsets = offsets_of(lengths).cuda()
    gy = torch.randn(x0.shape, generator=g).cuda()
    out = {}
    for kernel in ("torch", "causal_conv1d"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = varlen_causal_conv1d(x, w, b, offsets, activation=activation, kernel=kernel)
        y.backward(gy)
        out[kernel] = (y.detach(), x.grad, w.grad, b.grad)
    for a, ref in zip(out["causal_conv1d"], out["torch"], strict=True):
        assert rel_err(a, ref) <= 1e-5
