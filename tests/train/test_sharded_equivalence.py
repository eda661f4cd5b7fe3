"""One sharded training step (2 gloo/CPU ranks) equals one unsharded step on the union of the ranks' batches.

The module's fixture launches this file as a script on 2 ranks (``MASTER_ADDR=127.0.0.1``, a free port,
``init_distributed()``); each rank runs every case - ``row_wise``/``table_wise`` sharding x ``sgd``/
``rowwise_adagrad`` fused sparse optimizer, dense AdamW - through the training stack (``build_dmp`` +
``TrainPipelineSparseDist.progress``) from weights copied out of a seeded plain ``SSD4Rec`` into its
table shards (by shard offsets) and dense parameters, and saves its loss, table shards and dense
parameters/gradients. The tests rebuild the same plain model in-process, run forward/backward on the global
batch (both ranks' examples; equal read-out counts, so the global mean loss is the mean of the per-rank
losses and TorchRec/DDP's averaging over ranks gives its gradient), apply SGD / row-wise Adagrad (fbgemm's
eps 1e-8) by hand to the table and ``torch.optim.AdamW`` to the dense parameters, and compare.

Tolerances (fp32 throughout; the two sides differ only in summation order - split vs whole batch lookups,
the all-to-all/all-reduce averaging, the fused kernel's per-row gradient aggregation):
``rtol=1e-4, atol=1e-5`` for losses, table rows and dense parameters; ``rtol=1e-4, atol=1e-6`` for
dense gradients (max |grad| ~3e-2). Measured differences are ~3e-8 (table), ~1e-8 (dense), 0 (loss). The
table's update is also checked on its own (``updated - initial``, ``rtol=1e-3, atol=1e-6``) and both steps
must be visible (max |table step| > 1e-3, max |dense step| > 1e-4, i.e. >> atol), so a missing or doubled
step (e.g. sparse gradients summed instead of averaged over ranks) fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd4rec_torchrec.config import LossSection, ModelSection, TrainSection
from ssd4rec_torchrec.data import PreprocessParams, SyntheticConfig, prepare
from ssd4rec_torchrec.data.batches import SeqBatch, make_batch
from ssd4rec_torchrec.data.loader import LoaderSpec, TrainLoader
from ssd4rec_torchrec.model import SSD4Rec

WORLD = 2
SEED = 7
CASES = [(s, o) for s in ("row_wise", "table_wise") for o in ("sgd", "rowwise_adagrad")]
MODEL = ModelSection(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=16, dropout=0.0)
LOSS = LossSection(name="full")
SPEC = LoaderSpec(objective="prefix", prefixes_per_user=1, loss="full", batch_size=8)
SPARSE_LR = {"sgd": 1.0, "rowwise_adagrad": 0.05}
DENSE_LR, WEIGHT_DECAY = 1e-3, 0.01
FBGEMM_EPS = 1e-8  # fbgemm's default; build_dmp passes only lr to the fused row-wise Adagrad
TABLE_KEY = "ec.embeddings.item_embedding.weight"
TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
WORKER_TIMEOUT_S = 420


def _dataset(root: Path):
    return prepare("synthetic", synthetic=SyntheticConfig(num_users=64, num_items=100, num_clusters=5, mean_length=12,
                                                          max_length=30, seed=3),
                   params=PreprocessParams(user_k=5, item_k=2), root=root)


def _train_section(sharding: str, optimizer: str) -> TrainSection:
    return TrainSection(sharding=sharding, sparse_optimizer=optimizer, sparse_lr=SPARSE_LR[optimizer], lr=DENSE_LR,
                        weight_decay=WEIGHT_DECAY)


def _reference_model(num_items: int) -> SSD4Rec:
    torch.manual_seed(SEED)
    return SSD4Rec(num_items, MODEL, LOSS)


def _rank_batch(split, num_items: int, rank: int) -> SeqBatch:
    return next(TrainLoader(split, num_items, SPEC, seed=SEED, rank=rank, world_size=WORLD).epoch(0))


def _merge(batches: list[SeqBatch], num_items: int) -> SeqBatch:
    """The global batch: all ranks' examples in one ``SeqBatch`` (read-out positions shifted)."""
    hist = [b.features["history"] for b in batches]
    shifts = np.cumsum([0] + [int(h.lengths().sum()) for h in hist[:-1]])
    return make_batch(
        torch.cat([h.values() for h in hist]).numpy(),
        torch.cat([h.lengths() for h in hist]).numpy().astype(np.int64),
        torch.cat([b.readout + int(s) for b, s in zip(batches, shifts)]).numpy(),
        torch.cat([b.targets for b in batches]).numpy(),
        torch.cat([b.features["target"].lengths() for b in batches]).numpy().astype(np.int64),
        catalog_size=num_items,
        users=torch.cat([b.users for b in batches]).numpy(),
    )


