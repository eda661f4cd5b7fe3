"""`full_softmax_cross_entropy` (one autograd Function, hand-written backward) against float64 `F.cross_entropy`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssd4rec_torchrec import losses
from ssd4rec_torchrec.config import LossSection
from ssd4rec_torchrec.data.preprocess import FIRST_ITEM_INDEX
from ssd4rec_torchrec.losses import full_softmax_cross_entropy
from ssd4rec_torchrec.model import RetrievalLoss


def _reference(user, catalog, target, weight):
    """Per-row loss and the gradients of `sum(weight * loss)` from float64 `F.cross_entropy` (independent path)."""
    u = user.detach().double().requires_grad_()
    c = catalog.detach().double().requires_grad_()
    loss = F.cross_entropy(u @ c.T, target, reduction="none")
    du, dc = torch.autograd.grad((loss * weight.double()).sum(), (u, c))
    return loss.detach(), du, dc


def _check(user, catalog, target, *, atol, rtol=1e-5, grad_atol=None, seed=0):
    """Loss values and both gradients (for a random upstream gradient) against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(user.shape[0], generator=gen) + 0.5
    user = user.detach().requires_grad_()
    catalog = catalog.detach().requires_grad_()
    loss = full_softmax_cross_entropy(user, catalog, target)
    assert loss.shape == (user.shape[0],) and loss.dtype == torch.float32
    du, dc = torch.autograd.grad((loss * weight).sum(), (user, catalog))
    ref, rdu, rdc = _reference(user, catalog, target, weight)
    assert (loss >= 0).all()
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    grad_atol = atol if grad_atol is None else grad_atol
    assert du.dtype == user.dtype and dc.dtype == catalog.dtype
    assert du.shape == user.shape and dc.shape == catalog.shape
    torch.testing.assert_close(du.double(), rdu, atol=grad_atol, rtol=rtol)
    torch.testing.assert_close(dc.double(), rdc, atol=grad_atol, rtol=rtol)


@pytest.fixture(params=[None, 5 * 37], ids=["default_blocks", "small_blocks"])
def block_elems(request, monkeypatch):
    """Run each case with the default row blocks and with 5-row blocks (block edges inside the batch)."""
    if request.param is not None:
        monkeypatch.setattr(losses, "_BLOCK_ELEMS", request.param)
    return request.param


def test_random_logits(block_elems):
    gen = torch.Generator().manual_seed(0)
    R, n_items, d = 53, 37, 16
    user = torch.randn(R, d, generator=gen)
    catalog = torch.randn(n_items, d, generator=gen) * 0.5
    target = torch.randint(0, n_items, (R,), generator=gen)
    _check(user, catalog, target, atol=1e-5)


