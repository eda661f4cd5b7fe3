"""Preemption: SIGTERM during training writes a checkpoint at the current step and exits with code 75; a
``--resume`` then ends with the same metrics as an uninterrupted run (same seed, same world size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.train.fault_worker import run_faulty

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.synthetic.num_users=200", "data.synthetic.num_items=300", "train.epochs=2",
         "train.batch_size=32", "objective.prefixes_per_user=2", "objective.max_history=20", "train.num_threads=1",
         "train.max_steps_per_epoch=6"]
SIGTERM_AT = 8  # epoch 1, step 2 (6 steps per epoch)
COMPARED = ("valid", "test", "valid_history", "best_epoch", "epochs_run", "epochs_trained", "popularity")


def _train(run: Path, *extra: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_faulty(["--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL, *extra], fault)


def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    full = _train(tmp_path / "full")
    assert full.returncode == 0, (full.stdout + full.stderr)[-4000:]
    run = tmp_path / "preempted"
    out = _train(run, fault=("--sigterm-at", str(SIGTERM_AT)))
    assert out.returncode == 75, (out.stdout + out.stderr)[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    ckpt = run / "checkpoints" / f"step-{SIGTERM_AT}"
    assert last == f"train: preempted by SIGTERM at epoch 1 step 2; checkpoint {ckpt} written, continue with --resume"
    progress = json.loads((ckpt / "progress.json").read_text())
    assert (progress["epoch"], progress["step"], progress["global_step"]) == (1, 2, SIGTERM_AT)
    assert not (run / "metrics.json").exists()
    out = _train(run, "--resume")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert f"resumed from {ckpt} (epoch 1, step 2)" in (run / "train.log").read_text()
    want = json.loads((tmp_path / "full" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    for key in COMPARED:
        assert got[key] == want[key], key


def test_sigterm_reaching_one_of_two_ranks_checkpoints_both_at_the_same_step(tmp_path) -> None:
    """The ranks agree on the step to stop at: SIGTERM reaches rank 1 only (a signal may reach the ranks at
    different steps), and both stop after that step with one complete checkpoint of it."""
    run = tmp_path / "two"
    env = {**os.environ, "SSD4REC_NO_MALLOC_TUNING": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train" / "fault_worker.py"), "--sigterm-at", "3", "--sigterm-rank", "1", "--",
           "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0, (out.stdout + out.stderr)[-4000:]
    ckpt = run / "checkpoints" / "step-3"
    assert f"train: preempted by SIGTERM at epoch 0 step 3; checkpoint {ckpt} written" in out.stderr, out.stderr[-4000:]
    progress = json.loads((ckpt / "progress.json").read_text())
    assert (progress["epoch"], progress["step"], progress["world_size"]) == (0, 3, 2)
    assert {p.name for p in ckpt.iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt", "manifest.json", ".metadata"}
    assert not (run / "metrics.json").exists()
