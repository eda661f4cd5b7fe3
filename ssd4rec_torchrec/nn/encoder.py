"""SSD4Rec encoder: (optional) embedding Dropout+LayerNorm, optional learned positions, n Bi-SSD layers.

Works on the flat packed token axis (`values (T, d)`, jagged `offsets (S+1,)`); it never builds a padded
`[B, L]` tensor. Item embeddings live outside (TorchRec `EmbeddingCollection`); this module takes their
values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssd4rec_torchrec.nn.dropout import Dropout
from ssd4rec_torchrec.nn.layers import BiSSDLayer
from ssd4rec_torchrec.ops import reverse_segments_index, segment_positions

__all__ = ["BiSSDEncoder", "EncoderConfig", "init_official_"]


@dataclass
class EncoderConfig:
    """Encoder hyper-parameters: the one place their defaults are written.

    The defaults are the project's training defaults; ``config.ModelSection`` restates the ones it exposes in
    YAML and a test holds the two equal, and ``BiSSDEncoder``'s keyword defaults are these. The official SSD4Rec
    ML-1M setting (``config.yaml`` of the paper's code) is :meth:`official`: d_model=256, d_state=64,
    chunk_size=256, an *un-flipped* backward output (``flip_back=False``, the code's quirk; ``True`` is the
    aligned variant and must be labelled as such) and 4096 learned positions when enabled. Official per
    dataset: ML-1M/KuaiRand n_layers=2, dropout=0.2, norm_embedding=True; Beauty/Games n_layers=1,
    dropout=0.4, norm_embedding=False. Shared everywhere: d_conv=4, expand=2, headdim=16, beta=0.1, no
    positions, shared backward weights.
    """

    d_model: int = 64
    n_layers: int = 2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    ngroups: int = 1
    chunk_size: int = 64
    dropout: float = 0.2
    embedding_dropout: float | None = None  # None: same as `dropout` (official)
    beta: float = 0.1
    share_backward_weights: bool = True
    flip_back: bool = True
    backward_scope: Literal["sequence", "prefix"] = "sequence"
    norm_embedding: bool = True
    positional: Literal["none", "learned"] = "none"
    max_positions: int = 512
    ffn_mult: int = 4
    ln_eps: float = 1e-12
    kernel: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer in backward (memory for long packed batches)
    autocast: Literal["none", "bf16"] = "none"  # training: bf16 autocast for the layers' matmuls (output fp32)

    @classmethod
    def official(cls, **overrides: Any) -> EncoderConfig:
        """The official SSD4Rec ML-1M encoder (see the class docstring), with ``overrides``."""
        official = dict(d_model=256, d_state=64, chunk_size=256, flip_back=False, max_positions=4096)
        return cls(**{**official, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def init_official_(module: nn.Module) -> None:
    """The official `_init_weights`: N(0, 0.02) for Linear/Embedding weights, zero Linear bias, LN = (1, 0).

    Applied with `Module.apply`, it also overrides the mixers' in/out projections (as in the official
    code); A_log, dt_bias, D, conv1d and the gated RMSNorm keep their Mamba2 initialisation.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class BiSSDEncoder(nn.Module):
    """Stack of `BiSSDLayer`s over packed sequences: `forward(values (T, d), offsets (S+1,)) -> (T, d)`.

    Input handling follows the official model: `E = LayerNorm(Dropout(values))` when `norm_embedding`
    (LN eps `ln_eps`), else the raw values. With `positional="learned"`, a learned embedding of the
    token's index within its segment is added first (positions >= max_positions share the last row); the
    official model has none. Parameters get the official init (`init_official_`).
    `gradient_checkpointing=True` stores only each layer's input during training and recomputes the layer in
    backward: same results, about one layer's activations of peak memory instead of all layers'.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int = EncoderConfig.n_layers,
        *,
        d_state: int = EncoderConfig.d_state,
        d_conv: int = EncoderConfig.d_conv,
        expand: int = EncoderConfig.expand,
        headdim: int = EncoderConfig.headdim,
        ngroups: int = EncoderConfig.ngroups,
        chunk_size: int = EncoderConfig.chunk_size,
        dropout: float = EncoderConfig.dropout,
        embedding_dropout: float | None = EncoderConfig.embedding_dropout,
        beta: float = EncoderConfig.beta,
        share_backward_weights: bool = EncoderConfig.share_backward_weights,
        flip_back: bool = EncoderConfig.flip_back,
        backward_scope: Literal["sequence", "prefix"] = EncoderConfig.backward_scope,
        norm_embedding: bool = EncoderConfig.norm_embedding,
        positional: Literal["none", "learned"] = EncoderConfig.positional,
        max_positions: int = EncoderConfig.max_positions,
        ffn_mult: int = EncoderConfig.ffn_mult,
        ln_eps: float = EncoderConfig.ln_eps,
        kernel: str = EncoderConfig.kernel,
        gradient_checkpointing: bool = EncoderConfig.gradient_checkpointing,
        autocast: Literal["none", "bf16"] = EncoderConfig.autocast,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        if positional not in ("none", "learned"):
            raise ValueError(f"positional must be 'none' or 'learned', got {positional!r}")
        if autocast not in ("none", "bf16"):
            raise ValueError(f"autocast must be 'none' or 'bf16', got {autocast!r}")
        self.autocast = autocast
        self.d_model = d_model
        self.n_layers = n_layers
        self.norm_embedding = norm_embedding
        self.positional = positional
        self.max_positions = max_positions
        self.gradient_checkpointing = gradient_checkpointing
        self.backward_scope = backward_scope
        self.position_embedding = nn.Embedding(max_positions, d_model) if positional == "learned" else None
        if norm_embedding:
            self.dropout = Dropout(dropout if embedding_dropout is None else embedding_dropout)
            self.LayerNorm = nn.LayerNorm(d_model, eps=ln_eps)
        self.layers = nn.ModuleList(
            BiSSDLayer(
                d_model,
                dropout=dropout,
                beta=beta,
                share_backward_weights=share_backward_weights,
                flip_back=flip_back,
                backward_scope=backward_scope,
                ffn_mult=ffn_mult,
                ln_eps=ln_eps,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                headdim=headdim,
                ngroups=ngroups,
                chunk_size=chunk_size,
                kernel=kernel,
                **mixer_kwargs,
            )
            for _ in range(n_layers)
        )
        self.apply(init_official_)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, **overrides: Any) -> BiSSDEncoder:
        kwargs = cfg.to_dict()
        kwargs.update(overrides)
        d_model = kwargs.pop("d_model")
        return cls(d_model, **kwargs)

    def positions(self, offsets: torch.Tensor, T: int) -> torch.Tensor:
        """Index of each token within its segment (0 at the segment start), shape (T,)."""
        return segment_positions(offsets, T)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        T = values.shape[0]
        h = values
        if self.position_embedding is not None:
            pos = self.positions(offsets, T).clamp_(max=self.max_positions - 1)
            h = h + self.position_embedding(pos)
        if self.norm_embedding:
            h = self.LayerNorm(self.dropout(h))
        rev = reverse_segments_index(offsets, T)  # shared by all layers
        # bf16 autocast (training only: a speed option) runs the projections and the FFN in bf16; the mixers keep
        # conv, scan and norm in fp32. Evaluation and export run fp32, so offline metrics are those served.
        bf16 = self.autocast == "bf16" and self.training
        with torch.autocast(device_type=h.device.type, dtype=torch.bfloat16, enabled=bf16):
            for layer in self.layers:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    # Keeps only each layer's input; the layer (dropout masks included) is replayed in backward.
                    h = checkpoint(layer, h, offsets, rev, use_reentrant=False)
                else:
                    h = layer(h, offsets, rev)
        return h.to(values.dtype)
