"""SSD4Rec as a TorchRec model: one shared ``EmbeddingCollection`` item table + the Bi-SSD encoder.

The only TorchRec-aware model code. The KJT comes from the loader (``data.batches``); its
``history`` JaggedTensor's ``values()``/``offsets()`` go straight into :class:`BiSSDEncoder` (no padded
[B, L] tensor). Targets, sampled negatives and - for full softmax - the whole catalog are looked up
through the same (sharded) table, so their gradients reach the fused sparse optimizer.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from .config import LossSection, ModelSection
from .data.batches import FEATURES, SeqBatch, make_batch
from .data.preprocess import FIRST_ITEM_INDEX, table_rows
from .losses import full_softmax_cross_entropy, sampled_softmax_loss
from .nn import BiSSDEncoder, EncoderConfig
from .nn.baselines import BERT4RecEncoder, SASRecEncoder

TABLE = "item_embedding"
TABLE_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def item_table_config(num_items: int, dim: int, init_std: float, dtype: str = "fp32") -> EmbeddingConfig:
    """The shared item table: pad + items + mask rows, explicit N(0, std) init (TorchRec's default
    U(±sqrt(1/rows)) shrinks as the catalog grows). ``dtype`` ``fp16`` stores the table (weights and the
    fused optimizer's updates) in half precision through TorchRec's ``data_type``; lookups still return fp32."""
    return EmbeddingConfig(
        num_embeddings=table_rows(num_items),
        embedding_dim=dim,
        name=TABLE,
        feature_names=list(FEATURES),
        data_type=TABLE_DTYPES[dtype],
        init_fn=partial(nn.init.normal_, mean=0.0, std=init_std),
    )


def build_encoder(cfg: ModelSection) -> torch.nn.Module:
    """The sequence encoder named by ``cfg.name``; all take ``(values (T, d), offsets (S+1,))``."""
    if cfg.name in ("sasrec", "bert4rec"):
        cls = SASRecEncoder if cfg.name == "sasrec" else BERT4RecEncoder
        return cls(cfg.d_model, cfg.n_layers, cfg.n_heads, dropout=cfg.dropout, max_positions=cfg.max_positions,
                   norm_embedding=cfg.norm_embedding)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EncoderConfig) if hasattr(cfg, f.name)}
    return BiSSDEncoder.from_config(EncoderConfig(**shared))


class RetrievalLoss(nn.Module):
    """Full or sampled softmax at the read-out positions; returns ``(loss, (loss, rows))``.

    A module (an FX leaf) so ``TrainPipelineSparseDist``'s tracer does not trace its shape-dependent
    branches.
    """

    def __init__(self, cfg: LossSection):
        super().__init__()
        self.cfg = cfg

    def forward(self, user: torch.Tensor, targets: torch.Tensor, target_emb: torch.Tensor, neg_emb: torch.Tensor,
                catalog_emb: torch.Tensor, neg_ids: torch.Tensor, neg_logq: torch.Tensor,
                target_logq: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.cfg.name == "full":
            # catalog rows = items 1..num_items; = F.cross_entropy(user @ catalog_emb.T, ...) per row, with one
            # (R, I) buffer and a hand-written backward (``losses``).
            per_row = full_softmax_cross_entropy(user, catalog_emb, targets - FIRST_ITEM_INDEX)
        else:
            per_row = sampled_softmax_loss(user, target_emb, targets, neg_emb, neg_ids, neg_logq, target_logq,
                                           self.cfg)
        loss = per_row.mean()
        return loss, (loss.detach(), torch.tensor(float(per_row.numel())))


class SSD4Rec(nn.Module):
    """Item table (``self.ec``) + Bi-SSD encoder; ``forward(batch) -> (loss, (loss, rows))``.

    ``forward`` is what ``TrainPipelineSparseDist`` runs; ``user_vectors`` / ``item_vectors`` serve
    evaluation and export.
    """

    def __init__(self, num_items: int, model: ModelSection, loss: LossSection, device: torch.device | str = "cpu"):
        super().__init__()
        self.num_items = num_items
        self.l2_normalize = loss.name == "sampled" and loss.l2_normalize
        self.ec = EmbeddingCollection(
            tables=[item_table_config(num_items, model.d_model, model.embedding_init_std, model.table_dtype)],
            device=torch.device(device),
        )
        self.encoder = build_encoder(model)
        self.loss = RetrievalLoss(loss)

    def forward(self, batch: SeqBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        feats = self.ec(batch.features)
        hist = feats["history"]
        hidden = self.encoder(hist.values(), hist.offsets().long())
        return self.loss(hidden[batch.readout], batch.targets, feats["target"].values(), feats["negatives"].values(),
                         feats["catalog"].values(), batch.negatives, batch.negative_logq, batch.target_logq)

    @torch.no_grad()
    def user_vectors(self, batch: SeqBatch) -> torch.Tensor:
        """Encoder output at each example's read-out position (L2-normalised if the loss is)."""
        hist = self.ec(batch.features)["history"]
        user = self.encoder(hist.values(), hist.offsets().long())[batch.readout]
        return F.normalize(user, dim=-1) if self.l2_normalize else user

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Rows for items 1..num_items, looked up through the (possibly sharded) table."""
        empty = np.zeros(0, dtype=np.int64)
        batch = make_batch(empty, np.zeros(1, dtype=np.int64), empty, empty, np.zeros(1, dtype=np.int64),
                           catalog_size=self.num_items)
        device = next(self.encoder.parameters()).device
        items = self.ec(batch.features.to(device))["catalog"].values()
        return F.normalize(items, dim=-1) if self.l2_normalize else items


__all__ = ["TABLE", "RetrievalLoss", "SSD4Rec", "build_encoder", "item_table_config"]
