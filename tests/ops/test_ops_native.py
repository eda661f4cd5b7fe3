"""`ops.native`: the fused CPU kernels build here, and each one matches its pure-torch definition."""

from __future__ import annotations

import shutil

import pytest
import torch

from ssd4rec_torchrec.ops import native


def test_builds_where_a_compiler_exists() -> None:
    """`make setup` builds the kernels; with a C++ compiler on PATH they must load (else the fast path is gone)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the pure-torch paths are used")
    where = native.build_directory()
    ops = native.native_ops()
    assert ops is not None
    assert native.build_directory() == where and where.is_dir()  # the cache key does not drift with the load


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    before = native.native_ops()
    native.native_ops.cache_clear()
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    try:
        assert native.native_ops() is None
    finally:
        monkeypatch.delenv(native.NATIVE_ENV)
        native.native_ops.cache_clear()
    # re-enabled: the library loaded before is reused (loading it twice would abort the process)
    assert native.native_ops() is before


@pytest.fixture
def ops():
    ops = native.native_ops()
    if ops is None:
        pytest.skip("native CPU kernels unavailable")
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_forward_is_x_times_mask_times_scale(ops, dtype: torch.dtype) -> None:
    x = torch.randn(1001, 37, dtype=dtype)
    y, mask = ops.dropout_forward(x, 123456789123, 6554, 1.25)
    assert mask.dtype == torch.bool and mask.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, torch.where(mask, x * 1.25, torch.zeros_like(x)))
    rate = 1 - mask.double().mean().item()
    assert abs(rate - 6554 / 2**15) < 5 * (0.2 * 0.8 / x.numel()) ** 0.5
    # the same seed gives the same mask; another seed another one; threshold 0 keeps all, 2**15 drops all
    assert torch.equal(ops.dropout_forward(x, 123456789123, 6554, 1.25)[1], mask)
    assert not torch.equal(ops.dropout_forward(x, 987654321, 6554, 1.25)[1], mask)
    assert bool(ops.dropout_forward(x, 1, 0, 1.0)[1].all())
    assert not bool(ops.dropout_forward(x, 1, 2**15, 1.0)[1].any())


def test_mask_bits_are_uniform_and_independent(ops) -> None:
    """Drop rates at several thresholds, and across neighbouring elements (pairs), match independent draws."""
    n = 2**20
    x = torch.ones(n)
    for thr in (3277, 16384, 29491):
        q = thr / 2**15
        _, mask = ops.dropout_forward(x, 42 + thr, thr, 1.0)
        drop = ~mask
        tol = 5 * (q * (1 - q) / n) ** 0.5
        assert abs(drop.double().mean().item() - q) < tol
        both = (drop[:-1] & drop[1:]).double().mean().item()  # neighbours dropped together: q^2 if independent
        assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / n) ** 0.5


def test_scale_by_mask(ops) -> None:
    g = torch.randn(333, 65)
    mask = torch.rand(333, 65) < 0.7
    assert torch.equal(ops.scale_by_mask(g, mask, 1.5), torch.where(mask, g * 1.5, torch.zeros_like(g)))
    with pytest.raises(RuntimeError, match="mask"):
        ops.scale_by_mask(g, mask.float(), 1.5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.dropout_forward(g.half(), 1, 10, 1.0)


def test_gated_rms_norm_extreme_gates(ops) -> None:
    """The kernel's vectorised exp is clamped: gates far in both tails (and at 0) still give SiLU to fp32 accuracy."""
    z = torch.tensor([-1e4, -200.0, -90.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 90.0, 200.0, 1e4, 5.0, -5.0,
                      1.0]).repeat(3, 1)
    x = torch.randn(3, 16, dtype=torch.float64)
    w = torch.rand(16, dtype=torch.float64) + 0.5
    y, _ = ops.gated_rms_norm_forward(x.float(), z, w.float(), 1e-5, 16)
    u = x * torch.nn.functional.silu(z.double())
    ref = u * torch.rsqrt(u.square().mean(-1, keepdim=True) + 1e-5) * w
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
