"""Sharded full-catalog ranking and top-k equal brute force exactly.

Reference: canonical scores built independently here (float64, summed over k = 0 .. d-1 in order), then
pessimistic ranks and (score desc, target after its ties, column asc) top-k by plain numpy sorting.

1. In-process: the catalog cut into random column blocks (some empty), per-block counts / top-k combined
   with ``finish_ranks`` / ``merge_topk``; vectors quantised so that exact ties are everywhere.
2. Two gloo ranks with a real row-wise (and table-wise) sharded TorchRec table: each rank's blocks come from
   its own shards (checked: no rank holds every row), ``sharded_score_ranks`` / ``sharded_topk`` run for users
   that differ per rank (including a rank with none); the parent reassembles the table from the saved shards
   and compares with brute force.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd4rec_torchrec.eval.sharded import local_item_blocks
from ssd4rec_torchrec.ops.canonical import canonical_target_scores
from ssd4rec_torchrec.ops.ranking import PROTOCOLS, block_rank_counts, finish_ranks, score_ranks
from ssd4rec_torchrec.ops.topk import block_topk, merge_topk

WORLD = 2
NUM_ITEMS, DIM = 97, 8
TABLE_KEY = "embeddings.item_embedding.weight"
WORKER_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------- reference


def _canonical(users: torch.Tensor, items: torch.Tensor) -> np.ndarray:
    u, it = users.double().numpy(), items.double().numpy()
    s = np.zeros((u.shape[0], it.shape[0]))
    for k in range(u.shape[1]):
        s = s + u[:, k : k + 1] * it[None, :, k]
    return s


def _history_sets(values: torch.Tensor, offsets: torch.Tensor) -> list[set[int]]:
    v, o = values.tolist(), offsets.tolist()
    return [{x - 1 for x in v[o[b] : o[b + 1]] if 1 <= x <= NUM_ITEMS} for b in range(len(o) - 1)]


def _brute_ranks(scores: np.ndarray, targets: torch.Tensor, seen: list[set[int]]) -> dict[str, np.ndarray]:
    out = {p: np.zeros(len(scores), dtype=np.int64) for p in PROTOCOLS}
    for b, t in enumerate(targets.tolist()):
        t -= 1
        others = [j for j in range(scores.shape[1]) if j != t and scores[b, j] >= scores[b, t]]
        out["unfiltered"][b] = len(others)
        out["filtered"][b] = scores.shape[1] if t in seen[b] else len([j for j in others if j not in seen[b]])
    return out


def _brute_topk(scores: np.ndarray, targets: torch.Tensor, seen: list[set[int]] | None, k: int):
    top_scores, top_cols = [], []
    for b, t in enumerate(targets.tolist()):
        row = [(-(-np.inf if seen and j in seen[b] else scores[b, j]), j == t - 1, j) for j in range(scores.shape[1])]
        row.sort()
        top_scores.append([-r[0] for r in row[:k]])
        top_cols.append([r[2] for r in row[:k]])
    return np.array(top_scores), np.array(top_cols)


def _quantised(generator: torch.Generator, rows: int, distinct: int) -> torch.Tensor:
    """Rows drawn from a few distinct quarter-integer vectors: many exactly tied scores."""
    palette = torch.randint(-4, 5, (distinct, DIM), generator=generator).float() / 4
    return palette[torch.randint(0, distinct, (rows,), generator=generator)]


def _histories(generator: torch.Generator, users: int, with_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, 12, (users,), generator=generator)
    values = torch.randint(0, NUM_ITEMS + 2, (int(lengths.sum()),), generator=generator)  # pad/mask included
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    for b in range(0, users, 3):  # every third user has seen their target (a filtered miss)
        if lengths[b]:
            values[offsets[b]] = with_targets[b]
    return values, offsets


def _case(seed: int, users: int):
    g = torch.Generator().manual_seed(seed)
    items = _quantised(g, NUM_ITEMS, 6) if seed % 2 else torch.randn(NUM_ITEMS, DIM, generator=g)
    vectors = _quantised(g, users, 4)
    targets = torch.randint(1, NUM_ITEMS + 1, (users,), generator=g)
    hv, ho = _histories(g, users, targets)
    return items, vectors, targets, hv, ho


# ------------------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("seed", range(6))
def test_block_counts_and_topk_equal_brute_force(seed):
    items, vectors, targets, hv, ho = _case(seed, users=23)
    g = torch.Generator().manual_seed(100 + seed)
    cuts = sorted(torch.randint(0, NUM_ITEMS + 1, (4,), generator=g).tolist())
    bounds = list(zip([0, *cuts], [*cuts, NUM_ITEMS]))  # 5 blocks, some possibly empty
    scores = _canonical(vectors, items)
    seen = _history_sets(hv, ho)
    expect = _brute_ranks(scores, targets, seen)

    target_scores = sum(canonical_target_scores(vectors, items[lo:hi], targets, lo)[0] for lo, hi in bounds)
    assert np.array_equal(target_scores.numpy(), scores[np.arange(23), targets.numpy() - 1])
    counts = {p: torch.zeros(23, dtype=torch.long) for p in PROTOCOLS}
    for lo, hi in bounds:
        block = block_rank_counts(vectors, items[lo:hi], targets, target_scores, first_col=lo, num_items=NUM_ITEMS,
                                  history_values=hv, history_offsets=ho, chunk_items=7)
        for p in PROTOCOLS:
            counts[p] += block[p]
    ranks = finish_ranks(counts, targets, num_items=NUM_ITEMS, history_values=hv, history_offsets=ho)
    whole = score_ranks(vectors, items, targets, history_values=hv, history_offsets=ho)
    for p in PROTOCOLS:
        assert np.array_equal(ranks[p].numpy(), expect[p]), p
        assert np.array_equal(whole[p].numpy(), expect[p]), p
    assert (expect["unfiltered"] > 0).any() and (expect["filtered"] == NUM_ITEMS).any()

    for k, history in ((10, None), (10, (hv, ho)), (NUM_ITEMS, (hv, ho))):
        kw = {"history_values": history[0], "history_offsets": history[1]} if history else {}
        parts = [block_topk(vectors, items[lo:hi], k, first_col=lo, num_items=NUM_ITEMS, targets=targets,
                            chunk_items=5, **kw) for lo, hi in bounds]
        got_scores, got_cols = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, targets=targets)
        want_scores, want_cols = _brute_topk(scores, targets, seen if history else None, k)
        assert np.array_equal(got_cols.numpy(), want_cols)
        assert np.array_equal(got_scores.numpy(), want_scores)


def test_topk_dump_order_reproduces_pessimistic_ranks():
    """With ties, the target is listed after the items tied with it, so its position in the top-k is its rank."""
    items, vectors, targets, hv, ho = _case(1, users=40)
    ranks = score_ranks(vectors, items, targets, history_values=hv, history_offsets=ho)
    for protocol, kw in (("unfiltered", {}), ("filtered", {"history_values": hv, "history_offsets": ho})):
        _, cols = block_topk(vectors, items, NUM_ITEMS, targets=targets, **kw)
        position = (cols == (targets - 1).unsqueeze(1)).int().argmax(1)
        live = ranks[protocol] < NUM_ITEMS
        assert torch.equal(position[live], ranks[protocol][live])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_replicated_table_split_by_rank_covers_every_item_once(world):
    table = torch.arange((NUM_ITEMS + 2) * 2, dtype=torch.float32).reshape(NUM_ITEMS + 2, 2)
    model = torch.nn.Module()
    model.register_buffer("weight", table)
    cols = []
    for rank in range(world):
        for b in local_item_blocks(model, "weight", NUM_ITEMS, rank, world):
            assert torch.equal(b.vectors, table[b.first_col + 1 : b.first_col + 1 + len(b.vectors)])
            cols += range(b.first_col, b.first_col + len(b.vectors))
    assert sorted(cols) == list(range(NUM_ITEMS))  # padding row 0 and mask row n+1 are never ranked


# ------------------------------------------------------------------------------------------------- 2 ranks


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from ssd4rec_torchrec.config import LossSection, ModelSection, TrainSection
    from ssd4rec_torchrec.eval.sharded import sharded_score_ranks, sharded_topk
    from ssd4rec_torchrec.job.distributed import build_dmp, init_distributed
    from ssd4rec_torchrec.model import SSD4Rec

    torch.set_num_threads(1)
    ctx = init_distributed()
    model_cfg = ModelSection(d_model=DIM, n_layers=1, d_state=8, headdim=8, chunk_size=16, dropout=0.0)
    for sharding in ("row_wise", "table_wise"):
        dmp, _ = build_dmp(SSD4Rec(NUM_ITEMS, model_cfg, LossSection(), device="meta"),
                           TrainSection(sharding=sharding), ctx)
        table = _quantised(torch.Generator().manual_seed(5), NUM_ITEMS + 2, 6)
        shards = []
        with torch.no_grad():
            for shard in dmp.module.ec.state_dict()[TABLE_KEY].local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(table[r0 : r0 + nr, c0 : c0 + nc])
                shards.append((r0, nr))
        blocks = local_item_blocks(dmp.module.ec, TABLE_KEY, NUM_ITEMS, ctx.rank, ctx.world_size)
        results = []
        for call, users in enumerate((17 + 5 * ctx.rank, 0 if ctx.rank else 9)):  # rank 1 has no users once
            _, vectors, targets, hv, ho = _case(1000 * call + ctx.rank, users)
            ranks = sharded_score_ranks(vectors, targets, hv, ho, blocks, NUM_ITEMS)
            topk_all = sharded_topk(vectors, targets, blocks, NUM_ITEMS, 10)
            topk_filtered = sharded_topk(vectors, targets, blocks, NUM_ITEMS, 10, history_values=hv,
                                         history_offsets=ho)
            results.append({"vectors": vectors, "targets": targets, "hv": hv, "ho": ho, "ranks": ranks,
                            "topk": topk_all, "topk_filtered": topk_filtered})
        torch.save({"results": results, "shards": shards,
                    "block_cols": [(b.first_col, len(b.vectors)) for b in blocks]},
                   out / f"{sharding}-rank{ctx.rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded_eval")
    from dist_workers import run_ranks  # tests/ is on sys.path under pytest, not in the worker processes

    run_ranks(__file__, out, WORLD, WORKER_TIMEOUT_S)
    return out


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_sharded_ranks_and_topk_equal_brute_force(ranks_out, sharding):
    saved = [torch.load(ranks_out / f"{sharding}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    table = _quantised(torch.Generator().manual_seed(5), NUM_ITEMS + 2, 6)
    rows = sorted((r0, nr) for s in saved for r0, nr in s["shards"])
    assert rows[0][0] == 0 and sum(nr for _, nr in rows) == NUM_ITEMS + 2  # shards partition the table
    cols = [c for s in saved for first, n in s["block_cols"] for c in range(first, first + n)]
    assert sorted(cols) == list(range(NUM_ITEMS))
    if sharding == "row_wise":  # no rank holds the whole table
        assert all(sum(n for _, n in s["block_cols"]) < NUM_ITEMS for s in saved)
    items = table[1 : NUM_ITEMS + 1]
    for s in saved:
        for res in s["results"]:
            if not len(res["targets"]):
                assert all(r.numel() == 0 for r in res["ranks"].values())
                continue
            scores = _canonical(res["vectors"], items)
            seen = _history_sets(res["hv"], res["ho"])
            expect = _brute_ranks(scores, res["targets"], seen)
            for p in PROTOCOLS:
                assert np.array_equal(res["ranks"][p].numpy(), expect[p]), p
            for key, history in (("topk", None), ("topk_filtered", seen)):
                want_scores, want_cols = _brute_topk(scores, res["targets"], history, 10)
                assert np.array_equal(res[key][1].numpy(), want_cols), key
                assert np.array_equal(res[key][0].numpy(), want_scores), key


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
