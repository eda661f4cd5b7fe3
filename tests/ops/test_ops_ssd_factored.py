"""The factored form (`exp(cs_i - cs_j) = f_i g_j`) and its fallback.

When every chunk's log-decays span at most `2 * _FACTORED_MAX_LOG`, `ssd_scan` runs the whole scan as one
fused autograd Function (`_FactoredScan`, hand-written backward). Otherwise the general path runs, with the
factored intra-chunk form where it is safe and the exact per-head decay matrices elsewhere. Every form must
match the float64 token-by-token reference, a call that mixes forms must too, and the factored gradient
must not leak across segments (exactly zero).
"""

from __future__ import annotations

import pytest
import torch
from ops_reference import make_ssd_inputs, offsets_of, rel_err, ssd_reference
from test_ops_ssd_scan import CASES, check_against_reference

import ssd4rec_torchrec.ops.ssd.chunked as chunked_mod
from ssd4rec_torchrec.ops import ssd_scan

NAMES = ("x", "dt", "A", "B", "C", "D")


class PathSpy:
    """Counts the chunks that went through each form (`fused` chunks count as factored too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.factored = 0
        self.fused = 0
        self.exact = 0
        real_factored, real_exact = chunked_mod._intra_chunk_factored, chunked_mod._DecayMatmul.apply
        real_fused = chunked_mod._FactoredScan.apply

        def factored(a, *rest):
            self.factored += a.shape[0]
            return real_factored(a, *rest)

        def fused(x, dt, *rest):
            self.fused += dt.shape[0]
            self.factored += dt.shape[0]
            return real_fused(x, dt, *rest)

        def exact(a, cb, u, mask):
            if cb is not None:  # the intra-chunk call (the chunk-state scan passes cb=None)
                self.exact += a.shape[0]
            return real_exact(a, cb, u, mask)

        monkeypatch.setattr(chunked_mod, "_intra_chunk_factored", factored)
        monkeypatch.setattr(chunked_mod._FactoredScan, "apply", fused)
        monkeypatch.setattr(chunked_mod._DecayMatmul, "apply", exact)


@pytest.mark.parametrize("form", ["factored", "exact"])
@pytest.mark.parametrize("name", ["chunk_pm1", "span_4_chunks", "one_long_q64", "empty_segments", "chunk_odd"])
def test_each_form_matches_reference(monkeypatch: pytest.MonkeyPatch, form: str, name: str) -> None:
    if form == "exact":
        monkeypatch.setattr(chunked_mod, "_FACTORED_MAX_LOG", 0.0)
    spy = PathSpy(monkeypatch)
    lengths, q = CASES[name]
    check_against_reference(lengths, q, H=4, G=2, P=3, N=5, D_kind="h", seed=len(name))
    assert (spy.factored > 0 and spy.exact == 0) if form == "factored" else (spy.exact > 0 and spy.factored == 0)


def test_mixed_call_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast decays in some chunks (span far above the threshold) force the exact form there only."""
    spy = PathSpy(monkeypatch)
    lengths, q = [30, 2, 50, 14, 33], 16  # 129 tokens, 9 chunks
    inp = make_ssd_inputs(lengths, 4, 2, 3, 5, "h", torch.float32, seed=3)
    inp["dt"][16:48] = inp["dt"][16:48] * 40 + 2.0  # chunks 1 and 2: |dt*A| ~ 1..300 per token
    for v in inp.values():
        v.requires_grad_(True)
    offsets = offsets_of(lengths)
    y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, D=inp["D"], chunk_size=q,
                 kernel="torch")
    ref = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()}
    y_ref = ssd_reference(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], offsets, ref["D"])
    assert spy.exact == 2 and spy.factored == 7 and spy.fused == 0  # one unsafe chunk: the general path
    assert rel_err(y, y_ref) <= 1e-5
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(gy.float())
    y_ref.backward(gy)
    for k in ("x", "dt", "B", "C"):
        assert rel_err(inp[k].grad, ref[k].grad) <= 1e-4, k


