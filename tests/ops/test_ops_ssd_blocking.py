"""The torch `ssd_scan` processes its intra-chunk term in blocks of chunks bounded by `_BLOCK_BYTES`.

Blocking must not change results: with a tiny budget (one chunk per block, or a few chunks with a ragged
last block) outputs and all gradients equal those of a single block covering every chunk to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from ops_reference import make_ssd_inputs, offsets_of

import ssd4rec_torchrec.ops.ssd.decay as decay_mod
from ssd4rec_torchrec.ops import ssd_scan

NAMES = ("x", "dt", "A", "B", "C", "D")


def run(monkeypatch: pytest.MonkeyPatch, budget: int, lengths: list[int], q: int, H: int, G: int,
        scan_block: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(decay_mod, "_BLOCK_BYTES", budget)
    if scan_block is not None:
        monkeypatch.setattr(decay_mod, "_SCAN_BLOCK", scan_block)
    inp = make_ssd_inputs(lengths, H, G, 3, 5, "hp", torch.float32, 11, requires_grad=True)
    y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], offsets_of(lengths), D=inp["D"],
                 chunk_size=q, kernel="torch")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(gy)
    return y.detach(), {k: inp[k].grad for k in NAMES}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-6 * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("budget", [1, 3 * 4 * 16 * 16 * 4, 7 * 4 * 16 * 16 * 4 + 5])
@pytest.mark.parametrize(("H", "G"), [(4, 1), (4, 2), (4, 4)])
def test_blocked_equals_unblocked(monkeypatch: pytest.MonkeyPatch, budget: int, H: int, G: int) -> None:
    lengths = [5, 16, 17, 33, 1, 70, 0, 9, 40, 3]  # 194 tokens: 13 chunks of 16, segments across chunks
    y_ref, g_ref = run(monkeypatch, 2**62, lengths, 16, H, G)
    y, g = run(monkeypatch, budget, lengths, 16, H, G)
    assert close(y, y_ref)
    for k in NAMES:
        assert torch.isfinite(g[k]).all() and close(g[k], g_ref[k]), k


def test_blocked_inter_chunk_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recursive chunk-state scan uses the same blocked Function (with broadcast operands)."""
    lengths = [37, 1, 60, 2, 19, 23]
    y_ref, g_ref = run(monkeypatch, 2**62, lengths, 2, 2, 1, scan_block=3)
    y, g = run(monkeypatch, 1, lengths, 2, 2, 1, scan_block=3)
    assert close(y, y_ref)
    for k in NAMES:
        assert close(g[k], g_ref[k]), k
