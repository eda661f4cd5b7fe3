"""`varlen_causal_conv1d` (torch path) against a per-segment `F.conv1d` loop with left zero padding.

Error metric: `rel_err(a, b) = max|a - b| / max|b|` (see `ops_reference.rel_err`); fp32 implementation vs
a float64 reference on the same inputs. The torch path runs the taps over the flat token axis in row blocks
of `_BLOCK_ELEMS // C` rows and recomputes the first W-1 rows of each segment: the small tests see one
block, so `test_many_row_blocks` shrinks the blocks to a few rows (segments and heads across block edges).
Every test runs twice: with the native CPU kernels (fp32 inputs) and with the pure-torch Function.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_reference import conv_reference, offsets_of, rel_err, select_cpu_path

import ssd4rec_torchrec.ops.conv as conv_mod
from ssd4rec_torchrec.ops import varlen_causal_conv1d


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return select_cpu_path(request.param, conv_mod, monkeypatch)


OUT_TOL = 1e-6
GRAD_TOL = 1e-4  # gradients are sums over tokens (dw, db cancel); same bound the SSD scan uses


def check_conv(lengths: list[int], C: int, W: int, with_bias: bool, activation: str | None, seed: int = 0,
               extra_cols: int = 0) -> dict:
    """fp32 conv vs float64 per-segment reference: outputs and gradients of x, weight, bias.

    `extra_cols > 0` passes x as a column slice of a wider leaf (strided rows, as the mixer's split of the
    input projection does); its gradient must then be zero outside the slice.
    """
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    base = torch.randn(T, C + extra_cols, generator=g, requires_grad=True)
    lo = extra_cols // 2
    x = base[:, lo: lo + C] if extra_cols else base
    w = torch.randn(C, W, generator=g, requires_grad=True)
    b = torch.randn(C, generator=g, requires_grad=True) if with_bias else None
    offsets = offsets_of(lengths)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    y = varlen_causal_conv1d(x, w, b, offsets, activation=activation, kernel="torch")
    y_ref = conv_reference(xr, wr, br, offsets, activation)
    assert y.shape == (T, C) and y.dtype == torch.float32
    errs = {"y": rel_err(y, y_ref)}
    assert errs["y"] <= OUT_TOL, errs
    if T:
        gy = torch.randn(T, C, generator=g, dtype=torch.float64)
        y.backward(gy.float())
        y_ref.backward(gy)
        pairs = [("dw", w.grad, wr), ("db", None if b is None else b.grad, br)]
        for name, t, tr in [("dx", base.grad[:, lo: lo + C], xr)] + (pairs if b is not None else pairs[:1]):
            errs[name] = rel_err(t, tr.grad)
        if extra_cols:
            assert not base.grad[:, :lo].any() and not base.grad[:, lo + C:].any()
        assert all(v <= GRAD_TOL for k, v in errs.items() if k != "y"), errs
    return errs


@pytest.mark.parametrize("W", [1, 2, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_short_segments(W: int, activation: str | None) -> None:
    """Every segment length 1..W+1 (and empty ones), so each window is clipped at a segment start."""
    lengths = [n for n in range(1, W + 2)] + [0] + list(range(W + 1, 0, -1))
    check_conv(lengths, 6, W, True, activation, seed=W)


@pytest.mark.parametrize("boundary", [63, 64, 65, 255, 256, 257])
def test_boundaries_at_block_edges(boundary: int) -> None:
    """Segment boundaries (and total lengths) at 63/64/65 and 255/256/257 (causal-conv1d PR #117 style)."""
    check_conv([boundary, 3, boundary], 8, 4, True, "silu", seed=boundary)
    check_conv([boundary], 8, 4, False, None, seed=boundary + 1)
    check_conv([1, boundary - 1, 2], 8, 4, True, None, seed=boundary + 2)


@pytest.mark.parametrize("block_elems", [1, 8, 24, 40, 8 * 7])
@pytest.mark.parametrize(("W", "activation", "with_bias"), [(4, "silu", True), (4, None, False), (2, "silu", False),
                                                             (1, None, True), (5, "silu", True)])
def test_many_row_blocks(monkeypatch: pytest.MonkeyPatch, block_elems: int, W: int, activation: str | None,
                         with_bias: bool) -> None:
    """Row blocks of 1, 1, 3, 5 and 7 rows (C=8): the flat taps and the transposed taps cross block edges,
    segment heads fall at and across them, and the per-block weight/bias-gradient buffers accumulate."""
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", block_elems)
    lengths = [1, 2, 9, 0, 3, 1, 17, 4, 1, 11]
    check_conv(lengths, 8, W, with_bias, activation, seed=block_elems + W)
    check_conv(lengths, 8, W, with_bias, activation, seed=block_elems + W + 1, extra_cols=5)


@pytest.mark.parametrize("extra_cols", [1, 132])
def test_strided_column_slice_input(extra_cols: int) -> None:
    """x as a column slice of a wider tensor (read in place, not copied): same values and gradients."""
    check_conv([37, 1, 2, 60, 5], 12, 4, True, "silu", seed=extra_cols, extra_cols=extra_cols)


@pytest.mark.parametrize("block_elems", [8, 1 << 18])
def test_segments_never_see_each_other(monkeypatch: pytest.MonkeyPatch, block_elems: int) -> None:
    """Non-finite tokens and gradients in one segment leave every other segment's outputs and input
    gradients bit-identical (nothing of the other segment is added, not even times zero)."""
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", block_elems)
    lengths, C, W = [6, 2, 5, 1, 9], 8, 4
    off = offsets_of(lengths)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(sum(lengths), C, generator=g)
    w, b = torch.randn(C, W, generator=g), torch.randn(C, generator=g)
    gy0 = torch.randn(sum(lengths), C, generator=g)
    outs = []
    for poison in (False, True):
        x, gy = x0.clone(), gy0.clone()
        for s in (1, 3):  # segments 1 (length 2) and 3 (length 1)
            if poison:
                x[off[s]: off[s + 1]] = float("nan")
                x[off[s]] = float("inf")
                gy[off[s]: off[s + 1]] = float("nan")
        x.requires_grad_()
        y = varlen_causal_conv1d(x, w, b, off, activation="silu", kernel="torch")
        y.backward(gy)
        outs.append((y.detach(), x.grad))
    keep = torch.cat([torch.arange(int(off[s]), int(off[s + 1])) for s in (0, 2, 4)])
    for clean, poisoned in zip(outs[0], outs[1]):
        assert torch.equal(clean[keep], poisoned[keep])
        assert torch.isfinite(clean).all()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=10),
    C=st.integers(1, 9),
    W=st.integers(1, 5),
    with_bias=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_property(lengths, C, W, with_bias, activation, seed) -> None:
    check_conv(lengths, C, W, with_bias, activation, seed)


