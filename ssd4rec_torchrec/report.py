"""The quality report: train a suite of models under one time budget, then tabulate and plot their metrics.

A suite YAML names the runs (a config plus ``key=value`` overrides each), the world size and the budget
(``train.time_budget_s``: seconds of training steps, eval/checkpoint time excluded), so that every model
gets the same compute on the same machine and seed. :func:`launch` trains each run in its own process
(``<out>/runs/<slug>/``); :func:`render` reads only those run directories' ``metrics.json`` and writes
``report.md``, ``report.json`` and ``valid_ndcg_vs_time.png``; :func:`update_report_doc` puts the tables and
the plot between ``<!-- report:<suite>:start/end -->`` markers in a Markdown file (:data:`QUALITY_DOC`), and
:func:`write_quality_json` merges the runs into the machine-readable record ``docs/results/quality.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import ConfigError, from_dict, load_train_config, load_yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TRAIN_APP = REPO / "apps" / "train.py"
PROTOCOLS = ("filtered", "unfiltered")  # table order (the eval module's PROTOCOLS needs torch)
METRICS = tuple(f"{m}@{k}" for k in (10, 20) for m in ("HR", "NDCG", "MRR"))
PLOT = "valid_ndcg_vs_time.png"
TARGETS = (0.10, 0.15, 0.17)  # validation NDCG@10 (filtered) levels of the time-to-target table
LAUNCH_LOG = "report-launch.log"
STATUS = "report-status.json"
RESERVED = ("run_dir", "train.time_budget_s")  # set by the suite, not by a run's overrides


class ReportError(ConfigError):
    """A bad suite or output: one line naming the bad value."""


@dataclass
class SuiteRun:
    name: str
    config: str
    set: list[str] = field(default_factory=list)  # ``key=value`` overrides, as ``apps/train.py --set``
    time_budget_s: float | None = None  # this run's own cap (a reference outside the equal-time comparison)

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")


@dataclass
class Suite:
    name: str
    runs: list[SuiteRun]
    world_size: int = 1
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if not self.runs:
            raise ValueError("runs: empty")


def slugify(name: str) -> str:
    """``"SSD4Rec (prefix, 8/user)"`` -> ``"ssd4rec-prefix-8-user"``: a run's directory name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def load_suite(path: str | Path) -> Suite:
    """Parse and check a suite: known keys only, config files exist, each run's resolved config validates,
    unique run names, one seed for all. Raises :class:`ReportError` (one line) otherwise."""
    path = Path(path)
    try:
        raw = load_yaml(path)
        missing = [k for k in ("name", "runs") if k not in raw]
        if missing:
            raise ReportError(f"{path}: missing key {missing[0]!r}")
        for i, run in enumerate(raw["runs"] if isinstance(raw["runs"], list) else []):
            if isinstance(run, dict) and ("name" not in run or "config" not in run):
                raise ReportError(f"{path}: runs[{i}]: missing key {'name' if 'name' not in run else 'config'!r}")
        suite = from_dict(Suite, raw)
    except ConfigError as e:
        msg = str(e)
        raise ReportError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    seeds: dict[int, str] = {}
    slugs: dict[str, str] = {}
    for i, run in enumerate(suite.runs):
        where = f"{path}: runs[{i}] ({run.name!r})"
        slug = slugify(run.name)
        if slug in slugs:
            raise ReportError(f"{where}: name clashes with {slugs[slug]!r} (both give directory {slug!r})")
        slugs[slug] = run.name
        if not Path(run.config).is_file():
            raise ReportError(f"{where}: config: no such file {run.config!r}")
        for kv in run.set:
            if kv.partition("=")[0].strip() in RESERVED:
                raise ReportError(f"{where}: set: {kv!r} is fixed by the suite ({', '.join(RESERVED)})")
        try:
            cfg = load_train_config(run.config, [*run.set, *_budget_override(suite, run)])
        except ConfigError as e:
            raise ReportError(f"{where}: {e}") from None
        seeds.setdefault(cfg.seed, run.name)
    if len(seeds) > 1:
        raise ReportError(f"{path}: runs use different seeds {sorted(seeds)}; a report compares one seed")
    return suite


def run_budget(suite: Suite, run: SuiteRun | None = None) -> float | None:
    """The cap a run trains under: its own ``time_budget_s`` when it has one, else the suite's."""
    return run.time_budget_s if run is not None and run.time_budget_s is not None else suite.time_budget_s


def _budget_override(suite: Suite, run: SuiteRun | None = None) -> list[str]:
    budget = run_budget(suite, run)
    return [] if budget is None else [f"train.time_budget_s={budget}"]


