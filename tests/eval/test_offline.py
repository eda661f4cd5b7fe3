"""apps/evaluate.py on a real (tiny) run: metrics equal the run's own, the top-K dump reproduces them,
and a 2-rank evaluation equals the 1-rank one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.synthetic.num_users=300", "train.epochs=1", "train.batch_size=64"]


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL],
                   cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    return run


def _metrics_from_dump(table, k: int) -> tuple[float, float]:
    users = np.asarray(table["user_id"])
    hit = np.asarray(table["item_id"]) == np.asarray(table["target_item_id"])
    rank = np.asarray(table["rank"])
    n = len(np.unique(users))
    return float(hit[rank <= k].sum() / n), float((hit / np.log2(rank + 1))[rank <= k].sum() / n)


def test_evaluate_reproduces_run_and_dump(run_dir, tmp_path):
    dump = tmp_path / "top.csv"
    out = subprocess.run([sys.executable, "apps/evaluate.py", "--run", str(run_dir), "--dump-topk", str(dump),
                          "--k", "20"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reported = json.loads((run_dir / "metrics.json").read_text())["test"]
    evaluated = json.loads((run_dir / "eval_test.json").read_text())["metrics"]
    for protocol in ("filtered", "unfiltered"):
        for key, value in reported[protocol].items():
            assert evaluated[protocol][key] == pytest.approx(value, abs=1e-12)
    table = pacsv.read_csv(dump)
    assert table.column_names == ["user_id", "rank", "item_id", "score", "target_item_id"]
    assert table.num_rows == 20 * int(reported["filtered"]["count"])
    hr, ndcg = _metrics_from_dump(table, 10)  # tiny config validates on the filtered protocol
    assert hr == pytest.approx(reported["filtered"]["HR@10"], abs=1e-9)
    assert ndcg == pytest.approx(reported["filtered"]["NDCG@10"], abs=1e-9)
    scores = np.asarray(table["score"]).reshape(-1, 20)
    assert (np.diff(scores, axis=1) <= 0).all()  # ranked by score


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank(run_dir, tmp_path):
    torchx = str(Path(sys.executable).parent / "torchx")
    dump = tmp_path / "top.parquet"
    out = subprocess.run([torchx, "run", "dist.ddp", "-j", "1x2", "--script", "apps/evaluate.py", "--", "--run-dir",
                          str(run_dir), "--out", str(tmp_path / "m2.json"), "--dump-topk", str(dump), "--k", "10",
                          "--protocol", "unfiltered"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    two = json.loads((tmp_path / "m2.json").read_text())["metrics"]
    one = json.loads((run_dir / "metrics.json").read_text())["test"]
    for protocol in ("filtered", "unfiltered"):
        for key, value in one[protocol].items():
            assert two[protocol][key] == pytest.approx(value, abs=1e-9)
    hr, ndcg = _metrics_from_dump(pq.read_table(dump), 10)
    assert hr == pytest.approx(one["unfiltered"]["HR@10"], abs=1e-9)
    assert ndcg == pytest.approx(one["unfiltered"]["NDCG@10"], abs=1e-9)


def test_bad_arguments_fail_in_one_line(tmp_path, run_dir):
    cases = [
        (["--run", str(tmp_path / "nope")], "not a run directory"),
        (["--run", str(run_dir), "--dump-topk", str(tmp_path / "x.txt")], "use a .csv or .parquet"),
        (["--run", str(run_dir), "--checkpoint", str(tmp_path)], "no"),
        (["--run", str(run_dir), "--k", "0", "--dump-topk", str(tmp_path / "x.csv")], "k must be >= 1"),
    ]
    for args, expected in cases:
        out = subprocess.run([sys.executable, "apps/evaluate.py", *args], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr[-1000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("evaluate: error:") and expected in last, last
