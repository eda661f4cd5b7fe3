"""The serving bundle format (``format_version`` 1): names, checksums and the one reader.

Written by :mod:`ssd4rec_torchrec.export.writer` (``apps/export.py``), read here by the service, the export
checks and anyone who wants user vectors without torchrec. Imports only torch, numpy, safetensors and the
standard library, so a service can load a bundle with just those installed. Layout::

    manifest.json            format_version, num_items, d_model, max_history, ..., files: {name: {sha256, bytes}}
    items_fp32.safetensors   item_vectors float32 (num_items, d): row i is item index i + 1
    items_bf16.safetensors   optional, the same table in bfloat16
    items_int8.safetensors   optional, item_vectors int8 + per-row float32 ``scales``
    item_ids.npy             raw id of item index i + 1 (integer or unicode dtype; loaded without pickle)
    popularity.safetensors   counts float64 (num_items,)
    user_tower.pt2           torch.export program: int64 (item_indices (T,), offsets (B+1,)) -> (B, d) float32
    user_tower_aoti.pt2      optional AOTInductor CPU package of the same tower

Every file listed in the manifest is checked against its size and sha256 before use (a bundle is trusted
as a whole: the tower packages hold code and graphs). No pickle anywhere. A bundle's id is the sha256 prefix
of its ``manifest.json``, which holds every other file's sha256.
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
from safetensors.torch import load_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOWER = "user_tower.pt2"
TOWER_AOTI = "user_tower_aoti.pt2"
ITEM_FILES = {"fp32": "items_fp32.safetensors", "bf16": "items_bf16.safetensors", "int8": "items_int8.safetensors"}
ITEM_IDS = "item_ids.npy"
POPULARITY = "popularity.safetensors"
REQUIRED_KEYS = ("format_version", "num_items", "d_model", "max_history", "files", "item_vectors")
TOWER_KINDS = ("exported", "aoti")  # what a service may insist on; ``load_bundle`` also takes "auto"
BUNDLE_ID_CHARS = 16

Tower = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BundleError(ValueError):
    """A bundle that is missing, incomplete, corrupted or of an unknown format."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file, as listed in the manifest."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(root: Path, files: dict[str, Any], needed: Sequence[str] = ()) -> None:
    """Every listed file exists inside the bundle with its recorded size and sha256; every ``needed`` file is
    listed. Raises :class:`BundleError` naming the file otherwise."""
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
        if not isinstance(want, dict):
            raise BundleError(f"{root}: {name}: manifest entry must be an object")
        size = p.stat().st_size
        if size != want.get("bytes"):
            raise BundleError(f"{root}: {name} has {size} bytes, manifest says {want.get('bytes')} "
                              "(truncated or replaced)")
        digest = sha256_file(p)
        if digest != want.get("sha256"):
            raise BundleError(f"{root}: {name} does not match its manifest checksum (sha256 {digest[:12]}...): "
                              "corrupted or replaced")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The bundle's manifest (a JSON object of this format with the required keys; files not verified)."""
    return _read_manifest(Path(root))[0]


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: the manifest must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest['format_version']!r}, this reader knows {FORMAT_VERSION}")
    if not isinstance(manifest["item_vectors"], dict):
        raise BundleError(f"{path}: 'item_vectors' must be an object")
    return manifest, raw


