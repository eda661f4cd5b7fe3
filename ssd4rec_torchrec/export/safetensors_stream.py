"""A safetensors file written row block by row block (the tensors never need to exist in memory at once).

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of every
tensor, padded with spaces to a multiple of 8) and the raw little-endian data. The writer lays out the
header for known shapes, preallocates the file and fills each tensor's rows through a memory map.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# safetensors dtype -> numpy dtype of the stored bytes (bf16 is written through its int16 bit pattern)
_NUMPY = {"F32": np.float32, "F64": np.float64, "BF16": np.int16, "I8": np.int8, "I64": np.int64}


class SafetensorsWriter:
    """``SafetensorsWriter(path, {name: (dtype, shape)})``; ``write_rows(name, start, rows)``; ``close()``."""

    def __init__(self, path: str | Path, spec: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, (dtype, shape) in spec.items():
            if dtype not in _NUMPY:
                raise ValueError(f"unsupported safetensors dtype {dtype!r}")
            np_dtype = np.dtype(_NUMPY[dtype]).newbyteorder("<")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (np_dtype, tuple(shape), offset)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.truncate(self._data_start + offset)
        self._maps: dict[str, np.memmap] = {}

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` as rows ``start ..`` of tensor ``name`` (dtype must match the declared one)."""
        dtype, shape, offset = self._layout[name]
        if rows.dtype.newbyteorder("<") != dtype and rows.dtype != dtype:
            raise ValueError(f"{name}: rows are {rows.dtype}, the file declares {dtype}")
        if name not in self._maps:
            if not int(np.prod(shape)):
                return
            self._maps[name] = np.memmap(self.path, dtype=dtype, mode="r+", offset=self._data_start + offset,
                                         shape=shape)
        m = self._maps[name]
        if start < 0 or start + rows.shape[0] > shape[0] or rows.shape[1:] != shape[1:]:
            raise ValueError(f"{name}: rows {start}..{start + rows.shape[0]} of shape {rows.shape[1:]} do not fit "
                             f"{shape}")
        m[start:start + rows.shape[0]] = rows

    def close(self) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps.clear()


__all__ = ["SafetensorsWriter"]
