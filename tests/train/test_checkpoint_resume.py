"""Checkpoint/resume: atomic checkpoints, exact resume after a killed rank, re-sharding across world sizes.

- A half-written checkpoint (``.tmp-*`` dir, or a step dir without ``progress.json``/``.metadata``) is
  never picked up by ``--resume``; ``--resume`` with no checkpoint starts fresh.
- Kill/resume: a 2-rank TorchX job whose rank 1 SIGKILLs itself mid-epoch (at a checkpoint step, so a
  ``.tmp-`` dir is left behind) is restarted in-job by torchrun (``--env PET_MAX_RESTARTS=1``; TorchX's
  ``--max_retries`` is a no-op on ``local_cwd``) with the app always passing ``--resume``. Its
  ``metrics.json`` must equal the uninterrupted run's (tolerance 1e-6; observed: bit-identical).
- A checkpoint written by 2 ranks is evaluated on 1 rank and vice versa: the metrics match the writing
  run's, and the loaded model and optimizer state (item table, fused ``momentum1``, AdamW moments) equal
  the checkpoint's full tensors exactly.

This file doubles as the evaluation worker (``python this_file.py eval <run_dir> <out_dir>``, also
under torchrun) for the cross-world-size tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# ~7 steps/epoch on 2 ranks, 13 on 1; `--set=k=v` because TorchX rejects a repeated `--set` option.
SMALL = [f"--set={kv}" for kv in (
    "data.synthetic.num_users=200", "data.synthetic.num_items=300", "train.epochs=2", "train.batch_size=32",
    "objective.prefixes_per_user=2", "objective.max_history=20", "train.checkpoint_every_steps=3",
    "train.num_threads=1",
)]
FAULT_WORKER = "tests/train/fault_worker.py"  # SIGKILLs a rank at a checkpoint (SSD4REC_FAULT_AT_STEP)
FAULT_STEP = 13  # 2 ranks: epoch 1, step 6 = a checkpoint step, so step-13 is left half-written
RESUME_TOL = 1e-6  # kill/resume vs uninterrupted (same world size)
RESHARD_TOL = 1e-5  # same checkpoint evaluated on another world size: only the eval batching differs


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSD4REC_FAULT_AT_STEP"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def _torchx_train(run: Path, *torchx_args: str, script: str = "apps/train.py") -> subprocess.CompletedProcess:
    return _run([str(BIN / "torchx"), "run", "dist.ddp", "-j", "1x2", *torchx_args, "--script", script,
                 "--", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--resume", *SMALL])


def _metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = float(v)
    return out


def _max_diff(a: dict, b: dict) -> float:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return max(abs(fa[k] - fb[k]) for k in fa)


# ---------------------------------------------------------------- fixtures (one training run each)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """Uninterrupted 2-rank TorchX job (also passes --resume on an empty run dir: starts fresh)."""
    run = tmp_path_factory.mktemp("two") / "run"
    _ok(_torchx_train(run))
    assert "resumed from" not in (run / "train.log").read_text()
    return run


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory) -> Path:
    """1-rank job started with --resume into a run dir holding only half-written checkpoints."""
    run = tmp_path_factory.mktemp("one") / "run"
    ckpts = run / "checkpoints"
    tmp = ckpts / ".tmp-step-999"  # written completely but never renamed (crash just before the rename)
    tmp.mkdir(parents=True)
    (tmp / "progress.json").write_text(json.dumps({"epoch": 5, "step": 0, "global_step": 999}))
    (tmp / ".metadata").write_bytes(b"garbage")
    no_progress = ckpts / "step-998"  # shards but no progress.json: never complete
    no_progress.mkdir()
    (no_progress / ".metadata").write_bytes(b"garbage")
    _ok(_run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--resume",
              *SMALL]))
    return run


# ---------------------------------------------------------------- 1 + 4: atomicity, fresh resume


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)


def _tiny_step(model: _Tiny, opt: Any) -> None:
    opt.zero_grad()
    model.lin(torch.randn(4, 3)).square().sum().backward()
    opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path, monkeypatch):
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    from ssd4rec_torchrec.job import checkpoint as ck

    def build() -> tuple[_Tiny, KeyedOptimizerWrapper]:
        m = _Tiny()
        return m, KeyedOptimizerWrapper(dict(m.named_parameters()), lambda p: torch.optim.AdamW(p, lr=0.1))

    root = tmp_path / "checkpoints"
    assert ck.latest_checkpoint(root) is None  # no directory at all
    model, opt = build()
    _tiny_step(model, opt)
    ck.save_checkpoint(root, "step-1", model, opt, {"epoch": 0, "step": 1, "global_step": 1}, rank=0, keep=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moment = opt.state_dict()["state"]["lin.weight"]["exp_avg"].clone()
    _tiny_step(model, opt)

    def crash(state: dict, checkpoint_id: str) -> None:  # shards half written, then the process dies
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(ck.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="mid-save"):
        ck.save_checkpoint(root, "step-2", model, opt, {"epoch": 0, "step": 2, "global_step": 2}, rank=0)
    monkeypatch.undo()
    assert not (root / ".tmp-step-2").exists()  # a failed save removes what it wrote
    (root / ".tmp-step-2").mkdir()  # as a process killed mid-save leaves it
    (root / ".tmp-step-2" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step-3").mkdir()  # renamed by hand without progress.json
    (root / "step-3" / ".metadata").write_bytes(b"x")
    (root / "step-4").mkdir()  # progress.json but no DCP metadata
    (root / "step-4" / "progress.json").write_text("{}")
    assert (root / ".tmp-step-2").is_dir() and not (root / "step-2").exists()
    assert ck.list_checkpoints(root) == [root / "step-1"]

    fresh, fresh_opt = build()  # a new process: AdamW state is lazy until loaded
    progress = ck.load_checkpoint(ck.latest_checkpoint(root), fresh, fresh_opt, rank=0)
    assert progress["global_step"] == 1 and progress["world_size"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k])
    assert torch.equal(fresh_opt.state_dict()["state"]["lin.weight"]["exp_avg"], saved_moment)

    # a crash between the two renames of a `best` replacement: the old `best` comes back
    ck.save_checkpoint(root, "best", model, None, {"epoch": 1}, rank=0)
    (root / "best").rename(root / ".old-best")
    ck.clean_temp(root)
    assert ck.is_complete(root / "best")
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())
    # rotation keeps the newest `keep` complete step checkpoints
    for n in (5, 6, 7):
        ck.save_checkpoint(root, f"step-{n}", model, opt, {"global_step": n}, rank=0, keep=2)
    assert ck.list_checkpoints(root) == [root / "step-6", root / "step-7"]


@pytest.mark.slow
def test_resume_ignores_half_written_and_starts_fresh(one_rank_run):
    log = (one_rank_run / "train.log").read_text()
    assert "resumed from" not in log
    m = _metrics(one_rank_run)
    assert m["epochs_run"] == 2 and m["world_size"] == 1
    names = {p.name for p in (one_rank_run / "checkpoints").iterdir()}
    assert ".tmp-step-999" not in names  # cleaned up at start
    assert {"best", "step-25", "step-26"} <= names


# ---------------------------------------------------------------- 2: kill one rank, resume, same metrics


def _assert_same_result(reference: Path, run: Path) -> float:
    a, b = _metrics(reference), _metrics(run)
    diff = _max_diff({"valid": a["valid"], "test": a["test"]}, {"valid": b["valid"], "test": b["test"]})
    history = _max_diff({str(i): h for i, h in enumerate(a["valid_history"])},
                        {str(i): h for i, h in enumerate(b["valid_history"])})
    assert diff <= RESUME_TOL and history <= RESUME_TOL, (diff, history)
    for k in ("best_epoch", "epochs_run", "stopped_early", "world_size"):
        assert a[k] == b[k], k
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("restart", ["in-job", "rerun"])
def test_killed_rank_resumes_to_identical_metrics(two_rank_run, tmp_path, restart):
    """``in-job``: torchrun restarts the worker group once (``PET_MAX_RESTARTS=1``; the shared rendezvous
    store must be off, pytorch/pytorch#135712, else the restarted gloo group often fails to connect or
    hangs). ``rerun``: the failed job is launched again with ``--resume``."""
    run = tmp_path / "run"
    fault = f"SSD4REC_FAULT_AT_STEP=1:{FAULT_STEP}"
    if restart == "in-job":
        _ok(_torchx_train(run, "--env", f"{fault},PET_MAX_RESTARTS=1,TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                          script=FAULT_WORKER))
    else:
        first = _torchx_train(run, "--env", fault, script=FAULT_WORKER)
        assert first.returncode != 0 and not (run / "metrics.json").exists()
        assert (run / "checkpoints" / f".tmp-step-{FAULT_STEP}").is_dir()  # rank 0 died inside the save
        _ok(_torchx_train(run, "--env", fault, script=FAULT_WORKER))  # the marker file stops a second fault
    assert (run / f".fault-injected-rank1-step{FAULT_STEP}").exists(), "the fault was not injected"
    log = (run / "train.log").read_text()
    assert f"checkpoints/step-{FAULT_STEP - 3} (epoch 1, step 3)" in log  # the half-written step-13 skipped
    diff = _assert_same_result(two_rank_run, run)
    print(f"kill/resume ({restart}) vs uninterrupted: max |diff| of valid/test metrics = {diff:.3g}")


# ---------------------------------------------------------------- 3: 2 ranks -> 1 and 1 -> 2


def _full_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Flatten a (DCP-loaded) nested state dict to ``a.b.c -> tensor``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _full_tensors(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _check_resharded(run: Path, out_dir: Path, world_size: int, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    result = json.loads((out_dir / "result.json").read_text())
    m = _metrics(run)
    assert m["world_size"] != world_size
    best = result["best"]
    assert best["world_size"] == world_size
    d_best = _max_diff({"valid": m["valid"], "test": m["test"]}, {"valid": best["valid"], "test": best["test"]})
    last = result["last"]
    assert last["epoch"] == m["epochs_run"]
    d_last = _max_diff(m["valid_history"][-1]["filtered"], last["valid"]["filtered"])
    print(f"{m['world_size']}->{world_size} ranks: max |diff| best {d_best:.3g}, last {d_last:.3g}")
    assert d_best <= RESHARD_TOL and d_last <= RESHARD_TOL
    # the loaded (re-sharded) model and optimizer state equal the checkpoint's full tensors
    for name, ckpt in (("best", run / "checkpoints" / "best"), ("last", run / "checkpoints" / last["name"])):
        dcp_to_torch_save(ckpt, tmp_path / f"{name}.pt")
        expected = _full_tensors(torch.load(tmp_path / f"{name}.pt", weights_only=False))
        loaded = torch.load(out_dir / f"{name}.pt", weights_only=True)
        if name == "last":
            assert any(k.endswith("momentum1") for k in loaded), "fused optimizer state missing"
            assert any(k.endswith("exp_avg_sq") for k in loaded), "AdamW state missing"
        assert expected.keys() == loaded.keys()
        for k, v in loaded.items():
            assert torch.equal(v, expected[k]), k


@pytest.mark.slow
def test_two_rank_checkpoint_loads_on_one_rank(two_rank_run, tmp_path):
    out = tmp_path / "eval"
    _ok(_run([sys.executable, __file__, "eval", str(two_rank_run), str(out)]))
    _check_resharded(two_rank_run, out, 1, tmp_path)


@pytest.mark.slow
def test_one_rank_checkpoint_loads_on_two_ranks(one_rank_run, tmp_path):
    out = tmp_path / "eval"
    _ok(_run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__, "eval", str(one_rank_run),
              str(out)], OMP_NUM_THREADS="1"))
    _check_resharded(one_rank_run, out, 2, tmp_path)


# ---------------------------------------------------------------- worker


def _gather_full(state: dict, rank: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collective: every tensor of a (possibly sharded) state dict as a full tensor on rank 0."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_gather_full(v, rank, f"{key}."))
        elif isinstance(v, ShardedTensor):
            full = torch.empty(v.size(), dtype=v.dtype) if rank == 0 else None
            v.gather(dst=0, out=full)
            if rank == 0:
                out[key] = full
        elif isinstance(v, torch.Tensor):
            out[key] = v.detach().clone()
    return out


def _eval_worker(run_dir: str, out_dir: str) -> None:
    """Evaluate ``best`` and the latest step checkpoint of ``run_dir`` on this job's world size."""
    import torch.distributed as dist

    from ssd4rec_torchrec.config import load_train_config
    from ssd4rec_torchrec.eval.model_eval import evaluate
    from ssd4rec_torchrec.job import restore
    from ssd4rec_torchrec.job.checkpoint import has_optimizer_state, latest_checkpoint

    run, out = Path(run_dir), Path(out_dir)
    cfg = load_train_config(run / "config.yaml")
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None
    result: dict[str, Any] = {}
    for name, path in (("best", run / "checkpoints" / "best"), ("last", latest)):
        job = restore(cfg, path, load_optimizer=has_optimizer_state(path))  # DCP re-shards to this world size
        r = {s: evaluate(job.model, job.split, s, cfg, job.ctx, job.num_items) for s in ("valid", "test")}
        r.update(world_size=job.ctx.world_size, progress=json.loads((path / "progress.json").read_text()))
        rank = dist.get_rank()
        state = {"model": job.dmp.state_dict()}
        if name == "last":
            state["optim"] = {"state": job.optimizer.state_dict()["state"]}
        full = _gather_full(state, rank)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(full, out / f"{name}.pt")
            result[name] = {"valid": r["valid"], "test": r["test"], "world_size": r["world_size"],
                            "name": path.name, "epoch": r["progress"]["epoch"]}
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    if sys.argv[1:2] == ["eval"]:
        _eval_worker(*sys.argv[2:4])
    else:
        sys.exit(f"usage: {sys.argv[0]} eval RUN_DIR OUT_DIR")
