"""`ops.compat`: each version shim on this install's side of the difference, and the other side simulated."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssd4rec_torchrec.ops import compat

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_MAMBA = HAS_TRITON and importlib.util.find_spec("mamba_ssm") is not None


def test_fp32_matmul_precision_round_trip() -> None:
    m = torch.backends.cuda.matmul
    raw = getattr(m, "fp32_precision", "tf32" if m.allow_tf32 else "none")
    old = compat.set_fp32_matmul_precision("tf32")
    try:
        assert old == raw
        assert compat.fp32_matmul_precision() == "tf32"
        assert compat.set_fp32_matmul_precision("ieee") == "tf32"
        assert compat.fp32_matmul_precision() == "ieee"
    finally:
        compat.set_fp32_matmul_precision(old)
    assert getattr(m, "fp32_precision", raw) == raw  # restored exactly (torch's "none" included)
    with pytest.raises(ValueError, match="fp32 matmul precision"):
        compat.set_fp32_matmul_precision("bf16")


def test_fp32_matmul_precision_legacy_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = types.SimpleNamespace(allow_tf32=False)  # a torch without `fp32_precision`
    monkeypatch.setattr(compat, "_matmul_backend", lambda: legacy)
    assert compat.fp32_matmul_precision() == "ieee"
    assert compat.set_fp32_matmul_precision("tf32") == "none"
    assert legacy.allow_tf32 is True and compat.fp32_matmul_precision() == "tf32"
    assert compat.set_fp32_matmul_precision("none") == "tf32" and legacy.allow_tf32 is False


def test_sdpa_backends_restricts_and_validates() -> None:
    q = torch.randn(1, 2, 16, 8)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with compat.sdpa_backends(["math"]):
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="SDPA backends"), compat.sdpa_backends(["flashy"]):
        pass
    with pytest.raises(ValueError, match="SDPA backends"), compat.sdpa_backends([]):
        pass


def test_sdpa_backends_legacy_api(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention as attention

    monkeypatch.delattr(attention, "sdpa_kernel")  # `from torch.nn.attention import sdpa_kernel` now fails
    seen = {}

    @contextlib.contextmanager
    def legacy(**flags: bool):
        seen.update(flags)
        yield

    monkeypatch.setattr(torch.backends.cuda, "sdp_kernel", legacy, raising=False)
    with compat.sdpa_backends(["flash"]):
        pass
    assert seen == {"enable_flash": True, "enable_mem_efficient": False, "enable_math": False}


def test_flash_attention_impl_reported_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention as attention

    impl = compat.flash_attention_impl()
    assert impl is None or isinstance(impl, str)
    monkeypatch.setattr(attention, "current_flash_attention_impl", lambda: types.SimpleNamespace(name="FA2"),
                        raising=False)
    assert compat.flash_attention_impl() == "FA2"
    monkeypatch.delattr(attention, "current_flash_attention_impl")
    assert compat.flash_attention_impl() is None


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_fp32_default_knob_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    before = compat.triton_fp32_default()
    try:
        compat.set_triton_fp32_default("ieee")
        assert compat.triton_fp32_default() == "ieee"
        assert os.environ["TRITON_F32_DEFAULT"] == "ieee"
        monkeypatch.setattr(compat, "_triton_knobs", lambda: None)  # a Triton without `knobs`: the variable
        compat.set_triton_fp32_default("tf32x3")
        assert compat.triton_fp32_default() == "tf32x3"
    finally:
        monkeypatch.undo()
        compat.set_triton_fp32_default(before)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_autotune_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton
    from triton.runtime.autotuner import Autotuner

    big = triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 64}, num_stages=3)
    small = triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, num_stages=2)
    fake = types.SimpleNamespace(configs=[big, small])
    monkeypatch.setattr(compat, "_ORIGINAL_PRUNE", [])
    monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs: list(self.configs))
    compat.set_triton_autotune_limit(1)
    assert compat.triton_autotune_limit() == 1
    assert Autotuner.prune_configs(fake, {}) == [big]
    compat.set_triton_autotune_limit(1, smallest=True)
    assert Autotuner.prune_configs(fake, {}) == [small]
    compat.set_triton_autotune_limit(None)
    assert compat.triton_autotune_limit() is None
    assert Autotuner.prune_configs(fake, {}) == [big, small]
    with pytest.raises(ValueError, match="max_configs"):
        compat.set_triton_autotune_limit(0)


_LOADER_PROBE = """
import json, sys, torch
from ssd4rec_torchrec.ops import compat
out = {}
if not torch.cuda.is_available():  # default: the bare import is only tried where CUDA can run the kernels
    try:
        compat.load_mamba_chunk_scan()
        out["default"] = compat.mamba_import_mode()
    except ImportError as exc:
        out["default"] = "ImportError: " + str(exc)
fn = compat.load_mamba_chunk_scan(bare_package=True)
out.update(name=fn.__name__, mode=compat.mamba_import_mode(), stub="selective_scan_cuda" in sys.modules,
           transformers="transformers" in sys.modules)
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_MAMBA, reason="mamba-ssm / triton not installed")
def test_load_mamba_chunk_scan_without_package_init() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _LOADER_PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "mamba_chunk_scan_combined"
    if out["mode"] == "bare":  # a pure-Python wheel: neither the Mamba-1 extension nor transformers was needed
        assert not out["stub"] and not out["transformers"]
        assert out.get("default", "ImportError").startswith("ImportError")
    else:
        assert out["mode"] == "package"
