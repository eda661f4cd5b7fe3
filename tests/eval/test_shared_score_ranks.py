"""``ranks_from_scores`` with one score vector shared by every user (the popularity baseline) sorts once and
binary-searches (O(catalog) memory whatever the batch); it equals the per-user (B, num_items) path, ties,
infinities, repeated and out-of-catalog history entries included."""

from __future__ import annotations

import torch

from ssd4rec_torchrec.ops.ranking import ranks_from_scores


def test_shared_scores_equal_per_user_scores():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        b = int(torch.randint(0, 12, (1,), generator=g))
        scores = torch.randint(-3, 4, (n,), generator=g).double() / 2  # many exact ties
        if trial % 5 == 0:
            scores[0] = float("inf")
        targets = torch.randint(1, n + 1, (b,), generator=g)
        lengths = torch.randint(0, 6, (b,), generator=g)
        hv = torch.randint(0, n + 2, (int(lengths.sum()),), generator=g)  # padding and mask ids included
        ho = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        want = ranks_from_scores(scores.expand(b, n).contiguous(), targets, history_values=hv, history_offsets=ho)
        got = ranks_from_scores(scores, targets, history_values=hv, history_offsets=ho)
        assert set(got) == set(want)
        for p in want:
            assert torch.equal(got[p], want[p]), (trial, p)
        only = ranks_from_scores(scores, targets, history_values=hv, history_offsets=ho, protocols=("filtered",))
        assert list(only) == ["filtered"] and torch.equal(only["filtered"], want["filtered"])
