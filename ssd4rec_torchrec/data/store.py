"""Versioned on-disk datasets: a JSON manifest plus ``.npy`` arrays loadable memory-mapped.

Layout of ``<cache>/datasets/<name>-<key>/``::

    manifest.json      format version, source (kind, checksum), preprocessing params, stats, files
    offsets.npy        (U+1,) int64   per-user sequence offsets (TorchRec jagged convention)
    items.npy          (N,)   int32   item indices (1..num_items; 0 = pad, num_items+1 = mask)
    timestamps.npy     (N,)   int64
    user_ids.npy       (U,)           raw user id of each user index
    item_ids.npy       (num_items,)   raw item id of item index i+1
    item_titles.npy    (num_items,)   optional display names

``key`` hashes (format version, source checksum, params): same inputs are a cache hit, anything
different is a different directory. Writes go to a temp dir renamed into place, so a crash never
leaves a half dataset that a later run would pick up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .preprocess import (
    FIRST_ITEM_INDEX,
    PAD_INDEX,
    LeaveOneOut,
    Sequences,
    leave_one_out,
    mask_index,
    table_rows,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("offsets", "items", "timestamps", "user_ids", "item_ids")


def cache_key(source_checksum: str, params: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": source_checksum, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_dataset(dest: Path, seqs: Sequences, manifest: dict) -> Path:
    """Write arrays + manifest into a temp dir next to ``dest`` and rename it into place (atomic)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        arrays = {
            "offsets": seqs.offsets, "items": seqs.items, "timestamps": seqs.timestamps,
            "user_ids": seqs.user_ids, "item_ids": seqs.item_ids,
        }
        if seqs.item_titles is not None:
            arrays["item_titles"] = seqs.item_titles
        files = {}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype == object:
                arr = arr.astype(str)
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            files[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files,
                    "reserved_ids": {"pad": PAD_INDEX, "first_item": FIRST_ITEM_INDEX,
                                     "mask": mask_index(seqs.stats["items"]),
                                     "table_rows": table_rows(seqs.stats["items"])},
                    "stats": seqs.stats, "created_unix": int(time.time())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if (dest / "manifest.json").exists():  # a concurrent writer won the race: theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@dataclass
class SequenceDataset:
    """A prepared dataset opened from disk (arrays memory-mapped, read-only)."""

    root: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, root: str | Path) -> SequenceDataset:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{root}: not a prepared dataset (no manifest.json)")
        manifest = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{root}: dataset format {manifest.get('format_version')} != {FORMAT_VERSION}; "
                             "prepare it again")
        return cls(root, manifest)

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.root / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    @cached_property
    def offsets(self) -> np.ndarray:
        return self._array("offsets")

    @cached_property
    def items(self) -> np.ndarray:
        return self._array("items")

    @cached_property
    def timestamps(self) -> np.ndarray:
        return self._array("timestamps")

    @cached_property
    def user_ids(self) -> np.ndarray:
        return self._array("user_ids")

    @cached_property
    def item_ids(self) -> np.ndarray:
        return self._array("item_ids")

    @cached_property
    def item_titles(self) -> np.ndarray | None:
        return self._array("item_titles") if (self.root / "item_titles.npy").exists() else None

    @property
    def stats(self) -> dict:
        return self.manifest["stats"]

    @property
    def num_users(self) -> int:
        return int(self.stats["users"])

    @property
    def num_items(self) -> int:
        return int(self.stats["items"])

    @property
    def num_interactions(self) -> int:
        return int(self.stats["interactions"])

    @property
    def mask_index(self) -> int:
        return mask_index(self.num_items)

    @property
    def table_rows(self) -> int:
        return table_rows(self.num_items)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def leave_one_out(self) -> LeaveOneOut:
        return leave_one_out(self.offsets, self.items)

    def item_index_of(self, raw_ids) -> np.ndarray:
        """Raw item ids -> indices (0 = unknown), via binary search on the sorted raw-id map."""
        raw = np.asarray(raw_ids).astype(self.item_ids.dtype, copy=False)
        pos = np.searchsorted(self.item_ids, raw)
        pos = np.clip(pos, 0, len(self.item_ids) - 1)
        found = self.item_ids[pos] == raw
        return np.where(found, pos + FIRST_ITEM_INDEX, PAD_INDEX)
