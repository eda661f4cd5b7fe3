"""Checkpoint faults: a write error leaves the previous complete checkpoint intact (and the job fails with one
line, or trains on with ``train.checkpoint_errors: warn``); a truncated or corrupted checkpoint is detected
on resume by its manifest's checksums and the previous complete one is used, with a warning naming it."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ssd4rec_torchrec.job import checkpoint as ck
from tests.train.fault_worker import run_faulty

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.synthetic.num_users=200", "data.synthetic.num_items=300", "train.epochs=1",
         "train.batch_size=32", "objective.prefixes_per_user=2", "objective.max_history=20", "train.num_threads=1",
         "train.checkpoint_every_steps=3", "train.max_steps_per_epoch=8", "train.keep_checkpoints=3"]


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)


def _build():
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    m = _Tiny()
    return m, KeyedOptimizerWrapper(dict(m.named_parameters()), lambda p: torch.optim.AdamW(p, lr=0.1))


def _step(model, opt) -> None:
    opt.zero_grad()
    model.lin(torch.randn(4, 3)).square().sum().backward()
    opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    model, opt = _build()
    _step(model, opt)
    ck.save_checkpoint(root, "step-1", model, opt, {"global_step": 1}, rank=0, keep=2)
    before = {p.name: p.read_bytes() for p in (root / "step-1").iterdir()}
    _step(model, opt)

    torch_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if not str(f).endswith("rng-rank0.pt"):
            return torch_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"par")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.torch, "save", disk_full)  # the RNG file, after DCP wrote the shards
    with pytest.raises(ck.CheckpointWriteError, match=r"step-2 was not written .*No space left on device"):
        ck.save_checkpoint(root, "step-2", model, opt, {"global_step": 2}, rank=0, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # nothing half-written is left
    assert {p.name: p.read_bytes() for p in (root / "step-1").iterdir()} == before
    assert ck.resume_checkpoint(root, 0) == root / "step-1" and ck.verify_checkpoint(root / "step-1") is None

    # replacing `best` fails after its files are written: the previous `best` stays
    ck.save_checkpoint(root, "best", model, None, {"epoch": 1}, rank=0)
    best = {p.name: p.read_bytes() for p in (root / "best").iterdir()}
    write_durable = ck._write_durable

    def io_error(path: Path, text: str) -> None:
        if path.name == ck.PROGRESS:
            raise OSError(errno.EIO, "I/O error")
        write_durable(path, text)

    monkeypatch.setattr(ck, "_write_durable", io_error)
    with pytest.raises(ck.CheckpointWriteError, match="best was not written"):
        ck.save_checkpoint(root, "best", model, None, {"epoch": 2}, rank=0)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (root / "best").iterdir()} == best
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-1"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "progress"])
def test_damaged_checkpoint_is_skipped_on_resume(tmp_path, caplog, damage) -> None:
    root = tmp_path / "checkpoints"
    model, opt = _build()
    for n in (1, 2, 3):
        _step(model, opt)
        ck.save_checkpoint(root, f"step-{n}", model, opt, {"global_step": n}, rank=0, keep=3)
    assert ck.resume_checkpoint(root, 0) == root / "step-3"
    manifest = json.loads((root / "step-3" / ck.MANIFEST).read_text())["files"]
    assert {".metadata", "rng-rank0.pt"} <= set(manifest) and any(n.endswith(".distcp") for n in manifest)
    shard = next((root / "step-3").glob("*.distcp"))
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:-9] + bytes([data[-9] ^ 0x01]) + data[-8:])
        reason = f"{shard.name} does not match its sha256"
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        reason = f"{shard.name} has {len(data) // 2} bytes"
    elif damage == "delete":
        (root / "step-3" / "rng-rank0.pt").unlink()
        reason = "rng-rank0.pt is missing"
    else:
        (root / "step-3" / ck.PROGRESS).write_text('{"global_st')
        reason = "progress.json unreadable"
    assert reason in (ck.verify_checkpoint(root / "step-3") or "")
    with caplog.at_level(logging.WARNING, "ssd4rec_torchrec.job.checkpoint"):
        assert ck.resume_checkpoint(root, 0) == root / "step-2"
    assert any(str(root / "step-3") in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert ck.verify_checkpoint(root / "step-2") is None


# ------------------------------------------------------------------ the training job


def _train(run: Path, *extra: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_faulty(["--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL, *extra], fault)


def test_job_checkpoint_write_error_fails_with_one_line_or_warns(tmp_path) -> None:
    # saves: step-3 (1st), step-6 (2nd) fails, step-8 (end of epoch)
    run = tmp_path / "fail"
    out = _train(run, fault=("--oserror-at-save", "2"))
    assert out.returncode == 4, (out.stdout + out.stderr)[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train: checkpoint ") and "step-6 was not written" in last, last
    assert "No space left on device" in last and "train.checkpoint_errors: fail" in last, last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]
    assert ck.verify_checkpoint(run / "checkpoints" / "step-3") is None

    run = tmp_path / "warn"
    out = _train(run, "--set", "train.checkpoint_errors=warn", fault=("--oserror-at-save", "2"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "step-6 was not written" in out.stderr and "train.checkpoint_errors: warn" in out.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "step-3", "step-8"], names
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1


def test_job_resume_falls_back_past_a_corrupted_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    out = _train(run)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    latest = run / "checkpoints" / "step-8"
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    out = _train(run, "--resume", "--set", "train.epochs=2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    log = (run / "train.log").read_text()
    assert f"checkpoint {latest} is damaged ({shard.name} has" in log, log[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-6'} (epoch 0, step 6)" in log, log[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2