def test_bf16_returns_bf16() -> None:
    lengths = [5, 1, 9]
    x = torch.randn(15, 8).bfloat16()
    w = torch.randn(8, 4).bfloat16()
    y = varlen_causal_conv1d(x, w, None, offsets_of(lengths), activation="silu")
    assert y.dtype == torch.bfloat16
    ref = conv_reference(x.double(), w.double(), None, offsets_of(lengths), "silu")
    assert rel_err(y, ref) <= 1e-2


def test_auto_and_mamba_fall_back_to_torch_on_cpu() -> None:
    x, w, b = torch.randn(12, 8), torch.randn(8, 4), torch.randn(8)
    off = offsets_of([5, 7])
    ref = varlen_causal_conv1d(x, w, b, off, kernel="torch")
    assert torch.equal(varlen_causal_conv1d(x, w, b, off, kernel="auto"), ref)
    assert torch.equal(varlen_causal_conv1d(x, w, b, off, kernel="mamba"), ref)
    with pytest.raises(RuntimeError, match="unusable"):
        varlen_causal_conv1d(x, w, b, off, kernel="causal_conv1d")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(12)}, "x must be"),
        ({"weight": torch.randn(7, 4)}, "weight must be"),
        ({"bias": torch.randn(7)}, "bias must be"),
        ({"offsets": torch.tensor([0, 5, 11])}, "must equal"),
        ({"activation": "relu"}, "activation"),
        ({"kernel": "cuda"}, "kernel must be"),
    ],
)
def test_validation_errors(kwargs: dict, match: str) -> None:
    args = {"x": torch.randn(12, 8), "weight": torch.randn(8, 4), "bias": torch.randn(8),
            "offsets": offsets_of([5, 7])}
    kwargs = dict(kwargs)  # the parametrized dict is shared by both CPU-path runs
    kw = {k: kwargs.pop(k) for k in ("activation", "kernel") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        varlen_causal_conv1d(args["x"], args["weight"], args["bias"], args["offsets"], **kw)


@pytest.mark.parametrize("block_elems", [8, 1 << 18])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_split_output_matches_unsplit(monkeypatch: pytest.MonkeyPatch, block_elems: int,
                                      activation: str | None) -> None:
    """`split=` returns the column blocks of the same output, and its backward (gradients joined per row block
    inside the Function) gives bit-identical gradients to the unsplit call's."""
    monkeypatch.setattr(conv_mod, "_BLOCK_ELEMS", block_elems)
    g = torch.Generator().manual_seed(11)
    lengths, C, W = [5, 1, 13, 2, 8], 10, 4
    offsets = offsets_of(lengths)
    T = sum(lengths)
    x0, w0, b0 = torch.randn(T, C, generator=g), torch.randn(C, W, generator=g), torch.randn(C, generator=g)
    gy = torch.randn(T, C, generator=g)
    sizes = [5, 3, 2]
    results = []
    for split in (None, sizes):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = varlen_causal_conv1d(x, w, b, offsets, activation=activation, kernel="torch", split=split)
        if split is not None:
            assert isinstance(y, tuple) and [p.shape[1] for p in y] == sizes
            y = torch.cat(y, 1)
        y.backward(gy)
        results.append((y.detach(), x.grad, w.grad, b.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="split"):
        varlen_causal_conv1d(x0, w0, b0, offsets, kernel="torch", split=[5, 4])


def test_native_kernel_takes_fp32(cpu_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = conv_mod._NativeVarlenConv.apply
    monkeypatch.setattr(conv_mod._NativeVarlenConv, "apply", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(7, 3), torch.randn(3, 4)
    varlen_causal_conv1d(x, w, None, offsets_of([3, 4]), activation="silu", kernel="torch")
    varlen_causal_conv1d(x.double(), w.double(), None, offsets_of([3, 4]), kernel="torch")  # float64: torch path
    assert len(calls) == (1 if cpu_path == "native" else 0)
