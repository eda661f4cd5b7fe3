"""The one config schema: a run's sections as dataclasses (one YAML per dataset/scale under ``configs/``).

Every field has a default, defined here only; the loader (:mod:`.loader`) validates YAML and ``--set`` against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .loader import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic interaction generator (``data.synthetic``): see :mod:`ssd4rec_torchrec.data.synthetic`."""

    num_users: int = 2_000
    num_items: int = 2_000
    num_clusters: int = 50
    mean_length: float = 30.0  # target mean before clipping (Pareto scale is derived from it)
    length_alpha: float = 1.6  # Pareto tail index: smaller = heavier tail
    min_length: int = 5
    max_length: int = 1_000
    zipf_exponent: float = 1.1
    p_stay: float = 0.8  # probability that the next item stays in the current session's cluster
    transition_probs: tuple[float, float, float] = (0.7, 0.2, 0.1)  # P(step = 1, 2, 3)
    seed: int = 0
    chunk_users: int = 200_000  # users generated per chunk (bounds memory)

    def __post_init__(self) -> None:
        checks = {
            "num_users": self.num_users >= 1,
            "num_items": 1 <= self.num_items <= 10**9,
            "num_clusters": 1 <= self.num_clusters <= self.num_items,
            "mean_length": self.mean_length >= 1,
            "length_alpha": self.length_alpha > 1.0,
            "min_length": self.min_length >= 1,
            "max_length": self.max_length >= self.min_length,
            "zipf_exponent": self.zipf_exponent > 0,
            "p_stay": 0.0 <= self.p_stay < 1.0,
            "transition_probs": len(self.transition_probs) == 3 and abs(sum(self.transition_probs) - 1) < 1e-6
            and min(self.transition_probs) >= 0,
            "chunk_users": self.chunk_users >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"synthetic: invalid {name}={getattr(self, name)!r}")


@dataclass
class DataSection:
    dataset: str = "ml-1m"  # ml-1m | ml-100k | synthetic | a file path
    user_k: int = 5
    item_k: int = 5
    duplicates: Literal["keep", "drop", "error"] = "keep"
    # event order per user: "exact" timestamps, or "float32" = RecBole 1.x's (timestamps rounded to float32,
    # a 64-second grid on ML-1M; ties keep file order): the split of RecBole-protocol (unfiltered) papers
    time_key: Literal["exact", "float32"] = "exact"
    format: Literal["auto", "inter", "dat", "csv", "tsv", "parquet"] = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # keep the source's whole catalog in the item table (items 1..catalog size, raw-id order), including
    # items that k-core filtering removed or that nobody interacted with (cold items); the synthetic
    # catalog is ``synthetic.num_items``. false: only items that survive k-core (the default)
    full_catalog: bool = False


