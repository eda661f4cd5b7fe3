"""Loading a bundle for the service, and hot reload: load beside the live model, check, then swap.

A candidate bundle is loaded in a separate thread (the tower thread keeps serving), its files are verified
against the manifest's sha256, its ``d_model`` must equal the live one's, and a smoke query must pass: a few
histories of popular items go through the new tower packed in one call and one by one (finite vectors of
shape (B, d), packed == single within ``SMOKE_TOL``), then through the index and the full response path.
Only then is it swapped in (one reference assignment in the event loop); requests already queued keep the
recommender they were prepared with, so they finish on the model they started with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bundle import BundleError, load_serving_bundle
from .index import build_index
from .recommender import Prepared, Recommender

log = logging.getLogger(__name__)

SMOKE_TOL = 1e-4  # the export's own tower-vs-eager limit


class ReloadError(RuntimeError):
    """A bundle that was refused (``status``: the HTTP status to answer with)."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class LiveModel:
    """One loaded bundle with its index and recommender ."""

    recommender: Recommender
    path: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def bundle_id(self) -> str:
        return self.recommender.bundle.bundle_id

    def describe(self) -> dict[str, Any]:
        b = self.recommender.bundle
        return {"id": self.bundle_id, "path": self.path, "tower": b.tower_kind, "num_items": b.num_items,
                "d_model": b.d_model, "loaded_at": round(self.loaded_at, 3)}


def smoke_query(recommender: Recommender) -> None:
    """Raise ``ReloadError`` unless the tower answers a few popular-item histories sanely (see module doc)."""
    order = [int(i) for i in recommender.popularity_order[: max(1, recommender.max_history)]]
    histories = [order[:1], order[:5][::-1], order[: recommender.max_history]]
    histories = [h for h in histories if h]
    d = recommender.bundle.d_model
    try:
        packed = recommender.user_vectors(histories)
        single = torch.cat([recommender.user_vectors([h]) for h in histories])
    except Exception as e:
        raise ReloadError(f"the tower failed on the smoke query: {type(e).__name__}: {str(e)[:300]}") from e
    if tuple(packed.shape) != (len(histories), d):
        raise ReloadError(f"the tower returned shape {tuple(packed.shape)} for {len(histories)} histories, "
                          f"expected ({len(histories)}, {d})")
    if not bool(torch.isfinite(packed).all()):
        raise ReloadError("the tower returned NaN or inf on the smoke query")
    diff = float((packed - single).abs().max())
    if not diff <= SMOKE_TOL:
        raise ReloadError(f"the tower's packed and single answers differ by {diff:.3g} (> {SMOKE_TOL})")
    result = recommender.run_batch([Prepared(history=histories[-1], exclude=set(), k=5)])[0]
    if len(result["items"]) != min(5, recommender.bundle.num_items):
        raise ReloadError(f"the smoke query returned {len(result['items'])} items, expected 5")


def load_live_model(path: str, *, index: str = "exact", max_history: int | None = None, tower: str = "exported",
                    expect_d: int | None = None) -> LiveModel:
    """Load, verify and smoke-test the bundle at ``path`` (``ReloadError`` says why it was refused)."""
    t0 = time.perf_counter()
    try:
        bundle = load_serving_bundle(path, tower=tower)
    except (BundleError, OSError, ValueError) as e:
        raise ReloadError(str(e)) from e
    except Exception as e:  # a tower package that does not load
        raise ReloadError(f"{path}: the {tower} tower does not load: {type(e).__name__}: {str(e)[:300]}") from e
    if expect_d is not None and bundle.d_model != expect_d:
        raise ReloadError(f"{path}: d_model {bundle.d_model} differs from the live bundle's {expect_d}")
    try:
        recommender = Recommender(bundle, build_index(index, bundle.item_vectors), max_history)
    except (ValueError, ImportError) as e:
        raise ReloadError(f"{path}: {e}") from e
    smoke_query(recommender)
    log.info("bundle %s (id %s) loaded and checked in %.1f s", path, bundle.bundle_id, time.perf_counter() - t0)
    return LiveModel(recommender, str(path))


__all__ = ["LiveModel", "ReloadError", "load_live_model", "smoke_query"]