@pytest.mark.parametrize("target", [1, 3, 5])
def test_factored_gradient_does_not_leak_across_segments(monkeypatch: pytest.MonkeyPatch, target: int) -> None:
    """A loss on one segment gives exactly zero gradient to the tokens of every other segment (segments
    before and after it in the same chunk)."""
    spy = PathSpy(monkeypatch)
    lengths = [5, 9, 3, 20, 1, 7]  # several segments per 16-token chunk
    offsets = offsets_of(lengths)
    inp = make_ssd_inputs(lengths, 2, 1, 3, 4, None, torch.float32, seed=9, requires_grad=True)
    y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, chunk_size=16, kernel="torch")
    s, e = int(offsets[target]), int(offsets[target + 1])
    y[s:e].sum().backward()
    assert spy.factored > 0 and spy.exact == 0
    for k in ("x", "dt", "B", "C"):
        g = inp[k].grad
        assert torch.cat([g[:s], g[e:]]).abs().max() == 0, k
        assert g[s:e].abs().max() > 0, k


def test_first_token_decay_gets_no_intra_chunk_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decay of a segment's first token never acts inside the segment: its dt gradient is exactly 0
    (D = None and dt enters only through the decay and the input scaling x * dt, which we cancel by x = 0
    at that token)."""
    PathSpy(monkeypatch)
    lengths = [6, 10]
    offsets = offsets_of(lengths)
    inp = make_ssd_inputs(lengths, 2, 1, 3, 4, None, torch.float32, seed=2, requires_grad=False)
    inp["x"][[0, 6]] = 0.0
    for k in ("x", "dt", "A", "B", "C"):
        inp[k].requires_grad_(True)
    y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, chunk_size=16, kernel="torch")
    y.pow(2).sum().backward()
    assert inp["dt"].grad[[0, 6]].abs().max() == 0
    assert inp["dt"].grad[[1, 7]].abs().max() > 0


@pytest.mark.parametrize(("lengths", "H", "G", "P", "N", "decay", "seed"), [
    ([62, 10], 6, 3, 1, 1, None, 1),  # found by the property test: g_j·f_{Q-1} overflows outside the last segment
    ([40, 30, 50], 4, 1, 8, 4, 1.8, 5),  # |dt·A| in 0.9..2.7: half-spans ~45 and ~57 (60 allowed)
    ([3, 120, 7], 4, 2, 2, 3, 1.8, 11),
])
def test_fused_path_near_threshold(monkeypatch: pytest.MonkeyPatch, lengths: list[int], H: int, G: int, P: int,
                                   N: int, decay: float | None, seed: int) -> None:
    """Wide (but still factorable) decay spans: the fused path's products of large and small factors must
    stay finite and match the float64 reference, outputs and every gradient."""
    spy = PathSpy(monkeypatch)
    inp = make_ssd_inputs(lengths, H, G, P, N, "hp", torch.float32, seed=seed)
    if decay is not None:  # dt·A = -decay · U(0.5, 1.5) per token and head
        u = torch.rand(inp["dt"].shape, generator=torch.Generator().manual_seed(seed)) + 0.5
        inp["dt"] = decay * u / inp["A"].abs()
    for v in inp.values():
        v.requires_grad_(True)
    offsets = offsets_of(lengths)
    y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets, D=inp["D"], chunk_size=64,
                 kernel="torch")
    assert spy.fused > 0 and spy.exact == 0
    ref = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()}
    y_ref = ssd_reference(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], offsets, ref["D"])
    assert rel_err(y, y_ref) <= 1e-5
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(gy.float())
    y_ref.backward(gy)
    for k in NAMES:
        assert torch.isfinite(inp[k].grad).all(), k
        assert rel_err(inp[k].grad, ref[k].grad) <= 1e-4, k
