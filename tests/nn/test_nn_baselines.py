"""SASRec / BERT4Rec jagged encoders: packing invariance, isolation, causality, parity with per-segment
references (hand-written softmax attention and `nn.MultiheadAttention`), bucketing bounds, gradients,
toy training and bf16 autocast."""

from __future__ import annotations

import inspect
import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from ssd4rec_torchrec.nn.baselines import (
    BERT4RecEncoder,
    JaggedAttentionPlan,
    JaggedTransformerEncoder,
    SASRecEncoder,
    jagged_attention,
)
from ssd4rec_torchrec.nn.encoder import BiSSDEncoder

log = logging.getLogger(__name__)
D = 16
CLASSES = {"sasrec": SASRecEncoder, "bert4rec": BERT4RecEncoder}


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out


def _make(kind: str, seed: int = 0, **kw) -> JaggedTransformerEncoder:
    """Small encoder in eval mode with deterministic weights (dropout only matters in train mode)."""
    torch.manual_seed(seed)
    return CLASSES[kind](D, **kw).eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _encode_alone(enc: nn.Module, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    bounds = offsets.tolist()
    return torch.cat([enc(x[s:e], _offsets([e - s])) for s, e in itertools.pairwise(bounds)])


def _sharpen(enc: JaggedTransformerEncoder, std: float = 0.3) -> JaggedTransformerEncoder:
    """Larger q/k/v weights than the N(0, 0.02) init, so attention mixes tokens visibly."""
    for blk in enc.layers:
        nn.init.normal_(blk.qkv.weight, std=std)
    return enc


ENCODERS = {kind: _make(kind, seed=i + 1) for i, kind in enumerate(CLASSES)}
SHARP = {kind: _sharpen(_make(kind, seed=i + 7)) for i, kind in enumerate(CLASSES)}


# ---------------------------------------------------------------------------------------------- packing / isolation


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    kind=st.sampled_from(sorted(CLASSES)),
    seed=st.integers(0, 2**16),
)
@example(lengths=[300, 1, 299, 2, 150, 151], kind="sasrec", seed=1)
@example(lengths=[300, 1, 299, 2, 150, 151], kind="bert4rec", seed=2)
@example(lengths=[1], kind="bert4rec", seed=3)
def test_packing_invariance(lengths: list[int], kind: str, seed: int) -> None:
    enc = ENCODERS[kind]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=seed)
    with torch.no_grad():
        diff = (enc(x, offsets) - _encode_alone(enc, x, offsets)).abs().max().item()
    log.info("%s packing %s: max abs diff %.3g", kind, lengths, diff)
    assert diff <= 1e-5, (lengths, diff)


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("lengths", [[5, 0, 4, 0], [0, 0], [0, 7], []])
def test_empty_segments(kind: str, lengths: list[int]) -> None:
    enc = ENCODERS[kind]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=0)
    with torch.no_grad():
        y = enc(x, offsets)
    assert y.shape == x.shape
    if sum(lengths):
        with torch.no_grad():
            assert (y - _encode_alone(enc, x, offsets)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_segments_are_isolated(kind: str) -> None:
    enc = ENCODERS[kind]
    lengths = [40, 3, 120, 1, 77]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=5)
    x2 = x.clone()
    s, e = offsets[2].item(), offsets[3].item()
    x2[s:e] = _randn(e - s, D, seed=6)
    with torch.no_grad():
        y, y2 = enc(x, offsets), enc(x2, offsets)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[s:e] = False
    diff = (y[keep] - y2[keep]).abs().max().item()
    log.info("%s isolation: max abs diff in other segments %.3g", kind, diff)
    assert diff <= 1e-6
    assert (y[s:e] - y2[s:e]).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("t,k", [(0, 1), (10, 5), (58, 1)])
def test_causality(kind: str, t: int, k: int) -> None:
    enc = SHARP[kind]
    lengths = [17, 60, 9]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=11)
    start = offsets[1].item()
    x2 = x.clone()
    x2[start + t + k] += _randn(D, seed=12)  # not a constant shift: the embedding LayerNorm would remove it
    with torch.no_grad():
        y, y2 = enc(x, offsets), enc(x2, offsets)
    past = (y[start : start + t + 1] - y2[start : start + t + 1]).abs().max().item()
    if kind == "sasrec":
        assert past <= 1e-6, past  # tokens <= t never see token t+k
        assert (y[start + t + k] - y2[start + t + k]).abs().max().item() > 1e-3
    else:
        assert past > 1e-3, past  # bidirectional: earlier tokens see the change


# --------------------------------------------------------------------------------------------- reference parity


