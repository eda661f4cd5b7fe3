"""Exact full-catalog ranking and top-k over a sharded item table: each rank scores only its own rows.

Per user batch, the ranks all-gather their users' vectors, targets and histories (small: B x d), then each
rank, for *all* gathered users and only *its own* table rows:

- contributes its targets' canonical scores (``canonical_target_scores``; all-reduced, exact since x + 0 = x),
- counts the items at or above each target (``block_rank_counts``; all-reduced),
- keeps its own top-k (``block_topk``; all-gathered and merged by ``merge_topk``),

and keeps the results of its own users. No rank ever holds the whole table, and the ranks and top-k equal
a brute-force ranking of the whole catalog exactly (canonical float64 scores, pessimistic ties). Total work
equals the unsharded evaluation's; memory per rank is O(users x chunk).

Where the rows come from: the item table's local shards (row-wise: one row range per rank; table-wise:
the owner holds all rows, the others none); a replicated table (unsharded, ``data_parallel``) is split into
equal row ranges by rank. Column-wise shards are assembled through the table lookup instead. Blocks are
views of at most ``BLOCK_ROWS`` rows in the table's own dtype (fp16 tables stay fp16); each is upcast to
fp32 (and L2-normalised if asked) only while it is scored, so scoring memory stays bounded whatever the
catalog size (the fp16 -> fp32 upcast is exact, so scores equal those of the upcast table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..ops.canonical import canonical_target_scores
from ..ops.ranking import PROTOCOLS, block_rank_counts, finish_ranks
from ..ops.segments import offsets_from_lengths
from ..ops.topk import block_topk, merge_topk

SCORE_BUDGET_BYTES = 1 << 25  # per score chunk (users x items x 4 bytes) before re-scoring
BLOCK_ROWS = 1 << 16  # rows per item block: bounds the per-block fp32 / float64 working copies


@dataclass
class ItemBlock:
    """Vectors of item columns ``first_col .. first_col + len(vectors) - 1`` (items ``first_col + 1 ..``).

    ``vectors`` is a view in the table's dtype; ``normalize``: L2-normalise when scored."""

    first_col: int
    vectors: Tensor
    normalize: bool = False

    def scoring(self, device: torch.device | None = None) -> Tensor:
        """The block as scored: on ``device``, fp16/bf16 upcast to fp32, L2-normalised if asked."""
        v = self.vectors if device is None else self.vectors.to(device)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        return F.normalize(v, dim=-1) if self.normalize else v


def _row_range_blocks(weight: Tensor, row0: int, num_items: int, block_rows: int = BLOCK_ROWS) -> list[ItemBlock]:
    """Rows ``row0 ..`` of the table (row r = item r; 0 = padding, num_items + 1 = mask) -> item blocks of at
    most ``block_rows`` rows each."""
    lo, hi = max(row0, 1), min(row0 + weight.shape[0], num_items + 1)
    return [ItemBlock(r - 1, weight[r - row0 : min(r + block_rows, hi) - row0].detach())
            for r in range(lo, hi, block_rows)]


