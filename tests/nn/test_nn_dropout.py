"""`nn.dropout.Dropout`: the CPU mask from integer random bits behaves as inverted dropout at the quantised rate.

Every test runs on both CPU paths: the fused native kernel (`ops.native`) and the pure-torch one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssd4rec_torchrec.nn import BERT4RecEncoder, BiSSDEncoder, Dropout
from ssd4rec_torchrec.nn import dropout as dropout_module
from ssd4rec_torchrec.nn.dropout import dropout, quantized_drop_probability
from ssd4rec_torchrec.ops.native import native_ops


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the native kernel, then with the pure-torch path (native_ops() -> None)."""
    if request.param == "torch":
        monkeypatch.setattr(dropout_module, "native_ops", lambda: None)
    elif native_ops() is None:
        pytest.skip("native CPU kernels unavailable here (see tests/ops/test_ops_native.py)")
    return request.param


def _positive(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inputs without zeros, so `out == 0` identifies the dropped elements."""
    return (torch.rand(*shape) + 0.5).to(dtype)


def test_module_interface_like_nn_dropout() -> None:
    m = Dropout(0.3)
    assert isinstance(m, nn.Dropout) and m.p == 0.3 and not m.inplace
    assert m.state_dict() == {} and list(m.parameters()) == []
    assert repr(m) == "Dropout(p=0.3, inplace=False)"
    with pytest.raises(ValueError):
        Dropout(1.5)
    with pytest.raises(ValueError):
        dropout(torch.ones(2), -0.1)


def test_identity_in_eval_mode_and_at_p_zero() -> None:
    x = torch.randn(37, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert dropout(x, 0.9, training=False) is x


def test_quantised_probability() -> None:
    for p in (0.1, 0.2, 0.4, 0.5, 0.9):
        q = quantized_drop_probability(p)
        assert abs(q - p) <= 2**-16 and (q * 2**15).is_integer()


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drop_rate_and_exact_scaling(p: float) -> None:
    torch.manual_seed(0)
    x = _positive(1024, 1023)  # ~1e6 elements, not a multiple of 4
    out = Dropout(p).train()(x)
    dropped = out == 0
    n = x.numel()
    q = quantized_drop_probability(p)
    rate = dropped.sum().item() / n
    assert abs(rate - q) <= 5 * math.sqrt(q * (1 - q) / n), (rate, q)  # 5 binomial standard deviations
    scale = 1.0 / (1.0 - q)
    assert torch.equal(out[~dropped], x[~dropped] * scale)  # kept values: exactly x * the documented factor


def test_no_positional_bias_in_mask() -> None:
    """Each of the four 16-bit fields of a 64-bit draw (element index mod 4) drops at the same rate."""
    torch.manual_seed(1)
    out = Dropout(0.5).train()(_positive(4 * 2**18))
    q = quantized_drop_probability(0.5)
    per_field = (out == 0).view(-1, 4).float().mean(0)
    tol = 5 * math.sqrt(q * (1 - q) / 2**18)
    assert (per_field - q).abs().max().item() <= tol, per_field


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradient_is_mask_times_scale(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    x = _positive(300, 7, dtype=dtype).requires_grad_(True)
    out = Dropout(0.2).train()(x)
    kept = out != 0
    scale = 1.0 / (1.0 - quantized_drop_probability(0.2))
    assert out.dtype == dtype and torch.equal(out[kept], (x * scale)[kept].detach())
    g = torch.randn(300, 7).to(dtype)
    out.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * scale, torch.zeros_like(g)))


def test_same_seed_same_mask_new_call_new_mask() -> None:
    x = _positive(64, 33)
    m = Dropout(0.2).train()
    torch.manual_seed(3)
    a, b = m(x), m(x)
    torch.manual_seed(3)
    assert torch.equal(m(x), a)
    assert not torch.equal(a == 0, b == 0)


def test_p_one_drops_everything() -> None:
    x = torch.randn(10, 3, requires_grad=True)
    out = Dropout(1.0).train()(x)
    assert torch.equal(out, torch.zeros(10, 3))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(10, 3))


def test_models_use_it() -> None:
    """Every dropout of the Bi-SSD encoder and of the Transformer baselines is this one (fair speed comparisons)."""
    for enc in (BiSSDEncoder(16, 2, d_state=16, headdim=8, chunk_size=32), BERT4RecEncoder(16, 2, n_heads=2)):
        drops = [m for m in enc.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(type(m) is Dropout for m in drops)


def test_path_really_switches(cpu_path: str) -> None:
    """The fixture is not a no-op: the native path draws from a different stream than the torch path."""
    x = _positive(4096)
    torch.manual_seed(4)
    out = dropout(x, 0.5)
    torch.manual_seed(4)
    mask = (torch.empty(1024, dtype=torch.int64).random_().view(torch.int16).bitwise_and(2**15 - 1) >= 2**14)
    assert torch.equal(out != 0, mask) == (cpu_path == "torch")


def test_mask_does_not_depend_on_thread_count() -> None:
    x = _positive(300, 1001)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            outs.append(Dropout(0.3).train()(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_non_contiguous_input_and_gradient() -> None:
    torch.manual_seed(6)
    base = _positive(64, 40).requires_grad_(True)
    x = base.t()  # (40, 64) non-contiguous view
    out = Dropout(0.25).train()(x)
    kept = out != 0
    scale = 1.0 / (1.0 - quantized_drop_probability(0.25))
    assert out.shape == x.shape and torch.equal(out[kept], (x * scale)[kept].detach())
    g = torch.randn(64, 40).t()  # non-contiguous upstream gradient
    out.backward(g)
    assert torch.equal(base.grad.t(), torch.where(kept, g * scale, torch.zeros_like(g)))
