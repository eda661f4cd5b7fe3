# ruff: noqa: E402  (tune_malloc() must run before the imports below pull in torch)
"""Train SSD4Rec (one process, or one rank of a torchrun/TorchX job).

  python apps/train.py --config configs/tiny.yaml
  torchx run dist.ddp -j 1x2 --script apps/train.py -- --config configs/ml1m.yaml
  torchx run dist.ddp -j 2x8 apps/train.py            (the script path given twice is tolerated)

Exit codes: 0 done; 2 config or data error; 3 non-finite loss or gradient (train.on_nonfinite: stop);
4 checkpoint write error (train.checkpoint_errors: fail); 75 preempted by SIGTERM (a checkpoint was written:
rerun with --resume). Each failure prints one line.
"""

from __future__ import annotations

from ssd4rec_torchrec.runtime import tune_malloc

tune_malloc()  # before torch is imported: re-exec with glibc malloc settings (see runtime.py)

import argparse
import os
import sys
from pathlib import Path

from ssd4rec_torchrec.config import ConfigError, load_train_config
from ssd4rec_torchrec.data import DataError
from ssd4rec_torchrec.train.loop import TrainingStopped, train

DEFAULT_CONFIG = "configs/tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", nargs="*", help=argparse.SUPPRESS)  # TorchX may pass 'apps/train.py' again
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--run-dir", help="output directory (overrides run_dir in the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set train.epochs=3 model.d_model=128")
    args = parser.parse_args(argv)
    stray = [s for s in args.script if Path(s).name != "train.py"]
    if stray:
        parser.error(f"unexpected argument {stray[0]!r} (did you mean --config {stray[0]}?)")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        cfg = load_train_config(args.config, overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, DataError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # every rank stops alike; rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            print(f"train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
