"""`backward_scope="prefix"`: each row gets the Bi-SSD read-out of its own prefix, so the encoder is causal."""

from __future__ import annotations

import pytest
import torch
from nn_testutils import SMALL, make_encoder, offsets_from_lengths

from ssd4rec_torchrec.nn import BiSSDLayer

LENGTHS = [1, 2, 5, 9, 4]


def _layer_pair(shared: bool, seed: int = 0) -> tuple[BiSSDLayer, BiSSDLayer]:
    """A sequence-scope and a prefix-scope layer with the same weights (random D and conv bias, float64)."""
    torch.manual_seed(seed)
    kw = {**SMALL, "dropout": 0.0, "beta": 0.3, "flip_back": False, "share_backward_weights": shared}
    seq = BiSSDLayer(16, **kw).double()
    for m in seq.modules():
        if hasattr(m, "A_log"):
            torch.nn.init.normal_(m.D)
            torch.nn.init.normal_(m.conv1d.bias)
    pre = BiSSDLayer(16, backward_scope="prefix", **kw).double()
    pre.load_state_dict(seq.state_dict())
    return seq.eval(), pre.eval()


@pytest.mark.parametrize("shared", [True, False])
def test_row_t_is_the_sequence_layer_on_prefix_t(shared):
    """Row t of the prefix-scope layer = the official (un-flipped) layer run on s..t alone, read at t."""
    seq, pre = _layer_pair(shared)
    off = offsets_from_lengths(LENGTHS)
    x = torch.randn(int(off[-1]), 16, dtype=torch.float64)
    got = pre(x, off)
    for i, n in enumerate(LENGTHS):
        s = int(off[i])
        for t in range(n):
            want = seq(x[s:s + t + 1], offsets_from_lengths([t + 1]))[-1]
            torch.testing.assert_close(got[s + t], want, rtol=1e-10, atol=1e-10)


def test_encoder_is_causal_and_matches_layerwise_prefix_reference():
    """Two layers: each layer's row t is the sequence-scope layer on that layer's input rows s..t."""
    torch.manual_seed(1)
    enc = make_encoder(n_layers=2, beta=0.5, flip_back=False, backward_scope="prefix").double()
    ref = make_encoder(n_layers=2, beta=0.5, flip_back=False).double()
    ref.load_state_dict(enc.state_dict())
    off = offsets_from_lengths([6, 3])
    x = torch.randn(9, 16, dtype=torch.float64)
    got = enc(x, off)
    h = ref.LayerNorm(ref.dropout(x))
    for layer in ref.layers:
        rows = []
        for i in range(2):
            s, e = int(off[i]), int(off[i + 1])
            rows += [layer(h[s:t + 1], offsets_from_lengths([t + 1 - s]))[-1] for t in range(s, e)]
        h = torch.stack(rows)
    torch.testing.assert_close(got, h, rtol=1e-10, atol=1e-10)
    # causal: changing row 4 of the first segment leaves rows 0..3 (and the other segment) bit-identical
    x2 = x.clone()
    x2[4] += 3.0
    got2 = enc(x2, off)
    assert torch.equal(got2[:4], got[:4]) and torch.equal(got2[6:], got[6:])
    assert not torch.equal(got2[4], got[4])


def test_prefix_scope_needs_unflipped_backward():
    with pytest.raises(ValueError, match="flip_back=False"):
        BiSSDLayer(16, **SMALL, flip_back=True, backward_scope="prefix")
    with pytest.raises(ValueError, match="backward_scope must be"):
        BiSSDLayer(16, **SMALL, flip_back=False, backward_scope="suffix")
