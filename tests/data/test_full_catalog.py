"""``full_catalog``: the synthetic source keeps its whole catalog (cold and k-core-dropped items included) as
items 1..num_items (item index = code + 1), the interactions are the same as without it, and artifacts
prepared without it keep their cache keys."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from ssd4rec_torchrec.config import ConfigError, load_train_config
from ssd4rec_torchrec.data import PreprocessParams, SyntheticConfig, prepare, synthetic_checksum
from ssd4rec_torchrec.data.store import cache_key

CFG = SyntheticConfig(num_users=300, num_items=20_000, num_clusters=20, mean_length=10, max_length=60, seed=3)


def test_full_catalog_keeps_cold_items(tmp_path):
    params = PreprocessParams(user_k=5, item_k=2)  # item k-core drops rare items' rows
    ds = prepare("synthetic", synthetic=CFG, params=params, root=tmp_path, full_catalog=True)
    assert ds.num_items == CFG.num_items == ds.stats["items"]
    assert ds.table_rows == CFG.num_items + 2
    assert ds.stats["catalog"] == "full"
    assert 0 < ds.stats["active_items"] < CFG.num_items  # most of the catalog is cold
    assert np.array_equal(ds.item_ids, np.arange(CFG.num_items))  # item index i + 1 <-> raw id i
    items = np.asarray(ds.items)
    assert items.min() >= 1 and items.max() <= CFG.num_items

    # same interactions, same order; only the id map differs (dense over survivors vs the whole catalog)
    dense = prepare("synthetic", synthetic=CFG, params=params, root=tmp_path)
    assert dense.num_items == dense.stats["items"] < ds.stats["active_items"] + 1
    assert dense.root != ds.root
    assert np.array_equal(np.asarray(dense.offsets), np.asarray(ds.offsets))
    assert np.array_equal(np.asarray(dense.item_ids)[np.asarray(dense.items) - 1], items - 1)
    for key in ("users", "interactions", "kcore_passes"):
        assert dense.stats[key] == ds.stats[key]


def test_default_cache_key_unchanged(tmp_path):
    params = PreprocessParams()
    ds = prepare("synthetic", synthetic=CFG, params=params, root=tmp_path)
    # the key as it was before full_catalog and time_key existed: their defaults stay out of it
    preprocess = {"user_k": params.user_k, "item_k": params.item_k, "duplicates": params.duplicates}
    legacy = cache_key(synthetic_checksum(CFG), {"preprocess": preprocess, "synthetic": asdict(CFG)})
    assert ds.root.name == f"synthetic-{legacy}"
    assert "catalog" not in ds.stats


def test_config_field(tmp_path):
    cfg = load_train_config(None, ["data.dataset=synthetic", "data.full_catalog=true"])
    assert cfg.data.full_catalog is True
    assert load_train_config(None).data.full_catalog is False
    with pytest.raises(ConfigError, match="full_catalog"):
        load_train_config(None, ["data.full_catalog=maybe"])
