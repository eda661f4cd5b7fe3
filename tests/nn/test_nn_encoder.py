"""BiSSDEncoder: packing invariance, isolation, gradients, toy training, bf16 autocast, config."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nn_testutils import make_encoder, offsets_from_lengths
from torch import nn

from ssd4rec_torchrec.nn import BiSSDEncoder, EncoderConfig

log = logging.getLogger(__name__)


def _encode_alone(enc: BiSSDEncoder, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    bounds = offsets.tolist()
    return torch.cat([enc(x[s:e], offsets_from_lengths([e - s])) for s, e in itertools.pairwise(bounds)])


ENC_PACK = make_encoder(16, flip_back=True)
ENC_PACK_OFFICIAL = make_encoder(16, seed=3, flip_back=False, positional="learned", max_positions=2048)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=4),
    official=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(lengths=[2000, 1999, 1, 1500], official=False, seed=1)
@example(lengths=[1, 2000, 777], official=True, seed=2)
def test_packing_invariance(lengths: list[int], official: bool, seed: int) -> None:
    enc = ENC_PACK_OFFICIAL if official else ENC_PACK
    offsets = offsets_from_lengths(lengths)
    x = torch.randn(sum(lengths), 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (enc(x, offsets) - _encode_alone(enc, x, offsets)).abs().max().item()
    log.info("packing %s (official=%s): max abs diff %.3g", lengths, official, diff)
    assert diff <= 1e-5, (lengths, diff)


@pytest.mark.parametrize("lengths", [[63, 64, 65], [255, 256, 257], [1, 1, 1], [31, 1, 33, 2], [5, 0, 4, 0]])
def test_packing_invariance_chunk_boundaries_and_empty_segments(lengths: list[int]) -> None:
    enc = make_encoder(16, chunk_size=64)
    offsets = offsets_from_lengths(lengths)
    x = torch.randn(sum(lengths), 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = (enc(x, offsets) - _encode_alone(enc, x, offsets)).abs().max().item()
    log.info("packing %s: max abs diff %.3g", lengths, diff)
    assert diff <= 1e-5


def test_segments_are_isolated() -> None:
    enc = make_encoder(16)
    lengths = [40, 1, 300, 77]
    offsets = offsets_from_lengths(lengths)
    x = torch.randn(sum(lengths), 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = enc(x, offsets)
        for k in range(len(lengths)):
            s, e = offsets[k].item(), offsets[k + 1].item()
            x2 = x.clone()
            x2[s:e] = torch.randn(e - s, 16)
            y2 = enc(x2, offsets)
            outside = torch.cat([(y2 - y)[:s], (y2 - y)[e:]])
            assert outside.numel() == 0 or outside.abs().max() <= 1e-6, k
            assert (y2 - y)[s:e].abs().max() > 1e-3  # and the segment itself does change
    # Gradient view of the same property: a loss on segment 2 has zero gradient outside it.
    xg = x.clone().requires_grad_(True)
    enc(xg, offsets)[offsets[2] : offsets[3]].sum().backward()
    g = xg.grad
    assert g[: offsets[2]].abs().max() == 0 and g[offsets[3] :].abs().max() == 0
    assert g[offsets[2] : offsets[3]].abs().max() > 0


def test_learned_positions_are_within_segment() -> None:
    enc = make_encoder(16, positional="learned", max_positions=4)
    offsets = offsets_from_lengths([3, 1, 6])
    assert enc.positions(offsets, 10).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5]
    enc(torch.randn(10, 16), offsets)  # positions 4, 5 clamp to the last row


@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_every_parameter(shared: bool) -> None:
    enc = make_encoder(16, share_backward_weights=shared, positional="learned", max_positions=64).train()
    offsets = offsets_from_lengths([5, 33, 12])
    x = torch.randn(50, 16, requires_grad=True)
    enc(x, offsets).pow(3).sum().backward()  # pow(3): LN makes sum and sum of squares degenerate
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_toy_next_item_training_reduces_loss() -> None:
    """Embeddings + encoder + tied read-out learn a deterministic successor map from the last token."""
    torch.manual_seed(0)
    n_items, d = 40, 32
    succ = torch.randperm(n_items - 1) + 1  # successor of item i is succ[i-1]; 0 unused

    def batch(n_seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = torch.randint(1, 30, (n_seq,)).tolist()
        items = torch.randint(1, n_items, (sum(lengths),))
        offsets = offsets_from_lengths(lengths)
        return items, offsets, succ[items[offsets[1:] - 1] - 1]

    emb = nn.Embedding(n_items, d)
    nn.init.normal_(emb.weight, std=0.02)
    enc = BiSSDEncoder(d, 2, d_state=16, headdim=8, chunk_size=32, dropout=0.1, flip_back=False)
    opt = torch.optim.Adam([*emb.parameters(), *enc.parameters()], lr=3e-3)

    def step_loss(items: torch.Tensor, offsets: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = enc(emb(items), offsets)[offsets[1:] - 1]
        return F.cross_entropy(h @ emb.weight.T, target)

    eval_batch = batch(64)
    with torch.no_grad():
        enc.eval()
        before = step_loss(*eval_batch).item()
    enc.train()
    for _ in range(60):
        opt.zero_grad()
        step_loss(*batch(32)).backward()
        opt.step()
    with torch.no_grad():
        enc.eval()
        after = step_loss(*eval_batch).item()
    log.info("toy next-item CE: %.3f -> %.3f (log V = %.3f)", before, after, torch.log(torch.tensor(40.0)))
    assert after < 0.5 * before


def test_bf16_autocast_close_to_fp32() -> None:
    enc = make_encoder(32, headdim=16)
    offsets = offsets_from_lengths([17, 200, 3])
    x = torch.randn(220, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = enc(x, offsets)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = enc(xg, offsets)
    y.float().pow(2).sum().backward()
    err = (y.float() - ref).abs()
    log.info(
        "bf16 autocast vs fp32: max abs %.3g, mean abs %.3g (outputs are LayerNorm'ed)",
        err.max().item(),
        err.mean().item(),
    )
    assert torch.isfinite(y).all() and xg.grad is not None and torch.isfinite(xg.grad).all()
    assert err.max() <= 0.1 and err.mean() <= 0.02


def test_autocast_option_runs_the_layers_in_bf16() -> None:
    """`autocast="bf16"` in training: the input LayerNorm in fp32, the layers under bf16 autocast (same numbers
    as running them by hand in an autocast context, different from fp32), output in the input's dtype. In
    eval mode (evaluation, export) it runs fp32: exactly the fp32 result."""
    from ssd4rec_torchrec.ops import reverse_segments_index

    enc = make_encoder(32, headdim=16).train()  # dropout is 0: train mode is deterministic
    offsets = offsets_from_lengths([17, 60, 3])
    x = torch.randn(80, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = enc(x, offsets)
        h = enc.LayerNorm(x)
        rev = reverse_segments_index(offsets, 80)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for layer in enc.layers:
                h = layer(h, offsets, rev)
        enc.autocast = "bf16"
        inner = enc(x, offsets)
        evaluated = enc.eval()(x, offsets)
    assert inner.dtype == torch.float32 and torch.equal(inner, h.float()) and not torch.equal(inner, ref)
    assert (inner - ref).abs().max() < 0.1
    assert torch.equal(evaluated, ref)
    with pytest.raises(ValueError, match="autocast"):
        BiSSDEncoder(16, 1, autocast="fp8")


def test_official_config_is_the_papers_ml1m_encoder() -> None:
    cfg = EncoderConfig.official()
    assert (cfg.d_model, cfg.n_layers, cfg.d_state, cfg.headdim, cfg.expand, cfg.d_conv) == (256, 2, 64, 16, 2, 4)
    assert (cfg.dropout, cfg.beta, cfg.norm_embedding, cfg.positional) == (0.2, 0.1, True, "none")
    assert cfg.share_backward_weights and not cfg.flip_back and cfg.chunk_size == 256
    enc = BiSSDEncoder.from_config(cfg)
    assert not enc.layers[0].flip_back and enc.layers[0].forward_ssd.nheads == 32
    # 2 x (Mamba2 437,984 + PFFN 525,568 + 2 LN) + embedding LN, as computed from the official code.
    assert sum(p.numel() for p in enc.parameters()) == 1_929_664
    lin = enc.layers[1].forward_ssd.in_proj.weight
    assert abs(lin.std().item() - 0.02) < 2e-3  # official N(0, 0.02) overrides Mamba2's Linear init
    assert torch.equal(enc.layers[0].ffn.w_1.bias, torch.zeros(1024))
    assert torch.equal(enc.layers[0].forward_ssd.D, torch.ones(32))
    assert BiSSDEncoder.from_config(cfg, n_layers=1).n_layers == 1


def test_gradient_checkpointing_gives_the_same_step() -> None:
    """Train mode with dropout: same outputs and gradients with and without per-layer recomputation."""
    results = []
    for ckpt in (False, True):
        enc = make_encoder(16, seed=5, dropout=0.2, gradient_checkpointing=ckpt).train()
        offsets = offsets_from_lengths([30, 3, 70])
        x = torch.randn(103, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(11)  # same dropout masks in both runs
        y = enc(x, offsets)
        y.pow(3).sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in enc.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp0, gp1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_one_set_of_encoder_defaults() -> None:
    """``BiSSDEncoder``'s keyword defaults are ``EncoderConfig``'s, and the config schema's model section
    restates exactly those for every field it exposes."""
    import dataclasses
    import inspect

    from ssd4rec_torchrec.config import ModelSection

    defaults = {f.name: f.default for f in dataclasses.fields(EncoderConfig)}
    params = inspect.signature(BiSSDEncoder.__init__).parameters
    assert {n: p.default for n, p in params.items() if n in defaults and n != "d_model"} == {
        n: v for n, v in defaults.items() if n != "d_model"}
    section = {f.name: f.default for f in dataclasses.fields(ModelSection) if f.name in defaults}
    assert len(section) >= 15 and section == {n: defaults[n] for n in section}
