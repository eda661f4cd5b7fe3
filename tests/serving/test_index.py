"""Item indexes: exact == brute force (ties, exclusion, chunking); FAISS flat == exact; HNSW recall@10."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ssd4rec_torchrec.bundle import BundleError, load_serving_bundle
from ssd4rec_torchrec.ops.topk import block_topk
from ssd4rec_torchrec.serving.index import ExactIndex, build_index, recall_at_k


def brute_topk(users: np.ndarray, items: np.ndarray, k: int, exclude: list[set[int]]) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy top-k: score desc, then item index asc; excluded items never listed (index 0, -inf)."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    n = items.shape[0]
    k = min(k, n)
    top_s, top_i = np.full((len(users), k), -np.inf), np.zeros((len(users), k), dtype=np.int64)
    for b, row in enumerate(scores):
        order = [j for j in np.lexsort((np.arange(n), -row)) if j + 1 not in exclude[b]][:k]
        top_s[b, : len(order)], top_i[b, : len(order)] = row[order], np.array(order, dtype=np.int64) + 1
    return top_s, top_i


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((2000, 16)).astype(np.float32)
    users = rng.standard_normal((100, 16)).astype(np.float32)
    exclude = [set(rng.integers(1, 2001, size=rng.integers(0, 40)).tolist()) for _ in range(100)]
    return items, users, exclude


@pytest.mark.parametrize("chunk", [None, 333])
def test_exact_equals_brute_force(data, chunk) -> None:
    items, users, exclude = data
    index = ExactIndex(items, chunk_items=chunk)
    for excl in (None, exclude):
        scores, got = index.search(torch.from_numpy(users), 10, excl)
        want_s, want_i = brute_topk(users, items, 10, excl or [set()] * len(users))
        np.testing.assert_array_equal(got, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-12, atol=1e-12)
        for b, row in enumerate(got):
            assert not set(row.tolist()) & (excl or [set()] * len(users))[b]


@pytest.mark.parametrize("chunk", [None, 97])
def test_exact_equals_evaluator_block_topk(chunk) -> None:
    """Same items and bit-identical scores as the offline evaluator's top-k, ties (duplicated rows) included."""
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(120, 8)).astype(np.float32) / 4  # small-integer vectors: many exact ties
    items = torch.from_numpy(np.concatenate([base, base[:60]]))
    users = torch.from_numpy(rng.integers(-3, 4, size=(40, 8)).astype(np.float32) / 4)
    exclude = [set(rng.integers(1, 181, size=rng.integers(0, 20)).tolist()) for _ in range(40)]
    hv = torch.tensor([i for e in exclude for i in sorted(e)], dtype=torch.long)
    ho = torch.tensor([0, *np.cumsum([len(e) for e in exclude])], dtype=torch.long)
    want_s, want_c = block_topk(users, items, 15, history_values=hv, history_offsets=ho)
    got_s, got_i = ExactIndex(items, chunk_items=chunk).search(users, 15, exclude)
    np.testing.assert_array_equal(got_i, want_c.numpy() + 1)
    np.testing.assert_array_equal(got_s, want_s.numpy())


def test_exact_ties_by_index_and_short_rows() -> None:
    items = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    index = ExactIndex(items)
    scores, got = index.search(np.array([[1.0, 0.0]], dtype=np.float32), 5)
    assert got.tolist() == [[2, 4, 1, 3, 5]]
    scores, got = index.search(np.array([[1.0, 0.0]], dtype=np.float32), 1000, [{2, 3, 4}])
    assert got.tolist() == [[1, 5, 0, 0, 0]] and np.isneginf(scores[0, 2:]).all()
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 2), dtype=np.float32), 0)


def test_flat_equals_exact(data) -> None:
    pytest.importorskip("faiss")
    items, users, exclude = data
    flat, exact = build_index("flat", items), ExactIndex(items)
    for excl in (None, exclude):
        fs, fi = flat.search(users, 10, excl)
        es, ei = exact.search(users, 10, excl)
        np.testing.assert_array_equal(fi, ei)
        np.testing.assert_allclose(fs, es, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall(data, kind, record_property) -> None:
    pytest.importorskip("faiss")
    items, users, exclude = data
    approx, exact = build_index(kind, items), ExactIndex(items)
    recall = recall_at_k(approx, exact, users, k=10)
    recall_excl = recall_at_k(approx, exact, users, k=10, exclude=exclude)
    record_property(f"{kind}_recall_at_10", recall)
    print(f"{kind} recall@10 vs exact: {recall:.3f} (with exclude_seen {recall_excl:.3f})")
    if kind == "hnsw":
        assert recall >= 0.9 and recall_excl >= 0.9
    _, got = approx.search(users, 10, exclude)
    for b, row in enumerate(got):  # exclusion is exact even when the search is not, and rows are full
        assert not set(row.tolist()) & exclude[b] and (row > 0).all()


def test_faiss_fills_rows_despite_large_exclusions(data) -> None:
    pytest.importorskip("faiss")
    items, users, _ = data
    keep = {5, 17, 1999}
    excl = [set(range(1, 2001)) - keep] * 3
    for kind in ("flat", "hnsw"):
        _, got = build_index(kind, items).search(users[:3], 10, excl)
        for row in got:
            assert set(row[:3].tolist()) == keep and (row[3:] == 0).all()


def test_recall_of_exact_is_one_and_unknown_kind(data) -> None:
    items, users, _ = data
    assert recall_at_k(ExactIndex(items), ExactIndex(items, chunk_items=100), users, k=10) == 1.0
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index("annoy", items)


def test_bundle_loader_checks(fake_bundle, tmp_path) -> None:
    bundle = load_serving_bundle(fake_bundle)
    assert bundle.item_vectors.shape == (bundle.num_items, bundle.d_model)
    assert bundle.item_vectors.dtype == torch.float32
    out = bundle.tower(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
    assert out.shape == (2, bundle.d_model)
    broken = tmp_path / "broken"
    shutil.copytree(fake_bundle, broken)
    data = bytearray((broken / "items_fp32.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "items_fp32.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_serving_bundle(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        load_serving_bundle(broken)
