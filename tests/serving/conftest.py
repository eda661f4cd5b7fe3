"""Fake serving bundles shared by the serving tests (the tower is exported once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssd4rec_torchrec.serving.testing import write_fake_bundle

NUM_ITEMS, DIM, MAX_HISTORY = 300, 16, 20


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Integer raw ids."""
    return write_fake_bundle(tmp_path_factory.mktemp("bundle"), num_items=NUM_ITEMS, d=DIM, max_history=MAX_HISTORY)


@pytest.fixture(scope="session")
def string_bundle(tmp_path_factory: pytest.TempPathFactory, fake_bundle: Path) -> Path:
    """Unicode raw ids ("item-123"), same tower."""
    return write_fake_bundle(tmp_path_factory.mktemp("sbundle"), num_items=NUM_ITEMS, d=DIM, max_history=MAX_HISTORY,
                             string_ids=True, tower_from=fake_bundle)

