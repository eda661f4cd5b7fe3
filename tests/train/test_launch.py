"""The launch forms README documents all work: plain python, and TorchX dist.ddp with 1x2, 2x1 and 2x8.

Each run is shrunk with --set overrides (one short epoch on a small synthetic set) and must write a
metrics.json whose world size matches the launch and whose test NDCG@10 beats the popularity ranking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.synthetic.num_users=400", "train.epochs=1", "train.batch_size=64"]  # one --set: TorchX
# rejects repeated flags


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun from the venv
    return env


def _check(run_dir: Path, world_size: int) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == world_size
    for protocol in ("filtered", "unfiltered"):
        assert metrics["test"][protocol]["NDCG@10"] > metrics["popularity"]["test"][protocol]["NDCG@10"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert any((run_dir / "tb").iterdir())


def test_plain_python(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL],
                   cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    _check(run, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("form", "world"),
    [
        (["-j", "1x2", "--script", "apps/train.py", "--"], 2),  # README's ML-1M form
        (["-j", "2x1", "apps/train.py"], 2),  # two "nodes" on one host: multi-node rendezvous
        (["-j", "2x8", "apps/train.py"], 16),  # what users type: positional script path, 16 ranks
    ],
    ids=["1x2-script", "2x1-positional", "2x8-positional"],
)
def test_torchx_dist_ddp(tmp_path, form, world):
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchx"), "run", "dist.ddp", *form,
           "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    _check(run, world)
