"""Data pipeline: raw sources -> k-core -> id maps -> leave-one-out -> cached jagged arrays."""

from .errors import DataError
from .interactions import RawInteractions
from .prepare import prepare
from .preprocess import (
    FIRST_ITEM_INDEX,
    PAD_INDEX,
    LeaveOneOut,
    PreprocessParams,
    build_sequences,
    k_core,
    leave_one_out,
    mask_index,
    table_rows,
)
from .sources import FileFormat, cache_dir, fetch_wheel, load_file
from .store import SequenceDataset
from .synthetic import SyntheticConfig, generate_synthetic, synthetic_checksum

__all__ = [
    "FIRST_ITEM_INDEX",
    "PAD_INDEX",
    "DataError",
    "FileFormat",
    "LeaveOneOut",
    "PreprocessParams",
    "RawInteractions",
    "SequenceDataset",
    "SyntheticConfig",
    "build_sequences",
    "cache_dir",
    "fetch_wheel",
    "generate_synthetic",
    "k_core",
    "leave_one_out",
    "load_file",
    "mask_index",
    "prepare",
    "synthetic_checksum",
    "table_rows",
]
