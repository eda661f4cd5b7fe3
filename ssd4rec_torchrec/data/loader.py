"""Epochs of training examples and eval batches, sharded by user across ranks, deterministic by seed.

Objectives (see ``config.ObjectiveSection``):

- ``prefix`` (the paper's): an example is a prefix ``i_1..i_c`` of a user's training history with
  target ``i_{c+1}``, read out at the prefix's last token. ``prefixes_per_user="all"`` takes every
  prefix (the official code: cost grows with the square of history length); an integer ``k`` samples
  ``k`` cut points per user per epoch (with replacement).
- ``cloze``: an example is a user's whole training history; items are replaced by the mask token with
  probability ``mask_prob``, the last one with probability ``p_last``; targets are the originals at
  masked positions. At inference a mask token is appended and read out.
- ``next`` (SASRec): an example is a user's training history without its last item; every position
  predicts the item after it (only for causal encoders). At inference the last token is read out.

Users are assigned to ranks by ``user % world_size``; every rank runs the same number of steps (the
minimum over ranks; the largest ranks' surplus examples of that epoch are skipped) so collectives line up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .batches import SeqBatch, corrupt, gather_segments, make_batch
from .preprocess import FIRST_ITEM_INDEX, LeaveOneOut, mask_index


def item_counts(items: np.ndarray, num_items: int) -> np.ndarray:
    """Interactions per item index (0 .. num_items + 1) as int32: 4 bytes per catalog item, where
    ``np.bincount`` would allocate 8."""
    counts = np.zeros(num_items + 2, dtype=np.int32)
    for s in range(0, len(items), 1 << 24):
        np.add.at(counts, np.asarray(items[s:s + (1 << 24)], dtype=np.int64), 1)
    return counts


class NegativeSampler:
    """Uniform or popularity-proportional (count^alpha) negatives over items 1..num_items.

    ``logq`` is log of the expected number of times an item is drawn in one step (K·q), the quantity a
    logQ-corrected sampled softmax subtracts.
    """

    def __init__(self, kind: str, num_items: int, counts: np.ndarray | None, num_negatives: int, alpha: float = 1.0):
        self.kind, self.num_items, self.k = kind, num_items, num_negatives
        if kind == "popularity":
            if counts is None:
                raise ValueError("popularity sampler needs item counts")
            w = np.power(np.asarray(counts[FIRST_ITEM_INDEX:FIRST_ITEM_INDEX + num_items], dtype=np.float64) + 1.0,
                         alpha)
            self.cdf = np.cumsum(w / w.sum())
            self.log_q_item = np.log(w / w.sum())
        elif kind == "uniform":
            self.cdf = None
        else:
            raise ValueError(f"unknown sampler {kind!r}")
        # in-batch negatives follow the target (popularity) distribution: log((count + 1) / total), evaluated
        # at the batch's targets from the counts (kept as int32 where they fit: 4 bytes per catalog item, no
        # float64 table of the catalog's size); the integer total is exact
        c = counts[FIRST_ITEM_INDEX:FIRST_ITEM_INDEX + num_items] if counts is not None else None
        if c is None:
            self.total = float(num_items)
        elif np.asarray(c[:0]).dtype.kind in "iu":  # integer counts: the float64 sum of (count + 1) is exact
            self.total = float(int(np.sum(c, dtype=np.int64)) + num_items)
            if len(c) and int(c.max()) < 2**31:
                c = c.astype(np.int32, copy=False)
        else:
            self.total = float((np.asarray(c, dtype=np.float64) + 1.0).sum())
        self.item_counts = c

    def log_pop(self, items: np.ndarray) -> np.ndarray:
        """log((count + 1) / total) of item indices ``items - FIRST_ITEM_INDEX`` (float64)."""
        if self.item_counts is None:
            return np.log(np.ones(len(items)) / self.total)
        return np.log((np.asarray(self.item_counts[items], dtype=np.float64) + 1.0) / self.total)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.cdf is None:
            ids = rng.integers(0, self.num_items, size=self.k)
            logq = np.full(self.k, math.log(self.k / self.num_items))
        else:
            ids = np.minimum(np.searchsorted(self.cdf, rng.random(self.k), side="right"), self.num_items - 1)
            logq = self.log_q_item[ids] + math.log(self.k)
        return ids + FIRST_ITEM_INDEX, logq.astype(np.float32)

    def target_logq(self, targets: np.ndarray) -> np.ndarray:
        return (self.log_pop(targets - FIRST_ITEM_INDEX) + math.log(max(len(targets), 1))).astype(np.float32)


@dataclass
class LoaderSpec:
    objective: str = "prefix"
    prefixes_per_user: int | str = 8
    mask_prob: float = 0.2
    p_last: float = 0.5
    corruption: float = 0.0
    max_history: int | None = None
    loss: str = "full"
    batch_size: int = 256


class TrainLoader:
    """Per-rank training batches for one epoch; ``epoch(e, start_step)`` is reproducible for resume."""

    def __init__(self, split: LeaveOneOut, num_items: int, spec: LoaderSpec, *, seed: int, rank: int = 0,
                 world_size: int = 1, sampler: NegativeSampler | None = None):
        self.split, self.num_items, self.spec = split, num_items, spec
        self.seed, self.rank, self.world = seed, rank, world_size
        self.sampler = sampler
        if spec.loss == "sampled" and sampler is None:
            raise ValueError("sampled softmax needs a NegativeSampler")
        self.train_lengths = np.diff(split.train_offsets)
        self.num_users = len(self.train_lengths)

    def _global_examples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All (user, cut) pairs of one epoch, shuffled the same way on every rank. ``cut`` = prefix length
        (prefix) or 0."""
        users = np.arange(self.num_users, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, 1])
        if self.spec.objective in ("cloze", "next"):
            ex_users, cuts = users, np.zeros(len(users), dtype=np.int64)
        else:
            n = self.train_lengths[users] - 1  # valid cut points 1..n_train-1
            users, n = users[n > 0], n[n > 0]
            if self.spec.prefixes_per_user == "all":
                ex_users = np.repeat(users, n)
                starts = np.repeat(np.cumsum(n) - n, n)
                cuts = np.arange(len(ex_users), dtype=np.int64) - starts + 1
            else:
                k = int(self.spec.prefixes_per_user)
                ex_users = np.repeat(users, k)
                cuts = (rng.random(len(ex_users)) * np.repeat(n, k)).astype(np.int64) + 1
        order = rng.permutation(len(ex_users))
        return ex_users[order], cuts[order]

    def example_tokens(self, users: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """Encoder input tokens of each example (after ``max_history`` truncation)."""
        m = self.spec.max_history or 2**40
        if self.spec.objective == "cloze":
            return np.minimum(self.train_lengths[users], m)
        if self.spec.objective == "next":
            return np.minimum(self.train_lengths[users], m + 1) - 1
        return np.minimum(cuts, m)

    def _count(self) -> int:
        """Examples of one epoch over all ranks."""
        if self.spec.objective in ("cloze", "next"):
            return self.num_users
        n = np.maximum(self.train_lengths - 1, 0)
        if self.spec.prefixes_per_user == "all":
            return int(n.sum())
        return int((n > 0).sum()) * int(self.spec.prefixes_per_user)

    def steps_per_epoch(self) -> int:
        """Global batches of ``batch_size x world_size`` examples; a last partial one counts if every rank
        gets at least one example of it."""
        full, rest = divmod(self._count(), self.spec.batch_size * self.world)
        return full + (rest >= self.world)

    def _examples(self, rank: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(user, cut) pairs of one rank for one epoch, in step order (``batch_size`` per step).

        Every step takes the next ``batch_size x world_size`` examples of the shared shuffle and deals them
        to the ranks in a snake order of decreasing length (0, 1, .., W-1, W-1, .., 0, 0, ..), so each rank
        gets ``batch_size`` examples and nearly the same number of tokens (within one example's length):
        the ranks of a variable-length batch then reach the collectives together instead of the lighter
        ones waiting for the heaviest.
        """
        users, cuts = self._global_examples(epoch)
        per_step, W = self.spec.batch_size * self.world, self.world
        steps = self.steps_per_epoch()
        n_used = min(len(users), steps * per_step)
        users, cuts = users[:n_used], cuts[:n_used]
        tokens = self.example_tokens(users, cuts)
        rank_of = np.empty(n_used, dtype=np.int64)
        full = n_used // per_step
        for start, rows, width in ((0, full, per_step), (full * per_step, 1, n_used - full * per_step)):
            if rows == 0 or width == 0:
                continue
            block = np.arange(start, start + rows * width).reshape(rows, width)
            by_length = np.take_along_axis(block, np.argsort(-tokens[block], axis=1, kind="stable"), axis=1)
            i = np.arange(width)
            snake = np.where((i // W) % 2 == 0, i % W, W - 1 - i % W)
            rank_of[by_length] = snake  # broadcast over the rows
        mine = np.flatnonzero(rank_of == rank)  # shuffle order inside each step
        return users[mine], cuts[mine]

    def tokens_per_epoch(self) -> int:
        """Input tokens this rank encodes per epoch (before max_history truncation when 'all')."""
        users, cuts = self._examples(self.rank, 0)
        if self.spec.objective in ("cloze", "next"):
            return int(self.train_lengths[users].sum())
        return int(cuts.sum())

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[SeqBatch]:
        users, cuts = self._examples(self.rank, epoch)
        bs, steps = self.spec.batch_size, self.steps_per_epoch()
        for step in range(start_step, steps):
            sl = slice(step * bs, (step + 1) * bs)  # the last step may hold fewer
            rng = np.random.default_rng([self.seed, epoch, self.rank, 2, step])
            yield self._batch(users[sl], cuts[sl], rng)

    def _batch(self, users: np.ndarray, cuts: np.ndarray, rng: np.random.Generator) -> SeqBatch:
        s, items, off = self.spec, self.split.train_items, self.split.train_offsets
        m = s.max_history or 2**40
        if s.objective == "prefix":
            lengths = np.minimum(cuts, m)
            starts = off[users] + cuts - lengths
            hist = gather_segments(items, starts, lengths)
            readout = np.cumsum(lengths) - 1
            targets = np.asarray(items[off[users] + cuts]).astype(np.int64)
            hist = corrupt(hist, s.corruption, rng)
            target_lengths = np.ones(len(users), dtype=np.int64)
        elif s.objective == "next":
            full = self.train_lengths[users]  # >= 1 (leave-one-out keeps >= 1 training item)
            span = np.minimum(full, m + 1)  # inputs are span-1 items, each predicting its successor
            seq = gather_segments(items, off[users + 1] - span, span).astype(np.int64)
            seg_start = np.cumsum(span) - span
            is_first = np.zeros(len(seq), dtype=bool)
            is_first[seg_start] = True
            is_last = np.zeros(len(seq), dtype=bool)
            is_last[np.cumsum(span) - 1] = True
            hist, targets = seq[~is_last], seq[~is_first]
            lengths = span - 1
            readout = np.arange(len(hist), dtype=np.int64)
            target_lengths = lengths
            hist = corrupt(hist, s.corruption, rng)
        else:
            full = self.train_lengths[users]
            lengths = np.minimum(full, m)
            hist = gather_segments(items, off[users + 1] - lengths, lengths).astype(np.int64)
            masked = rng.random(len(hist)) < s.mask_prob
            last = np.cumsum(lengths) - 1
            masked[last] = rng.random(len(users)) < s.p_last
            # every example predicts something: if nothing got masked, mask its last item
            seg = np.repeat(np.arange(len(users)), lengths)
            none = np.bincount(seg[masked], minlength=len(users)) == 0
            masked[last[none]] = True
            readout = np.flatnonzero(masked)
            targets = hist[readout].copy()
            target_lengths = np.bincount(seg[masked], minlength=len(users))
            hist = corrupt(hist, s.corruption, rng, protect=masked)
            hist[masked] = mask_index(self.num_items)
        kw = {}
        if s.loss == "sampled":
            neg, neg_logq = self.sampler.sample(rng)
            kw = {"negatives": neg, "negative_logq": neg_logq, "target_logq": self.sampler.target_logq(targets)}
        return make_batch(hist, lengths, readout, targets, target_lengths,
                          catalog_size=self.num_items if s.loss == "full" else 0, users=users, **kw)


def eval_user_sample(num_users: int, size: int | None, seed: int) -> np.ndarray | None:
    """A fixed, sorted random sample of ``size`` user indices (None, or all users, when ``size`` is None)."""
    if size is None or size >= num_users:
        return None
    return np.sort(np.random.default_rng([seed, 7]).choice(num_users, size=size, replace=False)).astype(np.int64)


def eval_batches(split: LeaveOneOut, num_items: int, which: str, *, objective: str, batch_users: int,
                 max_history: int | None = None, rank: int = 0, world_size: int = 1,
                 users: np.ndarray | None = None) -> Iterator[SeqBatch]:
    """Eval input per user (``valid``: training history; ``test``: history incl. the valid item).

    Every rank yields the same number of batches (padding examples carry weight 0) so collective
    lookups line up. ``cloze`` appends a mask token and reads it out; ``prefix`` reads the last token.
    ``users``: evaluate only these user indices (e.g. :func:`eval_user_sample`), split across ranks.
    """
    if which == "valid":
        off, items, targets = split.train_offsets, split.train_items, split.valid_targets
    elif which == "test":
        off, items, targets = split.test_offsets, split.test_items, split.test_targets
    else:
        raise ValueError(f"split must be 'valid' or 'test', got {which!r}")
    everyone = np.arange(len(off) - 1, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    num_users = len(everyone)
    users = everyone[rank::world_size]
    most = math.ceil(num_users / world_size)
    steps = math.ceil(most / batch_users)
    m = max_history or np.iinfo(np.int64).max
    for step in range(steps):
        u = users[step * batch_users:(step + 1) * batch_users]
        weights = np.ones(len(u), dtype=np.float32)
        if len(u) == 0:  # this rank ran out: one padding example keeps the collectives in step
            u, weights = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32)
        full = off[u + 1] - off[u]
        lengths = np.minimum(full, m)
        hist = gather_segments(items, off[u + 1] - lengths, lengths).astype(np.int64)
        if objective == "cloze":
            ends = np.cumsum(lengths)
            hist = np.insert(hist, ends, mask_index(num_items))
            lengths = lengths + 1
        readout = np.cumsum(lengths) - 1
        yield make_batch(hist, lengths, readout, np.asarray(targets[u]).astype(np.int64),
                         np.ones(len(u), dtype=np.int64), weights=weights, users=u)
