# ruff: noqa: E402  (tune_malloc() must run before the imports below pull in torch)
"""Export a finished run as a serving bundle: item tables, id maps, popularity, user tower (.pt2 + AOTI).

  python apps/export.py --run runs/ml1m --out bundles/ml1m
  python apps/export.py --run runs/ml1m --out bundles/ml1m --checkpoint latest --dtypes fp32,int8 --no-aoti
  torchx run dist.ddp -j 1x2 --script apps/export.py -- --run-dir runs/ml1m --out bundles/ml1m

The item table is gathered shard by shard at the job's world size. The bundle is written to OUT.tmp-* and
renamed into place when complete. (--run-dir is an alias of --run for TorchX.)
"""

from __future__ import annotations

from ssd4rec_torchrec.runtime import tune_malloc

tune_malloc()  # before torch is imported: re-exec with glibc malloc settings (see runtime.py)

import argparse
import json
import logging
import sys
from pathlib import Path

from ssd4rec_torchrec.config import ConfigError, load_train_config
from ssd4rec_torchrec.data import DataError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"export: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory written by apps/train.py")
    parser.add_argument("--out", required=True, help="bundle directory to create")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint directory")
    parser.add_argument("--dtypes", default="fp32,bf16,int8",
                        help="item tables to write, comma-separated from fp32,bf16,int8 (fp32 always; default all)")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (C++ compile)")
    parser.add_argument("--parity-users", type=int, default=64,
                        help="test users whose tower vectors are checked against the eager model (default 64)")
    parser.add_argument("--recall-users", type=int, default=2000,
                        help="test users for the bf16/int8 recall@10 cost (default 2000)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (swapped in when complete)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ssd4rec_torchrec.export").setLevel(logging.INFO)  # progress, not torchrec's planner tables
    run = Path(args.run)
    try:
        from ssd4rec_torchrec.export.writer import export_bundle, parse_dtypes

        dtypes = parse_dtypes(args.dtypes)
        if args.parity_users < 1:
            raise ValueError(f"--parity-users must be >= 1, got {args.parity_users}")
        if args.recall_users < 1:
            raise ValueError(f"--recall-users must be >= 1, got {args.recall_users}")
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
        cfg = load_train_config(run / "config.yaml", [f"run_dir={run}"])
        manifest = export_bundle(cfg, args.out, checkpoint=args.checkpoint, dtypes=dtypes, aoti=not args.no_aoti,
                                 parity_users=args.parity_users, recall_users=args.recall_users, force=args.force)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        tower = manifest["user_tower"]
        summary = {
            "bundle": args.out,
            "files": {k: v["bytes"] for k, v in manifest["files"].items()},
            "parity_max_abs_diff": tower["parity_max_abs_diff"],
            "aoti": tower["aoti"],
            "quantization_recall": manifest["quantization_recall"],
        }
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
