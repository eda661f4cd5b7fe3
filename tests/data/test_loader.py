"""Training/eval batches against independent per-user slicing; KJT layout; rank sharding."""

from __future__ import annotations

import numpy as np
import pytest

from ssd4rec_torchrec.data.batches import FEATURES
from ssd4rec_torchrec.data.loader import LoaderSpec, NegativeSampler, TrainLoader, eval_batches
from ssd4rec_torchrec.data.preprocess import leave_one_out


def _split(seed=0, users=23, lo=3, hi=30, n_items=50):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, n_items + 1, size=offsets[-1]).astype(np.int32)
    return leave_one_out(offsets, items), offsets, items, n_items


def _unpack(batch):
    kjt = batch.features
    assert kjt.keys() == list(FEATURES)
    jt = kjt["history"]
    values, offsets = jt.values().numpy(), jt.offsets().numpy()
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def test_prefix_all_is_every_prefix_once():
    split, offsets, items, n = _split()
    loader = TrainLoader(split, n, LoaderSpec(objective="prefix", prefixes_per_user="all", batch_size=7), seed=1)
    seen = []
    for batch in loader.epoch(0):
        hists = _unpack(batch)
        targets = batch.targets.tolist()
        readout_values = batch.features["history"].values()[batch.readout].tolist()
        assert readout_values == [h[-1] for h in hists]  # read-out = each prefix's last token
        assert batch.features["target"].values().tolist() == targets
        assert len(batch.features["catalog"].values()) == n  # full softmax: the catalog rides along
        seen += [(tuple(h), t) for h, t in zip(hists, targets)]
    expected = []
    for u in range(len(offsets) - 1):
        train = items[offsets[u]:offsets[u + 1] - 2].tolist()
        expected += [(tuple(train[:c]), train[c]) for c in range(1, len(train))]
    assert sorted(seen) == sorted(expected)
    assert len(seen) == int((np.diff(offsets) - 3).sum())  # n - 3 examples per user


def test_prefix_sampled_max_history_and_corruption():
    split, offsets, _items, n = _split(seed=3, lo=10, hi=60)
    spec = LoaderSpec(objective="prefix", prefixes_per_user=3, max_history=5, corruption=0.3, batch_size=1000)
    loader = TrainLoader(split, n, spec, seed=2)
    (batch,) = list(loader.epoch(0))
    hists = _unpack(batch)
    assert len(hists) == 3 * (len(offsets) - 1) and max(len(h) for h in hists) <= 5
    zeros = sum(v == 0 for h in hists for v in h) / sum(len(h) for h in hists)
    assert 0.15 < zeros < 0.45  # ρ-corruption replaced ~30% by id 0
    assert (batch.targets > 0).all()  # targets are never corrupted
    again = next(iter(TrainLoader(split, n, spec, seed=2).epoch(0)))
    assert _unpack(again) == hists  # deterministic by seed


def test_cloze_masks_and_targets():
    split, offsets, items, n = _split(seed=4, lo=5, hi=40)
    spec = LoaderSpec(objective="cloze", mask_prob=0.3, p_last=1.0, batch_size=100)
    (batch,) = list(TrainLoader(split, n, spec, seed=5).epoch(0))
    hists = _unpack(batch)
    mask = n + 1
    flat = batch.features["history"].values()
    assert (flat[batch.readout] == mask).all()
    assert int((flat == mask).sum()) == len(batch.readout)
    users = batch.users.tolist()
    pos = 0
    t_iter = iter(batch.targets.tolist())
    for u, h in zip(users, hists):
        train = items[offsets[u]:offsets[u + 1] - 2].tolist()
        assert len(h) == len(train) and h[-1] == mask  # p_last = 1: the last item is always masked
        for j, v in enumerate(h):
            if v == mask:
                assert next(t_iter) == train[j]
            else:
                assert v == train[j]
        pos += len(h)
    assert batch.features["target"].lengths().tolist() == [sum(v == mask for v in h) for h in hists]


@pytest.mark.parametrize(("objective", "world", "batch"), [("prefix", 3, 16), ("prefix", 2, 7), ("cloze", 2, 4),
                                                           ("cloze", 3, 5)])
