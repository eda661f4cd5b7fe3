"""Compare `SSDMixer` with `mamba_ssm.Mamba2` (non-fused path, Triton interpreter on CPU).

Run as a script in a SUBPROCESS (`test_mixer.py` does): the CPU shims below monkeypatch `torch.cuda`
and must stay out of the main pytest process. Prints one JSON line with the max errors per case.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit definition
sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=2)

import triton.runtime.autotuner as _at  # noqa: E402

_prune = _at.Autotuner.prune_configs
_at.Autotuner.prune_configs = lambda self, kw: _prune(self, kw)[:1]

from mamba_ssm.modules.mamba2 import Mamba2  # noqa: E402

from ssd4rec_torchrec.nn import SSDMixer  # noqa: E402

CASES: list[dict] = [
    # name, mixer kwargs, sequence length, whether to compare gradients too
    {"name": "default", "kw": {}, "L": 50, "grad": True},
    {
        "name": "ngroups2_Dhdim_normfirst",
        "kw": {"ngroups": 2, "D_has_hdim": True, "norm_before_gate": True},
        "L": 37,
        "grad": False,
    },
    {"name": "no_rmsnorm_bias", "kw": {"rmsnorm": False, "bias": True}, "L": 33, "grad": False},
]
BASE = {"d_model": 32, "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16, "chunk_size": 16}


def run_case(case: dict) -> dict:
    torch.manual_seed(0)
    kw = {**BASE, **case["kw"]}
    ours = SSDMixer(**kw)
    # Give every parameter a non-trivial value so that a mis-mapped tensor cannot hide.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name in ("dt_bias", "A_log"):
                continue
            p.add_(0.1 * torch.randn_like(p))
    ref = Mamba2(**kw, use_mem_eff_path=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours_back = SSDMixer(**kw)
    ours_back.load_state_dict(ref.state_dict(), strict=True)  # and the other way round
    x = torch.randn(1, case["L"], kw["d_model"], requires_grad=True)
    offsets = torch.tensor([0, case["L"]])
    y_ref = ref(x)
    y_ours = ours(x[0], offsets)
    out = {"fwd_max_abs_err": (y_ref[0] - y_ours).abs().max().item(), "fwd_max_abs_ref": y_ref.abs().max().item()}
    if case["grad"]:
        g = torch.randn_like(y_ours)
        gx_ref, *gp_ref = torch.autograd.grad(y_ref[0], [x, *ref.parameters()], g)
        gx_ours, *gp_ours = torch.autograd.grad(y_ours, [x, *ours.parameters()], g)
        out["grad_x_max_abs_err"] = (gx_ref - gx_ours).abs().max().item()
        names = [n for n, _ in ours.named_parameters()]
        out["grad_param_max_rel_err"] = max(
            ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(gp_ref, gp_ours)
        )
        assert names == [n for n, _ in ref.named_parameters()]
    return out


def main() -> None:
    t0 = time.perf_counter()
    results = {c["name"]: run_case(c) for c in CASES}
    results["seconds"] = time.perf_counter() - t0
    print(json.dumps(results))


if __name__ == "__main__":
    main()
