"""Quality report: train each run of a suite under one time budget, then write a table and a plot.

  python apps/report.py --suite configs/report/ml1m.yaml
  python apps/report.py --suite configs/report/ml100k.yaml --out /tmp/report100k --only "SASRec (next)" --reuse
  python apps/report.py --suite configs/report/ml1m.yaml --render-only --readme docs/quality.md \
      --quality-json docs/results/quality.json

Writes <out>/runs/<run>/ (each run's apps/train.py output and report-launch.log), <out>/report.md,
<out>/report.json and <out>/valid_ndcg_vs_time.png. --readme [FILE] (also spelled --doc) replaces the suite's
<!-- report:<suite>:start --> ... <!-- report:<suite>:end --> block in FILE, docs/quality.md when no FILE is
given (the block is added under "## Quality report" when absent), and copies the plot to docs/report/ beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssd4rec_torchrec.config import ConfigError
from ssd4rec_torchrec.report import (
    QUALITY_DOC,
    launch,
    load_suite,
    render,
    select_runs,
    update_report_doc,
    write_quality_json,
)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="suite YAML, e.g. configs/report/ml1m.yaml")
    parser.add_argument("--out", help="output directory (default results/report/<suite file stem>)")
    parser.add_argument("--readme", "--doc", dest="doc", nargs="?", const=str(ROOT / QUALITY_DOC), metavar="FILE",
                        help=f"Markdown file whose report block to replace (the flag alone: {QUALITY_DOC})")
    parser.add_argument("--quality-json", metavar="FILE",
                        help="merge the finished runs into this record, e.g. docs/results/quality.json")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these runs (names or directory slugs)")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json already exists")
    parser.add_argument("--render-only", action="store_true", help="train nothing; render from the run directories")
    parser.add_argument("--run-timeout", type=float, metavar="S", help="kill a run after S seconds (default: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.run_timeout is not None and args.run_timeout <= 0:
            raise ConfigError(f"--run-timeout must be > 0, got {args.run_timeout:g}")
        if args.doc and not Path(args.doc).is_file():
            raise ConfigError(f"--readme {args.doc!r}: no such file")
        suite = load_suite(args.suite)
        select_runs(suite, args.only)  # validate --only before anything runs
        out = Path(args.out) if args.out else Path("results/report") / Path(args.suite).stem
        codes = {} if args.render_only else launch(suite, out, only=args.only, reuse=args.reuse,
                                                   timeout_s=args.run_timeout)
        data = render(suite, out)
        if args.doc:
            image = update_report_doc(Path(args.doc), data, out)
            logging.info("updated %s (plot %s)", args.doc, image)
        if args.quality_json:
            logging.info("updated %s", write_quality_json(Path(args.quality_json), data))
    except ConfigError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    failed = [name for name, code in codes.items() if code]
    for r in data["runs"]:
        if r["status"] != "ok":
            print(f"report: {r['name']}: {r['status']}" + (f", log {r['log']}" if r.get("log") else ""),
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
