"""Item indexes over a bundle's item vectors: exact (canonical top-k) and FAISS (flat, HNSW, IVF).

All indexes answer ``search(user_vectors (B, d), k, exclude) -> (scores (B, k') float64, items (B, k') int64)``
with 1-based item indices (row ``i`` of the item vectors is item ``i + 1``), best first, ``k' = min(k,
num_items)``. ``exclude[b]`` is a set of item indices never returned for user ``b`` (``exclude_seen``);
rows with fewer than ``k'`` eligible items end in item 0 with score ``-inf``.

``ExactIndex`` ranks by the evaluator's canonical float64 scores (``ops.topk.block_topk``: fp32 matmul
chunked over items, near-ties re-scored in a fixed summation order; ties by item index ascending), so a
result never depends on the batch it was computed in and equals the offline evaluator's top-k.
The FAISS indexes score in float32; the approximate ones (HNSW, IVF) over-fetch to make room for excluded
items and are measured against exact with ``recall_at_k``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops.canonical import canonical_scores
from ..ops.segments import offsets_from_lengths

log = logging.getLogger(__name__)

INDEX_KINDS = ("exact", "flat", "hnsw", "ivf")


def _as_tensor(user_vectors: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(user_vectors)
    if t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"user_vectors must be a 2-D float array, got {tuple(t.shape)} {t.dtype}")
    return t.float()


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _check_exclude(exclude: Sequence[set[int]] | None, batch: int) -> list[set[int]]:
    if exclude is None:
        return [set() for _ in range(batch)]
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} sets for {batch} users")
    return [set(e) for e in exclude]


class ItemIndex(ABC):
    """Top-k inner-product search over ``item_vectors`` (num_items, d)."""

    kind: str = ""

    def __init__(self, item_vectors: Tensor | np.ndarray) -> None:
        vectors = torch.as_tensor(item_vectors)
        if vectors.dim() != 2 or vectors.shape[0] < 1 or not vectors.dtype.is_floating_point:
            raise ValueError(f"item_vectors must be a non-empty 2-D float array, got {tuple(vectors.shape)}")
        self.item_vectors = vectors.float().contiguous()
        self.num_items, self.dim = int(vectors.shape[0]), int(vectors.shape[1])

    @abstractmethod
    def search(self, user_vectors: Tensor | np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (B, k') float64, items (B, k') int64)``, 1-based items, best first (see module doc)."""


