"""One exception type for bad input data, so CLIs can print it as a single clear line."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or unusable input data. The message names the file and, where known, the line or column."""

    def __init__(self, source: str, reason: str, *, line: int | None = None, column: str | None = None):
        where = str(source)
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f" (column {column!r})"
        super().__init__(f"{where}: {reason}")
        self.source = str(source)
        self.line = line
        self.column = column
        self.reason = reason