def load_item_table(root: str | Path, dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(item_vectors, scales)`` of one stored table: fp32 / bf16 as stored (scales None), int8 with its
    per-row float32 scales (``item_vectors.float() * scales[:, None]`` dequantises)."""
    root = Path(root)
    name = read_manifest(root)["item_vectors"].get(dtype)
    if name is None:
        raise BundleError(f"{root}: no {dtype!r} item table in this bundle")
    t = load_file(str(root / name))
    return t["item_vectors"], t.get("scales")


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


def _aoti_present(manifest: dict[str, Any]) -> tuple[bool, str]:
    aoti = (manifest.get("user_tower") or {}).get("aoti") or {}
    return bool(aoti.get("present")), aoti.get("reason", "not built")


def _resolve_tower_kind(root: Path, manifest: dict[str, Any], kind: str) -> str:
    """``auto`` -> ``aoti`` when the package was built, else ``exported``; ``aoti`` insists on the package."""
    present, reason = _aoti_present(manifest)
    if kind == "aoti" and not present:
        raise BundleError(f"{root}: no AOTInductor package in this bundle ({reason})")
    return "aoti" if kind == "aoti" or (kind == "auto" and present) else "exported"


def _load_tower(root: Path, kind: str) -> Tower:
    """The ExportedProgram's module, or the AOTInductor package's runner (``kind="aoti"``)."""
    if kind == "aoti":
        from torch._inductor import aoti_load_package  # not imported by `import torch`

        return aoti_load_package(str(root / TOWER_AOTI))
    import torch.export

    return torch.export.load(root / TOWER).module()


@dataclass
class Bundle:
    """A loaded bundle. ``tower(item_indices, offsets) -> (B, d)`` float32 user vectors."""

    path: Path
    manifest: dict[str, Any]
    item_vectors: torch.Tensor  # (num_items, d) float32, row i = item index i + 1
    item_ids: np.ndarray  # (num_items,) raw ids
    popularity: np.ndarray  # (num_items,) float64 counts
    tower: Tower
    tower_kind: str = "exported"
    bundle_id: str = ""
    _order: np.ndarray | None = field(default=None, repr=False)

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
        if self.manifest.get("readout") == "last" and bool((lengths == 0).any()):
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


def load_bundle(path: str | Path, *, precision: str = "fp32", tower: str = "auto", verify: bool = True) -> Bundle:
    """Read and check a bundle directory: the manifest, (``verify``) every file's size and sha256, the
    ``precision`` item table (upcast to float32), the id map, popularity and the tower (``auto``: the
    AOTInductor package when present, else the ExportedProgram; ``aoti`` / ``exported`` insist)."""
    if tower not in ("auto", *TOWER_KINDS):
        raise ValueError(f"tower must be one of {('auto', *TOWER_KINDS)}, got {tower!r}")
    root = Path(path)
    manifest, raw_manifest = _read_manifest(root)
    vectors_file = manifest["item_vectors"].get(precision)
    if vectors_file is None:
        raise BundleError(f"{root / MANIFEST}: no {precision!r} item vectors (have {manifest['item_vectors']})")
    kind = _resolve_tower_kind(root, manifest, tower)
    if verify:
        verify_files(root, manifest["files"], [vectors_file, ITEM_IDS, POPULARITY, TOWER]
                     + ([TOWER_AOTI] if kind == "aoti" else []))
    n, d = int(manifest["num_items"]), int(manifest["d_model"])
    vectors = load_file(root / vectors_file).get("item_vectors")
    if vectors is None or tuple(vectors.shape) != (n, d):
        raise BundleError(f"{root / vectors_file}: 'item_vectors' must be ({n}, {d}), got "
                          f"{None if vectors is None else tuple(vectors.shape)}")
    vectors = vectors.float().contiguous()
    if not bool(torch.isfinite(vectors).all()):
        raise BundleError(f"{root / vectors_file}: item vectors contain NaN or inf")
    ids = _load_item_ids(root / ITEM_IDS)
    counts = load_file(root / POPULARITY).get("counts")
    if ids.shape != (n,) or counts is None or tuple(counts.shape) != (n,):
        raise BundleError(f"{root}: item_ids and popularity counts must have num_items={n} entries")
    fn = _load_tower(root, kind)
    bundle_id = hashlib.sha256(raw_manifest).hexdigest()[:BUNDLE_ID_CHARS]
    log.info("loaded bundle %s (id %s, %s tower): %d items, d=%d, max_history=%s", root, bundle_id, kind, n, d,
             manifest["max_history"])
    return Bundle(root, manifest, vectors, ids, counts.double().numpy(), fn, kind, bundle_id)


def load_serving_bundle(path: str | Path, *, precision: str = "fp32", verify: bool = True,
                        tower: str = "exported") -> Bundle:
    """:func:`load_bundle` as the service calls it: the tower it was told to serve (default ``exported``)."""
    return load_bundle(path, precision=precision, tower=tower, verify=verify)


ServingBundle = Bundle

__all__ = [
    "FORMAT_VERSION",
    "ITEM_FILES",
    "TOWER_KINDS",
    "Bundle",
    "BundleError",
    "ServingBundle",
    "file_entry",
    "load_bundle",
    "load_item_table",
    "load_serving_bundle",
    "read_manifest",
    "sha256_file",
    "verify_files",
]
