# ruff: noqa: E402  (tune_malloc() must run before the imports below pull in torch)
"""Benchmarks: `python apps/bench.py SUITE [options]` prints a table and writes JSON (+ PNG) to --out.

Suites: data (prepare 50M synthetic interactions), encoder (Bi-SSD encoder tokens/s vs length;
--compare-sasrec: Bi-SSD vs SASRec over segment length, written as encoder_vs_sasrec.json), packing (packed
varlen vs padded batches on ML-1M), mfu (model FLOP utilisation vs a measured GEMM peak), objective (tokens and
seconds per ML-1M epoch per training objective), train (end-to-end tokens/s of the ML-1M job, 1 and 2 ranks),
huge (a 50M-item synthetic catalog, fp16 row-wise sharded over 2 ranks: memory per rank, time per phase,
--num-items sweep for the largest catalog that fits).
Every suite has --quick (tiny sizes, for smoke tests).
"""

from __future__ import annotations

from ssd4rec_torchrec.runtime import tune_malloc

tune_malloc()  # before torch is imported: re-exec with glibc malloc settings (see runtime.py)

import argparse
import importlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

SUITES = {
    "data": "ssd4rec_torchrec.bench.data",
    "encoder": "ssd4rec_torchrec.bench.encoder",
    "packing": "ssd4rec_torchrec.bench.packing",
    "mfu": "ssd4rec_torchrec.bench.mfu",
    "objective": "ssd4rec_torchrec.bench.objective",
    "train": "ssd4rec_torchrec.bench.train_e2e",
    "huge": "ssd4rec_torchrec.bench.huge",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    modules = {}
    for name, module_name in SUITES.items():
        p = sub.add_parser(name, help=f"{name} benchmark")
        p.add_argument("--out", default="results/bench", help="results directory (default results/bench)")
        try:
            modules[name] = importlib.import_module(module_name)
        except ImportError as e:  # a suite whose module is missing stays listed but fails clearly when run
            modules[name] = e
            continue
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = modules[args.suite]
    if isinstance(module, ImportError):
        print(f"bench: suite {args.suite!r} unavailable: {module}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = module.run(args)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    stem = str(result.pop("output_name", args.suite))  # a suite mode may name its own files
    result = {"suite": args.suite, "host": platform.node(), "python": platform.python_version(),
              "unix_time": int(time.time()), **result}
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if hasattr(module, "plot"):
        module.plot(result, out / f"{stem}.png")
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