def local_item_blocks(model: torch.nn.Module, table_key: str, num_items: int, rank: int, world_size: int,
                      normalize: bool = False, block_rows: int = BLOCK_ROWS) -> list[ItemBlock]:
    """This rank's item rows of ``model``'s table (``table_key`` in its state dict), as column blocks of at
    most ``block_rows`` rows (views in the table's dtype; see :meth:`ItemBlock.scoring`)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    weight = model.state_dict()[table_key]
    blocks: list[ItemBlock] = []
    if isinstance(weight, ShardedTensor):
        dim = weight.size(1)
        for shard in weight.local_shards():
            (r0, c0), (_, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if (c0, nc) != (0, dim):
                raise ValueError(f"{table_key}: shard covers columns {c0}..{c0 + nc - 1} of {dim}; exact sharded "
                                 "evaluation needs whole rows (row_wise / table_wise / data_parallel sharding)")
            blocks += _row_range_blocks(shard.tensor, r0, num_items, block_rows)
    elif isinstance(weight, Tensor):  # replicated: split the rows evenly by rank
        per = -(-weight.shape[0] // world_size)
        r0 = rank * per
        blocks += _row_range_blocks(weight[r0 : r0 + per], r0, num_items, block_rows)
    else:
        raise ValueError(f"{table_key}: unsupported table type {type(weight).__name__}")
    if normalize:
        blocks = [ItemBlock(b.first_col, b.vectors, normalize=True) for b in blocks]
    return blocks


def _chunk_items(num_users: int) -> int:
    return max(1024, SCORE_BUDGET_BYTES // (4 * max(num_users, 1)))


class _Gathered:
    """One batch of every rank's users (vectors, targets, jagged histories), in rank order."""

    def __init__(self, vectors: Tensor, targets: Tensor, hist_values: Tensor, hist_offsets: Tensor,
                 group: dist.ProcessGroup | None) -> None:
        self.group = group
        world = self.world = dist.get_world_size(group) if _distributed(group) else 1
        if world == 1:
            self.vectors, self.targets = vectors, targets
            self.hist_values, self.hist_offsets = hist_values, hist_offsets
            self.start, self.count = 0, vectors.shape[0]
            return
        device = vectors.device
        lengths = hist_offsets[1:] - hist_offsets[:-1]
        sizes = torch.tensor([vectors.shape[0], hist_values.numel()], dtype=torch.long, device=device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        users = [int(s[0]) for s in all_sizes]
        hist = [int(s[1]) for s in all_sizes]
        me = dist.get_rank(group)
        self.start, self.count = sum(users[:me]), users[me]
        self.vectors = torch.cat(_all_gather_padded(vectors.float(), users, group))
        self.targets = torch.cat(_all_gather_padded(targets.long(), users, group))
        all_lengths = torch.cat(_all_gather_padded(lengths.long(), users, group))
        self.hist_values = torch.cat(_all_gather_padded(hist_values.long(), hist, group))
        self.hist_offsets = offsets_from_lengths(all_lengths)

    def mine(self, t: Tensor) -> Tensor:
        """This rank's users' rows of a per-gathered-user tensor."""
        return t[self.start : self.start + self.count]

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather_padded(t: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> list[Tensor]:
    """All-gather tensors whose first dimension differs by rank (``sizes``)."""
    most = max(sizes)
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [o[:n] for o, n in zip(out, sizes)]


def sharded_score_ranks(
    user_vectors: Tensor,
    targets: Tensor,
    history_values: Tensor,
    history_offsets: Tensor,
    blocks: list[ItemBlock],
    num_items: int,
    *,
    protocols: tuple[str, ...] = PROTOCOLS,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Tensor]:
    """Collective. ``score_ranks`` of this rank's users against the catalog spread over the ranks' blocks."""
    g = _Gathered(user_vectors, targets, history_values, history_offsets, group)
    n_all, device = g.vectors.shape[0], g.vectors.device
    chunk = _chunk_items(n_all)
    target_scores = torch.zeros(n_all, dtype=torch.float64, device=device)
    for b in blocks:
        target_scores += canonical_target_scores(g.vectors, b.scoring(device), g.targets, b.first_col)[0]
    g.all_reduce(target_scores)
    counts = torch.zeros(len(protocols), n_all, dtype=torch.long, device=device)
    for b in blocks:
        block = block_rank_counts(g.vectors, b.scoring(device), g.targets, target_scores, first_col=b.first_col,
                                  num_items=num_items, history_values=g.hist_values, history_offsets=g.hist_offsets,
                                  protocols=protocols, chunk_items=chunk)
        counts += torch.stack([block[p] for p in protocols])
    g.all_reduce(counts)
    ranks = finish_ranks({p: counts[i] for i, p in enumerate(protocols)}, g.targets, num_items=num_items,
                         history_values=g.hist_values, history_offsets=g.hist_offsets)
    return {p: g.mine(r) for p, r in ranks.items()}


def sharded_topk(
    user_vectors: Tensor,
    targets: Tensor,
    blocks: list[ItemBlock],
    num_items: int,
    k: int,
    *,
    history_values: Tensor | None = None,
    history_offsets: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Collective. This rank's users' top-``min(k, num_items)`` ``(scores float64, item columns)`` over the
    whole catalog; each rank ranks its own blocks, the per-rank lists are all-gathered and merged. With a
    history, those items are excluded (filtered protocol)."""
    k = min(k, num_items)
    filtered = history_values is not None
    if not filtered:
        history_values = torch.zeros(0, dtype=torch.long, device=user_vectors.device)
        history_offsets = torch.zeros(user_vectors.shape[0] + 1, dtype=torch.long, device=user_vectors.device)
    g = _Gathered(user_vectors, targets, history_values, history_offsets, group)
    n_all, device = g.vectors.shape[0], g.vectors.device
    hv, ho = (g.hist_values, g.hist_offsets) if filtered else (None, None)
    scores = torch.full((n_all, k), -torch.inf, dtype=torch.float64, device=device)
    cols = torch.full((n_all, k), num_items, dtype=torch.long, device=device)  # sentinel column sorts last
    for b in blocks:
        s, c = block_topk(g.vectors, b.scoring(device), k, first_col=b.first_col, num_items=num_items,
                          history_values=hv, history_offsets=ho, targets=g.targets, chunk_items=_chunk_items(n_all))
        scores, cols = merge_topk([scores, s], [cols, c], k, targets=g.targets)
    if _distributed(group):
        world = dist.get_world_size(group)
        all_scores = [torch.empty_like(scores) for _ in range(world)]
        all_cols = [torch.empty_like(cols) for _ in range(world)]
        dist.all_gather(all_scores, scores, group=group)
        dist.all_gather(all_cols, cols, group=group)
        scores, cols = merge_topk(all_scores, all_cols, k, targets=g.targets)
    return g.mine(scores), g.mine(cols)


__all__ = ["ItemBlock", "local_item_blocks", "sharded_score_ranks", "sharded_topk"]
