"""``train.time_budget_s``: training stops mid-epoch once the training-step time reaches the budget, validates
there, and records when each validation happened (``valid_timing``); resuming a budget-stopped run trains no
further. One small single-process run (~10 s) plus its resume."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from ssd4rec_torchrec.config import ConfigError, load_train_config

REPO = Path(__file__).resolve().parents[2]
BUDGET = 2.0
EPOCHS = 1000  # far more than fit in the budget: only the budget can stop the run
SMALL = ["--set", "data.synthetic.num_users=300", "data.synthetic.num_items=300", f"train.epochs={EPOCHS}",
         "train.batch_size=32", "objective.prefixes_per_user=2", "objective.max_history=20", "train.num_threads=1",
         "train.eval_every=1", "train.patience=1000", f"train.time_budget_s={BUDGET}"]


def _train(run: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run),
                          *extra, *SMALL], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("budget") / "run"
    return run, _train(run)


def test_budget_must_be_positive():
    with pytest.raises(ConfigError, match="time_budget_s must be > 0"):
        load_train_config("configs/tiny.yaml", ["train.time_budget_s=0"])
    assert load_train_config("configs/tiny.yaml").train.time_budget_s is None


def test_budget_stops_training_and_validates_there(budget_run):
    run, m = budget_run
    assert m["stopped_by_budget"] is True and m["stopped_early"] is False
    assert m["time_budget_s"] == BUDGET
    assert m["epochs_trained"] < EPOCHS and m["epochs_run"] < EPOCHS
    assert BUDGET <= m["train_seconds"] < BUDGET + 2.0  # stops right after the step that crossed the budget
    assert m["wall_seconds"] > m["train_seconds"]  # wall time also counts set-up and validations
    timing, history = m["valid_timing"], m["valid_history"]
    assert len(timing) == len(history) >= 2
    assert [t["epoch"] for t in timing] == [h["epoch"] for h in history]
    seconds = [t["train_seconds"] for t in timing]
    assert all(a < b for a, b in pairwise(seconds)), seconds
    walls = [t["wall_seconds"] for t in timing]
    assert all(a < b for a, b in pairwise(walls)), walls
    last = timing[-1]  # the validation the budget stop triggered, at the final state
    assert last["train_seconds"] == pytest.approx(m["train_seconds"], abs=1e-3)
    assert "time budget" in (run / "train.log").read_text()


def test_resuming_a_budget_stopped_run_trains_no_further(budget_run):
    run, before = budget_run
    after = _train(run, "--resume")
    assert "resumed from" in (run / "train.log").read_text()
    for k in ("valid_history", "valid_timing", "train_seconds", "epochs_trained", "stopped_by_budget", "best_epoch",
              "test"):
        assert after[k] == before[k], k


def test_max_steps_per_epoch_shortens_every_epoch(tmp_path):
    run = tmp_path / "short"
    args = [a for a in SMALL if not a.startswith(("train.time_budget_s", "train.epochs"))]
    out = subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run),
                          *args, "train.epochs=2", "train.max_steps_per_epoch=2"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    m = json.loads((run / "metrics.json").read_text())
    assert [t["global_step"] for t in m["valid_timing"]] == [2, 4]
    assert m["epochs_trained"] == 2
