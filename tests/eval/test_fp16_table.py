"""fp16 item tables (``model.table_dtype: fp16``) on 2 gloo ranks, row-wise sharded with fused row-wise Adagrad.

The workers check that TorchRec stores the shards in fp16 (dtype and bytes), run sampled-softmax training
steps through ``TrainPipelineSparseDist`` (loss finite, touched rows updated, still fp16), round-trip a DCP
checkpoint, then run exact sharded ranking and top-k straight from the fp16 shards in small blocks. The parent
gathers the saved fp16 shards, upcasts them and compares with a brute-force ranking (numpy, float64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = 2
NUM_ITEMS, DIM = 203, 8
TABLE_KEY = "embeddings.item_embedding.weight"
K = 10
WORKER_TIMEOUT_S = 300


def _split(num_users: int, seed: int):
    from ssd4rec_torchrec.data.preprocess import leave_one_out

    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 12, size=num_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, NUM_ITEMS + 1, size=int(offsets[-1])).astype(np.int32)
    return leave_one_out(offsets, items)


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ssd4rec_torchrec.config import LossSection, ModelSection, TrainSection
    from ssd4rec_torchrec.data.loader import LoaderSpec, NegativeSampler, TrainLoader
    from ssd4rec_torchrec.eval.sharded import local_item_blocks, sharded_score_ranks, sharded_topk
    from ssd4rec_torchrec.job.checkpoint import load_checkpoint, save_checkpoint
    from ssd4rec_torchrec.job.distributed import build_dmp, init_distributed
    from ssd4rec_torchrec.model import SSD4Rec

    torch.set_num_threads(1)
    ctx = init_distributed()
    torch.manual_seed(0)
    model_cfg = ModelSection(d_model=DIM, n_layers=1, d_state=8, headdim=8, chunk_size=16, dropout=0.0,
                             table_dtype="fp16")
    loss_cfg = LossSection(name="sampled", num_negatives=16)
    dmp, opt = build_dmp(SSD4Rec(NUM_ITEMS, model_cfg, loss_cfg, device="meta"),
                         TrainSection(sharding="row_wise", sparse_optimizer="rowwise_adagrad", sparse_lr=0.5), ctx)
    weight = dmp.module.ec.state_dict()[TABLE_KEY]
    (shard,) = weight.local_shards()
    assert shard.tensor.dtype == torch.float16, shard.tensor.dtype
    rows = shard.tensor.shape[0]
    assert rows < NUM_ITEMS + 2  # row-wise: each rank holds a part
    assert shard.tensor.untyped_storage().nbytes() >= rows * DIM * 2
    report = {"rows": rows, "bytes": shard.tensor.numel() * shard.tensor.element_size()}

    # training steps: sampled softmax, fused row-wise Adagrad on the fp16 table
    split = _split(64, seed=1)
    sampler = NegativeSampler("uniform", NUM_ITEMS, np.bincount(split.train_items, minlength=NUM_ITEMS + 2), 16)
    loader = TrainLoader(split, NUM_ITEMS, LoaderSpec(objective="prefix", prefixes_per_user=2, loss="sampled",
                                                      batch_size=16), seed=0, rank=ctx.rank, world_size=WORLD,
                         sampler=sampler)
    before = shard.tensor.clone()
    pipeline = TrainPipelineSparseDist(dmp, opt, ctx.device)
    batches = iter(list(loader.epoch(0))[:3])
    losses = []
    while True:
        try:
            loss, _ = pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(float(loss))
    pipeline.detach()
    after = dmp.module.ec.state_dict()[TABLE_KEY].local_shards()[0].tensor
    report.update(losses=losses, changed_rows=int((after != before).any(1).sum()), dtype_after=str(after.dtype))

    # checkpoint round trip (DCP, fp16 ShardedTensor + fused optimizer state)
    saved = after.clone()
    save_checkpoint(out / "ckpt", "step-3", dmp, opt, {"epoch": 0, "step": 3}, rank=ctx.rank)
    with torch.no_grad():
        after.zero_()
    load_checkpoint(out / "ckpt" / "step-3", dmp, opt, rank=ctx.rank, restore_rng=False)
    restored = dmp.module.ec.state_dict()[TABLE_KEY].local_shards()[0].tensor
    report["checkpoint_roundtrip"] = bool(torch.equal(restored, saved)) and restored.dtype == torch.float16

    # exact sharded ranking / top-k straight from the fp16 shards, in blocks of 7 rows
    blocks = local_item_blocks(dmp.module.ec, TABLE_KEY, NUM_ITEMS, ctx.rank, ctx.world_size, block_rows=7)
    assert blocks and all(b.vectors.dtype == torch.float16 and len(b.vectors) <= 7 for b in blocks)
    g = torch.Generator().manual_seed(10 + ctx.rank)
    users = 9 + 4 * ctx.rank
    vectors = torch.randn(users, DIM, generator=g)
    targets = torch.randint(1, NUM_ITEMS + 1, (users,), generator=g)
    lengths = torch.randint(0, 6, (users,), generator=g)
    hv = torch.randint(1, NUM_ITEMS + 1, (int(lengths.sum()),), generator=g)
    ho = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    ranks = sharded_score_ranks(vectors, targets, hv, ho, blocks, NUM_ITEMS)
    topk = sharded_topk(vectors, targets, blocks, NUM_ITEMS, K)
    topk_filtered = sharded_topk(vectors, targets, blocks, NUM_ITEMS, K, history_values=hv, history_offsets=ho)
    (r0, _), _ = shard.metadata.shard_offsets, shard.metadata.shard_sizes
    torch.save({"report": report, "shard": (r0, restored.clone()), "vectors": vectors, "targets": targets,
                "hv": hv, "ho": ho, "ranks": ranks, "topk": topk, "topk_filtered": topk_filtered},
               out / f"rank{ctx.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16_table")
    from dist_workers import run_ranks  # tests/ is on sys.path under pytest, not in the worker processes

    run_ranks(__file__, out, WORLD, WORKER_TIMEOUT_S)
    return out


def _load(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_fp16_storage_and_training(ranks_out):
    for s in _load(ranks_out):
        rep = s["report"]
        assert rep["bytes"] == rep["rows"] * DIM * 2  # half of an fp32 table
        assert rep["dtype_after"] == "torch.float16"
        assert len(rep["losses"]) == 3 and all(np.isfinite(rep["losses"]))
        assert rep["changed_rows"] > 0  # the fused optimizer updated fp16 rows
        assert rep["checkpoint_roundtrip"]


def _brute(scores: np.ndarray, target: int, seen: set[int] | None, k: int) -> tuple[list[float], list[int]]:
    keyed = sorted((-(-np.inf if seen and j in seen else scores[j]), j == target, j) for j in range(len(scores)))
    return [-x[0] for x in keyed[:k]], [x[2] for x in keyed[:k]]


def test_sharded_topk_from_fp16_equals_brute_force(ranks_out):
    saved = _load(ranks_out)
    shards = sorted(s["shard"] for s in saved)
    table = torch.cat([t for _, t in shards])
    assert shards[0][0] == 0 and table.shape[0] == NUM_ITEMS + 2 and table.dtype == torch.float16
    items = table[1 : NUM_ITEMS + 1].double().numpy()  # the gathered fp16 weights, upcast
    for s in saved:
        u = s["vectors"].double().numpy()
        scores = np.zeros((u.shape[0], NUM_ITEMS))
        for k in range(DIM):  # canonical order k = 0 .. d-1
            scores = scores + u[:, k : k + 1] * items[None, :, k]
        ho, hv = s["ho"].tolist(), s["hv"].tolist()
        for b, t in enumerate(s["targets"].tolist()):
            seen = {x - 1 for x in hv[ho[b] : ho[b + 1]]}
            above = [j for j in range(NUM_ITEMS) if j != t - 1 and scores[b, j] >= scores[b, t - 1]]
            assert int(s["ranks"]["unfiltered"][b]) == len(above)
            want = NUM_ITEMS if t - 1 in seen else len([j for j in above if j not in seen])
            assert int(s["ranks"]["filtered"][b]) == want
            for key, history in (("topk", None), ("topk_filtered", seen)):
                want_scores, want_cols = _brute(scores[b], t - 1, history, K)
                assert s[key][1][b].tolist() == want_cols, key
                assert s[key][0][b].tolist() == want_scores, key


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
