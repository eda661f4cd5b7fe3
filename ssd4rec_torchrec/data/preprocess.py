"""Raw interactions -> k-core -> chronological per-user sequences with contiguous item indices.

Reserved item indices (documented contract used by the model, the loaders and serving):

- ``PAD_INDEX = 0``: padding / "no item"; also what the official code's ρ-corruption writes.
- items are ``1 .. num_items`` (``FIRST_ITEM_INDEX = 1``), in ascending raw-id order;
- ``mask_index(num_items) = num_items + 1``: the cloze mask token.

So an item table has ``num_items + 2`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .interactions import RawInteractions

log = logging.getLogger(__name__)

PAD_INDEX = 0
FIRST_ITEM_INDEX = 1
MIN_SEQUENCE_LENGTH = 3  # leave-one-out needs >= 1 training item + a validation and a test target
DUPLICATE_POLICIES = ("keep", "drop", "error")
TIME_KEYS = ("exact", "float32")


def mask_index(num_items: int) -> int:
    """The cloze mask token: one past the last item."""
    return num_items + 1


def table_rows(num_items: int) -> int:
    """Rows of an item embedding table: padding + items + mask."""
    return num_items + 2


@dataclass(frozen=True)
class PreprocessParams:
    """What turns raw interactions into sequences. Part of the artifact's cache key."""

    user_k: int = 5  # iterative k-core: users need >= user_k interactions (and >= MIN_SEQUENCE_LENGTH)
    item_k: int = 5  # items need >= item_k interactions
    duplicates: str = "keep"  # (user, item, timestamp) repeats: keep (RecBole) | drop later copies | error
    # what orders each user's events (ties always keep the source's row order): "exact" timestamps, or "float32",
    # the timestamp rounded to float32 as RecBole 1.x stores it (torch.FloatTensor) before it sorts - on ML-1M a
    # 64-second grid, which changes 1,190 of 6,040 test targets: the split RecBole-protocol papers evaluate on
    time_key: str = "exact"

    def __post_init__(self) -> None:
        if self.time_key not in TIME_KEYS:
            raise ValueError(f"time_key must be one of {TIME_KEYS}, got {self.time_key!r}")
        if self.user_k < 1 or self.item_k < 1:
            raise ValueError(f"k-core thresholds must be >= 1, got user_k={self.user_k}, item_k={self.item_k}")
        if self.duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {self.duplicates!r}")


@dataclass
class Sequences:
    """Per-user chronological sequences as jagged arrays (TorchRec convention: values + offsets)."""

    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (N,) int32 item indices in 1..num_items
    timestamps: np.ndarray  # (N,) int64
    user_ids: np.ndarray  # (U,) raw user id per user index
    item_ids: np.ndarray  # (num_items,) raw item id of index i+1
    item_titles: np.ndarray | None
    stats: dict


