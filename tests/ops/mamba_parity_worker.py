"""Subprocess worker: mamba-ssm's Triton SSD kernel (interpreted on CPU) vs the torch path of `ssd_scan`.

Run by `test_ops_mamba_parity.py` in a fresh interpreter because it must set TRITON_INTERPRET=1 before any
Triton kernel is defined and monkeypatches `torch.cuda` (shims from notes/stack.md §7). Prints one JSON line:
`{"cases": [{"name": ..., "y": rel_err, "dx": ..., ...}, ...]}` with `rel_err = max|a-b| / max|b|`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # CUDA ext not built

import torch  # noqa: E402

if not torch.cuda.is_available():
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=2)
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.autotuner as _at

    _prune = _at.Autotuner.prune_configs
    _at.Autotuner.prune_configs = lambda self, kw: _prune(self, kw)[:1]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_reference import make_ssd_inputs, offsets_of, rel_err  # noqa: E402

from ssd4rec_torchrec.ops import ssd_scan  # noqa: E402

# (name, segment lengths (not chunk-aligned), H, G, P, N, chunk_size, D kind)
CASES = [
    ("h2_q16_Dh", [30, 1, 45, 24], 2, 1, 8, 8, 16, "h"),
    ("h4_g2_q32_Dhp", [17, 50, 33], 4, 2, 16, 16, 32, "hp"),
    ("h2_q16_noD_singletons", [1, 1, 15, 17, 1, 40, 21], 2, 1, 8, 16, 16, None),
]
NAMES = ("x", "dt", "A", "B", "C", "D")


def run_case(name, lengths, H, G, P, N, q, D_kind) -> dict:
    offsets = offsets_of(lengths)
    results = {}
    for kernel in ("torch", "mamba"):
        inp = make_ssd_inputs(lengths, H, G, P, N, D_kind, torch.float32, seed=len(name), requires_grad=True)
        y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, D=inp["D"], chunk_size=q,
                     kernel=kernel)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(gy)
        results[kernel] = (y.detach(), {k: v.grad for k, v in inp.items() if v is not None})
    (y_t, g_t), (y_m, g_m) = results["torch"], results["mamba"]
    out = {"name": name, "T": sum(lengths), "y": rel_err(y_m, y_t)}
    for k in g_t:
        out["d" + k] = rel_err(g_m[k], g_t[k])
    return out


def main() -> None:
    cases = [run_case(*c) for c in CASES]
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
