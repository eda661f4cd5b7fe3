"""SSDMixer: Mamba2 parameter layout/init, equality with mamba_ssm.Mamba2, packing behaviour."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nn_testutils import offsets_from_lengths

from ssd4rec_torchrec.nn import SSDMixer, gated_rms_norm

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def test_parameter_names_and_shapes_are_mamba2s() -> None:
    # Official SSD4Rec mixer: d_model 256, d_state 64, headdim 16 -> d_inner 512, 32 heads.
    m = SSDMixer(256, d_state=64, headdim=16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * 512 + 2 * 64 + 32, 256),
        "conv1d.weight": (512 + 2 * 64, 1, 4),
        "conv1d.bias": (512 + 2 * 64,),
        "dt_bias": (32,),
        "A_log": (32,),
        "D": (32,),
        "norm.weight": (512,),
        "out_proj.weight": (256, 512),
    }
    assert sum(p.numel() for p in m.parameters()) == 437_984  # the count computed from the official code


def test_mamba2_initialisation() -> None:
    torch.manual_seed(0)
    m = SSDMixer(64, d_state=16, headdim=4, dt_min=0.001, dt_max=0.1)  # 32 heads
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.001 - 1e-6 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(m.D, torch.ones(32))
    assert torch.equal(m.norm.weight, torch.ones(128))
    assert SSDMixer(64, d_state=16, headdim=4, D_has_hdim=True).D.shape == (128,)


def test_gated_rms_norm_by_hand() -> None:
    torch.manual_seed(0)
    x, z, w = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8)
    g = x * z * torch.sigmoid(z)
    gg = g.view(5, 2, 4)
    want = (gg / torch.sqrt(gg.pow(2).mean(-1, keepdim=True) + 1e-5)).view(5, 8) * w
    got = gated_rms_norm(x, w, z, eps=1e-5, group_size=4, norm_before_gate=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    xr = x.view(5, 1, 8)
    want_before = (xr / torch.sqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5)).view(5, 8) * w * F.silu(z)
    got_before = gated_rms_norm(x, w, z, eps=1e-5, group_size=8, norm_before_gate=True)
    torch.testing.assert_close(got_before, want_before, rtol=1e-6, atol=1e-6)


def test_mixer_is_causal_and_resets_per_segment() -> None:
    torch.manual_seed(0)
    m = SSDMixer(16, d_state=8, headdim=8, chunk_size=8)
    offsets = offsets_from_lengths([7, 20, 1, 13])
    x = torch.randn(41, 16)
    y = m(x, offsets)
    x2 = x.clone()
    x2[20] += 1.0  # token 13 of segment 1 (segment 1 spans 7..27)
    y2 = m(x2, offsets)
    changed = (y2 - y).abs().amax(-1) > 0
    assert not changed[:20].any() and changed[20] and not changed[27:].any()
    alone = torch.cat([m(x[s:e], offsets_from_lengths([e - s])) for s, e in [(0, 7), (7, 27), (27, 28), (28, 41)]])
    assert (alone - y).abs().max() <= 1e-5


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba-ssm not installed")
def test_matches_mamba2_in_subprocess() -> None:
    """Same weights in `mamba_ssm.Mamba2(use_mem_eff_path=False)` (Triton interpreter) and `SSDMixer`."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mamba2_reference.py"))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("Mamba2 comparison: %s", res)
    for name, r in res.items():
        if name == "seconds":
            continue
        assert r["fwd_max_abs_err"] <= 1e-5 * max(1.0, r["fwd_max_abs_ref"]), (name, r)
        if "grad_x_max_abs_err" in r:
            assert r["grad_x_max_abs_err"] <= 2e-5, (name, r)
            assert r["grad_param_max_rel_err"] <= 1e-4, (name, r)
    assert not math.isnan(res["seconds"])
