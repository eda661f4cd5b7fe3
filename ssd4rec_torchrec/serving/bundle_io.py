"""Minimal reader of a serving bundle (format_version 1); torch, numpy, safetensors and json only.

Layout (written by ``apps/export.py``)::

    manifest.json            format_version, num_items, d_model, max_history, ..., files: {name: {sha256, bytes}}
    items_fp32.safetensors   item_vectors float32 (num_items, d): row i is item index i + 1
    item_ids.npy             raw id of item index i + 1 (integer or unicode dtype; loaded without pickle)
    popularity.safetensors   counts float64 (num_items,)
    user_tower.pt2           torch.export program: int64 (item_indices (T,), offsets (B+1,)) -> (B, d) float32
    user_tower_aoti.pt2      optional AOTInductor CPU package of the same tower (``tower="aoti"``)

Every file listed in the manifest is checked against its size and sha256 before use. No pickle anywhere.
A bundle's id is the sha256 prefix of its ``manifest.json`` (which holds every other file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..export.bundle import BundleError, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "num_items", "d_model", "max_history", "files", "item_vectors")
TOWER_FILE = "user_tower.pt2"
IDS_FILE = "item_ids.npy"
POPULARITY_FILE = "popularity.safetensors"
TOWER_AOTI_FILE = "user_tower_aoti.pt2"
TOWER_KINDS = ("exported", "aoti")
BUNDLE_ID_CHARS = 16


@dataclass
class ServingBundle:
    """What the service needs from a bundle. ``tower(item_indices, offsets) -> (B, d)``."""

    path: Path
    manifest: dict[str, Any]
    item_vectors: torch.Tensor  # (num_items, d) float32, row i = item index i + 1
    item_ids: np.ndarray  # (num_items,) raw ids
    popularity: np.ndarray  # (num_items,) float64 counts
    tower: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tower_kind: str = "exported"
    bundle_id: str = ""

    @property
    def num_items(self) -> int:
        return int(self.item_vectors.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def max_history(self) -> int | None:
        """The history window the model was trained on; None when it was trained on full histories."""
        value = self.manifest["max_history"]
        return None if value is None else int(value)


def file_entry(path: Path) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file, as listed in the manifest."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(root: Path, files: dict[str, Any], needed: list[str]) -> None:
    """Every listed file exists with its size and sha256; every ``needed`` file is listed."""
    if not isinstance(files, dict):
        raise BundleError(f"{root}: manifest 'files' must be an object")
    for name in needed:
        if name not in files:
            raise BundleError(f"{root}: {name} has no checksum in the manifest")
    for name, want in files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root}: manifest lists a file outside the bundle: {name!r}")
        if not p.is_file():
            raise BundleError(f"{root}: {name} is listed in the manifest but missing")
        got = file_entry(p)
        if not isinstance(want, dict) or got["bytes"] != want.get("bytes") or got["sha256"] != want.get("sha256"):
            raise BundleError(f"{root}: {name} does not match its manifest checksum (corrupted or replaced)")


def _load_item_ids(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise BundleError(f"{path}: item ids must be a numeric or unicode array ({e})") from e
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind == "U"):
        raise BundleError(f"{path}: item ids must be 1-D integer or unicode, got {ids.dtype} {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise BundleError(f"{path}: item ids are not unique")
    return ids


Tower = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_aoti_present(root: Path, manifest: dict[str, Any]) -> None:
    """BundleError unless the manifest says the AOTInductor package was built."""
    aoti = (manifest.get("user_tower") or {}).get("aoti") or {}
    if not aoti.get("present"):
        raise BundleError(f"{root}: no AOTInductor package in this bundle ({aoti.get('reason', 'not built')})")


def _load_tower(root: Path, manifest: dict[str, Any], kind: str) -> Tower:
    """The ExportedProgram's module, or the AOTInductor package's runner (``kind="aoti"``)."""
    if kind == "aoti":
        _check_aoti_present(root, manifest)
        from torch._inductor import aoti_load_package  # not imported by `import torch`

        return aoti_load_package(str(root / TOWER_AOTI_FILE))
    return torch.export.load(root / TOWER_FILE).module()


def load_serving_bundle(path: str | Path, *, precision: str = "fp32", verify: bool = True,
                        tower: str = "exported") -> ServingBundle:
    """Read and check a bundle directory. ``precision`` picks the ``item_vectors`` file (only fp32 is scored
    as stored; other precisions are upcast to float32); ``tower`` is ``exported`` (the ``torch.export``
    program) or ``aoti`` (the AOTInductor package)."""
    if tower not in TOWER_KINDS:
        raise ValueError(f"tower must be one of {TOWER_KINDS}, got {tower!r}")
    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{root}: no manifest.json (not a serving bundle)")
    try:
        raw_manifest = mpath.read_bytes()
        manifest = json.loads(raw_manifest)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: the manifest must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{mpath}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{mpath}: format_version {manifest['format_version']!r}, this reader knows {FORMAT_VERSION}")
    vectors_file = manifest["item_vectors"].get(precision) if isinstance(manifest["item_vectors"], dict) else None
    if vectors_file is None:
        raise BundleError(f"{mpath}: no {precision!r} item vectors (have {manifest['item_vectors']})")
    if tower == "aoti":
        _check_aoti_present(root, manifest)
    if verify:
        needed = [vectors_file, IDS_FILE, POPULARITY_FILE, TOWER_FILE] + ([TOWER_AOTI_FILE] if tower == "aoti" else [])
        verify_files(root, manifest["files"], needed)
    n, d = int(manifest["num_items"]), int(manifest["d_model"])
    vectors = load_file(root / vectors_file).get("item_vectors")
    if vectors is None or tuple(vectors.shape) != (n, d):
        raise BundleError(f"{root / vectors_file}: 'item_vectors' must be ({n}, {d}), got "
                          f"{None if vectors is None else tuple(vectors.shape)}")
    vectors = vectors.float().contiguous()
    if not bool(torch.isfinite(vectors).all()):
        raise BundleError(f"{root / vectors_file}: item vectors contain NaN or inf")
    ids = _load_item_ids(root / IDS_FILE)
    counts = load_file(root / POPULARITY_FILE).get("counts")
    if ids.shape != (n,) or counts is None or tuple(counts.shape) != (n,):
        raise BundleError(f"{root}: item_ids and popularity counts must have num_items={n} entries")
    fn = _load_tower(root, manifest, tower)
    bundle_id = hashlib.sha256(raw_manifest).hexdigest()[:BUNDLE_ID_CHARS]
    log.info("loaded bundle %s (id %s, %s tower): %d items, d=%d, max_history=%s", root, bundle_id, tower, n, d,
             manifest["max_history"])
    return ServingBundle(root, manifest, vectors, ids, counts.double().numpy(), fn, tower, bundle_id)


__all__ = ["TOWER_KINDS", "BundleError", "ServingBundle", "file_entry", "load_serving_bundle", "verify_files"]