# ----------------------------------------------------------------------------------------------- worker (ranks)


def _local_shards(dmp) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's (offsets, copy) of each local shard of the item table."""
    return [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
            for s in dmp.state_dict()[TABLE_KEY].local_shards()]


def _worker(out: Path) -> None:
    """One rank: every case through build_dmp + TrainPipelineSparseDist, results to ``out``."""
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ssd4rec_torchrec.job.distributed import build_dmp, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed()
    ds = _dataset(out / "data")
    split, n = ds.leave_one_out(), ds.num_items
    batch = _rank_batch(split, n, ctx.rank)
    for sharding, optimizer in CASES:
        ref = _reference_model(n)
        dmp, opt = build_dmp(SSD4Rec(n, MODEL, LOSS, device="meta"), _train_section(sharding, optimizer), ctx)
        ref_table = ref.state_dict()[TABLE_KEY]
        ref_dense = dict(ref.named_parameters())
        with torch.no_grad():
            for shard in dmp.state_dict()[TABLE_KEY].local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(ref_table[r0:r0 + nr, c0:c0 + nc])
            for name, p in dmp.named_parameters():
                if not name.startswith("ec."):
                    p.copy_(ref_dense[name])
        initial = _local_shards(dmp)
        loss, rows = TrainPipelineSparseDist(dmp, opt, ctx.device).progress(iter([batch]))
        dense = {name: p for name, p in dmp.named_parameters() if not name.startswith("ec.")}
        torch.save({
            "loss": float(loss), "rows": float(rows), "users": batch.users, "targets": batch.targets,
            "initial_shards": initial, "shards": _local_shards(dmp),
            "dense": {k: p.detach().clone() for k, p in dense.items()},
            "dense_grad": {k: p.grad.detach().clone() for k, p in dense.items() if p.grad is not None},
        }, out / f"{sharding}-{optimizer}-rank{ctx.rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ parent (pytest)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Launch the 2 ranks once for all cases; fail with their log tails if either fails or hangs."""
    out = tmp_path_factory.mktemp("sharded_step")
    _dataset(out / "data")  # prepared once here; the ranks hit the cache
    from dist_workers import run_ranks  # tests/ is on sys.path under pytest, not in the worker processes

    run_ranks(__file__, out, WORLD, WORKER_TIMEOUT_S)
    return out


def _reference_step(split, n: int, batches: list[SeqBatch], optimizer: str):
    """Plain model, global batch: (loss, per-rank losses, initial table, updated table, dense params, grads)."""
    ref = _reference_model(n)
    with torch.no_grad():
        rank_losses = [float(ref(b)[0]) for b in batches]
    table = ref.ec.embeddings["item_embedding"].weight
    initial = table.detach().clone()
    loss, _ = ref(_merge(batches, n))
    loss.backward()
    dense = dict(ref.encoder.named_parameters(prefix="encoder"))
    before = {k: p.detach().clone() for k, p in dense.items()}
    grads = {k: p.grad.clone() for k, p in dense.items() if p.grad is not None}
    adamw = torch.optim.AdamW(list(dense.values()), lr=DENSE_LR, weight_decay=WEIGHT_DECAY)
    adamw.step()
    g, lr = table.grad, SPARSE_LR[optimizer]
    if optimizer == "sgd":
        updated = initial - lr * g
    else:  # fbgemm exact row-wise Adagrad, first step from zero state
        updated = initial - lr * g / (g.pow(2).mean(dim=1, keepdim=True).sqrt() + FBGEMM_EPS)
    dense_step = max(float((p.detach() - before[k]).abs().max()) for k, p in dense.items())
    assert dense_step > 1e-4, "the reference dense step is too small to test anything"
    return loss.item(), rank_losses, initial, updated, {k: p.detach() for k, p in dense.items()}, grads


def _assemble(rank_results: list[dict], key: str, shape: torch.Size) -> torch.Tensor:
    """Full table from every rank's local shards; each element must be covered exactly once."""
    full, seen = torch.zeros(shape), torch.zeros(shape, dtype=torch.int64)
    for res in rank_results:
        for (r0, c0), t in res[key]:
            full[r0:r0 + t.shape[0], c0:c0 + t.shape[1]] = t
            seen[r0:r0 + t.shape[0], c0:c0 + t.shape[1]] += 1
    assert bool((seen == 1).all()), f"{key}: shards do not tile the table exactly once"
    return full


@pytest.mark.parametrize(("sharding", "optimizer"), CASES)
def test_sharded_step_matches_unsharded(runs: Path, sharding: str, optimizer: str) -> None:
    ds = _dataset(runs / "data")
    split, n = ds.leave_one_out(), ds.num_items
    batches = [_rank_batch(split, n, r) for r in range(WORLD)]
    res = [torch.load(runs / f"{sharding}-{optimizer}-rank{r}.pt") for r in range(WORLD)]
    for b, r in zip(batches, res):  # the ranks trained on the batches the reference sees
        assert torch.equal(r["users"], b.users) and torch.equal(r["targets"], b.targets)
    assert len(set(int(b.targets.numel()) for b in batches)) == 1, "ranks need equal read-out counts"
    assert [r["rows"] for r in res] == [float(batches[0].targets.numel())] * WORLD

    loss, rank_losses, initial, updated, dense, grads = _reference_step(split, n, batches, optimizer)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in res]), torch.tensor(rank_losses), **TOL)
    torch.testing.assert_close(torch.tensor(sum(r["loss"] for r in res) / WORLD), torch.tensor(loss), **TOL)

    got_initial = _assemble(res, "initial_shards", initial.shape)
    torch.testing.assert_close(got_initial, initial, rtol=0, atol=0)
    got = _assemble(res, "shards", initial.shape)
    torch.testing.assert_close(got, updated, **TOL)
    step = updated - initial
    assert float(step.abs().max()) > 1e-3, "the reference step is too small to test anything"
    torch.testing.assert_close(got - got_initial, step, rtol=1e-3, atol=1e-6)

    print(f"{sharding}/{optimizer}: max|dloss| {abs(sum(r['loss'] for r in res) / WORLD - loss):.2e}, "
          f"max|dtable| {float((got - updated).abs().max()):.2e} (max|step| {float(step.abs().max()):.2e}), "
          f"max|ddense| {max(float((r['dense'][k] - dense[k]).abs().max()) for r in res for k in dense):.2e}, "
          f"max|dgrad| {max(float((r['dense_grad'][k] - grads[k]).abs().max()) for r in res for k in grads):.2e}")
    for r in res:
        assert r["dense"].keys() == dense.keys() and r["dense_grad"].keys() == grads.keys()
        for k in dense:
            torch.testing.assert_close(r["dense_grad"][k], grads[k], **GRAD_TOL, msg=lambda m, k=k: f"grad {k}: {m}")
            torch.testing.assert_close(r["dense"][k], dense[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
