"""The TorchRec model's losses against hand-written references, on an unsharded model."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ssd4rec_torchrec.config import LossSection, ModelSection
from ssd4rec_torchrec.data.loader import LoaderSpec, NegativeSampler, TrainLoader
from ssd4rec_torchrec.data.preprocess import leave_one_out
from ssd4rec_torchrec.losses import sampled_softmax_loss
from ssd4rec_torchrec.model import SSD4Rec


def _naive_sampled(user, pos, targets, neg, neg_ids, neg_logq, target_logq, cfg):
    """Per-row loop reference: -log softmax of [pos, valid negatives...] after corrections."""
    out = []
    for r in range(user.shape[0]):
        u, p = user[r].double(), pos[r].double()
        if cfg.l2_normalize:
            u, p = u / u.norm(), p / p.norm()
        logits = [float(u @ p)]
        for k in range(neg.shape[0]):
            if int(neg_ids[k]) == int(targets[r]):
                continue  # accidental hit
            n = neg[k].double() / (neg[k].double().norm() if cfg.l2_normalize else 1)
            logits.append(float(u @ n) - (float(neg_logq[k]) if cfg.logq_correction else 0.0))
        if cfg.in_batch_negatives:
            for j in range(user.shape[0]):
                if int(targets[j]) == int(targets[r]):
                    continue  # the positive itself and duplicates of it
                q = pos[j].double() / (pos[j].double().norm() if cfg.l2_normalize else 1)
                logits.append(float(u @ q) - (float(target_logq[j]) if cfg.logq_correction else 0.0))
        z = torch.tensor(logits, dtype=torch.float64) / cfg.temperature
        out.append(float(-(z[0] - torch.logsumexp(z, 0))))
    return torch.tensor(out, dtype=torch.float64)


def test_sampled_softmax_matches_reference():
    g = torch.Generator().manual_seed(0)
    r, k, d = 6, 9, 5
    user, pos, neg = (torch.randn(n, d, generator=g) for n in (r, r, k))
    targets = torch.tensor([3, 5, 3, 8, 1, 2])
    neg_ids = torch.tensor([3, 4, 5, 6, 7, 9, 10, 1, 11])
    neg_logq, target_logq = torch.randn(k, generator=g), torch.randn(r, generator=g)
    for in_batch in (False, True):
        for logq in (False, True):
            for l2 in (False, True):
                cfg = LossSection(name="sampled", num_negatives=k, in_batch_negatives=in_batch, logq_correction=logq,
                                  temperature=0.3, l2_normalize=l2)
                got = sampled_softmax_loss(user, pos, targets, neg, neg_ids, neg_logq, target_logq, cfg)
                ref = _naive_sampled(user, pos, targets, neg, neg_ids, neg_logq, target_logq, cfg)
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _tiny_split(n_items=30, users=12):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 15, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, n_items + 1, size=offsets[-1]).astype(np.int32)
    return leave_one_out(offsets, items)


def test_full_softmax_is_tied_cross_entropy_over_catalog():
    torch.manual_seed(0)
    n = 30
    model = SSD4Rec(n, ModelSection(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=16, dropout=0.0),
                    LossSection(name="full"))
    model.eval()
    batch = next(TrainLoader(_tiny_split(n), n, LoaderSpec(batch_size=8), seed=0).epoch(0))
    loss, (_, rows) = model(batch)
    table = model.ec.embeddings["item_embedding"].weight
    user = model.user_vectors(batch)
    logits = user @ table[1:n + 1].T
    ref = F.cross_entropy(logits, batch.targets - 1)
    torch.testing.assert_close(loss, ref)
    assert int(rows) == 8 and table.shape[0] == n + 2  # pad + items + mask
    torch.testing.assert_close(model.item_vectors(), table[1:n + 1].detach())
    loss.backward()
    assert table.grad is not None and table.grad[1:n + 1].abs().sum() > 0  # catalog rows get gradients


def test_sampled_loss_model_path_and_init_std():
    torch.manual_seed(0)
    n = 30
    split = _tiny_split(n)
    counts = np.bincount(split.train_items, minlength=n + 2)
    sampler = NegativeSampler("popularity", n, counts, num_negatives=10)
    cfg = LossSection(name="sampled", num_negatives=10, temperature=0.5)
    model = SSD4Rec(n, ModelSection(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=16, dropout=0.0,
                                    embedding_init_std=0.5), cfg)
    std = float(model.ec.embeddings["item_embedding"].weight.detach().std())
    assert math.isclose(std, 0.5, rel_tol=0.15)  # explicit init_fn, not TorchRec's shrinking default
    batch = next(TrainLoader(split, n, LoaderSpec(loss="sampled", batch_size=8), seed=0, sampler=sampler).epoch(0))
    loss, _ = model(batch)
    table = model.ec.embeddings["item_embedding"].weight.detach()
    user = model.user_vectors(batch)
    ref = _naive_sampled(user, table[batch.targets], batch.targets, table[batch.negatives], batch.negatives,
                         batch.negative_logq, batch.target_logq, cfg).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_model_autocast_reaches_the_encoder_and_is_validated():
    """`model.autocast: bf16` builds an encoder that runs its layers under bf16 autocast; other encoders
    refuse the option (it would be silently ignored)."""
    import pytest

    from ssd4rec_torchrec.config import from_dict
    from ssd4rec_torchrec.model import build_encoder

    enc = build_encoder(ModelSection(d_model=16, n_layers=1, d_state=8, headdim=8, autocast="bf16"))
    assert enc.autocast == "bf16"
    assert build_encoder(ModelSection(d_model=16, n_layers=1, d_state=8, headdim=8)).autocast == "none"
    with pytest.raises(ValueError, match="only implemented for ssd4rec"):
        ModelSection(name="sasrec", autocast="bf16")
    with pytest.raises(Exception, match="autocast"):
        from_dict(ModelSection, {"autocast": "fp8"})
