"""Load a serving bundle written by ``apps/export.py``: item tables, id maps, popularity and the user tower.

Imports only torch, numpy, safetensors and the standard library - no torchrec and no project model code -
so a service can load a bundle with just those installed. Every file is checked against the manifest's
sha256 before use (a bundle is trusted as a whole: the tower packages hold code and graphs).

Layout (``format_version`` 1): ``manifest.json``; ``items_fp32.safetensors`` (``item_vectors`` (n, d)
float32, row i = item index i + 1) and optionally ``items_bf16.safetensors`` / ``items_int8.safetensors``
(``item_vectors`` int8 + per-row ``scales``); ``item_ids.npy`` (raw id of index i + 1);
``popularity.safetensors`` (``counts`` float64 (n,)); ``user_tower.pt2`` (``torch.export``) and
optionally ``user_tower_aoti.pt2`` (AOTInductor, CPU), both ``(item_indices (T,), offsets (B+1,)) -> (B, d)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOWER = "user_tower.pt2"
TOWER_AOTI = "user_tower_aoti.pt2"
ITEM_FILES = {"fp32": "items_fp32.safetensors", "bf16": "items_bf16.safetensors", "int8": "items_int8.safetensors"}
ITEM_IDS = "item_ids.npy"
POPULARITY = "popularity.safetensors"
TOWER_KINDS = ("auto", "aoti", "exported")


class BundleError(ValueError):
    """A bundle that is missing, incomplete, corrupted or of an unknown format."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise :class:`BundleError` unless every listed file exists with the recorded size and sha256."""
    for name, meta in files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root}: manifest lists a file outside the bundle: {name!r}")
        if not p.is_file():
            raise BundleError(f"{root}: missing file {name}")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{root}: {name} has {size} bytes, manifest says {meta['bytes']} (truncated or replaced)")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise BundleError(f"{root}: checksum mismatch for {name} (sha256 {digest[:12]}..., manifest "
                              f"{meta['sha256'][:12]}...): the file is corrupted or was replaced")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The bundle's manifest (format checked, files not verified)."""
    root = Path(root)
    p = root / MANIFEST
    if not p.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{p}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{p}: format_version {manifest.get('format_version')!r}, this loader reads {FORMAT_VERSION}")
    return manifest


