"""The service's synchronous core: request models, raw-id mapping, popularity fallback, and one packed tower
call plus index search per micro-batch (:class:`Recommender`). No HTTP here: ``service`` wraps it in FastAPI,
``reload`` builds and smoke-tests one per bundle.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..bundle import Bundle
from .index import ItemIndex

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_REPORTED_UNKNOWN = 50
# Most recent items a model trained on full histories (bundle max_history null) reads per request, unless
# --max-history says otherwise: the linear-cost encoder takes long histories, the request body bounds them anyway.
FULL_HISTORY_CAP = 4096
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")

RawId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | Annotated[str, StringConstraints(max_length=256)]


class RecommendRequest(BaseModel):
    """``{"history": [raw ids, oldest first], "k": 10, "exclude_seen": true}`` (strict types, no extra keys)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    history: list[RawId]
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


@dataclass
class Prepared:
    """A validated request mapped to item indices, ready for the tower."""

    history: list[int]  # known item indices fed to the tower (truncated, oldest first)
    exclude: set[int]
    k: int
    warnings: list[str] = field(default_factory=list)
    unknown: list[Any] = field(default_factory=list)
    truncated: bool = False


class Recommender:
    """The synchronous core: raw-id mapping, popularity fallback, packed tower call + index search."""

    def __init__(self, bundle: Bundle, index: ItemIndex, max_history: int | None = None) -> None:
        if index.num_items != bundle.num_items:
            raise ValueError(f"index has {index.num_items} items, bundle {bundle.num_items}")
        self.bundle, self.index = bundle, index
        self.max_history_option = max_history
        self.max_history = int(max_history or bundle.max_history or FULL_HISTORY_CAP)
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if bundle.max_history is not None and self.max_history > bundle.max_history:
            log.warning("max_history %d exceeds the bundle's %d (the model was not trained on such lengths)",
                        self.max_history, bundle.max_history)
        ids = bundle.item_ids
        self.int_ids = bool(np.issubdtype(ids.dtype, np.integer))
        raw = ids.tolist()
        self.raw_ids: list[Any] = raw
        self.lookup: dict[Any, int] = {r: i + 1 for i, r in enumerate(raw)}
        pop = bundle.popularity
        self.popularity_order = np.lexsort((np.arange(len(pop)), -pop)) + 1  # count desc, index asc
        self.popularity = pop
        self.tower_calls = 0
        self.tower_histories = 0

    def item_index(self, raw: Any) -> int | None:
        """Item index of a raw id from JSON, or None when unknown."""
        if self.int_ids:
            if isinstance(raw, str):
                if not _DECIMAL.fullmatch(raw):
                    return None
                raw = int(raw)
            return self.lookup.get(raw)
        return self.lookup.get(raw if isinstance(raw, str) else str(raw))

    def prepare(self, req: RecommendRequest) -> Prepared:
        known, unknown = [], []
        for raw in req.history:
            idx = self.item_index(raw)
            (unknown if idx is None else known).append(raw if idx is None else idx)
        p = Prepared(history=known[-self.max_history :], exclude=set(known) if req.exclude_seen else set(),
                     k=req.k, unknown=unknown[:MAX_REPORTED_UNKNOWN])
        if unknown:
            shown = ", ".join(json.dumps(u) for u in unknown[:MAX_REPORTED_UNKNOWN])
            more = f" (and {len(unknown) - MAX_REPORTED_UNKNOWN} more)" if len(unknown) > MAX_REPORTED_UNKNOWN else ""
            p.warnings.append(f"{len(unknown)} unknown item id(s) skipped: {shown}{more}")
        if len(known) > self.max_history:
            p.truncated = True
            p.warnings.append(f"history of {len(known)} known items truncated to the most recent {self.max_history}")
        if not known:
            p.warnings.append("no known item in the history: popularity fallback")
        return p

    def _popular(self, p: Prepared) -> list[tuple[int, float]]:
        out = []
        for idx in self.popularity_order:
            if int(idx) not in p.exclude:
                out.append((int(idx), float(self.popularity[idx - 1])))
                if len(out) == p.k:
                    break
        return out

    @torch.inference_mode()
    def user_vectors(self, histories: Sequence[list[int]]) -> torch.Tensor:
        """ONE packed tower call for all histories: (B, d) float32."""
        values = torch.tensor([i for h in histories for i in h], dtype=torch.long)
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        self.tower_calls += 1
        self.tower_histories += len(histories)
        return self.bundle.tower(values, offsets).float()

    def run_batch(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Responses for a batch of prepared requests (one tower call for all those with a history)."""
        ranked: list[list[tuple[int, float]]] = [[] for _ in batch]
        modeled = [j for j, p in enumerate(batch) if p.history]
        if modeled:
            vectors = self.user_vectors([batch[j].history for j in modeled])
            kmax = max(batch[j].k for j in modeled)
            scores, items = self.index.search(vectors, kmax, [batch[j].exclude for j in modeled])
            for row, j in enumerate(modeled):
                ranked[j] = [(int(i), float(s)) for i, s in zip(items[row, : batch[j].k], scores[row, : batch[j].k])
                             if i > 0 and not math.isinf(s)]
        out = []
        for j, p in enumerate(batch):
            fallback = not p.history
            pairs = self._popular(p) if fallback else ranked[j]
            out.append({
                "items": [{"item_id": self.raw_ids[i - 1], "score": s} for i, s in pairs],
                "warnings": p.warnings,
                "fallback": "popularity" if fallback else None,
                "truncated": p.truncated,
                "unknown_item_ids": p.unknown,
            })
        return out

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Synchronous, unbatched path (tests, offline use)."""
        return self.run_batch([self.prepare(r) for r in requests])


__all__ = ["FULL_HISTORY_CAP", "MAX_K", "Prepared", "RecommendRequest", "Recommender"]
