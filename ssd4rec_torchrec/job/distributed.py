"""Process group, sharding plan, DMP and the combined (fused sparse + dense AdamW) optimizer.

Follows TorchRec's golden training recipe: embeddings built on ``meta``; the sparse optimizer applied
in backward (fused into the table kernels); planner with per-table constraints from config; DMP; dense
parameters wrapped by ``KeyedOptimizerWrapper`` and combined with ``dmp.fused_optimizer``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ..config import TrainSection
from ..model import TABLE

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistContext:
    """Join the torchrun/TorchX process group (env://), or make a 1-rank group for a plain ``python`` run.

    gloo on CPU, nccl on CUDA.
    """
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                      int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device, backend)
    return ctx


SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": (RowWiseAdagrad, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "sgd": (torch.optim.SGD, {}),
    "adam": (torch.optim.Adam, {}),
}


def build_dmp(model: torch.nn.Module, train: TrainSection, ctx: DistContext,
              pg: dist.ProcessGroup | None = None) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shard ``model.ec`` by ``train.sharding`` with the TorchRec planner and build the optimizers."""
    if ctx.device.type == "cpu" and train.sharding == "data_parallel":
        raise ValueError("train.sharding=data_parallel does not work on CPU: FBGEMM's CPU dense embedding kernel "
                         "returns pooled rows for a sequence table (pytorch/FBGEMM#4586); use row_wise or table_wise")
    if train.sparse_optimizer == "adam" and ctx.device.type == "cpu":
        raise ValueError("train.sparse_optimizer=adam needs a GPU (TorchRec's fused Adam for sharded tables is "
                         "GPU-only); on CPU use rowwise_adagrad, adagrad or sgd")
    opt_cls, extra = SPARSE_OPTIMIZERS[train.sparse_optimizer]
    _apply_optimizer_in_backward(opt_cls, model.ec.parameters(), {"lr": train.sparse_lr, **extra})
    sharders = [EmbeddingCollectionSharder()]
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type,
                        local_world_size=ctx.local_world_size)
    constraints = {TABLE: ParameterConstraints(sharding_types=[train.sharding])}
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    pg = pg or dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])
