"""Suite ``huge`` end to end at a toy size (200k items, fp16, 2 ranks) through apps/bench.py, and its memory guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ssd4rec_torchrec.bench.huge import predicted_gib

REPO = Path(__file__).resolve().parents[2]


def _bench(out: Path, *argv: str) -> dict:
    cmd = ["nice", "-n", "19", sys.executable, str(REPO / "apps" / "bench.py"), "huge", *argv, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return json.loads((out / "huge.json").read_text())


def test_huge_quick_two_ranks(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--quick")
    assert (tmp_path / "huge.png").stat().st_size > 0
    (row,) = res["rows"]
    assert row["status"] == "ok" and res["largest_fitting_num_items"] == 200_000 == row["num_items"]
    assert row["stats"]["items"] == 200_000 and row["stats"]["active_items"] < 200_000  # cold catalog kept
    ranks = row["per_rank"]
    assert len(ranks) == 2
    assert sum(r["table"]["rows"] for r in ranks) == 200_002  # pad + items + mask, split over the ranks
    for r in ranks:
        t = r["table"]
        assert t["dtype"] == "torch.float16" and t["table_bytes"] == t["rows"] * row["d_model"] * 2
        assert t["optimizer_state_bytes"] == t["rows"] * 4  # row-wise Adagrad: one fp32 per row
        assert set(r["phases"]) == {"data", "init", "epoch", "eval"}
        assert r["peak_rss_gib"] > 0
    assert ranks[0]["phases"]["epoch"]["steps"] > 0 and row["tokens_per_s"] > 0
    assert ranks[0]["phases"]["eval"]["users"] == 48
    for p in ("filtered", "unfiltered"):
        assert 0 <= row["metrics"][p]["HR@10"] <= 1
    top = row["first_topk"]
    assert len(top["cols"]) == 10 and top["scores"] == sorted(top["scores"], reverse=True)
    assert not (Path(res["workdir"]) / "cache").exists()  # generated data removed


def test_huge_skips_sizes_that_cannot_fit(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--quick", "--num-items", "200000", "400000", "--min-free-gib", "100000")
    (row,) = res["rows"]  # the sweep stops at the first size that does not fit
    assert row["status"] == "skipped" and "predicted" in row["reason"]
    assert res["largest_fitting_num_items"] is None and res["stopped_at"]["num_items"] == 200_000


def test_predicted_memory() -> None:
    p = predicted_gib(50_000_000, 64, 2, "rowwise_adagrad", 2)
    assert abs(p["table_per_rank"] - (25_000_001 * 64 * 2) / 2**30) < 1e-9
    assert abs(p["optimizer_per_rank"] - 25_000_001 * 4 / 2**30) < 1e-9
    assert p["total"] == 2 * p["per_rank"]
    assert predicted_gib(50_000_000, 64, 4, "rowwise_adagrad", 2)["table_per_rank"] == 2 * p["table_per_rank"]