def test_extreme_logits(block_elems):
    """Large magnitudes (|logits| up to ~1e4) and rows where one class dominates (the target or another class):
    errors against float64 stay within those of the fp32 `F.cross_entropy` path on the same inputs."""
    gen = torch.Generator().manual_seed(1)
    R, n_items, d = 41, 37, 8
    user = torch.randn(R, d, generator=gen) * 30
    catalog = torch.randn(n_items, d, generator=gen) * 5
    target = torch.randint(0, n_items, (R,), generator=gen)
    user[:20] = catalog[target[:20]] * 40
    user[20:30] = catalog[(target[20:30] + 1) % n_items] * 40
    weight = torch.rand(R, generator=gen) + 0.5
    assert (user.double() @ catalog.double().T).abs().max() > 1e3

    ref = _reference(user, catalog, target, weight)
    u, c = user.clone().requires_grad_(), catalog.clone().requires_grad_()
    loss = full_softmax_cross_entropy(u, c, target)
    new = (loss.detach(), *torch.autograd.grad((loss * weight).sum(), (u, c)))
    u, c = user.clone().requires_grad_(), catalog.clone().requires_grad_()
    loss = F.cross_entropy(u @ c.T, target, reduction="none")
    old = (loss.detach(), *torch.autograd.grad((loss * weight).sum(), (u, c)))
    assert (new[0] >= 0).all() and all(torch.isfinite(x).all() for x in new)
    for got, fp32, want in zip(new, old, ref):
        err = (got.double() - want).abs().max().item()
        fp32_err = (fp32.double() - want).abs().max().item()
        assert err <= 1.5 * fp32_err + 1e-6 * want.abs().max().item(), (err, fp32_err)
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_saturated_rows_are_finite_and_exact():
    """A target 200 nats above every other class: loss ~0 (not negative, no NaN); a wrong class 200 nats above
    the target: loss = 200 exactly, gradient = c_argmax - c_target."""
    catalog = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    user = torch.tensor([[200.0, 0.0], [0.0, 200.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = full_softmax_cross_entropy(user, catalog, target)
    ref = F.cross_entropy(user.detach().double() @ catalog.double().T, target, reduction="none")
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-6)
    assert loss[0] >= 0 and loss[0] < 1e-6
    (du,) = torch.autograd.grad(loss.sum(), user)
    assert torch.isfinite(du).all()
    torch.testing.assert_close(du[1], catalog[1] - catalog[0])
    torch.testing.assert_close(du[0], torch.zeros(2), atol=1e-6, rtol=0)


def test_non_contiguous_inputs(block_elems):
    gen = torch.Generator().manual_seed(2)
    R, n_items, d = 29, 37, 12
    user = torch.randn(R, 3 * d, generator=gen)[:, d: 2 * d]  # column slice
    catalog = torch.randn(d, n_items, generator=gen).t()  # transposed
    target = torch.randint(0, n_items, (2 * R,), generator=gen)[::2]  # strided
    assert not (user.is_contiguous() or catalog.is_contiguous() or target.is_contiguous())
    _check(user, catalog, target, atol=1e-5)


def test_single_row():
    gen = torch.Generator().manual_seed(3)
    _check(torch.randn(1, 8, generator=gen), torch.randn(37, 8, generator=gen), torch.tensor([5]), atol=1e-5)


@pytest.mark.parametrize("which", ["user", "catalog"])
def test_only_one_input_requires_grad(which):
    gen = torch.Generator().manual_seed(4)
    R, n_items, d = 17, 23, 8
    user, catalog = torch.randn(R, d, generator=gen), torch.randn(n_items, d, generator=gen)
    target = torch.randint(0, n_items, (R,), generator=gen)
    (user if which == "user" else catalog).requires_grad_()
    loss = full_softmax_cross_entropy(user, catalog, target)
    (grad,) = torch.autograd.grad(loss.mean(), user if which == "user" else catalog)
    _, rdu, rdc = _reference(user, catalog, target, torch.full((R,), 1.0 / R))
    torch.testing.assert_close(grad.double(), rdu if which == "user" else rdc, atol=1e-6, rtol=1e-5)


def test_no_grad_and_no_requires_grad():
    gen = torch.Generator().manual_seed(5)
    user, catalog = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)
    target = torch.randint(0, 9, (6,), generator=gen)
    ref = F.cross_entropy(user.double() @ catalog.double().T, target, reduction="none")
    loss = full_softmax_cross_entropy(user, catalog, target)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        loss = full_softmax_cross_entropy(user.requires_grad_(), catalog, target)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)


