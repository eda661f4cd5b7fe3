"""A small fake serving bundle (for tests and load runs without a trained model).

Its user tower is a tiny exported module with the real tower's signature: packed int64
``(item_indices (T,), offsets (B+1,))`` -> (B, d) float32, here tanh(W · recency-weighted mean of the
history's embedding rows), computed per segment with ``index_add`` (no padding).

    python -m ssd4rec_torchrec.serving.testing OUT_DIR [--num-items 5000] [--d 32] [--string-ids]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..bundle import FORMAT_VERSION, ITEM_IDS, POPULARITY, TOWER, file_entry


class FakeTower(nn.Module):
    """Recency-weighted mean of embedding rows per packed segment, then a linear layer and tanh."""

    def __init__(self, num_items: int, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embedding = nn.Parameter(torch.randn(num_items + 2, d, generator=g))
        self.proj = nn.Parameter(torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, item_indices: Tensor, offsets: Tensor) -> Tensor:
        t = item_indices.shape[0]
        b = offsets.shape[0] - 1
        pos = torch.arange(t, dtype=offsets.dtype, device=offsets.device)
        seg = torch.searchsorted(offsets[1:], pos, right=True)  # segment of each token
        recency = (pos - offsets[seg] + 1).to(torch.float32)  # 1 = oldest item of its history
        rows = self.embedding[item_indices] * recency.unsqueeze(1)
        sums = torch.zeros(b, self.embedding.shape[1], dtype=rows.dtype, device=rows.device).index_add(0, seg, rows)
        weights = torch.zeros(b, dtype=rows.dtype, device=rows.device).index_add(0, seg, recency)
        return torch.tanh((sums / weights.clamp(min=1.0).unsqueeze(1)) @ self.proj)


def export_tower(tower: nn.Module, path: Path) -> None:
    """``torch.export`` the tower with dynamic T and B and save it."""
    example = (torch.tensor([1, 2, 3], dtype=torch.long), torch.tensor([0, 1, 3], dtype=torch.long))
    tokens, bounds = torch.export.Dim("tokens", min=1), torch.export.Dim("offsets", min=2)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # B = 1 and T = 1 stay dynamic
        program = torch.export.export(tower, example, dynamic_shapes=({0: tokens}, {0: bounds}))
    torch.export.save(program, path)


def write_fake_bundle(out: str | Path, *, num_items: int = 500, d: int = 16, max_history: int | None = 50,
                      string_ids: bool = False, seed: int = 0, tower_from: str | Path | None = None) -> Path:
    """Write a complete format-1 bundle with random item vectors, ids and popularity into ``out``
    (``tower_from``: copy that bundle's exported tower instead of exporting a new one; same sizes and seed)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if tower_from is not None:
        shutil.copyfile(Path(tower_from) / TOWER, root / TOWER)
    else:
        export_tower(FakeTower(num_items, d, seed).eval(), root / TOWER)
    items = torch.from_numpy(rng.standard_normal((num_items, d)).astype(np.float32))
    save_file({"item_vectors": items}, root / "items_fp32.safetensors")
    raw = rng.choice(np.arange(10, 10 + 20 * num_items), size=num_items, replace=False).astype(np.int64)
    ids = raw.astype(str) if string_ids else raw
    if string_ids:
        ids = np.char.add("item-", ids)
    np.save(root / ITEM_IDS, ids, allow_pickle=False)
    counts = np.floor(1000.0 / np.arange(1, num_items + 1) ** 0.8)[rng.permutation(num_items)]
    save_file({"counts": torch.from_numpy(counts.astype(np.float64))}, root / POPULARITY)
    files = ["items_fp32.safetensors", ITEM_IDS, POPULARITY, TOWER]
    manifest = {
        "format_version": FORMAT_VERSION, "num_items": num_items, "d_model": d, "objective": "fake",
        "readout": "recency_mean", "mask_index": num_items + 1, "max_history": max_history,
        "l2_normalize": False, "config": {"fake": True}, "metrics": {}, "versions": {"torch": torch.__version__},
        "files": {name: file_entry(root / name) for name in files},
        "item_vectors": {"fp32": "items_fp32.safetensors"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a fake serving bundle")
    parser.add_argument("out")
    parser.add_argument("--num-items", type=int, default=5000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--string-ids", action="store_true")
    args = parser.parse_args(argv)
    print(write_fake_bundle(args.out, num_items=args.num_items, d=args.d, max_history=args.max_history,
                            string_ids=args.string_ids))


if __name__ == "__main__":
    main()
