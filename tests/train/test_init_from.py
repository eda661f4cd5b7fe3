"""``train.init_from``: a run starts from another run's checkpoint weights (fine-tuning with another objective or
backward scope). With learning rates of 1e-12 one step changes nothing measurable, so the new run's test metrics
equal the source checkpoint's, while a fresh run's do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssd4rec_torchrec.config import ConfigError, load_train_config

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.synthetic.num_users=200", "data.synthetic.num_items=200", "train.batch_size=32",
         "objective.prefixes_per_user=2", "objective.max_history=20", "train.num_threads=1", "train.epochs=1"]
FROZEN = ["train.lr=1e-12", "train.sparse_lr=1e-12", "train.sparse_optimizer=sgd", "train.max_steps_per_epoch=1"]


def _train(run: Path, *sets: str) -> dict:
    out = subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run),
                          "--set", *SMALL, *sets], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return json.loads((run / "metrics.json").read_text())


def test_init_from_loads_the_checkpoint_weights(tmp_path):
    source = _train(tmp_path / "source")
    best = tmp_path / "source" / "checkpoints" / "best"
    tuned = _train(tmp_path / "tuned", f"train.init_from={best}", "objective.name=cloze", *FROZEN)
    fresh = _train(tmp_path / "fresh", "objective.name=cloze", *FROZEN)
    for p in ("filtered", "unfiltered"):
        # cloze reads an appended mask token, prefix the last item: compare within the same read-out only
        assert tuned["test"][p]["NDCG@10"] != pytest.approx(fresh["test"][p]["NDCG@10"], abs=1e-4)
    same = _train(tmp_path / "same", f"train.init_from={best}", *FROZEN)
    for p in ("filtered", "unfiltered"):
        for m in ("NDCG@10", "HR@10", "MRR@10"):
            assert same["test"][p][m] == pytest.approx(source["test"][p][m], abs=1e-6)


def test_init_from_must_be_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        load_train_config("configs/tiny.yaml", [f"train.init_from={tmp_path}"])