def select_runs(suite: Suite, only: list[str] | None) -> list[SuiteRun]:
    """The runs named by ``only`` (run names or slugs; all when empty)."""
    if not only:
        return list(suite.runs)
    by_key = {k: r for r in suite.runs for k in (r.name, slugify(r.name))}
    unknown = [o for o in only if o not in by_key]
    if unknown:
        raise ReportError(f"--only {unknown[0]!r}: no such run in suite {suite.name!r} "
                          f"(runs: {', '.join(repr(r.name) for r in suite.runs)})")
    wanted = {id(by_key[o]) for o in only}
    return [r for r in suite.runs if id(r) in wanted]


def train_command(suite: Suite, run: SuiteRun, run_dir: Path) -> list[str]:
    """The training command of one run: torchrun (via ``python -m``) for several ranks, else plain python."""
    if suite.world_size > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={suite.world_size}"]
    else:
        head = [sys.executable]
    sets = [*_budget_override(suite, run), *run.set]
    return [*head, str(TRAIN_APP), "--config", str(Path(run.config).resolve()), "--run-dir", str(run_dir.resolve()),
            *(["--set", *sets] if sets else [])]


def machine() -> str:
    """E.g. ``2-core CPU (Intel Xeon ...)``: where the runs were trained (recorded at launch)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return f"{os.cpu_count()}-core CPU" + (f" ({model})" if model else "")


def launch(suite: Suite, out: Path, *, only: list[str] | None = None, reuse: bool = False,
           timeout_s: float | None = None) -> dict[str, int]:
    """Train the selected runs one after another; returns ``{run name: exit code}`` (0: metrics written).

    Each run's output goes to ``<out>/runs/<slug>/report-launch.log``; a failed run is logged and the
    others continue. ``reuse``: skip runs whose ``metrics.json`` exists; otherwise the run directory is
    emptied first, so a stale ``metrics.json`` can never pass for a new result.
    """
    from tqdm import tqdm

    runs = select_runs(suite, only)
    codes: dict[str, int] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    bar = tqdm(runs, desc=f"report {suite.name}", unit="run", dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        run_dir = out / "runs" / slugify(run.name)
        if reuse and (run_dir / "metrics.json").is_file():
            log.info("%s: reusing %s", run.name, run_dir / "metrics.json")
            codes[run.name] = 0
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = train_command(suite, run, run_dir)
        log.info("%s: %s", run.name, " ".join(cmd))
        started = time.time()
        with open(run_dir / LAUNCH_LOG, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
                proc.wait()
                code = -signal.SIGKILL
                f.write(f"\nreport: killed after --run-timeout {timeout_s:g} s\n")
        if code == 0 and not (run_dir / "metrics.json").is_file():
            code = 1  # exited cleanly but wrote nothing: still a failure
        codes[run.name] = code
        status = {"returncode": code, "seconds": round(time.time() - started, 1), "command": cmd,
                  "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        (run_dir / STATUS).write_text(json.dumps(status, indent=2) + "\n")
        if code:
            log.error("%s failed (exit %d), log: %s", run.name, code, run_dir / LAUNCH_LOG)
        else:
            log.info("%s done in %.0f s", run.name, status["seconds"])
    return codes


# ---------------------------------------------------------------- rendering (from run directories only)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def valid_curve(metrics: dict[str, Any], protocol: str = "filtered", metric: str = "NDCG@10") -> list[list[float]]:
    """``[[training seconds, validation metric], ...]`` from ``valid_history`` + ``valid_timing``."""
    history = metrics.get("valid_history") or []
    timing = metrics.get("valid_timing") or []
    curve = []
    for i, h in enumerate(history):
        seconds = h.get("train_seconds", timing[i]["train_seconds"] if i < len(timing) else None)
        if seconds is not None:
            curve.append([float(seconds), float(h[protocol][metric])])
    return curve


def is_bidirectional(model_cfg: dict[str, Any]) -> bool:
    """Whether the served encoder reads the history in both directions: BERT4Rec, and SSD4Rec with β > 0."""
    name = model_cfg.get("name", "ssd4rec")
    return name == "bert4rec" or (name == "ssd4rec" and float(model_cfg.get("beta", 0.1)) > 0)


def time_to_reach(curve: list[list[float]], threshold: float) -> float | None:
    """Training seconds of the first validation at or above ``threshold`` (None: never reached)."""
    return next((sec for sec, value in curve if value >= threshold), None)


def collect(suite: Suite, out: Path) -> dict[str, Any]:
    """The report's data (``report.json``), read from ``<out>/runs/*/``: one entry per suite run."""
    runs, popularity, dates, machines, seeds = [], None, [], [], set()
    for run in suite.runs:
        run_dir = out / "runs" / slugify(run.name)
        metrics = _read_json(run_dir / "metrics.json")
        status = _read_json(run_dir / STATUS) or {}
        entry: dict[str, Any] = {"name": run.name, "slug": slugify(run.name), "run_dir": str(run_dir),
                                 "time_budget_s": run_budget(suite, run)}
        if status.get("machine"):
            machines.append(status["machine"])
        if metrics is None:
            failed = (run_dir / LAUNCH_LOG).is_file()
            entry.update(status="failed" if failed else "not run",
                         log=str(run_dir / LAUNCH_LOG) if failed else None, returncode=status.get("returncode"))
            runs.append(entry)
            continue
        dates.append((run_dir / "metrics.json").stat().st_mtime)
        cfg = _run_config(run_dir)
        if "seed" in cfg:
            seeds.add(cfg["seed"])
        epochs = metrics.get("epochs_trained", metrics.get("epochs_run"))
        model_cfg = cfg.get("model") or {}
        entry.update(
            status="ok",
            dataset=(cfg.get("data") or {}).get("dataset", (metrics.get("dataset") or {}).get("name")),
            model=model_cfg.get("name"),
            objective=(cfg.get("objective") or {}).get("name"),
            bidirectional=is_bidirectional(model_cfg),
            epochs=epochs,
            seconds_per_epoch=metrics.get("seconds_per_epoch"),
            train_seconds=metrics.get("train_seconds"),
            wall_seconds=metrics.get("wall_seconds"),
            best_epoch=metrics.get("best_epoch"),
            stopped_by=("budget" if metrics.get("stopped_by_budget") else
                        "early stopping" if metrics.get("stopped_early") else "epochs"),
            world_size=metrics.get("world_size"),
            test={p: {m: metrics["test"][p][m] for m in METRICS} for p in PROTOCOLS},
            valid_curve=valid_curve(metrics),
        )
        if popularity is None and "popularity" in metrics:
            popularity = {p: {m: metrics["popularity"]["test"][p][m] for m in METRICS} for p in PROTOCOLS}
        runs.append(entry)
    date = datetime.fromtimestamp(max(dates), timezone.utc).strftime("%Y-%m-%d") if dates else None
    return {"suite": suite.name, "world_size": suite.world_size, "time_budget_s": suite.time_budget_s,
            "machine": machines[0] if machines else machine(), "date": date, "seeds": sorted(seeds), "runs": runs,
            "popularity": popularity}


