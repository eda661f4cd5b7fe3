"""The quality report renders from run directories alone (hand-made ``metrics.json`` here, no training): the
table carries exactly the runs' numbers, the plot is a PNG, the report block of a Markdown document (by default
docs/quality.md) is replaced idempotently, and a bad suite fails with one line naming the bad value (exit code 2
from the CLI)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from ssd4rec_torchrec.report import (
    METRICS,
    PLOT,
    ReportError,
    load_suite,
    render,
    slugify,
    train_command,
    update_report_doc,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PROTOCOLS = ("filtered", "unfiltered")


def _cli():
    spec = importlib.util.spec_from_file_location("report_app", REPO / "apps" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _metrics(base: float, *, budget: bool = True) -> dict:
    """Distinct 4-decimal numbers per protocol/metric, offset by ``base``."""
    test = {p: {m: round(base + 0.01 * i + (0.1 if p == "unfiltered" else 0), 4) for i, m in enumerate(METRICS)}
            for p in PROTOCOLS}
    history = [{"epoch": e, **{p: {"NDCG@10": round(base + 0.01 * e, 4)} for p in PROTOCOLS}} for e in range(3)]
    timing = [{"epoch": e, "global_step": 10 * (e + 1), "train_seconds": 30.0 * (e + 1), "wall_seconds": 40.0 * (e + 1)}
              for e in range(3)]
    popularity = {p: {m: round(0.0101 + 0.0001 * i, 4) for i, m in enumerate(METRICS)} for p in PROTOCOLS}
    return {"test": test, "valid": test, "epochs_run": 2, "epochs_trained": 2.5, "seconds_per_epoch": 36.0,
            "train_seconds": 90.0, "wall_seconds": 130.0, "stopped_by_budget": budget, "stopped_early": False,
            "best_epoch": 2, "world_size": 2, "popularity": {"test": popularity}, "valid_history": history,
            "valid_timing": timing}


@pytest.fixture
def suite_file(tmp_path) -> Path:
    suite = {"name": "fake-suite", "world_size": 2, "time_budget_s": 90, "runs": [
        {"name": "SSD4Rec (cloze)", "config": TINY, "set": ["objective.name=cloze"]},
        {"name": "SASRec (next)", "config": TINY, "set": ["model.name=sasrec", "objective.name=next"],
         "time_budget_s": 120},
        {"name": "Broken", "config": TINY},
        {"name": "Never run", "config": TINY},
    ]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    """Run directories as the launcher leaves them: two finished, one failed (log only), one never run."""
    out = tmp_path / "out"
    for name, base, model, objective in (("SSD4Rec (cloze)", 0.2, "ssd4rec", "cloze"),
                                         ("SASRec (next)", 0.3, "sasrec", "next")):
        run = out / "runs" / slugify(name)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics(base)))
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model}, "objective": {"name": objective}}))
    broken = out / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "report-launch.log").write_text("Traceback ...\n")
    return out


def test_render_table_has_exactly_the_run_numbers(suite_file, out):
    data = render(load_suite(suite_file), out)
    md = (out / "report.md").read_text()
    for base, name in ((0.2, "SSD4Rec (cloze)"), (0.3, "SASRec (next)")):
        expected = _metrics(base)
        rows = [line for line in md.splitlines() if line.startswith(f"| {name} |") and line.count("|") > 7]
        assert len(rows) == 2  # one table per protocol (plus the time-to-target row)
        for p, row in zip(PROTOCOLS, rows):
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells == [name, "2.50", "36.0", "90.0", *(f"{expected['test'][p][m]:.4f}" for m in METRICS)]
    pop = [line for line in md.splitlines() if line.startswith("| Popularity |")]
    assert [c.strip() for c in pop[0].strip("|").split("|")][4:] == [
        f"{_metrics(0)['popularity']['test']['filtered'][m]:.4f}" for m in METRICS]
    assert "| Broken | failed (log: `" in md and "| Never run | not run |" in md
    assert "world size 2" in md and "time budget 90 s" in md
    assert "(own caps: SASRec (next) 120 s)" in md  # a run's own cap is stated; the suite's is not repeated

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(data))
    by_name = {r["name"]: r for r in saved["runs"]}
    assert by_name["SASRec (next)"]["test"] == _metrics(0.3)["test"]
    assert by_name["SASRec (next)"]["model"] == "sasrec" and by_name["SASRec (next)"]["stopped_by"] == "budget"
    assert by_name["SSD4Rec (cloze)"]["valid_curve"] == [[30.0, 0.2], [60.0, 0.21], [90.0, 0.22]]
    assert by_name["Broken"]["status"] == "failed" and by_name["Broken"]["log"].endswith("report-launch.log")
    assert by_name["Never run"]["status"] == "not run"
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_doc_block_is_replaced_idempotently(suite_file, out, tmp_path):
    data = render(load_suite(suite_file), out)
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nIntro.\n\n## Layout\n\nFiles.\n")
    image = update_report_doc(readme, data, out)
    assert image == tmp_path / "docs" / "report" / f"fake-suite-{PLOT}" and image.is_file()
    first = readme.read_text()
    assert first.startswith("# Project\n\nIntro.\n\n## Layout\n\nFiles.\n")
    assert first.count("## Quality report") == 1
    assert first.count("<!-- report:fake-suite:start -->") == 1 == first.count("<!-- report:fake-suite:end -->")
    assert f"](docs/report/fake-suite-{PLOT})" in first
    update_report_doc(readme, data, out)
    assert readme.read_text() == first  # run twice: one block, same text

    # an existing section keeps its place: the block goes at its end, before the next heading
    readme.write_text("# P\n\n## Quality report\n\nWhat the numbers mean.\n\n## Layout\n\nFiles.\n")
    update_report_doc(readme, data, out)
    text = readme.read_text()
    assert text.count("## Quality report") == 1
    assert text.index("What the numbers mean.") < text.index("<!-- report:fake-suite:start -->") < text.index(
        "## Layout")
    update_report_doc(readme, data, out)
    assert readme.read_text() == text


def test_cli_render_only_with_readme(suite_file, out, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# P\n")
    assert _cli()(["--suite", str(suite_file), "--out", str(out), "--render-only", "--readme", str(readme)]) == 0
    assert "| SASRec (next) |" in capsys.readouterr().out
    assert "<!-- report:fake-suite:start -->" in readme.read_text()


def test_cli_flag_alone_targets_docs_quality(suite_file, out, monkeypatch):
    spec = importlib.util.spec_from_file_location("report_app", REPO / "apps" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = []
    monkeypatch.setattr(mod, "update_report_doc", lambda doc, data, out: written.append(doc) or doc)
    assert mod.main(["--suite", str(suite_file), "--out", str(out), "--render-only", "--readme"]) == 0
    assert written == [REPO / "docs" / "quality.md"]


def _write_suite(tmp_path: Path, suite: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.mark.parametrize(("suite", "message"), [
    ({"name": "s", "runs": [{"name": "a", "config": "configs/nope.yaml"}]},
     "runs[0] ('a'): config: no such file 'configs/nope.yaml'"),
    ({"name": "s", "colour": "red", "runs": [{"name": "a", "config": TINY}]}, "colour: unknown key"),
    ({"name": "s", "runs": [{"name": "a", "config": TINY, "sett": []}]}, "runs[0].sett: unknown key"),
    ({"name": "s", "runs": [{"name": "a", "config": TINY, "set": ["model.nme=x"]}]}, "model.nme: unknown key"),
    ({"name": "s", "runs": [{"name": "a", "config": TINY, "set": ["train.time_budget_s=5"]}]}, "fixed by the suite"),
    ({"name": "s", "time_budget_s": 0, "runs": [{"name": "a", "config": TINY}]}, "time_budget_s must be > 0"),
    ({"name": "s", "runs": [{"name": "A b", "config": TINY}, {"name": "a-B", "config": TINY}]}, "clashes"),
    ({"name": "s", "runs": [{"name": "a", "config": TINY}, {"name": "b", "config": TINY, "set": ["seed=1"]}]},
     "different seeds"),
    ({"runs": []}, "missing key 'name'"),
])
def test_bad_suite_is_one_clear_line(tmp_path, capsys, suite, message):
    path = _write_suite(tmp_path, suite)
    with pytest.raises(ReportError, match="^" + str(path).replace(".", r"\.") + ": .*") as e:
        load_suite(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert _cli()(["--suite", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing launched


def test_cli_rejects_unknown_run_and_missing_suite(suite_file, tmp_path, capsys):
    assert _cli()(["--suite", str(suite_file), "--out", str(tmp_path / "o"), "--only", "GRU4Rec"]) == 2
    assert "--only 'GRU4Rec': no such run" in capsys.readouterr().err
    assert _cli()(["--suite", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_command(suite_file, tmp_path):
    suite = load_suite(suite_file)
    cmd = train_command(suite, suite.runs[1], tmp_path / "r")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[cmd.index("--set") + 1:] == ["train.time_budget_s=120.0", "model.name=sasrec", "objective.name=next"]
    cmd = train_command(suite, suite.runs[0], tmp_path / "r")  # no cap of its own: the suite's
    assert cmd[cmd.index("--set") + 1:] == ["train.time_budget_s=90.0", "objective.name=cloze"]
    suite.world_size = 1
    assert train_command(suite, suite.runs[0], tmp_path / "r")[1].endswith("apps/train.py")
    suite.runs[1].time_budget_s = 600.0  # a run's own cap replaces the suite's
    cmd = train_command(suite, suite.runs[1], tmp_path / "r")
    assert cmd[cmd.index("--set") + 1] == "train.time_budget_s=600.0"


@pytest.mark.parametrize("suite_path", sorted((REPO / "configs" / "report").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_suites_load(suite_path, monkeypatch):
    """Every suite under configs/report/ parses and each run's resolved config (its ``set`` plus its cap)
    validates, so a typo in a suite fails here rather than an hour into a report."""
    monkeypatch.chdir(REPO)  # suites name their configs relative to the repository root
    suite = load_suite(suite_path)
    assert suite.world_size == 2 and suite.time_budget_s is not None
    assert all(Path(run.config).is_file() for run in suite.runs)


def test_run_budget_must_be_positive(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "runs": [{"name": "a", "config": TINY, "time_budget_s": 0}]}))
    with pytest.raises(ReportError, match=r"time_budget_s must be > 0"):
        load_suite(path)


def test_time_to_target_table_and_quality_json(suite_file, out, tmp_path):
    from ssd4rec_torchrec.report import QUALITY_KEYS, time_to_reach, write_quality_json

    assert time_to_reach([[10.0, 0.05], [20.0, 0.12], [30.0, 0.11], [40.0, 0.16]], 0.10) == 20.0
    assert time_to_reach([[10.0, 0.05]], 0.10) is None
    data = render(load_suite(suite_file), out)
    md = (out / "report.md").read_text()
    # SSD4Rec valid curve 0.2/0.21/0.22 at 30/60/90 s: every threshold at 30 s, best 0.22 at 90 s
    row = next(line for line in md.splitlines() if line.startswith("| SSD4Rec (cloze) |") and line.count("|") == 7)
    assert [c.strip() for c in row.strip("|").split("|")] == ["SSD4Rec (cloze)", "30", "30", "30", "0.2200", "90"]

    path = tmp_path / "docs" / "results" / "quality.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"runs": [{"name": "SASRec (next)", "dataset": "other"},
                                         {"name": "SASRec (next)", "dataset": None, "stale": True}]}))
    for r in data["runs"]:
        r.setdefault("dataset", None)
    write_quality_json(path, data)
    saved = json.loads(path.read_text())["runs"]
    assert {"name": "SASRec (next)", "dataset": "other"} in saved  # other datasets' records kept
    mine = [r for r in saved if r.get("dataset") is None]
    assert [r["name"] for r in mine] == ["SSD4Rec (cloze)", "SASRec (next)"]  # the stale record was replaced
    for r in mine:
        assert tuple(r) == QUALITY_KEYS
        assert set(r["test"]) == {"filtered", "unfiltered"}
        assert all(tuple(r["test"][p]) == ("HR@10", "NDCG@10", "MRR@10") for p in r["test"])
    sas = mine[1]
    assert sas["model"] == "sasrec" and sas["objective"] == "next" and sas["bidirectional"] is False
    assert sas["test"]["filtered"]["NDCG@10"] == _metrics(0.3)["test"]["filtered"]["NDCG@10"]
    assert mine[0]["bidirectional"] is True and sas["train_seconds"] == 90.0 and sas["epochs"] == 2.5
