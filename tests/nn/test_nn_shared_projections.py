"""BiSSDLayer with shared weights runs in_proj/out_proj once for both directions: same maths as two mixer calls.

The reference is the straightforward layer written from the mixer's public forward (`F = mixer(x)`,
`R = mixer(x[rev])`, `R' = R[rev]` or `R`), compared in float64 on outputs and on the gradients of the input
and of every parameter. The gated RMSNorm may compute in fp32 internally whatever the input dtype (as
mamba's `rms_norm_ref` does), so its configurations are compared at fp32-level tolerance; with
`rmsnorm=False` the whole layer is float64 and the tolerance is float64-level.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from nn_testutils import SMALL, offsets_from_lengths
from torch import nn

from ssd4rec_torchrec.nn import BiSSDLayer, SSDMixer
from ssd4rec_torchrec.ops import reverse_segments_index
from ssd4rec_torchrec.ops.bidirectional import _AddDirections, _StackReversed, _StackReversedSplit, reverse_rows

LENGTHS = [5, 1, 40, 17, 70]  # 133 tokens: several chunks of 32, a length-1 segment


def _reverse_index(lengths: list[int]) -> torch.Tensor:
    """Position s+e-1-t for token t of segment [s, e), built with plain Python."""
    out, start = [], 0
    for n in lengths:
        out.extend(range(start + n - 1, start - 1, -1))
        start += n
    return torch.tensor(out, dtype=torch.int64)


def _reference(layer: BiSSDLayer, x: torch.Tensor, offsets: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """The unshared computation: each direction a full mixer call (dropout must be 0)."""
    f = layer.forward_ssd(x, offsets)
    if layer.beta != 0:
        back = layer.forward_ssd if layer.backward_ssd is None else layer.backward_ssd
        r = back(x[rev], offsets)
        f = f + layer.beta * (r[rev] if layer.flip_back else r)
    ln = layer.LayerNorm
    h = nn.functional.layer_norm(f + x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return layer.ffn(h)


def _run(layer: nn.Module, fn, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = fn(xi)
    y.backward(gy)
    grads = {"x": xi.grad} | {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), grads


CASES = list(itertools.product([True, False], [0.0, 0.1], [False, True], [True, False], [True, False]))


@pytest.mark.parametrize(("flip_back", "beta", "bias", "fused", "rmsnorm"), CASES)
def test_layer_equals_unshared_reference(flip_back: bool, beta: float, bias: bool, fused: bool, rmsnorm: bool) -> None:
    torch.manual_seed(0)
    layer = BiSSDLayer(16, beta=beta, flip_back=flip_back, dropout=0.0, bias=bias, rmsnorm=rmsnorm, **SMALL)
    layer = layer.double().train()
    if not fused:
        layer.fuse_directions_max_tokens = 0
    offsets = offsets_from_lengths(LENGTHS)
    rev = _reverse_index(LENGTHS)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    gy = torch.randn_like(x)
    y, grads = _run(layer, lambda xi: layer(xi, offsets), x, gy)
    y_ref, grads_ref = _run(layer, lambda xi: _reference(layer, xi, offsets, rev), x, gy)
    tol = 1e-6 if rmsnorm else 1e-11  # see the module docstring
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert g is not None, name  # every parameter is used by both computations
        torch.testing.assert_close(g, grads_ref[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    if bias:
        assert layer.forward_ssd.out_proj.bias is not None and grads["forward_ssd.out_proj.bias"].abs().sum() > 0


@pytest.mark.parametrize("flip_back", [True, False])
def test_separate_backward_weights_equal_reference(flip_back: bool) -> None:
    """`share_backward_weights=False` keeps two full mixer calls; still the same maths."""
    torch.manual_seed(1)
    layer = BiSSDLayer(16, flip_back=flip_back, dropout=0.0, share_backward_weights=False, rmsnorm=False, **SMALL)
    layer = layer.double()
    offsets, rev = offsets_from_lengths(LENGTHS), _reverse_index(LENGTHS)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    gy = torch.randn_like(x)
    y, grads = _run(layer, lambda xi: layer(xi, offsets), x, gy)
    y_ref, grads_ref = _run(layer, lambda xi: _reference(layer, xi, offsets, rev), x, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-11, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fused", [True, False])
def test_directions_sum_to_mixed(fused: bool) -> None:
    """`directions` (F and R' separately, for inspection) and `mixed` (F + beta R', one out_proj) agree."""
    torch.manual_seed(2)
    layer = BiSSDLayer(16, beta=0.3, dropout=0.0, bias=True, **SMALL).eval()
    if not fused:
        layer.fuse_directions_max_tokens = 0
    offsets = offsets_from_lengths(LENGTHS)
    x = torch.randn(sum(LENGTHS), 16)
    with torch.no_grad():
        f, r = layer.directions(x, offsets)
        torch.testing.assert_close(layer.mixed(x, offsets), f + 0.3 * r, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_projections_low_precision_core_fp32() -> None:
    """Under bf16 autocast the projections run in bf16 and the conv/scan/norm core in fp32, as before."""
    torch.manual_seed(3)
    layer = BiSSDLayer(16, dropout=0.0, **SMALL).eval()
    m = layer.forward_ssd
    offsets = offsets_from_lengths(LENGTHS)
    x = torch.randn(sum(LENGTHS), 16)
    rev = _reverse_index(LENGTHS)
    with torch.no_grad():
        want = _reference(layer, x, offsets, rev)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zx = m.project_in(x)
            y = m.mix(zx, offsets)
            out = m.project_out(y)
            got = layer(x, offsets)
            ref_bf16 = _reference(layer, x, offsets, rev)
    assert (zx.dtype, y.dtype, out.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    scale = want.abs().max()
    assert (got.float() - want).abs().max() <= 0.05 * scale
    assert (got.float() - ref_bf16.float()).abs().max() <= 0.05 * scale


def test_state_dict_keys_unchanged() -> None:
    """Checkpoints and the export tower address the same parameters as before the projections were shared."""
    mixer = ["dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "norm.weight",
             "out_proj.weight"]
    rest = ["LayerNorm.weight", "LayerNorm.bias", "ffn.w_1.weight", "ffn.w_1.bias", "ffn.w_2.weight",
            "ffn.w_2.bias", "ffn.LayerNorm.weight", "ffn.LayerNorm.bias"]
    shared = BiSSDLayer(16, **SMALL)
    assert list(shared.state_dict()) == [f"forward_ssd.{k}" for k in mixer] + rest
    separate = BiSSDLayer(16, share_backward_weights=False, **SMALL)
    assert list(separate.state_dict()) == [f"{d}_ssd.{k}" for d in ("forward", "backward") for k in mixer] + rest
    assert isinstance(shared.forward_ssd, SSDMixer)


def test_row_functions_gradcheck() -> None:
    """The gather-only autograd Functions the layer composes (valid for a self-inverse `rev`)."""
    rev = _reverse_index([3, 1, 4])
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y2 = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(rev[rev], torch.arange(8))
    assert torch.equal(reverse_rows(x, rev), x[rev])
    assert torch.equal(_StackReversed.apply(x, rev), torch.cat([x, x[rev]]))
    torch.testing.assert_close(_AddDirections.apply(y2, rev, 0.3), y2[:8] + 0.3 * y2[8:][rev])
    torch.testing.assert_close(_AddDirections.apply(y2, None, 0.3), y2[:8] + 0.3 * y2[8:])
    assert torch.autograd.gradcheck(lambda t: reverse_rows(t, rev), (x,))
    assert torch.autograd.gradcheck(lambda t: _StackReversed.apply(t, rev), (x,))
    assert torch.autograd.gradcheck(lambda t: _AddDirections.apply(t, rev, 0.3), (y2,))
    assert torch.autograd.gradcheck(lambda t: _AddDirections.apply(t, None, 0.3), (y2,))


def test_stack_reversed_split_is_split_of_stack() -> None:
    """Forward: the column blocks of `cat([x, x[rev]])`; backward (float64 gradcheck) without the (2T, C) concat."""
    torch.manual_seed(7)
    offsets = torch.tensor([0, 3, 4, 9])
    rev = reverse_segments_index(offsets, 9)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    sizes = [3, 2, 2]
    parts = _StackReversedSplit.apply(x, rev, sizes)
    for got, want in zip(parts, torch.cat([x, x[rev]]).split(sizes, 1), strict=True):
        assert torch.equal(got, want)
    assert torch.autograd.gradcheck(lambda t: _StackReversedSplit.apply(t, rev, sizes), (x,))
