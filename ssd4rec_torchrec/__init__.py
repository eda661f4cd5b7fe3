"""SSD4Rec on TorchRec: a bidirectional Mamba-2/SSD encoder over packed, variable-length item histories.

The public API is importable from here (``from ssd4rec_torchrec import SSD4Rec, BiSSDEncoder``). Each name is
imported on first use (PEP 562), so ``import ssd4rec_torchrec.ops`` stays pure torch and does not pull in
torchrec. :data:`_EXPORTS` maps every public name to the module that defines it: the one place to update when a
module moves.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # the TorchRec model and the pure-torch encoder
    "SSD4Rec": "ssd4rec_torchrec.model",
    "BiSSDEncoder": "ssd4rec_torchrec.nn.encoder",
    "EncoderConfig": "ssd4rec_torchrec.nn.encoder",
    # configs: the schema and the YAML loader (base:, key=value overrides)
    "TrainConfig": "ssd4rec_torchrec.config",
    "load_train_config": "ssd4rec_torchrec.config",
    "load_yaml": "ssd4rec_torchrec.config",
    "ConfigError": "ssd4rec_torchrec.config",
    # data: sources -> cached dataset; KJT batches
    "prepare": "ssd4rec_torchrec.data",
    "SequenceDataset": "ssd4rec_torchrec.data",
    "SyntheticConfig": "ssd4rec_torchrec.data",
    "generate_synthetic": "ssd4rec_torchrec.data",
    "DataError": "ssd4rec_torchrec.data",
    "FEATURES": "ssd4rec_torchrec.data.batches",
    "SeqBatch": "ssd4rec_torchrec.data.batches",
    "make_batch": "ssd4rec_torchrec.data.batches",
    # the job layer: stand up a run (fresh, or restored from a checkpoint) at any world size
    "build_run": "ssd4rec_torchrec.job",
    "restore": "ssd4rec_torchrec.job",
    # an exported bundle, checksums verified
    "load_bundle": "ssd4rec_torchrec.bundle",
    "load_serving_bundle": "ssd4rec_torchrec.bundle",
    "Bundle": "ssd4rec_torchrec.bundle",
    "ServingBundle": "ssd4rec_torchrec.bundle",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
