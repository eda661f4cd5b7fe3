"""Training/eval examples -> packed jagged batches (TorchRec ``KeyedJaggedTensor`` built here, in the
loader, never in the model's forward: ``TrainPipelineSparseDist`` traces ``batch.features``).

Every batch's KJT has the same four keys, all looked up in the one shared item table:

- ``history``: B jagged input sequences (item indices; the model encodes ``values()``/``offsets()``
  directly - no padded [B, L] tensor);
- ``target``: the items to predict, jagged per example, in read-out order;
- ``negatives``: sampled negatives for sampled softmax (all in example 0's slot);
- ``catalog``: item indices 1..num_items for full softmax (all in example 0's slot).

Unused keys are empty. ``readout`` holds the positions (into the history values) whose encoder
outputs are scored against ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from .preprocess import FIRST_ITEM_INDEX, PAD_INDEX

FEATURES = ("history", "target", "negatives", "catalog")


@dataclass
class SeqBatch(Pipelineable):
    """One step's input on one rank."""

    features: KeyedJaggedTensor
    readout: torch.Tensor  # (R,) int64 positions into features["history"].values()
    targets: torch.Tensor  # (R,) int64 item indices (also the ``target`` feature's values)
    negatives: torch.Tensor  # (K,) int64 sampled negative item indices (K may be 0)
    negative_logq: torch.Tensor  # (K,) float32 log of the sampler's expected count (logQ correction)
    target_logq: torch.Tensor  # (R,) float32 log popularity of targets (in-batch negatives' logQ)
    weights: torch.Tensor  # (B,) float32: 1 for real examples, 0 for padding examples (eval)
    users: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (B,) user index

    def to(self, device: torch.device, non_blocking: bool = False) -> SeqBatch:
        return SeqBatch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            **{name: getattr(self, name).to(device=device, non_blocking=non_blocking) for name in _TENSORS},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for name in _TENSORS:
            getattr(self, name).record_stream(stream)

    def pin_memory(self) -> SeqBatch:
        return SeqBatch(features=self.features.pin_memory(),
                        **{name: getattr(self, name).pin_memory() for name in _TENSORS})

    @property
    def batch_size(self) -> int:
        return int(self.weights.numel())


_TENSORS = ("readout", "targets", "negatives", "negative_logq", "target_logq", "weights", "users")


def gather_segments(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[i] : starts[i] + lengths[i]]`` for all i, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=values.dtype)
    seg_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_starts[1:])
    idx = np.arange(total, dtype=np.int64) - np.repeat(seg_starts - starts, lengths)
    return np.asarray(values[idx])


def make_batch(
    histories: np.ndarray,
    lengths: np.ndarray,
    readout: np.ndarray,
    targets: np.ndarray,
    target_lengths: np.ndarray,
    *,
    negatives: np.ndarray | None = None,
    negative_logq: np.ndarray | None = None,
    target_logq: np.ndarray | None = None,
    catalog_size: int = 0,
    weights: np.ndarray | None = None,
    users: np.ndarray | None = None,
) -> SeqBatch:
    """Assemble a :class:`SeqBatch` (KJT lengths are key-major: all B of ``history``, then ``target``...)."""
    b = len(lengths)
    negatives = np.zeros(0, dtype=np.int64) if negatives is None else negatives
    catalog = np.arange(FIRST_ITEM_INDEX, FIRST_ITEM_INDEX + catalog_size, dtype=np.int64)
    slot0 = lambda n: np.concatenate([[n], np.zeros(b - 1, dtype=np.int64)]) if b else np.zeros(0, np.int64)
    kjt_lengths = np.concatenate([lengths, target_lengths, slot0(len(negatives)), slot0(catalog_size)])
    values = np.concatenate([histories.astype(np.int64, copy=False), targets.astype(np.int64, copy=False),
                             negatives.astype(np.int64, copy=False), catalog])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES), values=torch.from_numpy(values), lengths=torch.from_numpy(kjt_lengths.astype(np.int32))
    )
    f32 = lambda a, n: torch.from_numpy(np.asarray(a, dtype=np.float32)) if a is not None else torch.zeros(n)
    return SeqBatch(
        features=kjt,
        readout=torch.from_numpy(readout.astype(np.int64, copy=False)),
        targets=torch.from_numpy(targets.astype(np.int64, copy=False)),
        negatives=torch.from_numpy(negatives.astype(np.int64, copy=False)),
        negative_logq=f32(negative_logq, len(negatives)),
        target_logq=f32(target_logq, len(targets)),
        weights=f32(weights if weights is not None else np.ones(b), b),
        users=torch.from_numpy(np.asarray(users if users is not None else np.zeros(b), dtype=np.int64)),
    )


def corrupt(values: np.ndarray, rho: float, rng: np.random.Generator, protect: np.ndarray | None = None) -> np.ndarray:
    """The paper's ρ-corruption: each item becomes ``PAD_INDEX`` (0) with probability ``rho``."""
    if rho <= 0 or len(values) == 0:
        return values
    hit = rng.random(len(values)) < rho
    if protect is not None:
        hit[protect] = False
    return np.where(hit, PAD_INDEX, values).astype(values.dtype, copy=False)
