"""Item indexes over a bundle's item vectors: exact (canonical top-k) and FAISS (flat, HNSW, IVF).

All indexes answer ``search(user_vectors (B, d), k, exclude) -> (scores (B, k') float64, items (B, k') int64)``
with 1-based item indices (row ``i`` of the item vectors is item ``i + 1``), best first, ``k' = min(k,
num_items)``. ``exclude[b]`` is a set of item indices never returned for user ``b`` (``exclude_seen``);
rows with fewer than ``k'`` eligible items end in item 0 with score ``-inf``.

``ExactIndex`` ranks by the evaluator's canonical float64 scores (``eval.metrics.block_topk``: fp32 matmul
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
    """Exact top-k under canonical float64 scores, scored in chunks of ``chunk_items`` items."""

    kind = "exact"

    def __init__(self, item_vectors: Tensor | np.ndarray, chunk_items: int | None = 65536) -> None:
        super().__init__(item_vectors)
        self.chunk_items = chunk_items

    def search(self, user_vectors: Tensor | np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        from ..eval.metrics import block_topk

        users = _as_tensor(user_vectors)
        k, batch = min(_check_k(k), self.num_items), users.shape[0]
        sets = _check_exclude(exclude, batch)
        if batch == 0:
            return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
        values = torch.tensor([i for s in sets for i in sorted(s) if 1 <= i <= self.num_items], dtype=torch.long)
        counts = torch.tensor([sum(1 for i in s if 1 <= i <= self.num_items) for s in sets], dtype=torch.long)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        chunk = self.chunk_items if self.chunk_items and self.chunk_items < self.num_items else None
        scores, cols = block_topk(users, self.item_vectors, k, history_values=values, history_offsets=offsets,
                                  chunk_items=chunk)
        scores, items = scores.numpy(), cols.numpy() + 1
        items[np.isneginf(scores)] = 0  # excluded items fill in only when too few others are left
        return scores, items


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