class ExactIndex(ItemIndex):
    """Exact top-k under the evaluator's canonical float64 scores (``ops.canonical.canonical_scores``).

    Per chunk of items: a float64 matmul, its k-th best score per user, and every item within the matmul's
    rounding bound of it re-scored canonically; only those candidates are sorted (score desc, index asc).
    Equals ``ops.topk.block_topk`` (test), without sorting whole score rows.
    """

    kind = "exact"
    SCORE_BUDGET_BYTES = 1 << 25  # float64 scores of one chunk (users x items)

    def __init__(self, item_vectors: Tensor | np.ndarray, chunk_items: int | None = None) -> None:
        super().__init__(item_vectors)
        self.chunk_items = chunk_items
        self.items64 = self.item_vectors.double()
        self.max_norm = float(torch.linalg.vector_norm(self.items64, dim=1).max())

    def search(self, user_vectors: Tensor | np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        users = _as_tensor(user_vectors)
        k, batch = min(_check_k(k), self.num_items), users.shape[0]
        sets = _check_exclude(exclude, batch)
        out_scores, out_items = np.full((batch, k), -math.inf), np.zeros((batch, k), dtype=np.int64)
        if batch == 0:
            return out_scores, out_items
        if not bool(torch.isfinite(users).all()):
            raise ValueError("user vectors contain NaN or inf")
        users64 = users.double()
        # |float64 matmul - canonical| <= 2 gamma_d |u| |i| (both sums of exactly representable fp32 products)
        dim = self.dim
        margin = (8.0 * (dim + 2) * 2.0**-53 * self.max_norm) * torch.linalg.vector_norm(users64, dim=1, keepdim=True)
        ex_rows = torch.tensor([b for b, e in enumerate(sets) for i in e if 1 <= i <= self.num_items], dtype=torch.long)
        ex_cols = torch.tensor([i - 1 for e in sets for i in e if 1 <= i <= self.num_items], dtype=torch.long)
        chunk = self.chunk_items or max(1024, self.SCORE_BUDGET_BYTES // (8 * batch))
        rows_all, cols_all = [], []
        for lo in range(0, self.num_items, chunk):
            hi = min(lo + chunk, self.num_items)
            fast = users64 @ self.items64[lo:hi].T
            inside = (ex_cols >= lo) & (ex_cols < hi)
            fast[ex_rows[inside], ex_cols[inside] - lo] = -math.inf
            kth = torch.topk(fast, min(k, hi - lo), dim=1).values[:, -1:]
            rows, cols = ((fast >= kth - margin) & (fast > -math.inf)).nonzero(as_tuple=True)
            rows_all.append(rows)
            cols_all.append(cols + lo)
        rows, cols = torch.cat(rows_all), torch.cat(cols_all)
        if rows.numel() == 0:
            return out_scores, out_items
        uniq, inverse = torch.unique(cols, return_inverse=True)
        scores = canonical_scores(users, self.item_vectors[uniq], rows, inverse).numpy()
        rows_np, cols_np = rows.numpy(), cols.numpy()
        order = np.lexsort((cols_np, -scores, rows_np))  # by user, then score desc, then index asc
        rows_np, cols_np, scores = rows_np[order], cols_np[order], scores[order]
        starts = np.searchsorted(rows_np, np.arange(batch))
        rank = np.arange(len(rows_np)) - starts[rows_np]
        keep = rank < k
        out_scores[rows_np[keep], rank[keep]] = scores[keep]
        out_items[rows_np[keep], rank[keep]] = cols_np[keep] + 1
        return out_scores, out_items


class _FaissIndex(ItemIndex):
    """Shared FAISS search: over-fetch by the largest exclusion, filter, widen until each row is full."""

    def __init__(self, item_vectors: Tensor | np.ndarray) -> None:
        super().__init__(item_vectors)
        import faiss

        self.faiss = faiss
        self.index = self._build(np.ascontiguousarray(self.item_vectors.numpy(), dtype=np.float32))

    @abstractmethod
    def _build(self, vectors: np.ndarray):  # -> faiss.Index
        ...

    def _prepare(self, fetch: int) -> None:
        """Per-search tuning before fetching ``fetch`` neighbours (e.g. HNSW efSearch)."""

    def search(self, user_vectors: Tensor | np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        users = np.ascontiguousarray(_as_tensor(user_vectors).numpy(), dtype=np.float32)
        k, batch = min(_check_k(k), self.num_items), users.shape[0]
        sets = _check_exclude(exclude, batch)
        out_scores = np.full((batch, k), -math.inf)
        out_items = np.zeros((batch, k), dtype=np.int64)
        todo = np.arange(batch)
        fetch = min(self.num_items, k + max((len(s) for s in sets), default=0))
        while len(todo):
            self._prepare(fetch)
            dist, labels = self.index.search(users[todo], fetch)
            again = []
            for row, b in enumerate(todo):
                keep = [(float(s), int(i) + 1) for s, i in zip(dist[row], labels[row])
                        if i >= 0 and int(i) + 1 not in sets[b]][:k]
                eligible = self.num_items - sum(1 for i in sets[b] if 1 <= i <= self.num_items)
                if len(keep) < min(k, eligible) and fetch < self.num_items:
                    again.append(b)
                    continue
                for j, (s, i) in enumerate(keep):
                    out_scores[b, j], out_items[b, j] = s, i
            todo = np.array(again, dtype=np.int64)
            fetch = min(self.num_items, 2 * fetch)
        return out_scores, out_items


class FaissFlatIndex(_FaissIndex):
    """FAISS exact inner product (``IndexFlatIP``, float32 scores)."""

    kind = "flat"

    def _build(self, vectors: np.ndarray):
        index = self.faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index


class FaissHNSWIndex(_FaissIndex):
    """FAISS HNSW graph (``IndexHNSWFlat``, inner product); approximate."""

    kind = "hnsw"

    def __init__(self, item_vectors: Tensor | np.ndarray, m: int = 32, ef_construction: int = 200,
                 ef_search: int = 128) -> None:
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        super().__init__(item_vectors)

    def _build(self, vectors: np.ndarray):
        index = self.faiss.IndexHNSWFlat(vectors.shape[1], self.m, self.faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.add(vectors)
        return index

    def _prepare(self, fetch: int) -> None:
        self.index.hnsw.efSearch = max(self.ef_search, fetch)


class FaissIVFIndex(_FaissIndex):
    """FAISS inverted lists (``IndexIVFFlat``, inner product, ``nprobe`` of ``nlist`` cells); approximate."""

    kind = "ivf"

    def __init__(self, item_vectors: Tensor | np.ndarray, nlist: int | None = None, nprobe: int = 16) -> None:
        n = torch.as_tensor(item_vectors).shape[0]
        self.nlist = nlist or max(1, min(4096, int(math.sqrt(n))))
        self.nprobe = nprobe
        super().__init__(item_vectors)

    def _build(self, vectors: np.ndarray):
        quantizer = self.faiss.IndexFlatIP(vectors.shape[1])
        index = self.faiss.IndexIVFFlat(quantizer, vectors.shape[1], self.nlist, self.faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        index.nprobe = min(self.nprobe, self.nlist)
        self._quantizer = quantizer  # kept alive with the index
        return index


def build_index(kind: str, item_vectors: Tensor | np.ndarray, **options) -> ItemIndex:
    """``exact`` | ``flat`` | ``hnsw`` | ``ivf`` index over ``item_vectors``."""
    classes = {"exact": ExactIndex, "flat": FaissFlatIndex, "hnsw": FaissHNSWIndex, "ivf": FaissIVFIndex}
    if kind not in classes:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    index = classes[kind](item_vectors, **options)
    log.info("built %s index over %d items (d=%d)", kind, index.num_items, index.dim)
    return index


def recall_at_k(approx: ItemIndex, exact: ItemIndex, queries: Tensor | np.ndarray, k: int = 10,
                exclude: Sequence[set[int]] | None = None) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|."""
    _, a = approx.search(queries, k, exclude)
    _, e = exact.search(queries, k, exclude)
    hits, total = 0, 0
    for ra, re_ in zip(a, e):
        truth = {int(i) for i in re_ if i > 0}
        hits += len(truth & {int(i) for i in ra if i > 0})
        total += len(truth)
    return hits / total if total else 1.0


__all__ = ["INDEX_KINDS", "ExactIndex", "FaissFlatIndex", "FaissHNSWIndex", "FaissIVFIndex", "ItemIndex",
           "build_index", "recall_at_k"]


def _queries(args) -> tuple[Tensor, Tensor]:
    """(item vectors, query vectors): a bundle's items and its tower on random popularity-weighted histories,
    or random Gaussian items and queries."""
    gen = np.random.default_rng(args.seed)
    if args.bundle:
        from ..bundle import load_serving_bundle

        bundle = load_serving_bundle(args.bundle)
        p = bundle.popularity + 1.0
        lengths = gen.integers(1, (bundle.max_history or 200) + 1, size=args.queries)
        values = torch.from_numpy(gen.choice(bundle.num_items, size=int(lengths.sum()), p=p / p.sum()) + 1)
        offsets = offsets_from_lengths(torch.from_numpy(lengths))
        with torch.inference_mode():
            return bundle.item_vectors, bundle.tower(values, offsets).float()
    n, d = args.random
    items = torch.from_numpy(gen.standard_normal((n, d)).astype(np.float32))
    return items, torch.from_numpy(gen.standard_normal((args.queries, d)).astype(np.float32))


def main(argv: list[str] | None = None) -> None:
    """Recall@k of the approximate indexes against exact, and search time, on a bundle or random vectors."""
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle directory: its items, queries from its tower")
    src.add_argument("--random", type=int, nargs=2, metavar=("N", "D"), help="N random items of dimension D")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"], choices=INDEX_KINDS)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="queries per search call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    items, queries = _queries(args)

    def timed_search(index: ItemIndex) -> tuple[np.ndarray, float]:
        t0, found = time.perf_counter(), []
        for lo in range(0, len(queries), args.batch):
            found.append(index.search(queries[lo : lo + args.batch], args.k)[1])
        return np.concatenate(found), (time.perf_counter() - t0) / len(queries)

    t0 = time.perf_counter()
    exact = ExactIndex(items)
    truth, exact_s = timed_search(exact)
    rows = [{"kind": "exact", "recall": 1.0, "build_s": round(time.perf_counter() - t0 - exact_s * len(queries), 3),
             "ms_per_query": round(1000 * exact_s, 4)}]
    for kind in args.kinds:
        t0 = time.perf_counter()
        index = build_index(kind, items)
        build = time.perf_counter() - t0
        found, per_query = timed_search(index)
        hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found, truth))
        rows.append({"kind": kind, "recall": round(hits / truth.size, 4), "build_s": round(build, 3),
                     "ms_per_query": round(1000 * per_query, 4)})
    print(json.dumps({"num_items": items.shape[0], "d": items.shape[1], "queries": len(queries), "k": args.k,
                      "batch": args.batch, "results": rows}, indent=2))


if __name__ == "__main__":
    main()

