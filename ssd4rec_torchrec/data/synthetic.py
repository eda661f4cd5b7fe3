"""Deterministic synthetic interaction logs with learnable sequential structure, at any scale.

Model of a user (so a sequence model clearly beats popularity):

- items belong to ``num_clusters`` clusters; within a cluster item popularity is Zipf(``zipf_exponent``)
  so global popularity is Zipf-like too;
- a history is a run of *sessions*; each session stays in one cluster for a geometric number of items
  (mean ``1 / (1 - p_stay)``), and the next session's cluster is ``c + step`` with ``step`` drawn from
  ``{1, 2, 3}`` (probabilities ``transition_probs``): the next item's cluster is predictable from the
  current one, its identity from within-cluster popularity;
- lengths are heavy-tailed (Pareto with index ``length_alpha``) clipped to ``[min_length, max_length]``.

Everything is vectorised numpy and written chunk by chunk into memory-mapped ``.npy`` files, so
10^8 interactions never need more than a few chunk-sized buffers in RAM. Item ids go up to 10^8.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config.schema import SyntheticConfig
from .interactions import RawInteractions

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1


def synthetic_checksum(cfg: SyntheticConfig) -> str:
    """Identifies the generated log: the generator version and every field of ``cfg``."""
    blob = json.dumps({"generator": GENERATOR_VERSION, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    # Pareto(alpha) with minimum x_m has mean alpha*x_m/(alpha-1).
    scale = cfg.mean_length * (cfg.length_alpha - 1) / cfg.length_alpha
    raw = scale * (1.0 + rng.pareto(cfg.length_alpha, size=cfg.num_users))
    return np.clip(np.round(raw), cfg.min_length, cfg.max_length).astype(np.int64)


def _zipf_ranks(u: np.ndarray, m: np.ndarray, s: float) -> np.ndarray:
    """Inverse-CDF of a continuous Zipf(s) over ranks [1, m+1) -> integer ranks 0..m-1."""
    if abs(s - 1.0) < 1e-9:
        r = np.exp(u * np.log(m + 1.0))
    else:
        r = ((np.power(m + 1.0, 1.0 - s) - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
    return np.minimum(np.floor(r).astype(np.int64) - 1, m - 1)


def item_of(cluster: np.ndarray, rank: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """Item code of the ``rank``-th most popular item of ``cluster`` (clusters interleave: rank*C + c),
    scrambled by a fixed affine bijection so ids carry no visible structure."""
    base = rank * cfg.num_clusters + cluster
    n = cfg.num_items
    a = _coprime_multiplier(n)
    return (base * a + 12345) % n


def _coprime_multiplier(n: int) -> int:
    a = int(n * 0.6180339887) | 1
    while np.gcd(a, n) != 1:
        a += 2
    return a % n if n > 1 else 0


def cluster_sizes(cfg: SyntheticConfig) -> np.ndarray:
    c = np.arange(cfg.num_clusters)
    return (cfg.num_items - c + cfg.num_clusters - 1) // cfg.num_clusters


def _generate_chunk(cfg: SyntheticConfig, lengths: np.ndarray, rng: np.random.Generator):
    n = int(lengths.sum())
    u_count = len(lengths)
    starts = np.zeros(u_count, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    # Session boundaries: a new session begins at each user's first token and w.p. 1-p_stay afterwards.
    new_session = rng.random(n) >= cfg.p_stay
    new_session[starts] = True
    steps = rng.choice(np.array([1, 2, 3]), size=n, p=np.asarray(cfg.transition_probs))
    steps[starts] = rng.integers(0, cfg.num_clusters, size=u_count)  # each user's first cluster
    steps = np.where(new_session, steps, 0)
    # cluster = (first cluster + cumulative steps) within each user: cumsum, minus the user's prefix.
    csum = np.cumsum(steps)
    before = np.repeat(csum[starts] - steps[starts], lengths)
    cluster = (csum - before) % cfg.num_clusters
    sizes = cluster_sizes(cfg)
    rank = _zipf_ranks(rng.random(n), sizes[cluster].astype(np.float64), cfg.zipf_exponent)
    items = item_of(cluster, rank, cfg)
    gaps = rng.exponential(3600.0, size=n).astype(np.int64) + 1
    t0 = rng.integers(1_000_000_000, 1_500_000_000, size=u_count)
    gaps[starts] = 0
    ts = np.cumsum(gaps)
    ts = ts - np.repeat(ts[starts], lengths) + np.repeat(t0, lengths)
    return items, ts


def generate_synthetic(cfg: SyntheticConfig, out_dir: str | Path, progress: bool = False) -> RawInteractions:
    """Write ``user.npy``, ``item.npy``, ``timestamp.npy`` (memory-mapped, chunked) and return them.

    Codes are the raw ids (user index, item id in ``[0, num_items)``), so no id maps are materialised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    lengths = sample_lengths(cfg, rng)
    total = int(lengths.sum())
    log.info("synthetic: %d users, %d items, %d interactions", cfg.num_users, cfg.num_items, total)
    mm = np.lib.format.open_memmap
    item_dtype = np.int32 if cfg.num_items < 2**31 else np.int64
    user_dtype = np.int32 if cfg.num_users < 2**31 else np.int64
    users_out = mm(out / "user.npy", mode="w+", dtype=user_dtype, shape=(total,))
    items_out = mm(out / "item.npy", mode="w+", dtype=item_dtype, shape=(total,))
    ts_out = mm(out / "timestamp.npy", mode="w+", dtype=np.int64, shape=(total,))
    pos = 0
    chunks = range(0, cfg.num_users, cfg.chunk_users)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="synthetic", unit="chunk")
    for u0 in chunks:
        lens = lengths[u0 : u0 + cfg.chunk_users]
        # One independent stream per chunk, seeded by (seed, first user): deterministic for a config.
        chunk_rng = np.random.default_rng([cfg.seed, u0])
        items, ts = _generate_chunk(cfg, lens, chunk_rng)
        n = len(items)
        users_out[pos : pos + n] = np.repeat(np.arange(u0, u0 + len(lens), dtype=user_dtype), lens)
        items_out[pos : pos + n] = items
        ts_out[pos : pos + n] = ts
        pos += n
    for arr in (users_out, items_out, ts_out):
        arr.flush()
    del users_out, items_out, ts_out
    load = lambda name: np.load(out / f"{name}.npy", mmap_mode="r")
    return RawInteractions(
        user=load("user"), item=load("item"), timestamp=load("timestamp"), user_ids=None, item_ids=None,
        source=f"synthetic(seed={cfg.seed})", checksum=synthetic_checksum(cfg),
        extra={"num_user_codes": cfg.num_users, "num_item_codes": cfg.num_items},
    )