@dataclass
class ModelSection:
    """``ssd4rec`` (Bi-SSD encoder) or the baselines ``sasrec`` (causal Transformer, ``objective: next``)
    and ``bert4rec`` (bidirectional Transformer, ``objective: cloze``), all on the same jagged input."""

    name: Literal["ssd4rec", "sasrec", "bert4rec"] = "ssd4rec"
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    chunk_size: int = 64
    dropout: float = 0.2
    beta: float = 0.1
    share_backward_weights: bool = True
    flip_back: bool = True
    # the backward branch scans the whole input ("sequence", SSD4Rec) or, for each row, only the prefix that
    # ends there, read at its end ("prefix": needs flip_back false; the encoder is then causal, so the dense
    # next-item objective trains every prefix's read-out exactly)
    backward_scope: Literal["sequence", "prefix"] = "sequence"
    norm_embedding: bool = True
    positional: Literal["none", "learned"] = "none"
    embedding_init_std: float = 0.02
    table_dtype: Literal["fp32", "fp16"] = "fp32"  # item table storage (fp16: half the memory; TorchRec data_type)
    kernel: Literal["auto", "torch", "mamba"] = "auto"
    n_heads: int = 2  # sasrec / bert4rec
    max_positions: int = 512  # sasrec / bert4rec learned positions (and ssd4rec with positional: learned)
    autocast: Literal["none", "bf16"] = "none"  # ssd4rec: bf16 autocast for the encoder layers' matmuls

    @property
    def causal(self) -> bool:
        """Every output row depends only on its segment's tokens up to that row."""
        return self.name == "sasrec" or (self.name == "ssd4rec" and (self.beta == 0 or self.backward_scope == "prefix"))

    def __post_init__(self) -> None:
        if self.autocast != "none" and self.name != "ssd4rec":
            raise ValueError(f"model.autocast {self.autocast!r} is only implemented for ssd4rec, not {self.name}")
        if self.d_model < 1 or self.n_layers < 1:
            raise ValueError(f"d_model and n_layers must be >= 1 (got {self.d_model}, {self.n_layers})")
        if (self.expand * self.d_model) % self.headdim:
            raise ValueError(
                f"expand*d_model={self.expand * self.d_model} must be a multiple of headdim={self.headdim}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.backward_scope == "prefix" and self.flip_back:
            raise ValueError("model.backward_scope 'prefix' reads the un-flipped backward branch at each prefix's "
                             "end; set model.flip_back: false")
        if self.embedding_init_std <= 0:
            raise ValueError(f"embedding_init_std must be > 0, got {self.embedding_init_std}")


@dataclass
class ObjectiveSection:
    """``prefix``: the paper's (a prefix predicts its next item, read at its last token); ``cloze``:
    masked-item prediction with linear cost; ``next``: every position predicts its successor (SASRec;
    causal encoders only). ``corruption`` is the paper's ρ (history items -> id 0)."""

    SHORTHAND = "name"
    name: Literal["prefix", "cloze", "next"] = "prefix"
    prefixes_per_user: int | Literal["all"] = 8
    mask_prob: float = 0.2  # cloze: fraction of items replaced by the mask token
    p_last: float = 0.5  # cloze: probability that the last item is masked
    corruption: float = 0.0  # ρ: training history items replaced by id 0 with this probability
    max_history: int | None = None  # keep only the most recent items of each input (None: all)

    def __post_init__(self) -> None:
        if isinstance(self.prefixes_per_user, int) and self.prefixes_per_user < 1:
            raise ValueError(f"prefixes_per_user must be >= 1 or 'all', got {self.prefixes_per_user}")
        for name in ("mask_prob", "p_last", "corruption"):
            v = getattr(self, name)
            if not 0 <= v < 1 and not (name == "p_last" and v == 1):
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.max_history is not None and self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")


@dataclass
class LossSection:
    """``full``: softmax over the whole catalog (tied embeddings); ``sampled``: sampled softmax."""

    SHORTHAND = "name"
    name: Literal["full", "sampled"] = "full"
    num_negatives: int = 256
    sampler: Literal["uniform", "popularity"] = "uniform"
    popularity_alpha: float = 1.0  # popularity sampler: q ∝ count^alpha
    in_batch_negatives: bool = True
    logq_correction: bool = True
    temperature: float = 1.0
    l2_normalize: bool = False

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class TrainSection:
    epochs: int = 10
    batch_size: int = 256  # examples per rank per step
    lr: float = 1e-3  # dense AdamW
    # dense learning rate over the run's train.epochs x steps per epoch: constant, or linear warm-up over
    # warmup_steps then a cosine from lr to lr * lr_min_ratio (the sparse table's optimizer keeps sparse_lr)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    lr_min_ratio: float = 0.0
    weight_decay: float = 0.0
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    sharding: Literal["table_wise", "row_wise", "column_wise", "data_parallel"] = "row_wise"
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without improvement before stopping
    metric: str = "NDCG@10"
    protocol: Literal["filtered", "unfiltered"] = "filtered"
    eval_batch_users: int = 512
    # validate / test on a fixed random sample of this many users (seeded by ``seed``; None: every user)
    eval_sample_users: int | None = None
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    max_steps_per_epoch: int | None = None
    num_threads: int | None = None  # torch intra-op threads per rank (None: cores / local ranks)
    # stop once this many seconds of training steps (eval/checkpoint time excluded) have run, mid-epoch if
    # need be, and validate there: equal-time comparisons across models (None: no budget)
    time_budget_s: float | None = None
    # start from the model weights of this checkpoint directory (e.g. runs/x/checkpoints/best) - fine-tuning
    # with another objective or backward scope; optimizer state and progress start fresh (a --resume wins)
    init_from: str | None = None
    # a NaN / inf loss or dense gradient: "stop" the job (one line naming epoch, step and quantity; the last
    # checkpoint stays the latest) or "skip" the step's update on every rank (counted in metrics.json)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # a checkpoint that cannot be written (disk full, an I/O error on any rank) leaves the previous ones intact
    # and either "fail"s the job with one line or, with "warn", logs a warning and trains on
    checkpoint_errors: Literal["fail", "warn"] = "fail"

    def __post_init__(self) -> None:
        if self.init_from is not None and not (Path(self.init_from) / "progress.json").is_file():
            raise ValueError(f"init_from {self.init_from!r}: not a checkpoint directory (no progress.json)")
        if self.eval_sample_users is not None and self.eval_sample_users < 1:
            raise ValueError(f"eval_sample_users must be >= 1, got {self.eval_sample_users}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        for name in ("epochs", "batch_size", "eval_every", "patience", "eval_batch_users", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.lr <= 0 or self.sparse_lr <= 0:
            raise ValueError(f"learning rates must be > 0 (lr={self.lr}, sparse_lr={self.sparse_lr})")
        kind, _, k = self.metric.partition("@")
        if kind not in ("HR", "NDCG", "MRR") or not k.isdigit():
            raise ValueError(f"metric must look like NDCG@10 / HR@20 / MRR@10, got {self.metric!r}")


@dataclass
class TrainConfig:
    seed: int = 2024
    run_dir: str = "runs/default"
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        if self.objective.name == "next" and not self.model.causal:
            raise ValueError(f"objective 'next' trains every position on its successor and needs a causal "
                             f"encoder (model.name: sasrec, or ssd4rec with model.beta: 0 or model.backward_scope: "
                             f"prefix), got model.name={self.model.name!r}, model.beta={self.model.beta}, "
                             f"model.backward_scope={self.model.backward_scope!r}")

    def to_dict(self) -> dict:
        return to_dict(self)


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (or defaults when ``path`` is None) + ``key=value`` overrides -> validated config."""
    data = load_yaml(path, schema=TrainConfig) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