def load_item_table(root: str | Path, dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(item_vectors, scales)`` of one stored table: fp32 / bf16 as stored (scales None), int8 with its
    per-row float32 scales (``item_vectors.float() * scales[:, None]`` dequantises)."""
    root = Path(root)
    name = read_manifest(root)["item_vectors"].get(dtype)
    if name is None:
        raise BundleError(f"{root}: no {dtype!r} item table in this bundle")
    t = load_file(str(root / name))
    return t["item_vectors"], t.get("scales")


def _load_tower(root: Path, manifest: dict[str, Any], kind: str) -> tuple[Callable[..., torch.Tensor], str]:
    aoti = manifest.get("user_tower", {}).get("aoti", {})
    if kind in ("auto", "aoti") and aoti.get("present"):
        import torch._inductor  # not imported by `import torch`

        runner = torch._inductor.aoti_load_package(str(root / TOWER_AOTI))
        return runner, "aoti"
    if kind == "aoti":
        raise BundleError(f"{root}: no AOTInductor package in this bundle ({aoti.get('reason', 'not built')})")
    import torch.export

    return torch.export.load(str(root / TOWER)).module(), "exported"


@dataclass
class Bundle:
    """A loaded bundle. ``tower`` maps packed ``(item_indices, offsets)`` to user vectors (B, d) float32."""

    path: Path
    manifest: dict[str, Any]
    item_vectors: torch.Tensor
    item_ids: np.ndarray
    popularity: torch.Tensor
    tower: Callable[..., torch.Tensor]
    tower_kind: str
    _order: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def max_history(self) -> int | None:
        return self.manifest["max_history"]

    @torch.no_grad()
    def user_vectors(self, item_indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Run the tower on packed histories, after checking them (bad indices would read out of bounds
        in compiled code): int64, offsets from 0 non-decreasing to T, indices in 1..num_items, non-empty
        histories unless the read-out appends the mask token."""
        item_indices = torch.as_tensor(item_indices)
        offsets = torch.as_tensor(offsets)
        if item_indices.dtype != torch.int64 or offsets.dtype != torch.int64:
            raise ValueError(f"item_indices and offsets must be int64, got {item_indices.dtype}, {offsets.dtype}")
        if item_indices.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 2:
            raise ValueError("item_indices must be (T,) and offsets (B+1,) with B >= 1")
        lengths = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or int(offsets[-1]) != item_indices.numel() or bool((lengths < 0).any()):
            raise ValueError("offsets must start at 0, be non-decreasing and end at len(item_indices)")
        if self.manifest["readout"] == "last" and bool((lengths == 0).any()):
            raise ValueError("empty history: this tower reads the last item (use a fallback for empty histories)")
        if item_indices.numel() and (int(item_indices.min()) < 1 or int(item_indices.max()) > self.num_items):
            raise ValueError(f"item indices must be in 1..{self.num_items}")
        return self.tower(item_indices, offsets)

    def encode(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """User vectors of histories given as item indices (oldest first), each cut to its most recent
        ``max_history`` items."""
        m = self.max_history
        cut = [list(h)[-m:] if m else list(h) for h in histories]
        lengths = torch.tensor([len(h) for h in cut], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        values = torch.tensor([i for h in cut for i in h], dtype=torch.int64)
        return self.user_vectors(values, offsets)

    def index_of(self, raw_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Item indices (1..n) of raw ids; 0 for ids not in the catalog (or not convertible to its id type)."""
        if self._order is None:
            self._order = np.argsort(self.item_ids, kind="stable")
        sorted_ids = self.item_ids[self._order]
        out = np.zeros(len(raw_ids), dtype=np.int64)
        for j, raw in enumerate(raw_ids):
            try:
                key = np.asarray(raw).astype(self.item_ids.dtype)
            except (TypeError, ValueError, OverflowError):
                continue
            if key.ndim or (self.item_ids.dtype.kind in "iu" and np.asarray(raw).dtype.kind not in "iu"):
                continue  # a list, or a float / string where integer ids are expected: unknown
            pos = int(np.searchsorted(sorted_ids, key))
            if pos < len(sorted_ids) and sorted_ids[pos] == key:
                out[j] = int(self._order[pos]) + 1
        return out


def load_bundle(path: str | Path, *, tower: str = "auto", verify: bool = True) -> Bundle:
    """Open a bundle: check the manifest and (``verify``) every file's sha256, load the fp32 item table,
    the id map, popularity and the tower (``auto``: the AOTInductor package when present, else the
    ExportedProgram; ``aoti`` / ``exported`` insist)."""
    if tower not in TOWER_KINDS:
        raise ValueError(f"tower must be one of {TOWER_KINDS}, got {tower!r}")
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest["files"])
    items = load_file(str(root / manifest["item_vectors"]["fp32"]))["item_vectors"]
    ids = np.load(root / ITEM_IDS, allow_pickle=False)
    with safe_open(str(root / POPULARITY), framework="pt") as f:
        popularity = f.get_tensor("counts")
    n = int(manifest["num_items"])
    if items.shape != (n, manifest["d_model"]) or len(ids) != n or popularity.shape != (n,):
        raise BundleError(f"{root}: tables disagree with num_items={n}: items {tuple(items.shape)}, "
                          f"ids {len(ids)}, popularity {tuple(popularity.shape)}")
    fn, kind = _load_tower(root, manifest, tower)
    log.info("loaded bundle %s: %d items, d=%d, tower %s", root, n, items.shape[1], kind)
    return Bundle(root, manifest, items, ids, popularity, fn, kind)


__all__ = [
    "FORMAT_VERSION",
    "ITEM_FILES",
    "Bundle",
    "BundleError",
    "load_bundle",
    "load_item_table",
    "read_manifest",
    "sha256_file",
    "verify_files",
]
