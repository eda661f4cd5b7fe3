"""The dense learning-rate schedule: values by hand, validation, and that only the dense optimizer moves."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from ssd4rec_torchrec.config import TrainSection
from ssd4rec_torchrec.train.state import dense_lr, set_dense_lr


def test_schedule_values_by_hand():
    const = TrainSection(lr=0.01, warmup_steps=4)
    assert [dense_lr(s, 100, const) for s in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    cos = TrainSection(lr=0.01, lr_schedule="cosine", warmup_steps=10, lr_min_ratio=0.1)
    assert dense_lr(9, 110, cos) == pytest.approx(0.01)  # end of warm-up
    assert dense_lr(10, 110, cos) == pytest.approx(0.01)  # cosine starts at lr
    assert dense_lr(60, 110, cos) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert dense_lr(110, 110, cos) == pytest.approx(0.001)
    assert dense_lr(500, 110, cos) == pytest.approx(0.001)  # past the end: stays at the floor


def test_schedule_fields_are_validated():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainSection(warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        TrainSection(lr_min_ratio=1.5)


def test_set_dense_lr_leaves_the_first_optimizer_alone():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    sparse = KeyedOptimizerWrapper({"a": a}, lambda p: torch.optim.SGD(p, lr=0.5))
    dense = KeyedOptimizerWrapper({"b": b}, lambda p: torch.optim.AdamW(p, lr=0.1))
    combined = CombinedOptimizer([sparse, dense])
    set_dense_lr(combined, 0.003)
    assert sparse.param_groups[0]["lr"] == 0.5
    assert dense.param_groups[0]["lr"] == 0.003
    b.grad = torch.ones(2)
    combined.step()
    assert torch.allclose(b.detach(), torch.full((2,), -0.003), atol=1e-6)  # AdamW's first step moves by lr
