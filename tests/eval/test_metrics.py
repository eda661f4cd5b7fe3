"""Ranks and ranking metrics against hand-computed values, a brute-force Python reference and a 2-rank run."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd4rec_torchrec.eval import (
    DEFAULT_KS,
    RankingMetrics,
    evaluate_protocols,
    evaluate_scores,
    popularity_scores,
    ranks_from_scores,
    score_ranks,
    target_ranks,
)
from ssd4rec_torchrec.ops import canonical as canonical_module

# ----------------------------------------------------------------------------------------------------------------
# independent references (plain Python, no torch ops on the ranking path)
# ----------------------------------------------------------------------------------------------------------------


def brute_ranks(users: list[list[int]], items: list[list[int]], targets: list[int], histories: list[list[int]]):
    """Pessimistic ranks by loops over exact integer dot products; items are 1-based indices into ``items``."""
    n = len(items)
    unfiltered, filtered = [], []
    for u, t, hist in zip(users, targets, histories):
        s = {j: sum(a * b for a, b in zip(u, items[j - 1])) for j in range(1, n + 1)}
        seen = {v for v in hist if 1 <= v <= n}
        unfiltered.append(sum(1 for j in range(1, n + 1) if j != t and s[j] >= s[t]))
        if t in seen:
            filtered.append(n)
        else:
            filtered.append(sum(1 for j in range(1, n + 1) if j != t and j not in seen and s[j] >= s[t]))
    return unfiltered, filtered


def brute_metrics(ranks: list[int], ks) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"HR@{k}"] = sum(1.0 for r in ranks if r < k) / len(ranks)
        out[f"NDCG@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
        out[f"MRR@{k}"] = sum(1.0 / (r + 1) for r in ranks if r < k) / len(ranks)
    out["count"] = float(len(ranks))
    return out


def jagged(histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([v for h in histories for v in h], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(h) for h in histories], dtype=torch.int64).cumsum(0)
    return values, offsets


def assert_metrics_close(got: dict[str, float], want: dict[str, float], tol: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol, rel=0), key


# ----------------------------------------------------------------------------------------------------------------
# hand-computed examples
# ----------------------------------------------------------------------------------------------------------------


def test_target_ranks_by_hand_ties_are_pessimistic_and_excluded_target_misses():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.5, 0.9],  # target col 1 (0.5): 0.9 above, the other 0.5 ties -> rank 2
            [0.3, 0.2, 0.1, 0.0],  # target col 0 is the best -> rank 0
            [1.0, 1.0, 1.0, 1.0],  # all tied -> rank 3 (the last place)
        ]
    )
    targets = torch.tensor([1, 0, 3])
    assert target_ranks(scores, targets).tolist() == [2, 0, 3]

    exclude = torch.tensor(
        [
            [False, False, False, True],  # drop the 0.9 -> only the tie remains -> rank 1
            [True, False, False, False],  # target itself excluded -> rank C = 4 (miss)
            [True, True, False, False],  # two of the three ties dropped -> rank 1
        ]
    )
    assert target_ranks(scores, targets, exclude).tolist() == [1, 4, 1]


def test_target_ranks_infinite_scores():
    scores = torch.tensor([[-math.inf, 0.0, -math.inf], [math.inf, math.inf, 1.0]])
    # row 0: target -inf, one other -inf ties, 0.0 above -> 2; row 1: target +inf ties the other +inf -> 1
    assert target_ranks(scores, torch.tensor([0, 1])).tolist() == [2, 1]


# Four items: 1=(1,0) 2=(0,1) 3=(1,1) 4=(1,0) (same vector as item 1 -> exact ties).
HAND_ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
HAND_USERS = torch.tensor([[2.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
HAND_TARGETS = torch.tensor([1, 2, 2])
# user 0: [3, pad, mask]; user 1: [2, 1] contains its target; user 2: empty history.
HAND_HISTORY = [[3, 0, 5], [2, 1], []]
# scores u0 = [2, 1, 3, 2]: item 3 above, item 4 ties -> 2; filtered drops item 3 -> 1.
# scores u1 = [0, 1, 1, 0]: item 3 ties -> 1; filtered: target 2 in history -> miss = num_items = 4.
# scores u2 = [-1, 0, -1, -1]: target is the strict best -> 0 under both.
HAND_UNFILTERED = [2, 1, 0]
HAND_FILTERED = [1, 4, 0]


@pytest.mark.parametrize("chunk_items", [None, 1, 3, 4, 100])
def test_score_ranks_by_hand(chunk_items):
    values, offsets = jagged(HAND_HISTORY)
    ranks = score_ranks(
        HAND_USERS, HAND_ITEMS, HAND_TARGETS, history_values=values, history_offsets=offsets, chunk_items=chunk_items
    )
    assert list(ranks) == ["unfiltered", "filtered"]
    assert ranks["unfiltered"].dtype == torch.int64
    assert ranks["unfiltered"].tolist() == HAND_UNFILTERED
    assert ranks["filtered"].tolist() == HAND_FILTERED
    only = score_ranks(
        HAND_USERS, HAND_ITEMS, HAND_TARGETS, history_values=values, history_offsets=offsets, protocols=("filtered",)
    )
    assert list(only) == ["filtered"] and only["filtered"].tolist() == HAND_FILTERED


def test_metrics_by_hand():
    m = RankingMetrics(ks=(1, 5, 10))
    m.update(torch.tensor([0, 2]))
    m.update(torch.tensor([9, 10, 60]))
    got = m.compute()
    # ranks 0, 2, 9 are hits at k=10; 10 and 60 are misses; rank 2 is a hit at 5; only rank 0 at 1.
    want = {
        "HR@1": 1 / 5,
        "NDCG@1": 1 / 5,
        "MRR@1": 1 / 5,
        "HR@5": 2 / 5,
        "NDCG@5": (1 / math.log2(2) + 1 / math.log2(4)) / 5,
        "MRR@5": (1 + 1 / 3) / 5,
        "HR@10": 3 / 5,
        "NDCG@10": (1 + 0.5 + 1 / math.log2(11)) / 5,
        "MRR@10": (1 + 1 / 3 + 1 / 10) / 5,
        "count": 5.0,
    }
    assert_metrics_close(got, want)
    assert set(RankingMetrics().compute()) == {f"{n}@{k}" for n in ("HR", "NDCG", "MRR") for k in DEFAULT_KS} | {
        "count"
    }


def test_evaluate_protocols_by_hand():
    values, offsets = jagged(HAND_HISTORY)
    out = evaluate_protocols(HAND_USERS, HAND_ITEMS, HAND_TARGETS, values, offsets, ks=(1, 3), batch_users=2)
    assert_metrics_close(
        out["unfiltered"].compute(),
        {
            "HR@1": 1 / 3,
            "NDCG@1": 1 / 3,
            "MRR@1": 1 / 3,
            "HR@3": 1.0,
            "NDCG@3": (0.5 + 1 / math.log2(3) + 1) / 3,
            "MRR@3": (1 / 3 + 1 / 2 + 1) / 3,
            "count": 3.0,
        },
    )
    assert_metrics_close(
        out["filtered"].compute(),
        {
            "HR@1": 1 / 3,
            "NDCG@1": 1 / 3,
            "MRR@1": 1 / 3,
            "HR@3": 2 / 3,
            "NDCG@3": (1 / math.log2(3) + 1) / 3,
            "MRR@3": (1 / 2 + 1) / 3,
            "count": 3.0,
        },
    )


def test_popularity_baseline_by_hand():
    num_items = 4
    # item 1 x3, item 2 x2, item 3 x1, item 4 never; padding 0 and mask 5 are ignored.
    pop = popularity_scores(torch.tensor([1, 1, 2, 0, 1, 3, 5, 2]), num_items)
    assert pop.tolist() == [3.0, 2.0, 1.0, 0.0] and pop.dtype == torch.float64
    targets = torch.tensor([1, 3, 4])
    values, offsets = jagged([[1], [], [2]])
    # unfiltered: 1 is the most popular -> 0; 3 has 1 and 2 above -> 2; 4 has 1, 2, 3 above -> 3.
    # filtered: user 0's target is in its history -> 4; user 1 -> 2; user 2 loses item 2 -> {1, 3} above -> 2.
    ranks = ranks_from_scores(pop, targets, history_values=values, history_offsets=offsets)
    assert ranks["unfiltered"].tolist() == [0, 2, 3]
    assert ranks["filtered"].tolist() == [4, 2, 2]
    out = evaluate_scores(lambda s, e: pop, targets, values, offsets, ks=(1, 3), batch_users=2)
    assert out["unfiltered"].compute()["HR@3"] == pytest.approx(2 / 3)
    assert out["filtered"].compute()["HR@3"] == pytest.approx(2 / 3)
    assert out["unfiltered"].compute()["MRR@3"] == pytest.approx((1 + 1 / 3) / 3)
    # a constant scorer never hits: every item ties with the target
    flat = evaluate_scores(lambda s, e: torch.zeros(e - s, num_items), targets, values, offsets, ks=(1, 3))
    assert flat["unfiltered"].compute()["HR@3"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# brute-force reference on random inputs
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def ranking_problems(draw):
    num_users = draw(st.integers(0, 6))
    num_items = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 3))
    small = st.integers(-2, 2)  # small integers: exact float dot products and many ties
    users = [[draw(small) for _ in range(dim)] for _ in range(num_users)]
    items = [[draw(small) for _ in range(dim)] for _ in range(num_items)]
    targets = [draw(st.integers(1, num_items)) for _ in range(num_users)]
    histories = [draw(st.lists(st.integers(0, num_items + 1), max_size=6)) for _ in range(num_users)]
    chunk = draw(st.integers(1, num_items + 2))
    return users, items, targets, histories, chunk


@settings(max_examples=100, deadline=None)
@given(ranking_problems())
def test_score_ranks_match_brute_force(problem):
    users, items, targets, histories, chunk = problem
    want_unfiltered, want_filtered = brute_ranks(users, items, targets, histories)
    u = torch.tensor(users, dtype=torch.float32).reshape(len(users), len(items[0]))
    i = torch.tensor(items, dtype=torch.float32)
    t = torch.tensor(targets, dtype=torch.int64)
    values, offsets = jagged(histories)
    for chunk_items in (None, chunk):
        got = score_ranks(u, i, t, history_values=values, history_offsets=offsets, chunk_items=chunk_items)
        assert got["unfiltered"].tolist() == want_unfiltered
        assert got["filtered"].tolist() == want_filtered
    # the same through target_ranks with a hand-built exclusion mask, and through precomputed scores
    if users:
        exclude = torch.tensor([[j in h for j in range(1, len(items) + 1)] for h in histories])
        assert target_ranks(u @ i.T, t - 1).tolist() == want_unfiltered
        assert target_ranks(u @ i.T, t - 1, exclude).tolist() == want_filtered
    got = ranks_from_scores(u @ i.T, t, history_values=values, history_offsets=offsets)
    assert got["filtered"].tolist() == want_filtered
    # and the batched accumulators agree with metrics computed from the reference ranks
    if users:
        out = evaluate_protocols(u, i, t, values, offsets, ks=(1, 2, 5), batch_users=chunk)
        assert_metrics_close(out["unfiltered"].compute(), brute_metrics(want_unfiltered, (1, 2, 5)))
        assert_metrics_close(out["filtered"].compute(), brute_metrics(want_filtered, (1, 2, 5)))


def _random_problem(seed: int, num_users: int, num_items: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, dim, generator=g)
    items = torch.randn(num_items, dim, generator=g)
    # duplicate a third of the item rows elsewhere so that exact float ties occur between distinct items
    dup = torch.randperm(num_items, generator=g)[: num_items // 3]
    items[dup] = items[torch.randperm(num_items, generator=g)[: num_items // 3]]
    targets = torch.randint(1, num_items + 1, (num_users,), generator=g)
    lengths = torch.randint(0, 40, (num_users,), generator=g)
    values = torch.randint(0, num_items + 2, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    # make a quarter of the targets appear in their own history
    for b in range(0, num_users, 4):
        if lengths[b] > 0:
            values[offsets[b]] = targets[b]
    return users, items, targets, values, offsets


def test_chunked_equals_unchunked_exactly():
    users, items, targets, values, offsets = _random_problem(0, 48, 500, 16)
    # a third of the items duplicate another row: exact float ties that a shape-dependent matmul could split
    full = score_ranks(users, items, targets, history_values=values, history_offsets=offsets)
    assert bool((full["filtered"] == 500).any()) and bool((full["filtered"] < 500).any())
    for chunk in (1, 7, 166, 499, 500, 5000):
        got = score_ranks(users, items, targets, history_values=values, history_offsets=offsets, chunk_items=chunk)
        for p in full:
            assert torch.equal(got[p], full[p]), (chunk, p)
    # batched + chunked evaluation gives the same metrics (the float64 sums only differ by summation order)
    a = evaluate_protocols(users, items, targets, values, offsets, batch_users=13, chunk_items=97)
    b = evaluate_protocols(users, items, targets, values, offsets, batch_users=1024)
    for p in a:
        assert torch.equal(a[p].sums[0], b[p].sums[0])  # hit counts are integers: exact
        assert_metrics_close(a[p].compute(), b[p].compute())
        assert a[p].compute()["count"] == 48.0


def canonical_brute_ranks(users: torch.Tensor, items: torch.Tensor, targets, histories):
    """Like ``brute_ranks`` for float vectors: Python float64 sums in k order, the documented canonical scores."""
    u, i = users.double().tolist(), items.double().tolist()
    n = len(i)
    out_u, out_f = [], []
    for row, t, hist in zip(u, targets, histories):
        s = {}
        for j in range(1, n + 1):
            acc = 0.0
            for a, b in zip(row, i[j - 1]):
                acc += a * b
            s[j] = acc
        seen = {v for v in hist if 1 <= v <= n}
        out_u.append(sum(1 for j in range(1, n + 1) if j != t and s[j] >= s[t]))
        out_f.append(n if t in seen else sum(1 for j in range(1, n + 1) if j != t and j not in seen and s[j] >= s[t]))
    return out_u, out_f


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_float_inputs_match_canonical_brute_force(seed):
    users, items, targets, values, offsets = _random_problem(seed, 12, 90, 5)
    histories = [values[offsets[b] : offsets[b + 1]].tolist() for b in range(12)]
    want_u, want_f = canonical_brute_ranks(users, items, targets.tolist(), histories)
    for chunk in (None, 4, 31):
        got = score_ranks(users, items, targets, history_values=values, history_offsets=offsets, chunk_items=chunk)
        assert got["unfiltered"].tolist() == want_u and got["filtered"].tolist() == want_f


def test_wider_near_tie_band_changes_nothing(monkeypatch):
    # TF32 / bf16 matmul settings widen the band re-scored in float64; that may only cost time
    users, items, targets, values, offsets = _random_problem(6, 40, 400, 12)
    want = score_ranks(users, items, targets, history_values=values, history_offsets=offsets)
    monkeypatch.setattr(canonical_module, "_fp32_matmul_input_roundoff", lambda device: 2.0**-8)
    got = score_ranks(users, items, targets, history_values=values, history_offsets=offsets, chunk_items=64)
    for p in want:
        assert torch.equal(got[p], want[p])


def test_target_scores_agree_with_ties_from_duplicate_items():
    # every item is a copy of item 1, so every rank is the last place whatever the chunking
    items = torch.randn(1, 8).expand(50, 8).contiguous()
    users = torch.randn(5, 8)
    targets = torch.tensor([1, 10, 25, 49, 50])
    values, offsets = jagged([[], [], [], [], []])
    for chunk in (None, 1, 6, 50):
        got = score_ranks(users, items, targets, history_values=values, history_offsets=offsets, chunk_items=chunk)
        assert got["unfiltered"].tolist() == [49] * 5


def test_low_precision_inputs_are_scored_in_fp32():
    users, items, targets, values, offsets = _random_problem(1, 32, 200, 32)
    ub, ib = users.to(torch.bfloat16), items.to(torch.bfloat16)
    got = score_ranks(ub, ib, targets, history_values=values, history_offsets=offsets)
    want = score_ranks(ub.float(), ib.float(), targets, history_values=values, history_offsets=offsets)
    for p in want:
        assert torch.equal(got[p], want[p])


# ----------------------------------------------------------------------------------------------------------------
# accumulator behaviour
# ----------------------------------------------------------------------------------------------------------------


def test_merge_and_reset_and_empty():
    ranks = torch.tensor([0, 3, 7, 12, 100, 1])
    whole = RankingMetrics()
    whole.update(ranks)
    left, right = RankingMetrics(), RankingMetrics()
    left.update(ranks[:2])
    right.update(ranks[2:])
    right.update(torch.zeros(0, dtype=torch.int64))
    assert left.merge(right) is left
    assert torch.equal(left.sums, whole.sums) and float(left.count) == 6.0
    assert_metrics_close(left.compute(), brute_metrics(ranks.tolist(), DEFAULT_KS))
    with pytest.raises(ValueError, match="merge"):
        left.merge(RankingMetrics(ks=(10,)))
    left.reset()
    empty = left.compute()
    assert empty["count"] == 0.0 and math.isnan(empty["HR@10"])


def test_all_reduce_without_process_group_is_a_noop():
    assert not dist.is_initialized()
    m = RankingMetrics(ks=(2,))
    m.update(torch.tensor([0, 5]))
    before = m.compute()
    assert m.all_reduce() is m
    assert m.compute() == before


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _call_score_ranks(**overrides):
    values, offsets = jagged(HAND_HISTORY)
    kwargs = dict(
        user_vectors=HAND_USERS,
        item_vectors=HAND_ITEMS,
        targets=HAND_TARGETS,
        history_values=values,
        history_offsets=offsets,
    )
    kwargs.update(overrides)
    return score_ranks(kwargs.pop("user_vectors"), kwargs.pop("item_vectors"), kwargs.pop("targets"), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"targets": torch.tensor([0, 1, 2])}, "targets"),  # padding is not a target
        ({"targets": torch.tensor([1, 5, 2])}, "targets"),  # mask is not a target
        ({"targets": torch.tensor([1, 2])}, "targets"),
        ({"targets": torch.tensor([1.0, 2.0, 2.0])}, "integer"),
        ({"user_vectors": torch.ones(3, 3)}, "d="),
        ({"user_vectors": torch.ones(3, 2, dtype=torch.int64)}, "floating"),
        ({"item_vectors": torch.ones(0, 2)}, "at least one"),
        ({"user_vectors": torch.tensor([[math.nan, 0.0], [0.0, 1.0], [1.0, 1.0]])}, "NaN"),
        ({"history_values": torch.tensor([3, 0, 6, 2, 1])}, "history_values"),  # 6 > mask
        ({"history_values": torch.tensor([3, 0, -1, 2, 1])}, "history_values"),
        ({"history_offsets": torch.tensor([0, 3, 5])}, "B \\+ 1"),
        ({"history_offsets": torch.tensor([1, 3, 5, 5])}, "\\[0\\]"),
        ({"history_offsets": torch.tensor([0, 3, 5, 4])}, "len\\(history_values\\)"),
        ({"history_offsets": torch.tensor([0, 4, 3, 5])}, "non-decreasing"),
        ({"protocols": ("sampled",)}, "unknown protocol"),
        ({"protocols": ()}, "empty"),
        ({"chunk_items": 0}, "chunk_items"),
    ],
)
def test_score_ranks_rejects_bad_inputs(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call_score_ranks(**overrides)


def test_other_validation():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, math.nan]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="column indices"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="exclude"):
        target_ranks(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-negative"):
        RankingMetrics().update(torch.tensor([-1]))
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics(ks=(0, 5))
    with pytest.raises(ValueError, match="train_values"):
        popularity_scores(torch.tensor([1, 6]), 4)
    with pytest.raises(ValueError, match="batch_users"):
        evaluate_protocols(HAND_USERS, HAND_ITEMS, HAND_TARGETS, *jagged(HAND_HISTORY), batch_users=0)


# ----------------------------------------------------------------------------------------------------------------
# two ranks with gloo == one process
# ----------------------------------------------------------------------------------------------------------------

SPLIT = 23  # rank 0 gets users [0, 23), rank 1 gets [23, 50): deliberately uneven


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str, problem) -> None:
    torch.set_num_threads(1)  # two ranks on a small CI box: do not oversubscribe the cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        users, items, targets, values, offsets = problem
        lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, users.shape[0])
        local_offsets = offsets[lo : hi + 1]
        local_values = values[int(local_offsets[0]) : int(local_offsets[-1])]
        out = evaluate_protocols(
            users[lo:hi], items, targets[lo:hi], local_values, local_offsets - local_offsets[0], batch_users=6
        )
        torch.save({p: m.all_reduce().compute() for p, m in out.items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_all_reduce_matches_single_process(tmp_path):
    problem = _random_problem(2, 50, 300, 8)
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path), problem), nprocs=2, join=True)
    single = evaluate_protocols(*problem, batch_users=1024)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for p, m in single.items():
            want = m.compute()
            assert want["count"] == 50.0 and got[p]["count"] == 50.0
            assert_metrics_close(got[p], want, tol=1e-9)
