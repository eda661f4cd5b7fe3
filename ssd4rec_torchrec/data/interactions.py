"""Columnar interactions as read from a source, before any filtering."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawInteractions:
    """Interactions in original row order, ids factorised to dense integer codes.

    ``user``/``item`` hold codes; ``user_ids[code]`` / ``item_ids[code]`` give the raw id (int64 or
    unicode array). ``None`` means the code *is* the raw id (synthetic data with up to 1e8 items,
    where a materialised identity map would waste memory). Arrays may be memory-mapped.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_ids: np.ndarray | None
    item_ids: np.ndarray | None
    source: str
    checksum: str
    item_titles: np.ndarray | None = None  # optional display names, aligned with item codes
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user)
        if len(self.item) != n or len(self.timestamp) != n:
            raise ValueError("user, item and timestamp columns must have equal length")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_user_codes(self) -> int:
        if self.user_ids is not None:
            return len(self.user_ids)
        return int(self.extra.get("num_user_codes") or (int(self.user.max()) + 1 if len(self) else 0))

    @property
    def num_item_codes(self) -> int:
        if self.item_ids is not None:
            return len(self.item_ids)
        return int(self.extra.get("num_item_codes") or (int(self.item.max()) + 1 if len(self) else 0))


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes for raw ids: returns (sorted unique raw ids, int64 code per row).

    Digit-only string ids become integers so that raw ids sort numerically and stay compact.
    """
    if values.dtype.kind in "US" or values.dtype == object:
        as_str = values.astype(str)
        if len(as_str) and np.char.isdigit(as_str).all() and max(len(s) for s in as_str[:1000]) < 19:
            try:
                values = as_str.astype(np.int64)
            except (OverflowError, ValueError):
                values = as_str
        else:
            values = as_str
    uniques, codes = np.unique(values, return_inverse=True)
    return uniques, codes.astype(np.int64, copy=False)