def _num(v: Any, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown_table(data: dict[str, Any]) -> str:
    """One Markdown table per protocol: a row per run plus the popularity ranking."""
    parts = []
    for p in PROTOCOLS:
        head = ["Model (objective)", "Epochs", "s/epoch", "Train s", *METRICS]
        lines = [f"**Test, {p} protocol**", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for r in data["runs"]:
            if r["status"] != "ok":
                note = f"{r['status']}" + (f" (log: `{r['log']}`)" if r.get("log") else "")
                lines.append(f"| {r['name']} | {note} |" + " |" * (len(head) - 2))
                continue
            cells = [r["name"], _num(r["epochs"], 2), _num(r["seconds_per_epoch"], 1), _num(r["train_seconds"], 1),
                     *(_num(r["test"][p][m], 4) for m in METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
        if data["popularity"]:
            cells = ["Popularity", "—", "—", "—", *(_num(data["popularity"][p][m], 4) for m in METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def time_to_target_table(data: dict[str, Any], thresholds: tuple[float, ...] = TARGETS) -> str:
    """Training seconds until validation NDCG@10 (filtered) first reaches each threshold, and the best value."""
    head = ["Model (objective)", *(f"to {t:.2f}" for t in thresholds), "best valid NDCG@10", "at s"]
    lines = ["**Training seconds to reach validation NDCG@10 (filtered)**", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in data["runs"]:
        if r["status"] != "ok" or not r["valid_curve"]:
            continue
        sec, best = max(r["valid_curve"], key=lambda c: c[1])
        cells = [r["name"], *(_num(time_to_reach(r["valid_curve"], t), 0) for t in thresholds), _num(best, 4),
                 _num(sec, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUALITY_KEYS = ("name", "dataset", "model", "objective", "bidirectional", "train_seconds", "epochs", "test")
QUALITY_METRICS = ("HR@10", "NDCG@10", "MRR@10")


def quality_records(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite's finished runs as ``quality.json`` records (exactly :data:`QUALITY_KEYS`)."""
    return [{"name": r["name"], "dataset": r["dataset"], "model": r["model"], "objective": r["objective"],
             "bidirectional": bool(r["bidirectional"]), "train_seconds": r["train_seconds"], "epochs": r["epochs"],
             "test": {p: {m: r["test"][p][m] for m in QUALITY_METRICS} for p in PROTOCOLS}}
            for r in data["runs"] if r["status"] == "ok"]


def write_quality_json(path: Path, data: dict[str, Any]) -> Path:
    """Merge the suite's records into ``path`` (``{"runs": [...]}``): a record with the same (dataset, name) is
    replaced, every other record kept, so the file holds every reported run of every suite."""
    records = quality_records(data)
    new = {(r["dataset"], r["name"]) for r in records}
    old = (_read_json(path) or {}).get("runs", []) if path.is_file() else []
    runs = [r for r in old if (r.get("dataset"), r.get("name")) not in new] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return path


def conditions(data: dict[str, Any]) -> str:
    """The one-paragraph run conditions under the table."""
    budget = "no time budget" if data["time_budget_s"] is None else (
        f"time budget {data['time_budget_s']:g} s of training steps per run (validation/checkpoint time excluded)")
    own = [f"{r['name']} {r['time_budget_s']:g} s" for r in data["runs"]
           if r.get("time_budget_s") is not None and r["time_budget_s"] != data["time_budget_s"]]
    if own:  # runs capped apart from the suite's equal-time comparison
        budget += " (own caps: " + "; ".join(own) + ")"
    seeds = data.get("seeds") or []
    seed = f"seed {seeds[0]} for all runs" if len(seeds) == 1 else f"seeds {seeds}" if seeds else "one seed"
    return (f"Suite `{data['suite']}`, trained {data['date'] or '(no finished run)'} on {data['machine']}, "
            f"world size {data['world_size']}, {budget}, {seed}. Test metrics are those of each "
            "run's best validation checkpoint (its `train.metric`, filtered NDCG@10 by default); epochs are "
            "fractional when the budget stopped a run mid-epoch.")


def plot(data: dict[str, Any], path: Path) -> Path:
    """Validation NDCG@10 (filtered) against cumulative training seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in data["runs"]:
        if r["status"] == "ok" and r["valid_curve"]:
            xs, ys = zip(*r["valid_curve"])
            ax.plot(xs, ys, marker="o", markersize=3, label=r["name"])
    if data["time_budget_s"] is not None:
        ax.axvline(data["time_budget_s"], color="grey", linestyle=":", linewidth=1, label="budget")
    ax.set_xlabel("training seconds (validation/checkpoint time excluded)")
    ax.set_ylabel("validation NDCG@10 (filtered)")
    ax.set_title(f"{data['suite']}: validation NDCG@10 vs training time (world size {data['world_size']})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render(suite: Suite, out: Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and the plot under ``out`` from its run directories."""
    data = collect(suite, out)
    out.mkdir(parents=True, exist_ok=True)
    plot(data, out / PLOT)
    md = (f"# Quality report: {suite.name}\n\n{markdown_table(data)}\n\n{time_to_target_table(data)}\n\n"
          f"{conditions(data)}\n\n![]({PLOT})\n")
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


QUALITY_DOC = Path("docs/quality.md")  # the study whose tables the report writes (relative to the project root)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- report:{name}:start -->", f"<!-- report:{name}:end -->"


def update_report_doc(doc: Path, data: dict[str, Any], out: Path) -> Path:
    """Replace the suite's marker block in the Markdown file ``doc`` (the project's is :data:`QUALITY_DOC`; the
    block is added under ``## Quality report`` when absent); the plot is copied to
    ``docs/report/<suite>-valid_ndcg_vs_time.png`` of the project that holds ``doc`` so the link is to a file
    that can be committed. Idempotent. Returns the copied plot."""
    if not doc.is_file():
        raise ReportError(f"{str(doc)!r}: no such file")
    root = doc.parent.parent if doc.parent.name == "docs" else doc.parent
    image = root / "docs" / "report" / f"{slugify(data['suite'])}-{PLOT}"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / PLOT, image)
    start, end = _markers(data["suite"])
    link = Path(os.path.relpath(image, doc.parent)).as_posix()
    block = (f"{start}\n{markdown_table(data)}\n\n{time_to_target_table(data)}\n\n{conditions(data)}\n\n"
             f"![validation NDCG@10 vs training time, {data['suite']}]({link})\n{end}")
    text = doc.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        heading = re.search(r"^## Quality report[ \t]*$", text, re.MULTILINE)
        if heading is None:
            text = text.rstrip("\n") + "\n\n## Quality report\n\n" + block + "\n"
        else:  # at the end of the existing section
            nxt = re.compile(r"^## ", re.MULTILINE).search(text, heading.end())
            at = nxt.start() if nxt else len(text)
            text = text[:at].rstrip("\n") + "\n\n" + block + "\n" + ("\n" + text[at:] if nxt else "")
    doc.write_text(text)
    return image