def find_duplicates(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Boolean mask of rows repeating an earlier (user, item, timestamp) row (first copy is not flagged)."""
    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((item, timestamp, user))  # stable: equal keys keep original row order
    u, t, i = user[order], timestamp[order], item[order]
    same = (u[1:] == u[:-1]) & (t[1:] == t[:-1]) & (i[1:] == i[:-1])
    dup = np.zeros(n, dtype=bool)
    dup[order[1:][same]] = True
    return dup


def k_core(user: np.ndarray, item: np.ndarray, user_k: int, item_k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core (RecBole semantics): drop rows of users/items under threshold until stable.

    Returns (row mask of survivors, number of passes). Counts use all rows, duplicates included.
    """
    keep = np.ones(len(user), dtype=bool)
    idx = np.arange(len(user))
    passes = 0
    u, i = user, item
    while True:
        passes += 1
        uc = np.bincount(u)
        ic = np.bincount(i)
        ok = (uc[u] >= user_k) & (ic[i] >= item_k)
        if ok.all():
            break
        idx, u, i = idx[ok], u[ok], i[ok]
        if len(idx) == 0:
            break
    keep[:] = False
    keep[idx] = True
    return keep, passes


def _dense_index(codes: np.ndarray, size: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Map the codes present in ``codes`` to start, start+1, ... in ascending code order (O(N + size))."""
    present = np.zeros(size, dtype=bool)
    present[codes] = True
    kept_codes = np.flatnonzero(present)
    lookup = np.zeros(size, dtype=np.int64)
    lookup[kept_codes] = np.arange(start, start + len(kept_codes))
    return lookup[codes], kept_codes


def build_sequences(raw: RawInteractions, params: PreprocessParams, *, full_catalog: bool = False) -> Sequences:
    """k-core filter, stable chronological sort, contiguous re-indexing, jagged per-user arrays.

    ``full_catalog``: items are every item code of the source (item index = code + 1), so cold items -
    never interacted with, or removed by k-core - keep their table rows; k-core still filters interactions.
    """
    n_raw = len(raw)
    if n_raw == 0:
        raise DataError(raw.source, "no interactions")
    user = np.asarray(raw.user, dtype=np.int64)
    item = np.asarray(raw.item, dtype=np.int64)
    ts = np.asarray(raw.timestamp, dtype=np.int64)
    raw_users, raw_items = int(np.count_nonzero(np.bincount(user))), int(np.count_nonzero(np.bincount(item)))

    dup = find_duplicates(user, item, ts)
    n_dup = int(dup.sum())
    if n_dup:
        first = int(np.flatnonzero(dup)[0])
        if params.duplicates == "error":
            raise DataError(raw.source, f"{n_dup} duplicate (user, item, timestamp) rows, first at data row "
                            f"{first + 1} (policy duplicates=error; use keep or drop)")
        log.warning("%s: %d duplicate (user, item, timestamp) rows (policy: %s)", raw.source, n_dup,
                    params.duplicates)
        if params.duplicates == "drop":
            keep = ~dup
            user, item, ts = user[keep], item[keep], ts[keep]
    del dup

    keep, passes = k_core(user, item, max(params.user_k, MIN_SEQUENCE_LENGTH), params.item_k)
    if not keep.any():
        raise DataError(raw.source, f"nothing survives {params.user_k}/{params.item_k}-core filtering "
                        f"({n_raw} rows, {raw_users} users, {raw_items} items before)")
    if not keep.all():
        user, item, ts = user[keep], item[keep], ts[keep]
    del keep

    # Stable chronological order per user: (user, timestamp), ties keep the original row order.
    sort_key = ts.astype(np.float64).astype(np.float32) if params.time_key == "float32" else ts
    order = np.lexsort((sort_key, user))
    del sort_key
    user, item, ts = user[order], item[order], ts[order]
    del order

    user_index, user_codes = _dense_index(user, raw.num_user_codes, 0)
    del user
    if full_catalog:  # identity map: no lookup table, O(1) extra memory besides the raw-id array
        item_index, item_codes = item + FIRST_ITEM_INDEX, np.arange(raw.num_item_codes, dtype=np.int64)
    else:
        item_index, item_codes = _dense_index(item, raw.num_item_codes, FIRST_ITEM_INDEX)
    del item
    num_users, num_items = len(user_codes), len(item_codes)
    if num_items + 2 > np.iinfo(np.int32).max:
        raise DataError(raw.source, f"{num_items} items exceed the int32 index range")
    lengths = np.bincount(user_index, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    user_ids = raw.user_ids[user_codes] if raw.user_ids is not None else user_codes
    item_ids = raw.item_ids[item_codes] if raw.item_ids is not None else item_codes
    titles = raw.item_titles[item_codes] if raw.item_titles is not None else None
    stats = {
        "users": num_users,
        "items": num_items,
        "interactions": int(offsets[-1]),
        "avg_length": float(lengths.mean()),
        "median_length": float(np.median(lengths)),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "raw_rows": n_raw,
        "raw_users": raw_users,
        "raw_items": raw_items,
        "duplicate_rows": n_dup,
        "kcore_passes": passes,
        "density": float(offsets[-1]) / (num_users * num_items),
    }
    if full_catalog:
        stats["catalog"] = "full"
        stats["active_items"] = int(np.count_nonzero(np.bincount(item_index, minlength=num_items + 1)))
    return Sequences(offsets, item_index.astype(np.int32), ts, np.asarray(user_ids), np.asarray(item_ids),
                     titles, stats)


@dataclass
class LeaveOneOut:
    """Leave-one-out split of jagged sequences (last item = test target, second-to-last = valid target).

    ``train_*``: each user's history without its last two items (also the validation input);
    ``test_*``: the history without the last item (the test input, which includes the validation item).
    """

    train_offsets: np.ndarray
    train_items: np.ndarray
    valid_targets: np.ndarray
    test_offsets: np.ndarray
    test_items: np.ndarray
    test_targets: np.ndarray


def leave_one_out(offsets: np.ndarray, items: np.ndarray) -> LeaveOneOut:
    """Split per-user sequences; every user must have >= MIN_SEQUENCE_LENGTH items."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.min() < MIN_SEQUENCE_LENGTH:
        raise ValueError(f"leave-one-out needs >= {MIN_SEQUENCE_LENGTH} items per user")
    users = np.arange(len(offsets), dtype=np.int64)
    last = offsets[1:] - 1
    not_last = np.ones(len(items), dtype=bool)
    not_last[last] = False
    not_last_two = not_last.copy()
    not_last_two[last - 1] = False
    return LeaveOneOut(
        train_offsets=offsets - 2 * users,
        train_items=np.asarray(items[not_last_two]),
        valid_targets=np.asarray(items[last - 1]),
        test_offsets=offsets - users,
        test_items=np.asarray(items[not_last]),
        test_targets=np.asarray(items[last]),
    )
