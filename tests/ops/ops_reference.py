"""Independent references and input builders for the tests of `ssd4rec_torchrec.ops`.

The references are deliberately naive (a Python loop over the tokens of each segment, in float64) and
share no code with the implementations under test.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F


def select_cpu_path(path: str, module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on `path` for an op `module`: "torch" hides the native kernels from it (`native_ops() -> None`),
    "native" needs them (skipped where they cannot be built; tests/ops/test_ops_native.py says why)."""
    if path == "torch":
        monkeypatch.setattr(module, "native_ops", lambda: None)
    elif module.native_ops() is None:
        pytest.skip("native CPU kernels unavailable here (see tests/ops/test_ops_native.py)")
    return path


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the max norm: `max|actual - expected| / max|expected|` (computed in float64).

    Normalising by the largest reference entry (not entrywise) keeps the metric meaningful when some
    entries are close to zero. Returns the absolute error when the reference is identically 0.
    """
    a = actual.detach().double()
    b = expected.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def sum_rel_err(actual: torch.Tensor, expected_terms: torch.Tensor) -> float:
    """Error of a gradient that is a sum over tokens, relative to the magnitude of its terms.

    `expected_terms` has a leading token axis; the reference gradient is `expected_terms.sum(0)`. Returns
    `max|actual - Σ_t terms_t| / max(Σ_t |terms_t|)`. Gradients of parameters shared by all tokens (A, D)
    are such sums; when the terms nearly cancel, `max|b|` is far below the size of the terms and no fp32
    computation can resolve the sum to better than ~eps·Σ|terms|, so this is the meaningful relative error.
    """
    t = expected_terms.detach().double()
    ref = t.sum(0)
    err = (actual.detach().double() - ref).abs().max().item()
    scale = t.abs().sum(0).max().item()
    return err / scale if scale > 0 else err


def offsets_of(lengths: list[int]) -> torch.Tensor:
    """int64 jagged offsets `[0, cumsum(lengths)]`, written without the library helper."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int64)


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    offsets: torch.Tensor,
    D: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Sequential float64 SSD recurrence, one token at a time, state reset at every segment start.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t ;  y_t = h_t · C_t + D x_t  (head h uses group h // (H/G)).
    Differentiable by autograd (used as the gradient reference too). With `per_token=True`, A and D carry
    a leading T axis (one copy per token), so their gradients come out as per-token terms.
    """
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    _, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    group = torch.arange(H) // (H // G)
    ys = []
    off = offsets.tolist()
    for s in range(len(off) - 1):
        h = x.new_zeros(H, P, N)
        for t in range(off[s], off[s + 1]):
            Bt = B[t][group]  # (H, N)
            Ct = C[t][group]
            At = A[t] if per_token else A
            decay = torch.exp(dt[t] * At)  # (H,)
            h = decay[:, None, None] * h + (dt[t][:, None] * x[t])[:, :, None] * Bt[:, None, :]
            yt = (h * Ct[:, None, :]).sum(-1)
            if D is not None:
                Dd = D[t].double() if per_token else D.double()
                yt = yt + (Dd[:, None] if Dd.dim() == 1 else Dd) * x[t]
            ys.append(yt)
    return torch.stack(ys) if ys else x.new_zeros(0, H, P)


def conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """Per-segment causal depthwise conv: F.conv1d on each segment with W-1 zeros of left padding."""
    Cc = x.shape[1]
    W = weight.shape[1]
    outs = []
    off = offsets.tolist()
    for s in range(len(off) - 1):
        seg = x[off[s]:off[s + 1]].T.unsqueeze(0)  # (1, C, L)
        if seg.shape[-1] == 0:
            continue
        y = F.conv1d(F.pad(seg, (W - 1, 0)), weight.unsqueeze(1), bias, groups=Cc)
        outs.append(y[0].T)
    y = torch.cat(outs) if outs else x.new_zeros(0, Cc)
    return F.silu(y) if activation == "silu" else y


def make_ssd_inputs(
    lengths: list[int],
    H: int = 4,
    G: int = 1,
    P: int = 8,
    N: int = 8,
    D_kind: str | None = "h",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Random SSD inputs with realistic scales (dt = softplus(N(-2, 1)), A in [-8, -0.5])."""
    g = torch.Generator().manual_seed(seed)
    T = int(sum(lengths))
    out: dict[str, torch.Tensor | None] = {
        "x": torch.randn(T, H, P, generator=g),
        "dt": F.softplus(torch.randn(T, H, generator=g) - 2.0),
        "A": -(0.5 + 7.5 * torch.rand(H, generator=g)),
        "B": torch.randn(T, G, N, generator=g) / N**0.5,
        "C": torch.randn(T, G, N, generator=g) / N**0.5,
        "D": {None: None, "h": torch.randn(H, generator=g), "hp": torch.randn(H, P, generator=g)}[D_kind],
    }
    for k, v in out.items():
        if v is not None:
            out[k] = v.to(dtype).requires_grad_(requires_grad)
    return out