def _reference_attention(qkv: torch.Tensor, offsets: torch.Tensor, n_heads: int, causal: bool) -> torch.Tensor:
    """Hand-written softmax attention, one segment at a time."""
    d = qkv.shape[1] // 3
    dh = d // n_heads
    outs = [qkv.new_zeros(0, d)]
    for s, e in itertools.pairwise(offsets.tolist()):
        L = e - s
        q, k, v = (t.view(L, n_heads, dh).transpose(0, 1) for t in qkv[s:e].split(d, dim=1))
        scores = q @ k.transpose(1, 2) / math.sqrt(dh)
        if causal:
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ v).transpose(0, 1).reshape(L, d))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "bucket_ratio,max_chunk_elems", [(0.0, 1 << 30), (0.5, 1 << 24), (1.0, 1 << 24), (0.5, 3000), (0.0, 1)]
)
def test_jagged_attention_matches_reference(causal: bool, bucket_ratio: float, max_chunk_elems: int) -> None:
    lengths = [1, 37, 0, 64, 5, 63, 2, 40, 39, 1]
    offsets = _offsets(lengths)
    qkv = _randn(sum(lengths), 3 * 32, seed=21)
    plan = JaggedAttentionPlan.build(
        offsets, sum(lengths), causal=causal, bucket_ratio=bucket_ratio, max_chunk_elems=max_chunk_elems
    )
    got = jagged_attention(qkv, plan, 4, causal=causal)
    ref = _reference_attention(qkv, offsets, 4, causal)
    diff = (got - ref).abs().max().item()
    log.info("attention causal=%s ratio=%s chunks=%d: max abs diff %.3g", causal, bucket_ratio, len(plan.chunks), diff)
    assert diff <= 1e-5


