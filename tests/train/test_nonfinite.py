"""``train.on_nonfinite``: a NaN injected into one training step's loss.

- ``stop`` (the default): the job exits with code 3 and one line naming the epoch, step and quantity; the
  checkpoint written before the bad step stays the latest and no ``metrics.json`` is written.
- ``skip``: the step's update is dropped (the model's parameters - item table included - are bit-identical
  before and after that step, while every other step changes them), the run finishes with finite metrics,
  and ``metrics.json`` counts the skipped step.

The NaN comes from ``tests/train/fault_worker.py`` (``--nan-at``), which also records a digest of the model's
parameters at the start of every training step (``--trace``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.train.fault_worker import run_faulty

REPO = Path(__file__).resolve().parents[2]
NAN_AT = 5
SMALL = ["--set", "data.synthetic.num_users=200", "data.synthetic.num_items=300", "train.epochs=1",
         "train.batch_size=32", "objective.prefixes_per_user=2", "objective.max_history=20", "train.num_threads=1",
         "train.checkpoint_every_steps=3", "train.max_steps_per_epoch=8"]


def _run(run: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    trace = run.parent / f"{run.name}-digests.json"
    args = ["--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL, *extra]
    out = run_faulty(args, ("--nan-at", str(NAN_AT), "--trace", str(trace)), timeout=600)
    return out, json.loads(trace.read_text()) if trace.is_file() else []


def test_nonfinite_stop_names_epoch_step_and_quantity_and_keeps_the_last_checkpoint(tmp_path) -> None:
    run = tmp_path / "stop"
    out, digests = _run(run)
    assert out.returncode == 3, (out.stdout + out.stderr)[-4000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    last = lines[-1]
    assert last.startswith("train: non-finite loss (nan) at epoch 0 step 5 "), last
    assert "train.on_nonfinite: stop" in last and "step-3" in last, last
    assert len(digests) == NAN_AT  # it stopped at the bad step
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-3"], ckpts  # the last good checkpoint is the latest; nothing half-written
    assert json.loads((run / "checkpoints" / "step-3" / "progress.json").read_text())["global_step"] == 3
    assert not (run / "metrics.json").exists()


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path) -> None:
    out, digests = _run(tmp_path / "skip", "--set", "train.on_nonfinite=skip")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert len(digests) == 8
    # digests[i] = the parameters at the start of step i + 1: step NAN_AT's update is dropped, all others apply
    for i in range(len(digests) - 1):
        same = digests[i] == digests[i + 1]
        assert same == (i + 1 == NAN_AT), (i, same)
    m = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert m["nonfinite_steps_skipped"] == 1
    assert m["nonfinite_skipped"] == [{"epoch": 0, "step": NAN_AT, "global_step": NAN_AT, "quantity": "loss (nan)"}]
    assert all(math.isfinite(v) for v in m["test"]["filtered"].values())
    assert "non-finite loss (nan) at epoch 0 step 5: update skipped" in out.stderr


def test_first_nonfinite_grad_names_the_parameter() -> None:
    import torch

    from ssd4rec_torchrec.train.guard import first_nonfinite_grad

    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, float("inf"), 0.0])
    assert first_nonfinite_grad([("a", a), ("b", b), ("c", c)]) == "gradient of b (inf)"
    b.grad = torch.tensor([float("nan"), float("inf"), 0.0])
    assert first_nonfinite_grad([("a", a), ("b", b)]) == "gradient of b (nan)"
    b.grad = torch.tensor([3e38, 3e38, 3e38])  # finite, though its norm overflows float32
    assert first_nonfinite_grad([("a", a), ("b", b)]) is None
    assert first_nonfinite_grad([("c", c)]) is None  # no gradient at all


def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(tmp_path) -> None:
    """2 gloo ranks, NaN on rank 1 only: both ranks drop step 5's update (their parameters are unchanged by it)
    and train on in step."""
    run = tmp_path / "two"
    trace = tmp_path / "digests.json"
    env = {**os.environ, "SSD4REC_NO_MALLOC_TUNING": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train" / "fault_worker.py"), "--nan-at", str(NAN_AT), "--nan-rank", "1",
           "--trace", str(trace), "--", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL,
           "--set", "train.on_nonfinite=skip"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for rank in (0, 1):
        digests = json.loads(Path(f"{trace}.rank{rank}").read_text())
        assert len(digests) > NAN_AT
        for i in range(len(digests) - 1):
            assert (digests[i] == digests[i + 1]) == (i + 1 == NAN_AT), (rank, i)
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["nonfinite_steps_skipped"] == 1
    assert m["nonfinite_skipped"][0]["quantity"] == "loss (non-finite on another rank)"
