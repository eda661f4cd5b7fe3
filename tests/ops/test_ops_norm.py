"""`fused_gated_rms_norm` (hand-written backward) against a float64 plain-autograd reference.

Error metric: `rel_err(a, b) = max|a - b| / max|b|` (see `ops_reference.rel_err`). The fused op runs on
fp32 (or bf16) inputs, the reference on float64 copies of the same values. Every test runs twice: with the
native CPU kernels (which take the fp32, gated, `norm_before_gate=False` case) and with the pure-torch Function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_reference import rel_err, select_cpu_path

import ssd4rec_torchrec.ops.norm as norm_mod
from ssd4rec_torchrec.nn.mixer import GatedRMSNorm
from ssd4rec_torchrec.ops import fused_gated_rms_norm


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return select_cpu_path(request.param, norm_mod, monkeypatch)


OUT_TOL = 1e-6
GRAD_TOL = 1e-5  # dw sums over tokens
BF16_TOL = 1e-2  # bf16 output rounding (2^-8 relative) and bf16-rounded gradients


def gated_rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """The plain formula (`mamba_ssm.rms_norm_ref`), differentiated by autograd, in the inputs' dtype."""
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    groups = x.unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    out = (groups * rstd).flatten(-2) * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out


def make_inputs(
    T: int, H: int, with_z: bool, strided: bool, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """x, weight, z (leaves or column slices of wider leaves, as in the mixer) and the leaves to check."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # z and x are column slices of one projection output, as after `torch.split`
        big = (torch.randn(T, 2 * H + 7, generator=g) * 2).to(dtype).requires_grad_()
        z = big[:, :H] if with_z else None
        x = big[:, H + 3: 2 * H + 3]
        leaves = [big]
    else:
        x = (torch.randn(T, H, generator=g) * 2).to(dtype).requires_grad_()
        z = (torch.randn(T, H, generator=g) * 2).to(dtype).requires_grad_() if with_z else None
        leaves = [x] + ([z] if z is not None else [])
    weight = (1 + 0.5 * torch.randn(H, generator=g)).requires_grad_()
    return x, weight, z, [*leaves, weight]


def check(T: int, H: int, group_size: int, with_z: bool, norm_before_gate: bool, strided: bool,
          dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Output and every leaf gradient vs the float64 reference; returns the relative errors."""
    x, weight, z, leaves = make_inputs(T, H, with_z, strided, dtype)
    refs = [leaf.detach().double().requires_grad_() for leaf in leaves]
    if strided:
        big_r = refs[0]
        x_r, z_r = big_r[:, H + 3: 2 * H + 3], (big_r[:, :H] if with_z else None)
    else:
        x_r, z_r = refs[0], (refs[1] if with_z else None)
    w_r = refs[-1]
    kw = {"eps": 1e-5, "group_size": group_size, "norm_before_gate": norm_before_gate}
    y = fused_gated_rms_norm(x, weight, z, **kw)
    y_ref = gated_rms_norm_reference(x_r, w_r, z_r, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(gy.to(dtype))
    y_ref.backward(gy)
    errs = {"y": rel_err(y.double(), y_ref)}
    for i, (leaf, ref) in enumerate(zip(leaves, refs)):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
        errs[f"d{i}"] = rel_err(leaf.grad.double(), ref.grad)
    return errs


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("group_size", [48, 12])
@pytest.mark.parametrize("rows_per_block", [None, 5])
def test_matches_reference(norm_before_gate: bool, with_z: bool, strided: bool, group_size: int,
                           rows_per_block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """All gate orders, with / without z, column-slice inputs, grouped statistics; one block of rows or
    several (5 rows each, the last one ragged)."""
    if rows_per_block is not None:
        monkeypatch.setattr(norm_mod, "_BLOCK_ELEMS", rows_per_block * 48)
    errs = check(T=37, H=48, group_size=group_size, with_z=with_z, norm_before_gate=norm_before_gate,
                 strided=strided)
    assert errs["y"] <= OUT_TOL, errs
    assert max(v for k, v in errs.items() if k != "y") <= GRAD_TOL, errs


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_bf16_input(norm_before_gate: bool) -> None:
    """bf16 x and z (as under autocast): fp32 inside, bf16 output and bf16 gradients for x and z."""
    errs = check(T=29, H=32, group_size=16, with_z=True, norm_before_gate=norm_before_gate, strided=True,
                 dtype=torch.bfloat16)
    assert max(errs.values()) <= BF16_TOL, errs


def test_bf16_x_under_autocast() -> None:
    """Inside a bf16 autocast region (matmuls would run in bf16) the op still computes in fp32."""
    x, weight, z, _ = make_inputs(23, 32, with_z=True, strided=False)
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = fused_gated_rms_norm(xb, weight, z, group_size=32, norm_before_gate=False)
        y.backward(torch.ones_like(y))
    ref = gated_rms_norm_reference(xb.detach().double(), weight.detach().double(), z.detach().double(), 1e-5, 32,
                                   False)
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert rel_err(y.double(), ref) <= BF16_TOL


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
def test_gradcheck_float64(norm_before_gate: bool, with_z: bool) -> None:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(5, 20, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(big: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        z = big[:, 10:18] if with_z else None
        return fused_gated_rms_norm(big[:, 1:9], weight, z, group_size=4, norm_before_gate=norm_before_gate)

    assert torch.autograd.gradcheck(fn, (big, weight))


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("needs", ["x", "weight", "z", "xz"])
def test_partial_requires_grad_and_leading_dims(norm_before_gate: bool, needs: str) -> None:
    """Only some inputs need a gradient (the others get none); a (B, L, H) input keeps its shape; the
    incoming gradient of `.sum()` is an expanded (stride-0) tensor."""
    g = torch.Generator().manual_seed(4)
    names = ("x", "weight", "z")
    vals = dict(zip(names, (torch.randn(2, 5, 16, generator=g), torch.randn(16, generator=g),
                            torch.randn(2, 5, 16, generator=g))))
    ins = {k: v.clone().requires_grad_(k[0] in needs) for k, v in vals.items()}
    refs = {k: v.double().requires_grad_(k[0] in needs) for k, v in vals.items()}
    y = fused_gated_rms_norm(ins["x"], ins["weight"], ins["z"], group_size=8, norm_before_gate=norm_before_gate)
    assert y.shape == (2, 5, 16)
    y.sum().backward()
    gated_rms_norm_reference(refs["x"], refs["weight"], refs["z"], 1e-5, 8, norm_before_gate).sum().backward()
    for k in names:
        if k[0] in needs:
            assert rel_err(ins[k].grad.double(), refs[k].grad) <= GRAD_TOL, k
        else:
            assert ins[k].grad is None


def test_empty_input() -> None:
    x = torch.zeros(0, 8, requires_grad=True)
    z = torch.zeros(0, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = fused_gated_rms_norm(x, w, z, group_size=4, norm_before_gate=False)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


def test_module_uses_the_same_formula() -> None:
    """`GatedRMSNorm` (the mixer's norm) agrees with the reference."""
    norm = GatedRMSNorm(24, group_size=8, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.normal_()
    x, z = torch.randn(6, 24), torch.randn(6, 24)
    ref = gated_rms_norm_reference(x.double(), norm.weight.detach().double(), z.double(), 1e-5, 8, False)
    assert rel_err(norm(x, z).double(), ref) <= OUT_TOL


def test_bad_group_size() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        fused_gated_rms_norm(torch.randn(3, 10), torch.ones(10), group_size=4)


def test_native_kernel_takes_the_mamba2_case(cpu_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 with a gate and norm_before_gate=False goes to the native Function exactly when it is available."""
    calls = []
    real = norm_mod._NativeGatedRMSNorm.apply
    monkeypatch.setattr(norm_mod._NativeGatedRMSNorm, "apply", lambda *a: calls.append(1) or real(*a))
    x, z, w = torch.randn(9, 24), torch.randn(9, 24), torch.rand(24)
    fused_gated_rms_norm(x, w, z, group_size=12, norm_before_gate=False)
    fused_gated_rms_norm(x, w, z, group_size=12, norm_before_gate=True)  # never native
    fused_gated_rms_norm(x.double(), w.double(), z.double(), group_size=12, norm_before_gate=False)  # never native
    assert len(calls) == (1 if cpu_path == "native" else 0)
