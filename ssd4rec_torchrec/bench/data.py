"""Benchmark suite ``data``: prepare N synthetic interactions end to end; time and peak RSS."""

from __future__ import annotations

import argparse
import logging
import math
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np

from ..data import PreprocessParams, SyntheticConfig, prepare
from ..data.synthetic import sample_lengths

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", type=int, default=50_000_000, help="target interactions (default 50M)")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalog size")
    parser.add_argument("--mean-length", type=float, default=40.0)
    parser.add_argument("--max-length", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the prepared dataset (default: delete)")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run(args: argparse.Namespace) -> dict:
    if args.interactions < 1000:
        raise ValueError(f"--interactions must be >= 1000, got {args.interactions}")
    cfg = SyntheticConfig(num_users=1, num_items=args.items, num_clusters=min(1000, args.items),
                          mean_length=args.mean_length, max_length=args.max_length, seed=args.seed)
    # Calibrate the user count on a pilot draw of the (clipped) length distribution, +1% for k-core losses.
    pilot = sample_lengths(replace(cfg, num_users=200_000), np.random.default_rng(args.seed + 1))
    cfg = replace(cfg, num_users=math.ceil(1.01 * args.interactions / float(pilot.mean())))
    root = tempfile.mkdtemp(prefix="bench-data-", dir=args.out)
    try:
        t0 = time.perf_counter()
        ds = prepare("synthetic", synthetic=cfg, params=PreprocessParams(), root=root, progress=True)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        prepare("synthetic", synthetic=cfg, params=PreprocessParams(), root=root)
        hit_seconds = time.perf_counter() - t1
        result = {
            "config": asdict(cfg),
            "stats": ds.stats,
            "prepare_seconds": round(seconds, 2),
            "cache_hit_seconds": round(hit_seconds, 4),
            "peak_rss_gib": round(_peak_rss_gib(), 3),
            "targets": {"prepare_seconds_max": 600, "peak_rss_gib_max": 8.0},
        }
        result["targets_met"] = seconds <= 600 and result["peak_rss_gib"] <= 8.0
        log.info("prepared %d interactions in %.1fs, peak RSS %.2f GiB (cache hit %.3fs)",
                 ds.num_interactions, seconds, result["peak_rss_gib"], hit_seconds)
        return result
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