def _reference_encoder(enc: JaggedTransformerEncoder, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment loop with `nn.MultiheadAttention` holding the same weights (clamp position policy)."""
    d = enc.d_model
    outs = [values.new_zeros(0, d)]
    for s, e in itertools.pairwise(offsets.tolist()):
        L = e - s
        pos = torch.arange(L).clamp(max=enc.max_positions - 1)
        h = values[s:e] + enc.position_embedding.weight[pos]
        if enc.LayerNorm is not None:
            h = enc.LayerNorm(h)
        mask = torch.ones(L, L, dtype=torch.bool).triu(1) if enc.causal else None
        for blk in enc.layers:
            mha = nn.MultiheadAttention(d, blk.n_heads, batch_first=True)
            with torch.no_grad():
                mha.in_proj_weight.copy_(blk.qkv.weight)
                mha.in_proj_bias.copy_(blk.qkv.bias)
                mha.out_proj.weight.copy_(blk.out_proj.weight)
                mha.out_proj.bias.copy_(blk.out_proj.bias)
            a = mha(h[None], h[None], h[None], attn_mask=mask, need_weights=False)[0][0]
            h = blk.norm1(h + a)
            h = blk.norm2(h + blk.ffn_out(F.gelu(blk.ffn_in(h))))
        outs.append(h)
    return torch.cat(outs)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_encoder_matches_multihead_attention_reference(kind: str) -> None:
    enc = _sharpen(_make(kind, seed=4, n_layers=2, n_heads=4, max_positions=50))
    lengths = [60, 1, 0, 33, 7, 100]  # 60 and 100 run past max_positions=50 (clamped ids)
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=8)
    with torch.no_grad():
        diff = (enc(x, offsets) - _reference_encoder(enc, x, offsets)).abs().max().item()
    log.info("%s vs nn.MultiheadAttention reference: max abs diff %.3g", kind, diff)
    assert diff <= 1e-5


# ------------------------------------------------------------------------------------------ positions / bucketing


def test_position_policies() -> None:
    offsets = _offsets([3, 0, 6])
    clamp = _make("sasrec", max_positions=4).positions(offsets, 9).tolist()
    recent = _make("sasrec", max_positions=4, position_policy="recent").positions(offsets, 9).tolist()
    assert clamp == [0, 1, 2, 0, 1, 2, 3, 3, 3]
    assert recent == [0, 1, 2, 0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="position_policy"):
        SASRecEncoder(D, position_policy="truncate")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["clamp", "recent"])
def test_long_segments_are_not_truncated(policy: str) -> None:
    enc = _sharpen(_make("bert4rec", max_positions=8, position_policy=policy))
    lengths = [20, 3, 9]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=2)
    with torch.no_grad():
        y = enc(x, offsets)
        alone = _encode_alone(enc, x, offsets)
    assert y.shape == (32, D) and torch.isfinite(y).all()
    assert (y - alone).abs().max().item() <= 1e-5
    # Every token attends over its full segment: changing the oldest token moves the newest output.
    x2 = x.clone()
    x2[0] += _randn(D, seed=3)
    with torch.no_grad():
        assert (enc(x2, offsets)[19] - y[19]).abs().max().item() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_plan_bounds_padding_on_skewed_batch(causal: bool) -> None:
    lengths = [300] + [2] * 200 + [150, 149, 76, 75, 74, 0, 1]
    T = sum(lengths)
    offsets = _offsets(lengths)
    plan = JaggedAttentionPlan.build(offsets, T, causal=causal, bucket_ratio=0.5)
    per_batch = JaggedAttentionPlan.build(offsets, T, causal=causal, bucket_ratio=0.0, max_chunk_elems=1 << 40)
    ideal = sum(n * n for n in lengths)
    log.info(
        "skewed batch T=%d: padded %d (per-batch %d), pairs %d (per-batch %d, ideal %d)",
        T, plan.padded_tokens, per_batch.padded_tokens, plan.attention_pairs, per_batch.attention_pairs, ideal,
    )
    assert plan.padded_tokens <= 2 * T
    assert plan.attention_pairs <= 4 * ideal
    assert plan.attention_pairs * 10 < per_batch.attention_pairs
    assert per_batch.padded_tokens == 300 * (len(lengths) - 1)  # the empty segment takes no slot
    small = JaggedAttentionPlan.build(offsets, T, causal=causal, bucket_ratio=0.5, max_chunk_elems=20_000)
    assert all(c.n == 1 or c.n * c.length**2 <= 20_000 for c in small.chunks)
    assert sorted(small.inverse.tolist()) == sorted(set(small.inverse.tolist()))  # tokens map to distinct slots


@pytest.mark.parametrize(
    "offsets,T",
    [
        (torch.tensor([0, 3, 2], dtype=torch.int64), 2),
        (torch.tensor([1, 3], dtype=torch.int64), 3),
        (torch.tensor([0, 3], dtype=torch.int64), 4),
        (torch.tensor([0, 3], dtype=torch.int32), 3),
    ],
)
def test_invalid_offsets_raise(offsets: torch.Tensor, T: int) -> None:
    with pytest.raises(ValueError, match="offsets"):
        ENCODERS["sasrec"](torch.zeros(T, D), offsets)


def test_same_call_signature_as_bissd_encoder() -> None:
    want = list(inspect.signature(BiSSDEncoder.forward).parameters)
    for cls in CLASSES.values():
        assert list(inspect.signature(cls.forward).parameters) == want
        assert list(inspect.signature(cls.__init__).parameters)[:3] == ["self", "d_model", "n_layers"]


# ------------------------------------------------------------------------------------------ training behaviour


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    enc = CLASSES[kind](D, dropout=0.1).train()
    lengths = [12, 1, 30]
    x = _randn(sum(lengths), D, seed=3).requires_grad_(True)
    y = enc(x, _offsets(lengths))
    (y * _randn(*y.shape, seed=4)).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    enc = SASRecEncoder(D, dropout=0.3)
    x, offsets = _randn(20, D, seed=1), _offsets([8, 12])
    assert not torch.equal(enc.train()(x, offsets), enc(x, offsets))
    with torch.no_grad():
        assert torch.equal(enc.eval()(x, offsets), enc(x, offsets))


def _toy_batch(n_items: int, lengths: list[int], seed: int) -> torch.Tensor:
    """Sequences that walk +1 (mod n_items) from a random start: next item = current + 1."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_items, (len(lengths),), generator=g)
    return torch.cat([(s + torch.arange(n)) % n_items for s, n in zip(starts.tolist(), lengths)])


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_toy_training_reduces_loss(kind: str) -> None:
    """SASRec: next item at every position. BERT4Rec: cloze (masked items predicted from both sides)."""
    torch.manual_seed(0)
    n_items = 12
    mask_id = n_items
    emb = nn.Embedding(n_items + 1, D)
    enc = CLASSES[kind](D, n_layers=1, dropout=0.0, max_positions=32)
    opt = torch.optim.Adam([*emb.parameters(), *enc.parameters()], lr=1e-2)
    lengths = [9, 4, 16, 7, 12]
    offsets = _offsets(lengths)
    items = _toy_batch(n_items, lengths, seed=0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        if kind == "sasrec":
            out = enc(emb(items), offsets)
            last = torch.zeros_like(items, dtype=torch.bool)
            last[offsets[1:] - 1] = True  # no next item after a segment's last token
            idx = torch.nonzero(~last).squeeze(1)
            logits, target = out[idx] @ emb.weight[:n_items].T, items[idx + 1]
        else:
            masked = torch.rand(items.shape, generator=g) < 0.3
            masked[0] = True
            out = enc(emb(torch.where(masked, torch.full_like(items, mask_id), items)), offsets)
            logits, target = out[masked] @ emb.weight[:n_items].T, items[masked]
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    log.info("%s toy loss %.3f -> %.3f", kind, losses[0], losses[-1])
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_bf16_autocast(kind: str) -> None:
    torch.manual_seed(0)
    enc = _sharpen(CLASSES[kind](D, n_heads=2, dropout=0.1))
    lengths = [50, 3, 0, 120]
    offsets = _offsets(lengths)
    x = _randn(sum(lengths), D, seed=9).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = enc.train()(x, offsets)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in enc.parameters())
    enc.eval()
    with torch.no_grad():
        ref = enc(x, offsets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(x, offsets).float()
    diff = (low - ref).abs().max().item()
    log.info("%s bf16 autocast vs fp32: max abs diff %.3g", kind, diff)
    assert diff < 0.1