def test_gradcheck_float64(block_elems):
    gen = torch.Generator().manual_seed(6)
    R, n_items, d = 7, 5, 3
    user = (torch.randn(R, d, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    catalog = torch.randn(n_items, d, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, n_items, (R,), generator=gen)
    assert full_softmax_cross_entropy(user, catalog, target).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda u, c: full_softmax_cross_entropy(u, c, target), (user, catalog))


def test_float64_matches_reference_tightly():
    gen = torch.Generator().manual_seed(7)
    user = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    catalog = torch.randn(13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 13, (11,), generator=gen)
    loss = full_softmax_cross_entropy(user, catalog, target)
    du, dc = torch.autograd.grad(loss.sum(), (user, catalog))
    ref, rdu, rdc = _reference(user, catalog, target, torch.ones(11))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(du, rdu, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dc, rdc, atol=1e-12, rtol=1e-12)


def test_bf16_inputs_are_computed_in_fp32_under_autocast():
    gen = torch.Generator().manual_seed(8)
    user = torch.randn(9, 8, generator=gen).bfloat16().requires_grad_()
    catalog = torch.randn(12, 8, generator=gen).requires_grad_()
    target = torch.randint(0, 12, (9,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_softmax_cross_entropy(user, catalog, target)
    assert loss.dtype == torch.float32
    du, dc = torch.autograd.grad(loss.sum(), (user, catalog))
    assert du.dtype == torch.bfloat16 and dc.dtype == torch.float32
    ref, rdu, rdc = _reference(user.float(), catalog, target, torch.ones(9))
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dc.double(), rdc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du.double(), rdu, atol=2e-2, rtol=1e-2)  # bf16 gradient


def test_empty_batch_matches_cross_entropy():
    """R = 0: empty per-row loss, NaN mean, zero gradients - as `F.cross_entropy(reduction="none").mean()`."""
    user = torch.zeros(0, 4, requires_grad=True)
    catalog = torch.randn(6, 4, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    loss = full_softmax_cross_entropy(user, catalog, target)
    assert loss.shape == (0,)
    mean = loss.mean()
    ref = F.cross_entropy(user @ catalog.T, target, reduction="none").mean()
    assert torch.isnan(mean) and torch.isnan(ref)
    du, dc = torch.autograd.grad(mean, (user, catalog))
    rdu, rdc = torch.autograd.grad(ref, (user, catalog))
    assert du.shape == rdu.shape == (0, 4)
    torch.testing.assert_close(dc, rdc)
    assert (dc == 0).all()


@pytest.mark.parametrize("bad", [6, -1, -100])
def test_out_of_range_target_raises(bad):
    user, catalog = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(IndexError, match="out of bounds"):
        full_softmax_cross_entropy(user, catalog, torch.tensor([0, bad, 2]))


def test_bad_shapes_raise():
    user, catalog = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(ValueError):
        full_softmax_cross_entropy(user, torch.randn(6, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        full_softmax_cross_entropy(user, catalog, torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        full_softmax_cross_entropy(user, catalog, torch.tensor([0.0, 1.0, 2.0]))


def test_backward_twice_with_retain_graph():
    """The backward edits the saved buffer at the targets and restores it: a second backward is identical."""
    user = torch.randn(5, 4, requires_grad=True)
    catalog = torch.randn(6, 4, requires_grad=True)
    loss = full_softmax_cross_entropy(user, catalog, torch.tensor([0, 1, 2, 2, 5])).sum()
    first = torch.autograd.grad(loss, (user, catalog), retain_graph=True)
    second = torch.autograd.grad(loss, (user, catalog))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_not_twice_differentiable():
    user = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = full_softmax_cross_entropy(user, torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2])).sum()
    (du,) = torch.autograd.grad(loss, user, create_graph=True)
    with pytest.raises(RuntimeError):
        du.sum().backward()


def test_retrieval_loss_full_branch_equals_old_formula():
    gen = torch.Generator().manual_seed(9)
    R, n_items, d = 31, 40, 16
    user = torch.randn(R, d, generator=gen, requires_grad=True)
    catalog = (torch.randn(n_items, d, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(FIRST_ITEM_INDEX, n_items + FIRST_ITEM_INDEX, (R,), generator=gen)
    empty = torch.zeros(0)
    module = RetrievalLoss(LossSection(name="full"))
    loss, (logged, rows) = module(user, targets, empty, empty, catalog, empty.long(), empty, empty)
    du, dc = torch.autograd.grad(loss, (user, catalog))

    old = F.cross_entropy((user @ catalog.T).float(), targets - FIRST_ITEM_INDEX, reduction="none").mean()
    rdu, rdc = torch.autograd.grad(old, (user, catalog))
    assert loss.shape == () and loss.dtype == old.dtype
    torch.testing.assert_close(loss, old)
    assert logged.grad_fn is None and float(logged) == float(loss.detach())
    assert float(rows) == R
    torch.testing.assert_close(du, rdu)
    torch.testing.assert_close(dc, rdc)
