"""Preprocessing, artifacts, leave-one-out and the synthetic generator against independent references."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd4rec_torchrec.data import (
    PreprocessParams,
    RawInteractions,
    SequenceDataset,
    SyntheticConfig,
    build_sequences,
    generate_synthetic,
    k_core,
    leave_one_out,
    prepare,
    store,
    synthetic_checksum,
)

REPO = Path(__file__).resolve().parents[2]


def naive_k_core(rows, user_k, item_k):
    """Reference: recount on the surviving rows until nothing changes (plain Python)."""
    rows = list(rows)
    while True:
        uc = Counter(r[0] for r in rows)
        ic = Counter(r[1] for r in rows)
        kept = [r for r in rows if uc[r[0]] >= user_k and ic[r[1]] >= item_k]
        if len(kept) == len(rows):
            return kept
        rows = kept


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 15)), min_size=0, max_size=300),
       st.integers(1, 6), st.integers(1, 6))
def test_k_core_matches_naive(pairs, user_k, item_k):
    u = np.array([p[0] for p in pairs], dtype=np.int64)
    i = np.array([p[1] for p in pairs], dtype=np.int64)
    keep, _ = k_core(u, i, user_k, item_k) if len(pairs) else (np.zeros(0, bool), 0)
    expected = naive_k_core([(a, b, n) for n, (a, b) in enumerate(pairs)], user_k, item_k)
    assert sorted(np.flatnonzero(keep).tolist()) == [r[2] for r in expected]


def _raw(user, item, ts, source="mem"):
    user, item, ts = (np.asarray(x, dtype=np.int64) for x in (user, item, ts))
    return RawInteractions(user=user, item=item, timestamp=ts, user_ids=np.arange(user.max() + 1) * 10,
                           item_ids=np.arange(item.max() + 1) + 1000, source=source, checksum="x")


def test_sequences_are_stable_chronological_and_reindexed():
    rng = np.random.default_rng(1)
    n = 4000
    user = rng.integers(0, 40, n)
    item = rng.integers(0, 60, n)
    ts = rng.integers(0, 30, n)  # many ties
    seqs = build_sequences(_raw(user, item, ts), PreprocessParams(user_k=3, item_k=3))
    # independent reference: per user, python's stable sort on timestamp of the original rows
    keep_rows = naive_k_core([(u, i, r) for r, (u, i) in enumerate(zip(user, item))], 3, 3)
    kept = {r[2] for r in keep_rows}
    by_user = defaultdict(list)
    for r in range(n):
        if r in kept:
            by_user[int(user[r])].append(r)
    items_sorted = sorted({int(item[r]) for r in kept})
    index_of = {code: k + 1 for k, code in enumerate(items_sorted)}
    assert seqs.user_ids.tolist() == [u * 10 for u in sorted(by_user)]
    assert seqs.item_ids.tolist() == [c + 1000 for c in items_sorted]
    for ui, u in enumerate(sorted(by_user)):
        rows = sorted(by_user[u], key=lambda r: ts[r])  # stable: ties keep row order
        got = seqs.items[seqs.offsets[ui]:seqs.offsets[ui + 1]].tolist()
        assert got == [index_of[int(item[r])] for r in rows]
        assert seqs.timestamps[seqs.offsets[ui]:seqs.offsets[ui + 1]].tolist() == [int(ts[r]) for r in rows]
    assert seqs.items.dtype == np.int32 and seqs.items.min() >= 1 and seqs.items.max() == len(items_sorted)


def test_leave_one_out_matches_slicing():
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 20, size=50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, 100, size=offsets[-1]).astype(np.int32)
    loo = leave_one_out(offsets, items)
    for u in range(len(lengths)):
        seq = items[offsets[u]:offsets[u + 1]].tolist()
        assert loo.train_items[loo.train_offsets[u]:loo.train_offsets[u + 1]].tolist() == seq[:-2]
        assert loo.test_items[loo.test_offsets[u]:loo.test_offsets[u + 1]].tolist() == seq[:-1]
        assert loo.valid_targets[u] == seq[-2] and loo.test_targets[u] == seq[-1]
    with pytest.raises(ValueError, match="needs >= 3"):
        leave_one_out(np.array([0, 2]), items[:2])


def test_cache_hit_new_params_new_artifact_and_memmap(tmp_path):
    cfg = SyntheticConfig(num_users=300, num_items=500, num_clusters=10, seed=3)
    a = prepare("synthetic", synthetic=cfg, root=tmp_path)
    stamp = (a.root / "manifest.json").stat().st_mtime_ns
    b = prepare("synthetic", synthetic=cfg, root=tmp_path)
    assert b.root == a.root and (b.root / "manifest.json").stat().st_mtime_ns == stamp
    c = prepare("synthetic", synthetic=cfg, root=tmp_path, params=PreprocessParams(user_k=10))
    d = prepare("synthetic", synthetic=SyntheticConfig(num_users=300, num_items=500, num_clusters=10, seed=4),
                root=tmp_path)
    assert len({a.root, c.root, d.root}) == 3
    assert isinstance(b.items, np.memmap) and not b.items.flags.writeable
    m = json.loads((a.root / "manifest.json").read_text())
    assert m["format_version"] == store.FORMAT_VERSION and m["source"]["checksum_sha256"] == synthetic_checksum(cfg)
    assert m["params"]["preprocess"] == {"user_k": 5, "item_k": 5, "duplicates": "keep"}
    assert m["reserved_ids"] == {"pad": 0, "first_item": 1, "mask": a.num_items + 1, "table_rows": a.num_items + 2}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # raw ids round-trip through the serving map
    np.testing.assert_array_equal(a.item_index_of(a.item_ids[[0, 5, 7]]), [1, 6, 8])
    assert a.item_index_of([-12345]).tolist() == [0]


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store.np, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        prepare("synthetic", synthetic=SyntheticConfig(num_users=200, num_items=300, num_clusters=5), root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(store.np, "save", real_save)
    ds = prepare("synthetic", synthetic=SyntheticConfig(num_users=200, num_items=300, num_clusters=5), root=tmp_path)
    assert ds.num_interactions > 0


def test_synthetic_deterministic_heavy_tailed_and_huge_ids(tmp_path):
    cfg = SyntheticConfig(num_users=3000, num_items=100_000_000, num_clusters=1000, mean_length=30,
                          max_length=20_000, length_alpha=1.3, seed=7, chunk_users=700)
    a = generate_synthetic(cfg, tmp_path / "a")
    b = generate_synthetic(cfg, tmp_path / "b")
    for x, y in [(a.user, b.user), (a.item, b.item), (a.timestamp, b.timestamp)]:
        np.testing.assert_array_equal(x, y)
    c = generate_synthetic(SyntheticConfig(**{**cfg.__dict__, "seed": 8}), tmp_path / "c")
    assert not np.array_equal(a.item[:1000], c.item[:1000])
    lengths = np.bincount(a.user)
    assert lengths.min() >= cfg.min_length and lengths.max() <= cfg.max_length
    assert lengths.max() > 20 * np.median(lengths)  # heavy tail
    assert a.item.min() >= 0 and a.item.max() < 10**8 and a.item.max() > 10**7  # ids span a 1e8 catalog
    ts = np.asarray(a.timestamp)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    inc = np.diff(ts) > 0
    inc[starts[1:] - 1] = True
    assert inc.all()  # strictly increasing within each user


def test_synthetic_structure_beats_popularity(tmp_path):
    """A first-order predictor (most frequent successor of the last item's cluster) must clearly beat
    global popularity on leave-one-out HR@10: the structure is learnable by a sequence model."""
    cfg = SyntheticConfig(num_users=4000, num_items=5000, num_clusters=50, seed=11)
    ds = prepare("synthetic", synthetic=cfg, root=tmp_path)
    loo = ds.leave_one_out()
    n_items = ds.num_items
    train_counts = np.bincount(loo.train_items, minlength=n_items + 1)
    top_pop = np.argsort(-train_counts[1:], kind="stable")[:10] + 1
    # transition counts item -> next item over training histories (independent, simple estimator)
    t_off, t_items = loo.train_offsets, loo.train_items
    prev = np.concatenate([t_items[t_off[u]:t_off[u + 1] - 1] for u in range(ds.num_users)])
    nxt = np.concatenate([t_items[t_off[u] + 1:t_off[u + 1]] for u in range(ds.num_users)])
    trans = defaultdict(Counter)
    for p_, n_ in zip(prev.tolist(), nxt.tolist()):
        trans[p_][n_] += 1
    hits_pop = hits_seq = 0
    for u in range(ds.num_users):
        last = int(loo.test_items[loo.test_offsets[u + 1] - 1])
        target = int(loo.test_targets[u])
        cand = [i for i, _ in trans[last].most_common(10)] or top_pop.tolist()
        hits_seq += target in cand
        hits_pop += target in top_pop
    hr_pop, hr_seq = hits_pop / ds.num_users, hits_seq / ds.num_users
    assert hr_seq > 1.5 * hr_pop and hr_seq - hr_pop > 0.02, (hr_seq, hr_pop)


@pytest.mark.realdata
def test_ml1m_real_stats():
    ds = prepare("ml-1m")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6040, 3416, 999_611)
    assert ds.stats["max_length"] == 2277 and ds.stats["raw_rows"] == 1_000_209
    loo = ds.leave_one_out()
    assert len(loo.train_items) == 999_611 - 2 * 6040
    # prefix augmentation: n-3 training examples per user (the official code's 981,491)
    assert int((ds.lengths - 3).sum()) == 981_491
    assert ds.item_titles is not None and ds.item_titles[0] == "Toy Story (1995)"


@pytest.mark.realdata
def test_ml100k_real_stats():
    ds = prepare("ml-100k")
    assert (ds.num_users, ds.stats["raw_rows"]) == (943, 100_000)
    assert (ds.num_items, ds.num_interactions) == (1349, 99_287)


def test_cli_json_and_bad_value(tmp_path):
    cmd = [sys.executable, str(REPO / "apps" / "prepare_data.py"), "--cache-dir", str(tmp_path)]
    out = subprocess.run(cmd + ["--dataset", "synthetic", "--synthetic-users", "200", "--synthetic-items", "400",
                                "--synthetic-clusters", "8", "--json"], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    assert {"users", "items", "interactions"} <= stats.keys()
    ds = SequenceDataset.open(stats["path"])
    assert stats["interactions"] == ds.num_interactions == int(ds.offsets[-1])
    bad = subprocess.run(cmd + ["--dataset", "synthetic", "--synthetic-items", "-5"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "prepare_data: error: synthetic: invalid num_items=-5"
    help_ = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--dataset" in help_.stdout


def test_float32_time_key_orders_like_recbole():
    """time_key=float32: events sort on float32(timestamp) (RecBole 1.x's FloatTensor), ties in row order.

    Near 2**29 float32 values are 64 apart, so 536870913 and 536870940 share one key and keep their row order,
    while the exact key puts the earlier second first."""
    base = 2**29  # exactly representable; base + 1 .. base + 31 round down to it, base + 33 .. up to base + 64
    user = [0] * 5 + [1] * 5
    item = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    ts = [base + 40, base + 30, base + 1, base + 70, base + 200,
          base + 5, base + 3, base + 100, base + 99, base + 2]
    assert np.float32(base + 30) == np.float32(base + 1) == np.float32(base)
    assert np.float32(base + 40) == np.float32(base + 70) == np.float32(base + 64)
    exact = build_sequences(_raw(user, item, ts), PreprocessParams(user_k=1, item_k=1))
    rounded = build_sequences(_raw(user, item, ts), PreprocessParams(user_k=1, item_k=1, time_key="float32"))
    # items keep their codes (1..5 -> indices 1..5); python's stable sort on each key is the reference
    for seqs, key in ((exact, lambda t: t), (rounded, lambda t: float(np.float32(t)))):
        for u in (0, 1):
            rows = [r for r in range(10) if user[r] == u]
            want = [item[r] for r in sorted(rows, key=lambda r: key(ts[r]))]
            got = seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]].tolist()
            assert got == want
    assert exact.items[:5].tolist() != rounded.items[:5].tolist()
    with pytest.raises(ValueError, match="time_key"):
        PreprocessParams(time_key="float16")
