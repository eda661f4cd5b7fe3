"""Run configuration: the schema (dataclasses, the one source of defaults) and the YAML loader."""

from .loader import ConfigError, apply_overrides, deep_merge, from_dict, load_yaml, to_dict
from .schema import (
    DataSection,
    LossSection,
    ModelSection,
    ObjectiveSection,
    SyntheticConfig,
    TrainConfig,
    TrainSection,
    load_train_config,
)

__all__ = [
    "ConfigError",
    "DataSection",
    "LossSection",
    "ModelSection",
    "ObjectiveSection",
    "SyntheticConfig",
    "TrainConfig",
    "TrainSection",
    "apply_overrides",
    "deep_merge",
    "from_dict",
    "load_train_config",
    "load_yaml",
    "to_dict",
]
