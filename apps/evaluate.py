"""Evaluate a finished run's checkpoint (full ranking, both protocols) and optionally dump every user's top-K.

  python apps/evaluate.py --run runs/ml1m
  python apps/evaluate.py --run runs/ml1m --split valid --dump-topk topk.parquet --k 50
  torchx run dist.ddp -j 1x2 --script apps/evaluate.py -- --run-dir runs/ml1m

(--run-dir is an alias of --run for TorchX: torchrun rejects '--run' as an ambiguous abbreviation of its
own --run-path.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ssd4rec_torchrec.config import ConfigError, load_train_config
from ssd4rec_torchrec.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory written by apps/train.py")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint directory")
    parser.add_argument("--dump-topk", metavar="FILE", help="write every user's top-K to FILE (.csv or .parquet)")
    parser.add_argument("--k", type=int, default=100, help="K for --dump-topk (default 100)")
    parser.add_argument("--protocol", choices=("filtered", "unfiltered"),
                        help="history filtering for the dump (default: the run's train.protocol)")
    parser.add_argument("--out", help="metrics JSON (default RUN/eval_<split>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run)
    try:
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
        cfg = load_train_config(run / "config.yaml", [f"run_dir={run}"])
        from ssd4rec_torchrec.eval.offline import evaluate_run

        result = evaluate_run(cfg, args.checkpoint, args.split, dump_topk=args.dump_topk, k=args.k,
                              protocol=args.protocol)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out = Path(args.out) if args.out else run / f"eval_{args.split}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["metrics"], indent=2))
        print(f"wrote {out}" + (f" and {result['dump']['path']}" if result["dump"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