def test_examples_dealt_to_ranks_once_with_equal_steps_and_balanced_tokens(objective, world, batch):
    """Every example of the epoch goes to exactly one rank (none twice, only a last global batch too small
    to give each rank one example is left out), all ranks run the same number of steps, and the ranks'
    token counts in each step differ by at most the longest example of that step."""
    split, _offsets, _items, n = _split(seed=6, users=41)
    spec = LoaderSpec(objective=objective, prefixes_per_user="all", mask_prob=0.3, batch_size=batch)
    loaders = [TrainLoader(split, n, spec, seed=0, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(ld.epoch(0)) for ld in loaders]
    steps = loaders[0].steps_per_epoch()
    assert all(len(b) == steps for b in per_rank) and steps > 1
    train_len = np.diff(split.train_offsets)
    if objective == "prefix":  # one example per (user, prefix length); the history is that prefix
        every = {(u, c) for u in range(len(train_len)) for c in range(1, train_len[u])}
        seen = [(int(u), int(c)) for bs in per_rank for b in bs
                for u, c in zip(b.users.tolist(), b.features["history"].lengths().tolist(), strict=True)]
    else:
        every = {(u, 0) for u in range(len(train_len))}
        seen = [(int(u), 0) for bs in per_rank for b in bs for u in b.users.tolist()]
    assert len(seen) == len(set(seen)) and set(seen) <= every
    assert len(every) - len(seen) < world  # at most a too-small last global batch is left out
    for step in range(steps):
        batches = [bs[step] for bs in per_rank]
        tokens = [int(b.features["history"].lengths().sum()) for b in batches]
        longest = max(int(b.features["history"].lengths().max()) for b in batches)
        assert max(tokens) - min(tokens) <= longest
        if step < steps - 1:
            assert all(len(b.users) == batch for b in batches)


@pytest.mark.parametrize("objective", ["prefix", "cloze"])
def test_eval_batches_cover_every_user_once(objective):
    split, offsets, items, n = _split(seed=7, users=10)
    seen = {}
    for rank in range(3):
        batches = list(eval_batches(split, n, "test", objective=objective, batch_users=2, rank=rank, world_size=3))
        assert len(batches) == 2  # ceil(ceil(10/3)/2): same on every rank
        for b in batches:
            for u, w, h, t in zip(b.users.tolist(), b.weights.tolist(), _unpack(b), b.targets.tolist()):
                if w == 0:
                    continue
                seen[u] = (h, t)
    assert sorted(seen) == list(range(10))
    for u, (h, t) in seen.items():
        seq = items[offsets[u]:offsets[u + 1]].tolist()
        expected = seq[:-1] + ([n + 1] if objective == "cloze" else [])
        assert h == expected and t == seq[-1]


def test_negative_sampler_logq():
    counts = np.array([0, 100, 10, 1, 0, 0])  # pad, items 1..4, mask
    uni = NegativeSampler("uniform", 4, counts, num_negatives=8)
    ids, logq = uni.sample(np.random.default_rng(0))
    assert ids.min() >= 1 and ids.max() <= 4 and np.allclose(logq, np.log(8 / 4))
    pop = NegativeSampler("popularity", 4, counts, num_negatives=20000)
    ids, logq = pop.sample(np.random.default_rng(0))
    freq = np.bincount(ids, minlength=5)[1:] / 20000
    w = (counts[1:5] + 1.0) / (counts[1:5] + 1.0).sum()
    assert np.allclose(freq, w, atol=0.01)
    assert np.allclose(logq, np.log(w[ids - 1] * 20000), atol=1e-5)


def test_next_objective_predicts_every_successor():
    split, offsets, items, n = _split(seed=8, lo=4, hi=25)
    spec = LoaderSpec(objective="next", max_history=10, batch_size=1000)
    (batch,) = list(TrainLoader(split, n, spec, seed=0).epoch(0))
    hists = _unpack(batch)
    t_iter = iter(batch.targets.tolist())
    assert batch.readout.tolist() == list(range(sum(len(h) for h in hists)))  # every position is read out
    for u, h in zip(batch.users.tolist(), hists):
        train = items[offsets[u]:offsets[u + 1] - 2].tolist()[-11:]
        assert h == train[:-1]
        assert [next(t_iter) for _ in h] == train[1:]
