"""BiSSDLayer: backward direction (flip_back True/False), layer formula, separate backward weights."""

from __future__ import annotations

import itertools

import torch
from nn_testutils import SMALL, PrefixSumMixer, offsets_from_lengths
from torch import nn

from ssd4rec_torchrec.nn import BiSSDLayer, SSDMixer

LENGTHS = [3, 1, 4]
SEGMENTS = [(0, 3), (3, 4), (4, 8)]


def _layer_with_prefix_sum(flip_back: bool, shared: bool) -> BiSSDLayer:
    layer = BiSSDLayer(4, flip_back=flip_back, share_backward_weights=shared, dropout=0.0, d_state=4, headdim=4)
    layer.forward_ssd = PrefixSumMixer()
    if not shared:
        layer.backward_ssd = PrefixSumMixer()
    return layer.eval()


def test_backward_direction_by_hand() -> None:
    """With y_t = prefix sum, R' is a suffix sum; un-flipped, position t gets the mirrored position's."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]).unsqueeze(1).repeat(1, 4)
    offsets = offsets_from_lengths(LENGTHS)
    # Written out by hand for segments [1,2,4] [8] [16,32,64,128].
    fwd_want = [1, 3, 7, 8, 16, 48, 112, 240]
    suffix = [7, 6, 4, 8, 240, 224, 192, 128]  # flip_back=True: sum of x[t..end of segment]
    mirrored = [4, 6, 7, 8, 128, 192, 224, 240]  # flip_back=False: suffix sum from s+e-1-t (official)
    for shared in (True, False):
        for flip_back, want in ((True, suffix), (False, mirrored)):
            f, r = _layer_with_prefix_sum(flip_back, shared).directions(x, offsets)
            assert f[:, 0].tolist() == fwd_want
            assert r[:, 0].tolist() == want, (shared, flip_back)


def test_backward_direction_against_per_segment_runs() -> None:
    """Real mixer: R' equals running the mixer on each segment reversed with torch.flip, alone."""
    torch.manual_seed(0)
    lengths = [5, 1, 40, 17]
    offsets = offsets_from_lengths(lengths)
    x = torch.randn(sum(lengths), 16)
    for flip_back in (True, False):
        layer = BiSSDLayer(16, flip_back=flip_back, dropout=0.0, **SMALL).eval()
        with torch.no_grad():
            f, r = layer.directions(x, offsets)
            bounds = offsets.tolist()
            want_f, want_r = [], []
            for s, e in itertools.pairwise(bounds):
                one = offsets_from_lengths([e - s])
                want_f.append(layer.forward_ssd(x[s:e], one))
                back = layer.forward_ssd(torch.flip(x[s:e], [0]), one)
                want_r.append(torch.flip(back, [0]) if flip_back else back)
        assert (f - torch.cat(want_f)).abs().max() <= 1e-5
        assert (r - torch.cat(want_r)).abs().max() <= 1e-5


def test_layer_formula_official_order() -> None:
    """out = Dropout(LN(W2(Dropout(GELU(W1 H))) + H)), H = Dropout(LN(F + beta R' + x)); dropout off."""
    torch.manual_seed(1)
    layer = BiSSDLayer(16, beta=0.3, dropout=0.0, flip_back=False, **SMALL).eval()
    offsets = offsets_from_lengths([9, 30])
    x = torch.randn(39, 16)
    with torch.no_grad():
        f, r = layer.directions(x, offsets)
        h = nn.functional.layer_norm(f + 0.3 * r + x, (16,), layer.LayerNorm.weight, layer.LayerNorm.bias, 1e-12)
        ffn = layer.ffn
        inner = ffn.w_2(nn.functional.gelu(ffn.w_1(h)))
        want = nn.functional.layer_norm(inner + h, (16,), ffn.LayerNorm.weight, ffn.LayerNorm.bias, 1e-12)
        torch.testing.assert_close(layer(x, offsets), want, rtol=1e-5, atol=1e-5)
    assert layer.LayerNorm.eps == 1e-12 and ffn.w_1.out_features == 64


def test_separate_backward_weights_get_gradients() -> None:
    torch.manual_seed(2)
    shared = BiSSDLayer(16, dropout=0.0, **SMALL)
    sep = BiSSDLayer(16, dropout=0.0, share_backward_weights=False, **SMALL)
    assert shared.backward_ssd is None and isinstance(sep.backward_ssd, SSDMixer)
    n_mixer = sum(p.numel() for p in sep.forward_ssd.parameters())
    assert sum(p.numel() for p in sep.parameters()) == sum(p.numel() for p in shared.parameters()) + n_mixer
    fwd_ids = {id(p) for p in sep.forward_ssd.parameters()}
    assert not fwd_ids & {id(p) for p in sep.backward_ssd.parameters()}
    offsets = offsets_from_lengths([6, 11])
    sep(torch.randn(17, 16), offsets).pow(2).sum().backward()
    for name, p in sep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The backward mixer really is the one reading reversed input: zero it and R' vanishes.
    with torch.no_grad():
        sep.backward_ssd.out_proj.weight.zero_()
        _, r = sep.directions(torch.randn(17, 16), offsets)
    assert r.abs().max() == 0


def test_fused_and_sequential_directions_agree() -> None:
    """Shared weights: one packed call of 2T tokens (small T) equals two calls of T tokens (large T)."""
    torch.manual_seed(3)
    layer = BiSSDLayer(16, dropout=0.0, flip_back=False, **SMALL).eval()
    offsets = offsets_from_lengths([50, 7, 90])
    x = torch.randn(147, 16)
    with torch.no_grad():
        fused = layer.directions(x, offsets)
        layer.fuse_directions_max_tokens = 0
        sequential = layer.directions(x, offsets)
    for a, b in zip(fused, sequential, strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_beta_zero_is_forward_only_and_causal() -> None:
    """beta = 0 skips the backward scan: same output as F + 0 * R' + x, and position t never sees t+1.."""
    torch.manual_seed(3)
    layer = BiSSDLayer(16, beta=0.0, dropout=0.0, **SMALL).eval()
    offsets = offsets_from_lengths([9, 30])
    x = torch.randn(39, 16)
    with torch.no_grad():
        f, r = layer.directions(x, offsets)
        h = nn.functional.layer_norm(f + 0.0 * r + x, (16,), layer.LayerNorm.weight, layer.LayerNorm.bias, 1e-12)
        want = layer.ffn(h)
        torch.testing.assert_close(layer(x, offsets), want, rtol=1e-6, atol=1e-6)
        full = layer(x, offsets)
        for cut in (1, 5, 17, 30):  # the second segment truncated after `cut` tokens: outputs before it unchanged
            short = layer(x[: 9 + cut], offsets_from_lengths([9, cut]))
            torch.testing.assert_close(short, full[: 9 + cut], rtol=1e-5, atol=1e-5)
        bidirectional = BiSSDLayer(16, beta=0.1, dropout=0.0, **SMALL).eval()
        bidirectional.load_state_dict(layer.state_dict())
        short = bidirectional(x[:14], offsets_from_lengths([9, 5]))
        assert (short[9:] - bidirectional(x, offsets)[9:14]).abs().max() > 1e-4  # beta > 0 does see the future
