"""Benchmark suite ``huge``: a huge synthetic catalog row-wise sharded over 2 ranks on one machine.

For each catalog size (``--num-items``, a sweep that stops at the first size that does not fit) it launches
``python -m torch.distributed.run --standalone --nproc_per_node=R -m ssd4rec_torchrec.bench.huge --worker``
with the training config (default ``configs/huge.yaml``: fp16 table, row-wise Adagrad, sampled softmax).
Each rank runs the phases of a real job and reports them:

- ``data``: rank 0 generates and prepares the synthetic histories (full catalog kept), the others wait;
- ``init``: the model built on ``meta``, planned and materialised by DMP (each rank allocates its shard);
- ``epoch``: one epoch with ``TrainPipelineSparseDist`` (history tokens/s over all ranks);
- ``eval``: exact sharded ranking (HR/NDCG, both protocols) and filtered top-k of ``train.eval_sample_users``
  users, every rank scoring only its own rows in bounded blocks (``eval.sharded``).

Per rank: peak RSS per phase (VmHWM, reset between phases through ``/proc/self/clear_refs``), table and
fused-optimizer-state bytes, wall time per phase. No checkpoint is written (its size is reported: table +
optimizer state). The parent watches ``MemAvailable`` and kills the job (its own process group) before the
machine runs short (``--min-free-gib``); a size whose predicted footprint does not fit is not started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/huge.yaml"
QUICK_ITEMS = 200_000
QUICK_SET = ["data.synthetic.num_users=600", "data.synthetic.num_clusters=50", "data.synthetic.mean_length=12",
             "train.eval_sample_users=48", "train.batch_size=64", "loss.num_negatives=64", "model.d_model=32"]
TOPK = 10
BASE_RSS_GIB = 1.0  # per rank: interpreter, torch, model, data arrays, activations, eval blocks (measured ~0.9)
SAMPLER_BYTES_PER_ITEM = 4  # per rank: the negative sampler's int32 item counts


# ---------------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_gib() -> float:
    """Current resident set size of this process (GiB)."""
    return _status_kib("VmRSS") / 2**20


def peak_rss_gib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM; getrusage's lifetime peak as a fallback)."""
    hwm = _status_kib("VmHWM")
    return hwm / 2**20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available_gib() -> float:
    """The machine's ``MemAvailable`` (GiB; inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def predicted_gib(num_items: int, d: int, table_bytes: int, optimizer: str, world: int) -> dict[str, float]:
    """Predicted memory of the job: per rank (table shard + optimizer state + sampler + base) and total."""
    rows = -(-(num_items + 2) // world)
    table = rows * d * table_bytes
    opt = rows * 4 * (d if optimizer == "adagrad" else 1 if optimizer == "rowwise_adagrad" else 0)
    per_rank = (table + opt + num_items * SAMPLER_BYTES_PER_ITEM) / 2**30 + BASE_RSS_GIB
    return {"table_per_rank": table / 2**30, "optimizer_per_rank": opt / 2**30, "per_rank": per_rank,
            "total": per_rank * world}


# ---------------------------------------------------------------------------------------------------- worker


def _local_bytes(t: Any) -> int:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(t, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    return t.numel() * t.element_size() if hasattr(t, "element_size") else 0


class _Phases:
    """Wall time and peak RSS per phase of one rank; the report is rewritten after every phase, so a run
    killed later (out of memory) still tells what it got through."""

    def __init__(self, path: Path, report: dict[str, Any]) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.path, self.report = path, report
        self.resettable = reset_peak_rss()
        self._t = time.perf_counter()

    def write(self, **extra: Any) -> None:
        self.report.update(phases=self.rows, peak_reset_per_phase=self.resettable, **extra)
        self.report["peak_rss_gib"] = round(max(r["peak_rss_gib"] for r in self.rows.values()), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def done(self, name: str, **extra: Any) -> None:
        import torch.distributed as dist

        dist.barrier()  # phases end together, so every rank's time covers the same work
        self.rows[name] = {"seconds": round(time.perf_counter() - self._t, 3),
                           "peak_rss_gib": round(peak_rss_gib(), 3), "rss_gib_after": round(rss_gib(), 3), **extra}
        row = self.rows[name]
        log.info("phase %s: %.1f s, peak RSS %.2f GiB", name, row["seconds"], row["peak_rss_gib"])
        self.resettable = reset_peak_rss() and self.resettable
        self.write()
        self._t = time.perf_counter()


def worker_main(argv: list[str] | None = None) -> int:
    """One rank of the huge job (launched by :func:`launch`): data, init, one epoch, sampled exact eval."""
    p = argparse.ArgumentParser(prog="ssd4rec_torchrec.bench.huge --worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="directory for rank<r>.json")
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args(argv)

    import itertools

    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from tqdm import tqdm

    from ..config import load_train_config
    from ..data.loader import eval_user_sample
    from ..eval.metrics import PROTOCOLS, RankingMetrics
    from ..eval.model_eval import eval_user_batches, item_blocks
    from ..eval.sharded import sharded_score_ranks, sharded_topk
    from ..job import build_run, init_distributed, prepare_data
    from ..model import TABLE
    from ..train.loop import build_train_loader, count_tokens, pipeline_steps

    cfg = load_train_config(args.config, args.overrides)
    ctx = init_distributed()
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("torchrec", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    phases = _Phases(Path(args.out) / f"rank{ctx.rank}.json",
                     {"rank": ctx.rank, "world_size": ctx.world_size, "complete": False})

    ds = prepare_data(cfg, ctx)
    split = ds.leave_one_out()
    n_items = ds.num_items
    phases.done("data", interactions=int(ds.num_interactions), users=int(ds.num_users),
                active_items=int(ds.stats.get("active_items", n_items)))

    job = build_run(cfg, ctx, data=(ds, split))
    dmp, optimizer = job.dmp, job.optimizer
    weight = dmp.module.ec.state_dict()[f"embeddings.{TABLE}.weight"]
    shards = weight.local_shards() if hasattr(weight, "local_shards") else []
    table_bytes = _local_bytes(weight)
    opt_bytes = sum(_local_bytes(v) for st in dmp.fused_optimizer.state_dict()["state"].values() for v in st.values())
    dense_bytes = sum(p.numel() * p.element_size() for n, p in dmp.module.named_parameters() if not n.startswith("ec."))
    table = {"rows": sum(s.tensor.shape[0] for s in shards), "dtype": str(shards[0].tensor.dtype) if shards else None,
             "table_bytes": table_bytes, "optimizer_state_bytes": opt_bytes, "dense_parameter_bytes": dense_bytes}
    phases.report.update(num_items=n_items, table=table, stats=ds.stats)
    phases.done("init", **table)

    loader, steps = build_train_loader(cfg, split, n_items, ctx)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device)
    dmp.train()
    tokens = [0]
    batches = count_tokens(itertools.islice(loader.epoch(0), steps), tokens)
    losses, step_seconds = [], 0.0
    for loss, seconds in tqdm(pipeline_steps(pipeline, batches), total=steps, desc="epoch 0",
                              disable=not ctx.is_main, mininterval=2.0, dynamic_ncols=True):
        step_seconds += seconds
        losses.append(float(loss))
    pipeline.detach()
    all_tokens = torch.tensor(tokens, dtype=torch.long)
    dist.all_reduce(all_tokens)
    phases.done("epoch", steps=len(losses), tokens_all_ranks=int(all_tokens), step_seconds=round(step_seconds, 3),
                tokens_per_s=round(int(all_tokens) / max(step_seconds, 1e-9), 1),
                loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)

    model = dmp.module
    model.eval()
    blocks = item_blocks(model, ctx)
    sample = eval_user_sample(len(split.test_targets), cfg.train.eval_sample_users, cfg.seed)
    metrics = {p: RankingMetrics() for p in PROTOCOLS}
    rank_s = topk_s = 0.0
    first_topk = None
    with torch.no_grad():
        for b in eval_user_batches(model, split, "test", cfg, ctx, n_items, users=sample):
            vectors, targets, hv, ho = b.vectors, b.targets, b.history_values, b.history_offsets
            t0 = time.perf_counter()
            ranks = sharded_score_ranks(vectors, targets, hv, ho, blocks, n_items)
            t1 = time.perf_counter()
            scores, cols = sharded_topk(vectors, targets, blocks, n_items, TOPK, history_values=hv, history_offsets=ho)
            topk_s, rank_s = topk_s + time.perf_counter() - t1, rank_s + t1 - t0
            for p in PROTOCOLS:
                metrics[p].update(ranks[p])
            if first_topk is None and len(targets):
                first_topk = {"user": int(b.users[0]), "target_col": int(targets[0]) - 1,
                              "cols": cols[0].tolist(), "scores": scores[0].tolist()}
    result = {p: m.all_reduce().compute() for p, m in metrics.items()}
    phases.done("eval", users=0 if sample is None else len(sample), blocks=len(blocks), rank_seconds=round(rank_s, 3),
                topk_seconds=round(topk_s, 3), k=TOPK)

    lifetime_peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    phases.write(complete=True, lifetime_peak_rss_gib=lifetime_peak,
                 metrics={p: {k: result[p][k] for k in ("HR@10", "NDCG@10")} for p in PROTOCOLS},
                 first_topk=first_topk)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------- parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the huge suite."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config (default {DEFAULT_CONFIG})")
    parser.add_argument("--num-items", type=int, nargs="+", default=None, metavar="N",
                        help="catalog sizes to try in order, stopping at the first that does not fit "
                             "(default: the config's data.synthetic.num_items)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks on this machine (default 2)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run")
    parser.add_argument("--min-free-gib", type=float, default=3.0,
                        help="kill a run when the machine's available memory falls below this (default 3)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated datasets under --out")
    parser.add_argument("--quick", action="store_true", help=f"toy size ({QUICK_ITEMS} items, a few users)")


def _descendants(pid: int) -> list[int]:
    """Process ids of ``pid``'s children, grandchildren, ... (from ``/proc``; torchrun's workers run in their
    own sessions, so killing the launcher's process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started (by id), the workers first."""
    for p in [*reversed(_descendants(pid)), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _run_job(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, min_free_gib: float
             ) -> dict[str, Any]:
    """Run ``cmd``; kill it and its workers if the machine's memory runs short or time is up."""
    t0 = time.perf_counter()
    lowest = mem_available_gib()
    status, reason = "ok", None
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(0.25)
            free = mem_available_gib()
            lowest = min(lowest, free)
            if free < min_free_gib:
                status, reason = "out_of_memory", f"available memory fell to {free:.1f} GiB (< {min_free_gib} GiB)"
            elif time.perf_counter() - t0 > timeout:
                status, reason = "timeout", f"still running after {timeout:.0f} s"
            if status != "ok":
                _kill_tree(proc.pid)
                proc.wait()
                break
    if status == "ok" and proc.returncode != 0:
        status = "failed"
        reason = f"exit {proc.returncode}: " + log_path.read_text()[-1500:].strip().splitlines()[-1]
    return {"status": status, "reason": reason, "wall_seconds": round(time.perf_counter() - t0, 2),
            "min_available_gib": round(lowest, 2), "returncode": proc.returncode}


def launch(config: str, num_items: int, args: argparse.Namespace, overrides: list[str], workdir: Path
           ) -> dict[str, Any]:
    """Run the job at one catalog size; returns the parent's view plus every rank's report."""
    from ..config import load_train_config

    sets = [*overrides, f"data.synthetic.num_items={num_items}"]
    cfg = load_train_config(config, sets)
    if cfg.data.dataset != "synthetic" or not cfg.data.full_catalog:
        raise ValueError(f"{config}: the huge suite needs data.dataset=synthetic and data.full_catalog=true")
    pred = predicted_gib(num_items, cfg.model.d_model, 2 if cfg.model.table_dtype == "fp16" else 4,
                         cfg.train.sparse_optimizer, args.ranks)
    row: dict[str, Any] = {"num_items": num_items, "ranks": args.ranks, "d_model": cfg.model.d_model,
                           "table_dtype": cfg.model.table_dtype,
                           "predicted_gib": {k: round(v, 2) for k, v in pred.items()}}
    available = mem_available_gib()
    row["available_gib_before"] = round(available, 2)
    if pred["total"] > available - args.min_free_gib:
        row.update(status="skipped", reason=f"predicted {pred['total']:.1f} GiB > {available:.1f} GiB available "
                                            f"- {args.min_free_gib} GiB reserve")
        return row
    run_dir = workdir / f"items-{num_items}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           "-m", "ssd4rec_torchrec.bench.huge", "--worker", "--config", config, "--out", str(run_dir), "--set", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", SSD4REC_CACHE=str(workdir / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log.info("launching %d items: %s", num_items, " ".join(cmd))
    row.update(_run_job(cmd, env, run_dir / "job.log", args.timeout, args.min_free_gib))
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if row["status"] == "ok" and (len(ranks) != args.ranks or not all(r.get("complete") for r in ranks)):
        row.update(status="failed", reason=f"{sum(bool(r.get('complete')) for r in ranks)} of {args.ranks} rank "
                                           "reports complete")
    if ranks:  # complete, or the phases a killed run got through
        row["per_rank"] = [{k: r.get(k) for k in ("rank", "table", "phases", "peak_rss_gib", "peak_reset_per_phase",
                                                  "complete")} for r in ranks]
        r0 = ranks[0]
        row.update(metrics=r0.get("metrics"), first_topk=r0.get("first_topk"), stats=r0.get("stats"),
                   phases_completed=list(r0["phases"]),
                   phase_seconds={k: v["seconds"] for k, v in r0["phases"].items()},
                   tokens_per_s=r0["phases"].get("epoch", {}).get("tokens_per_s"),
                   peak_rss_gib_per_rank=[r["peak_rss_gib"] for r in ranks])
        if all(r.get("table") for r in ranks):
            row.update(table_gib_per_rank=[round(r["table"]["table_bytes"] / 2**30, 3) for r in ranks],
                       optimizer_state_gib_per_rank=[round(r["table"]["optimizer_state_bytes"] / 2**30, 3)
                                                     for r in ranks],
                       checkpoint_gib_if_written=round(sum(
                           r["table"]["table_bytes"] + r["table"]["optimizer_state_bytes"] for r in ranks) / 2**30, 2))
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Try each catalog size in turn; stop at the first that does not fit; report memory and time."""
    from ..config import load_train_config

    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    config = str(Path(args.config).resolve())
    overrides = [*(QUICK_SET if args.quick else []), *args.overrides]
    cfg = load_train_config(config, overrides)
    sizes = args.num_items or [QUICK_ITEMS if args.quick else cfg.data.synthetic.num_items]
    bad = [n for n in sizes if n < cfg.data.synthetic.num_clusters]
    if bad:
        raise ValueError(f"--num-items {bad[0]} is below data.synthetic.num_clusters={cfg.data.synthetic.num_clusters}")
    workdir = Path(tempfile.mkdtemp(prefix="huge-", dir=args.out))
    rows = []
    try:
        for n in sizes:
            row = launch(config, n, args, overrides, workdir)
            rows.append(row)
            log.info("%d items: %s%s", n, row["status"], f" ({row['reason']})" if row.get("reason") else "")
            if row["status"] != "ok":
                break
    finally:
        if not args.keep_data:
            shutil.rmtree(workdir / "cache", ignore_errors=True)
    fitted = [r["num_items"] for r in rows if r["status"] == "ok"]
    stopped = next((r for r in rows if r["status"] != "ok"), None)
    summary = {"largest_fitting_num_items": max(fitted) if fitted else None,
               "stopped_at": None if stopped is None else {"num_items": stopped["num_items"],
                                                           "status": stopped["status"], "reason": stopped["reason"]}}
    log.info("huge (%s):\n%s", args.config, _table(rows))
    return {"config": args.config, "overrides": overrides, "cpu_count": os.cpu_count(), "workdir": str(workdir),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None, "rows": rows, **summary}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'items':>12} {'status':>13} {'peak RSS/rank GiB':>18} {'table/rank GiB':>15} {'data s':>7} "
             f"{'init s':>7} {'epoch s':>8} {'eval s':>7} {'tok/s':>7}"]
    for r in rows:
        if "table_gib_per_rank" not in r:
            lines.append(f"{r['num_items']:>12} {r['status']:>13}  {r.get('reason') or ''}")
            continue
        ph = r["phase_seconds"]
        peaks = "/".join(f"{x:.2f}" for x in r["peak_rss_gib_per_rank"])
        tables = "/".join(f"{x:.2f}" for x in r["table_gib_per_rank"])
        lines.append(f"{r['num_items']:>12} {r['status']:>13} {peaks:>18} {tables:>15} {ph.get('data', 0):>7.1f} "
                     f"{ph.get('init', 0):>7.1f} {ph.get('epoch', 0):>8.1f} {ph.get('eval', 0):>7.1f} "
                     f"{r['tokens_per_s'] or 0:>7.0f}" + ("" if r["status"] == "ok" else f"  {r['reason']}"))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Peak RSS per rank and seconds per phase for each catalog size that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "table_gib_per_rank" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [f"{r['num_items'] / 1e6:g}M" for r in rows]
    x = list(range(len(rows)))
    width = 0.8 / max(1, max((len(r["per_rank"]) for r in rows), default=1))
    for i in range(max((len(r["per_rank"]) for r in rows), default=0)):
        ax1.bar([xx + i * width for xx in x], [r["per_rank"][i]["peak_rss_gib"] if i < len(r["per_rank"]) else 0
                                              for r in rows], width, label=f"rank {i} peak RSS")
        ax1.bar([xx + i * width for xx in x], [r["per_rank"][i]["table"]["table_bytes"] / 2**30
                                              if i < len(r["per_rank"]) else 0 for r in rows], width * 0.5,
                color="black", alpha=0.4, label="table shard" if i == 0 else None)
    ax1.set_ylabel("GiB")
    ax1.set_xticks(x, labels)
    if rows:
        ax1.legend(fontsize=7)
    bottom = [0.0] * len(rows)
    for phase in ("data", "init", "epoch", "eval"):
        vals = [r["phase_seconds"].get(phase, 0.0) for r in rows]
        ax2.bar(x, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_ylabel("seconds")
    ax2.set_xticks(x, labels)
    if rows:
        ax2.legend(fontsize=7)
    fig.suptitle(f"{Path(result['config']).name}: largest catalog that fits "
                 f"{result['largest_fitting_num_items'] or 0:,}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if "--worker" not in sys.argv[1:]:
        sys.exit("usage: python apps/bench.py huge [...] (this module's own entry point is the per-rank worker)")
    sys.exit(worker_main(sys.argv[1:]))
