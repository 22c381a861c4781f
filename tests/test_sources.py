"""Sensor sources: log parsing (CSV / JSONL), errors, chunking, pacing and live sources.

Every log is generated here in tmp_path; nothing reads /work/shared.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import sources
from edge_agent.sources import (
    FollowFile,
    JsonLinesStream,
    LogError,
    ReadingChunk,
    SimulatedSensor,
    StdinSource,
    numbers,
    pace,
    read_log,
)

HEADER = "ts,device_id,ax,ay,az,label"
CHANNELS = ("ax", "ay", "az")


# ----------------------------------------------------------------------------- helpers


def make_readings(n_per_device: int = 50, devices=("s01", "s02", "s10"), seed: int = 0) -> list[dict]:
    """Interleaved readings of several devices, sorted by ts like a hub log."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, dev in enumerate(devices):
        t = 100.0 + d * 0.003
        for i in range(n_per_device):
            t = round(t + 0.02 + 0.01 * (i % 3), 4)
            vals = [round(float(v), 6) for v in rng.normal(0, 3, 3)]
            if i % 17 == 5:
                vals[1] = None  # a missing reading
            rows.append(
                {
                    "ts": t,
                    "device_id": dev,
                    "ax": vals[0],
                    "ay": vals[1],
                    "az": vals[2],
                    "label": ["walk", "run", "", "7"][(i // 10) % 4],
                }
            )
    rows.sort(key=lambda r: (r["ts"], r["device_id"]))
    return rows


def _num(v) -> str:
    return "" if v is None else repr(v)


def write_csv(path: Path, rows: list[dict], header: str = HEADER) -> Path:
    cols = header.split(",")
    text = (
        header
        + "\n"
        + "".join(
            ",".join(_num(r[c]) if c not in ("device_id", "label") else str(r[c]) for c in cols) + "\n"
            for r in rows
        )
    )
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return path


def read_all(path, **kw) -> ReadingChunk:
    chunk = read_log(path, **kw).read_all()
    assert chunk is not None
    return chunk


def assert_same(a: ReadingChunk, b: ReadingChunk) -> None:
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.device_ids, b.device_ids)
    np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here
    if a.labels is None or b.labels is None:
        assert a.labels is None and b.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)
    assert a.channels == b.channels


def expected_arrays(rows: list[dict]):
    ts = np.array([r["ts"] for r in rows])
    vals = np.array([[np.nan if r[c] is None else r[c] for c in CHANNELS] for r in rows], dtype=np.float32)
    return ts, np.array([r["device_id"] for r in rows]), vals, np.array([r["label"] for r in rows])


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".ndjson", ".csv.gz", ".jsonl.gz"])
def test_formats_parse_to_the_expected_data(tmp_path: Path, suffix: str) -> None:
    rows = make_readings()
    path = tmp_path / f"log{suffix}"
    (write_csv if ".csv" in suffix else write_jsonl)(path, rows)
    reader = read_log(path)
    assert reader.channels == CHANNELS
    assert reader.has_labels
    chunk = reader.read_all()
    ts, dev, vals, labels = expected_arrays(rows)
    np.testing.assert_array_equal(chunk.ts, ts)
    np.testing.assert_array_equal(chunk.device_ids, dev)
    np.testing.assert_array_equal(chunk.values, vals)
    np.testing.assert_array_equal(chunk.labels, labels)
    assert chunk.values.dtype == np.float32 and chunk.ts.dtype == np.float64
    assert chunk.source == str(path)
    assert reader.stats.rows_read == len(rows) and reader.stats.rows_skipped == 0
    assert set(reader.device_names) == {"s01", "s02", "s10"}


def test_csv_and_jsonl_give_the_same_data(tmp_path: Path) -> None:
    rows = make_readings(80)
    a = read_all(write_csv(tmp_path / "a.csv", rows))
    b = read_all(write_jsonl(tmp_path / "a.jsonl", rows))
    assert_same(a, b)
    np.testing.assert_array_equal(a.lines, np.arange(2, len(rows) + 2))  # header is line 1
    np.testing.assert_array_equal(b.lines, np.arange(1, len(rows) + 1))


@pytest.mark.parametrize("chunk_rows", [1, 3, 64, 2047, 2048, 2049, 5000, 100_000])
def test_chunking_does_not_change_the_data(tmp_path: Path, chunk_rows: int) -> None:
    # 4500 rows: several internal parse parts (fewer rows for tiny chunks: they are slow)
    rows = make_readings(1500 if chunk_rows > 10 else 100)
    for path in (write_csv(tmp_path / "a.csv", rows), write_jsonl(tmp_path / "a.jsonl", rows)):
        ref = read_all(path, chunk_rows=100_000)
        chunks = list(read_log(path, chunk_rows=chunk_rows))
        assert all(len(c) <= chunk_rows for c in chunks)
        assert all(len(c) == chunk_rows for c in chunks[:-1])  # no line is bad: exact sizes
        assert_same(ReadingChunk.concat(chunks), ref)
        assert chunks[0].first_line == ref.first_line


def test_chunking_does_not_change_skips(tmp_path: Path) -> None:
    lines = [HEADER]
    t = 0.0
    for i in range(3000):
        t += 0.01
        lines.append(f"{t:.2f},d{i % 3},{i},{-i},0.5,x" if i % 97 else f"{t:.2f},d{i % 3},oops,1,2,x")
    path = write_lines(tmp_path / "s.csv", lines)
    results = []
    for cr in (5, 333, 4096):
        reader = read_log(path, chunk_rows=cr, on_error="skip")
        whole = ReadingChunk.concat(list(reader))
        results.append((whole, reader.stats))
    for whole, stats in results[1:]:
        assert_same(whole, results[0][0])
        assert stats.skipped_by_reason == results[0][1].skipped_by_reason == {"bad number": 31}


def test_missing_readings_are_nan_not_errors(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.csv", [HEADER, "0.1,a,,1,nan,x", "0.2,a,NaN,,2,", "0.3,a,1,2,3,y"])
    c = read_all(path)
    assert np.isnan(c.values[0, 0]) and np.isnan(c.values[0, 2]) and np.isnan(c.values[1, 0])
    assert np.isnan(c.values[1, 1]) and c.values[1, 2] == 2
    assert c.labels.tolist() == ["x", "", "y"]


def test_number_syntaxes(tmp_path: Path) -> None:
    vals = [
        "1",
        "-2",
        "+3",
        ".5",
        "-.25",
        "7.",
        "1e-3",
        "2E+2",
        " 4.5 ",
        "-0",
        "000123.4500",
        "12345678901234.5",
        "0.1234567890123456789",
        "-9007199254740993",
    ]
    lines = [HEADER] + [f"{i},a,{v},0,0,x" for i, v in enumerate(vals)]
    c = read_all(write_lines(tmp_path / "n.csv", lines))
    np.testing.assert_array_equal(c.values[:, 0], np.array([float(v) for v in vals], dtype=np.float32))
    assert math.copysign(1.0, c.values[9, 0]) == -1.0  # "-0" keeps its sign like float()


def test_optional_label_and_column_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "o.csv", ["wz,device_id,ts,ax", "1.5,n1,0.5,2", "2.5,n2,0.5,3"])
    reader = read_log(path)
    assert reader.channels == ("wz", "ax") and not reader.has_labels
    c = reader.read_all()
    assert c.labels is None
    np.testing.assert_array_equal(c.values, np.array([[1.5, 2], [2.5, 3]], np.float32))
    np.testing.assert_array_equal(c.ts, [0.5, 0.5])


def test_quotes_crlf_bom_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    text = '\ufeffts,device_id,ax,ay,az,label\r\n0.1,a,1,2,3,"x,y"\r\n\r\n0.2,"a",4,5,6,z\r\n0.3,a,7,8,9,w'
    path = tmp_path / "q.csv"
    path.write_bytes(text.encode("utf-8"))
    reader = read_log(path)
    c = reader.read_all()
    assert c.labels.tolist() == ["x,y", "z", "w"]
    assert c.lines.tolist() == [2, 4, 5]
    assert reader.stats.blank_lines == 1 and reader.stats.rows_skipped == 0
    np.testing.assert_array_equal(c.values[:, 2], [3, 6, 9])


def test_long_device_ids_and_labels(tmp_path: Path) -> None:
    lines = [HEADER]
    for i in range(40):
        dev = "a-rather-long-device-identifier-" + str(i % 4)
        lines.append(f"{i},{dev},1,2,3,label-number-{i % 5}-of-the-long-kind")
    lines.append("40,x,1,2,3,é")
    c = read_all(write_lines(tmp_path / "l.csv", lines))
    assert len(set(c.device_ids.tolist())) == 5
    assert c.labels[-1] == "é" and c.labels[0] == "label-number-0-of-the-long-kind"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_label_no_result_can_carry_is_a_bad_line(tmp_path: Path, fmt: str) -> None:
    """A label holding a NUL, or over 256 characters: sent as a result's truth, the hub refuses the whole batch
    holding it and the device keeps it for good. The log names the line instead; skipped, the rest goes on."""
    labels = ["walk", "wa\x00lk", "x" * 257, "x" * 256, "walk"]
    if fmt == "csv":
        path = write_lines(tmp_path / "l.csv", [HEADER] + [f"{i},a,1,2,3,{lab}" for i, lab in enumerate(labels)])
    else:
        path = tmp_path / "l.jsonl"
        path.write_bytes(b"".join(orjson.dumps({"ts": i, "device_id": "a", "ax": 1, "ay": 2, "az": 3, "label": lab})
                                  + b"\n" for i, lab in enumerate(labels)))
    first = 3 if fmt == "csv" else 2
    with pytest.raises(LogError, match=re.escape(f':{first}: label "wa\\u0000lk" holds a NUL')):
        read_all(path)
    reader = read_log(path, on_error="skip")
    got = [lab for chunk in reader for lab in chunk.labels.tolist()]
    assert got == ["walk", "x" * 256, "walk"]
    errors = [str(e).split(": ", 1)[1] for e in reader.stats.first_errors]
    assert errors[0] == 'label "wa\\u0000lk" holds a NUL' and errors[1].startswith('label "xxx'), errors
    assert errors[1].endswith("is longer than 256 characters") and len(errors) == 2, errors


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        read_log(tmp_path / "x.txt")


# ----------------------------------------------------------------------------- errors

GOOD = ["0.10,a,1,2,3,x", "0.10,b,1,2,3,x", "0.12,a,1,2,3,x"]

CSV_CASES = [
    # (bad line, kind, reason)
    ("0.2,a,abc,2,3,x", "bad number", "bad number 'abc' in column 'ax'"),
    ("0.2,a,1,2,1.2.3,x", "bad number", "bad number '1.2.3' in column 'az'"),
    ("0.2,a,1,2,0x10,x", "bad number", "bad number '0x10' in column 'az'"),
    ("0.2,a,1_000,2,3,x", "bad number", "bad number '1_000' in column 'ax'"),
    ("0.2,a,1,-,3,x", "bad number", "bad number '-' in column 'ay'"),
    ("abc,a,1,2,3,x", "bad number", "bad number 'abc' in column 'ts'"),
    ("0.2,a,1,2,3", "missing column", "missing column(s): expected 6 fields, got 5"),
    ("0.2,a,1,2,3,x,9", "extra column", "extra column(s): expected 6 fields, got 7"),
    (",a,1,2,3,x", "empty field", "empty field 'ts'"),
    ("0.2,,1,2,3,x", "empty field", "empty field 'device_id'"),
    ("inf,a,1,2,3,x", "non-finite ts", "non-finite ts 'inf'"),
    ("nan,a,1,2,3,x", "non-finite ts", "non-finite ts 'nan'"),
    # past 2**53 ms a float64 holds no whole millisecond (the agent's keys); before 1970: tests/test_replay_order.py
    ("-1e16,a,1,2,3,x", "ts out of range", "ts '-1e16' out of range (seconds since 1970, at most 9.0072e+12 either way)"),
    ("1e16,a,1,2,3,x", "ts out of range", "ts '1e16' out of range (seconds since 1970, at most 9.0072e+12 either way)"),
    ("0.2,a,1,-inf,3,x", "non-finite value", "non-finite value '-inf' in column 'ay'"),
    ("0.2,a,1e39,2,3,x", "non-finite value", "value '1e39' out of float32 range in column 'ax'"),
    (
        "0.11,a,1,2,3,x",
        "non-monotonic ts",
        "non-monotonic ts 0.11 for device 'a' (previous 0.12 at line {prev})",
    ),
    (
        "0.12,a,1,2,3,x",
        "non-monotonic ts",
        "non-monotonic ts 0.12 for device 'a' (previous 0.12 at line {prev})",
    ),
    ('0.2,a,1,2,3,"x', "bad quoting", "bad quoting"),
]


@pytest.mark.parametrize(("bad", "kind", "reason"), CSV_CASES)
@pytest.mark.parametrize("where", ["early", "deep"])
def test_csv_errors_name_file_line_and_reason(
    tmp_path: Path, bad: str, kind: str, reason: str, where: str
) -> None:
    # "deep": the bad line sits after 5000 good ones, inside a fast-path block
    filler = [] if where == "early" else [f"{i * 0.0001:.4f},z,1,2,3,x" for i in range(5000)]
    lines = [HEADER, *filler, *GOOD, bad, "9.0,a,1,2,3,x"]
    path = write_lines(tmp_path / "data.csv", lines)
    line = len(lines) - 1
    reason = reason.format(prev=line - 1)
    with pytest.raises(LogError) as ei:
        read_all(path)
    e = ei.value
    assert (e.path, e.line, e.kind) == (str(path), line, kind)
    assert e.reason.startswith(reason)
    assert str(e).startswith(f"{path}:{line}: {reason}")
    assert isinstance(e, ValueError)
    # skip: the bad line goes, the others stay, the reason is counted
    reader = read_log(path, on_error="skip")
    c = reader.read_all()
    assert len(c) == len(lines) - 2
    assert reader.stats.rows_skipped == 1 and reader.stats.skipped_by_reason == {kind: 1}
    assert [str(x) for x in reader.stats.first_errors] == [str(e)]


def test_error_str_is_path_line_reason(tmp_path: Path) -> None:
    e = LogError("data.csv", 17, "bad number 'abc' in column 'ax'", "bad number")
    assert str(e) == "data.csv:17: bad number 'abc' in column 'ax'"
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.line, e2.reason, e2.kind) == (e.path, e.line, e.reason, e.kind)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("ts,ax,ay", "missing header column 'device_id'"),
        ("device_id,ax,ay", "missing header column 'ts'"),
        ("ts,device_id,ax,ax", "duplicate column 'ax' in header"),
        ("ts,device_id,label", "no channel columns in header"),
        ("ts,device_id,,ax", "empty column name in header"),
    ],
)
def test_header_errors_are_fatal_even_when_skipping(tmp_path: Path, header: str, reason: str) -> None:
    path = write_lines(tmp_path / "h.csv", [header, "0,a,1,2"])
    with pytest.raises(LogError) as ei:
        read_log(path, on_error="skip")
    assert ei.value.line == 1 and ei.value.reason == reason


def test_empty_files(tmp_path: Path) -> None:
    for name in ("e.csv", "e.jsonl"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(LogError, match="empty file"):
            read_log(tmp_path / name)
    only_header = write_lines(tmp_path / "h.csv", [HEADER])
    reader = read_log(only_header)
    assert reader.channels == CHANNELS and list(reader) == []


J_GOOD = [
    '{"ts":0.1,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x"}',
    '{"ts":0.1,"device_id":"b","ax":1,"ay":null,"az":3,"label":null}',
]
JSON_CASES = [
    ('{"ts":0.2,"device_id":"a","ax":1,"ay":2,"az":3', "bad json", "bad JSON"),
    ("[1, 2]", "bad json", "expected a JSON object"),
    ('{"ts":0.2,"device_id":"a","ax":1,"az":3,"label":"x"}', "missing column", "missing key 'ay'"),
    (
        '{"ts":0.2,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x","q":1}',
        "extra column",
        "unexpected key 'q'",
    ),
    (
        '{"ts":0.2,"device_id":"a","ax":"1","ay":2,"az":3,"label":"x"}',
        "bad number",
        "bad number \"1\" in column 'ax'",
    ),
    (
        '{"ts":0.2,"device_id":"a","ax":true,"ay":2,"az":3,"label":"x"}',
        "bad number",
        "bad number true in column 'ax'",
    ),
    ('{"ts":null,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x"}', "empty field", "empty field 'ts'"),
    ('{"ts":-1.5e16,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x"}', "ts out of range", "ts -1.5e+16 out of range"),
    ('{"ts":0.2,"device_id":"","ax":1,"ay":2,"az":3,"label":"x"}', "empty field", "empty field 'device_id'"),
    (
        '{"ts":0.2,"device_id":"a","ax":1e300,"ay":2,"az":3,"label":"x"}',
        "non-finite value",
        "value 1e+300 out of",
    ),
    (
        '{"ts":0.05,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x"}',
        "non-monotonic ts",
        "non-monotonic ts 0.05",
    ),
]


@pytest.mark.parametrize(("bad", "kind", "reason"), JSON_CASES)
def test_jsonl_errors_name_file_line_and_reason(tmp_path: Path, bad: str, kind: str, reason: str) -> None:
    filler = [
        orjson.dumps({"ts": i * 0.0001, "device_id": "z", "ax": 1, "ay": 2, "az": 3, "label": "q"}).decode()
        for i in range(3000)
    ]
    lines = [*J_GOOD, *filler, bad, '{"ts":9,"device_id":"a","ax":1,"ay":2,"az":3,"label":"x"}']
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(LogError) as ei:
        read_all(path)
    assert (ei.value.line, ei.value.kind) == (len(lines) - 1, kind)
    assert ei.value.reason.startswith(reason)
    assert str(ei.value).startswith(f"{path}:{len(lines) - 1}: ")
    reader = read_log(path, on_error="skip")
    assert len(reader.read_all()) == len(lines) - 1
    assert reader.stats.skipped_by_reason == {kind: 1}


def test_jsonl_label_may_be_absent_null_or_numeric(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "j.jsonl",
        [
            '{"ts":0.1,"device_id":"a","ax":1,"label":"x"}',
            '{"ts":0.2,"device_id":"a","ax":1}',
            '{"ts":0.3,"device_id":7,"ax":1,"label":3}',
            '{"ts":0.4,"device_id":"a","ax":1,"label":null}',
        ],
    )
    c = read_all(path)
    assert c.labels.tolist() == ["x", "", "3", ""]
    assert c.device_ids.tolist() == ["a", "a", "7", "a"]


def test_raise_mode_delivers_the_rows_before_the_bad_line(tmp_path: Path) -> None:
    lines = [HEADER] + [f"{i},a,1,2,3,x" for i in range(10)] + ["10,a,bad,2,3,x", "11,a,1,2,3,x"]
    reader = read_log(write_lines(tmp_path / "r.csv", lines), chunk_rows=100)
    got = []
    with pytest.raises(LogError) as ei:
        for c in reader:
            got.append(c)
    assert ei.value.line == 12
    assert sum(len(c) for c in got) == 10 == reader.stats.rows_read


def test_skip_policy_counts_every_reason(tmp_path: Path) -> None:
    lines = [
        HEADER,
        "0.1,a,1,2,3,x",
        "0.2,a,zz,2,3,x",  # bad number
        "0.3,a,1,2,3",  # missing column
        "0.4,a,1,2,3,x,5",  # extra column
        ",a,1,2,3,x",  # empty ts
        "0.5,a,1,2,3,x",
        "0.45,a,1,2,3,x",  # non-monotonic
        "0.6,b,1,2,3,x",
        "inf,b,1,2,3,x",  # non-finite ts
        "0.7,b,q,r,s,x",  # bad number (one count per line)
        "0.8,a,1,2,3,x",
    ]
    reader = read_log(write_lines(tmp_path / "s.csv", lines), on_error="skip")
    c = reader.read_all()
    assert c.lines.tolist() == [2, 7, 9, 12]
    s = reader.stats
    assert s.rows_read == 4 and s.rows_skipped == 7 and s.lines == len(lines)
    assert s.skipped_by_reason == {
        "bad number": 2,
        "missing column": 1,
        "extra column": 1,
        "empty field": 1,
        "non-monotonic ts": 1,
        "non-finite ts": 1,
    }
    assert [e.line for e in s.first_errors] == [3, 4, 5, 6, 8, 10, 11]
    assert "7 skipped" in s.summary() and "s.csv:3: bad number 'zz' in column 'ax'" in s.summary()


def test_many_errors_only_the_first_few_are_kept(tmp_path: Path) -> None:
    lines = [HEADER] + [f"{i},a,{'x' if i % 2 else 1},2,3,y" for i in range(200)]
    reader = read_log(write_lines(tmp_path / "m.csv", lines), on_error="skip")
    assert len(reader.read_all()) == 100
    assert reader.stats.rows_skipped == 100 and len(reader.stats.first_errors) == sources.MAX_ERRORS_KEPT


# ----------------------------------------------------------------------------- monotonic ts


def test_interleaved_devices_are_checked_per_device(tmp_path: Path) -> None:
    # globally unsorted is fine as long as each device increases
    lines = [
        HEADER,
        "5,a,1,1,1,x",
        "1,b,1,1,1,x",
        "6,a,1,1,1,x",
        "2,b,1,1,1,x",
        "2.5,b,1,1,1,x",
        "7,a,1,1,1,x",
    ]
    c = read_all(write_lines(tmp_path / "i.csv", lines), chunk_rows=2)
    assert c.device_ids.tolist() == ["a", "b", "a", "b", "b", "a"]
    bad = [*lines, "2.5,b,1,1,1,x"]
    with pytest.raises(LogError) as ei:
        read_all(write_lines(tmp_path / "j.csv", bad), chunk_rows=3)
    assert ei.value.line == 8 and "device 'b' (previous 2.5 at line 6)" in ei.value.reason


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 100])
def test_skipping_non_monotonic_rows_keeps_the_running_max(tmp_path: Path, chunk_rows: int) -> None:
    seq = [1, 2, 10, 3, 4, 11, 11, 12]
    lines = [HEADER] + [f"{t},a,{i},0,0,x" for i, t in enumerate(seq)]
    lines.insert(3, "1.5,b,0,0,0,y")  # another device in between
    reader = read_log(write_lines(tmp_path / "m.csv", lines), chunk_rows=chunk_rows, on_error="skip")
    c = reader.read_all()
    by = c.by_device()
    assert by["a"][0].tolist() == [1, 2, 10, 11, 12]
    assert by["b"][0].tolist() == [1.5]
    assert reader.stats.skipped_by_reason == {"non-monotonic ts": 3}


# ----------------------------------------------------------------------------- chunk helpers


def test_by_device_matches_a_naive_split(tmp_path: Path) -> None:
    rows = make_readings(200, devices=tuple(f"d{i}" for i in range(12)))
    c = read_all(write_csv(tmp_path / "b.csv", rows))
    split = c.by_device()
    assert set(split) == {f"d{i}" for i in range(12)}
    for dev, (ts, vals, labels) in split.items():
        mask = c.device_ids == dev
        np.testing.assert_array_equal(ts, c.ts[mask])
        np.testing.assert_array_equal(vals, c.values[mask])
        np.testing.assert_array_equal(labels, c.labels[mask])
    single = c.take(c.device_ids == "d3")
    assert list(single.by_device()) == ["d3"]
    assert c.take(slice(0, 0)).by_device() == {}


def test_concat_remaps_codes_of_different_sources(tmp_path: Path) -> None:
    a = read_all(write_lines(tmp_path / "a.csv", [HEADER, "1,x,1,1,1,l", "2,y,1,1,1,l"]))
    b = read_all(write_lines(tmp_path / "b.csv", [HEADER, "1,y,2,2,2,m", "2,z,2,2,2,m"]))
    c = ReadingChunk.concat([a, b])
    assert c.device_ids.tolist() == ["x", "y", "y", "z"]
    assert set(c.device_names) == {"x", "y", "z"}


# ----------------------------------------------------------------------------- hypothesis

finite32 = st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_infinity=False)
reading = st.tuples(
    st.floats(min_value=0.001, max_value=10.0, allow_nan=False),  # ts step
    st.sampled_from(["a", "b", "sensor-7", "ünï", "dev,ice"]),  # device (one needs quoting)
    st.lists(
        st.one_of(
            finite32,
            st.none(),
            st.integers(-(10**6), 10**6),
            st.decimals(-(10**6), 10**6, places=4, allow_nan=False, allow_infinity=False),
        ),
        min_size=2,
        max_size=2,
    ),
    st.sampled_from(["", "walk", "1.5", "x y"]),
)


def _fmt(v) -> str:
    return "" if v is None else (str(v) if not isinstance(v, float) else repr(v))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(reading, min_size=1, max_size=60), st.integers(1, 9))
def test_roundtrip_csv_and_jsonl(tmp_path: Path, data, chunk_rows: int) -> None:
    last: dict[str, float] = {}
    t = 0.0
    rows = []
    for step, dev, vals, label in data:
        t = last.get(dev, 0.0) + step
        last[dev] = t
        rows.append((t, dev, vals, label))
    csv_lines = ["ts,device_id,u,v,label"]
    jl = []
    for t, dev, vals, label in rows:
        dq = f'"{dev}"' if "," in dev else dev
        csv_lines.append(f"{t!r},{dq},{_fmt(vals[0])},{_fmt(vals[1])},{label}")
        jl.append(
            orjson.dumps(
                {
                    "ts": t,
                    "device_id": dev,
                    "u": None if vals[0] is None else float(vals[0]),
                    "v": None if vals[1] is None else float(vals[1]),
                    "label": label,
                }
            ).decode()
        )
    c1 = read_all(write_lines(tmp_path / "r.csv", csv_lines), chunk_rows=chunk_rows)
    c2 = read_all(write_lines(tmp_path / "r.jsonl", jl), chunk_rows=chunk_rows)
    exp_vals = np.array(
        [[np.nan if v is None else float(v) for v in vals] for _, _, vals, _ in rows], np.float32
    )
    for c in (c1, c2):
        np.testing.assert_array_equal(c.ts, [r[0] for r in rows])
        np.testing.assert_array_equal(c.values, exp_vals)
        assert c.device_ids.tolist() == [r[1] for r in rows]
        assert c.labels.tolist() == [r[3] for r in rows]


numeric_text = st.one_of(
    st.from_regex(r"\A[+-]?[0-9]{0,9}(\.[0-9]{0,9})?\Z", fullmatch=True),
    st.from_regex(r"\A[-+.0-9eE]{1,16}\Z", fullmatch=True),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda x: f"{x:.6f}"),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(numeric_text, min_size=1, max_size=40))
def test_vectorized_number_parser_agrees_with_float(texts: list[str]) -> None:
    raw = b"\n" * 64 + ",".join(texts).encode()
    ends, pos = [], 64
    starts = []
    for t in texts:
        starts.append(pos)
        pos += len(t)
        ends.append(pos)
        pos += 1
    vals, status = numbers.parse_numbers(raw, np.array(starts), np.array(ends))
    for t, v, s in zip(texts, vals.tolist(), status.tolist(), strict=True):
        try:
            ref = float(t) if t.strip() and "_" not in t else None
        except ValueError:
            ref = None
        if not t.strip():
            assert s == numbers.EMPTY
        elif ref is None:
            assert s == numbers.BAD, t
        elif math.isnan(ref):
            assert s == numbers.NAN
        else:
            assert s in (numbers.OK, numbers.INF), t
            assert v == ref and math.copysign(1, v) == math.copysign(1, ref), (t, v, ref)


# ----------------------------------------------------------------------------- pacing


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        assert dt > 0
        self.sleeps.append(dt)
        self.now += dt


def _chunk(ts, devs=None) -> ReadingChunk:
    n = len(ts)
    return ReadingChunk(
        ts=np.asarray(ts, float),
        device_codes=np.zeros(n, np.int32) if devs is None else np.asarray(devs, np.int32),
        device_names=("a", "b"),
        values=np.zeros((n, 1), np.float32),
        channels=("x",),
    )


@pytest.mark.parametrize("speed", [1.0, 10.0, 0.5])
def test_pace_releases_readings_at_their_scaled_time(speed: float) -> None:
    fc = FakeClock()
    chunks = [_chunk([10.0, 10.0, 10.5, 11.0], [0, 1, 0, 0]), _chunk([11.0, 12.5, 13.0])]
    released = []
    for sub in pace(chunks, speed, clock=fc.clock, sleep=fc.sleep):
        released.append((fc.now - 1000.0, sub.ts.tolist()))
    assert [t for _, ts in released for t in ts] == [10.0, 10.0, 10.5, 11.0, 11.0, 12.5, 13.0]
    for at, ts in released:
        for t in ts:  # never early, and released as soon as due (the fake clock does not drift)
            assert at == pytest.approx((t - 10.0) / speed)
    assert sum(fc.sleeps) == pytest.approx(3.0 / speed)


def test_pace_batches_readings_that_are_already_due() -> None:
    fc = FakeClock()

    def slow_consumer():
        for sub in pace([_chunk(np.arange(0, 1, 0.01))], 1.0, clock=fc.clock, sleep=fc.sleep):
            yield sub
            fc.now += 0.1  # processing takes 100 ms: later readings are already due

    subs = list(slow_consumer())
    assert sum(len(s) for s in subs) == 100
    assert len(subs) < 20


def test_pace_speed_zero_never_sleeps() -> None:
    chunks = [_chunk([0.0, 5.0]), _chunk([100.0])]

    def no_sleep(_dt):
        raise AssertionError("slept")

    out = list(pace(chunks, 0, clock=lambda: 0.0, sleep=no_sleep))
    assert out == chunks
    with pytest.raises(ValueError):
        list(pace(chunks, float("nan")))


def test_pace_never_moves_back_on_unsorted_logs() -> None:
    fc = FakeClock()
    out = list(pace([_chunk([5.0, 6.0, 1.0, 7.0])], 1.0, clock=fc.clock, sleep=fc.sleep))
    assert [t for s in out for t in s.ts.tolist()] == [5.0, 6.0, 1.0, 7.0]
    assert sum(fc.sleeps) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- simulated sensor


def test_simulated_sensor_is_deterministic() -> None:
    def run(seed):
        sim = SimulatedSensor(
            ["d1", "d2"],
            ("ax", "ay"),
            50.0,
            seed,
            ("idle", "walk", "run"),
            speed=0,
            limit=1000,
            segment_s=4.0,
        )
        return ReadingChunk.concat(list(sim))

    a, b, c = run(1), run(1), run(2)
    assert_same(a, b)
    assert not np.array_equal(a.values, c.values)
    assert len(a) == 2000 and a.channels == ("ax", "ay")
    split = a.by_device()
    ts, vals, labels = split["d1"]
    np.testing.assert_allclose(np.diff(ts), 0.02)
    # the hidden class changes only on segment boundaries (every 4 s = 200 samples)
    seg = np.arange(1000) // 200
    for s in range(5):
        assert len(set(labels[seg == s].tolist())) == 1
    assert len(set(labels.tolist())) > 1
    assert np.isfinite(vals).all()


def test_simulated_sensor_paces_with_injected_clock_and_stops() -> None:
    fc = FakeClock()
    sim = SimulatedSensor(
        "s",
        ("x",),
        rate_hz=10.0,
        seed=0,
        labels=None,
        chunk_s=0.5,
        duration_s=3.0,
        clock=fc.clock,
        sleep=fc.sleep,
    )
    chunks = list(sim)
    assert sum(len(c) for c in chunks) == 30 and all(c.labels is None for c in chunks)
    assert fc.now - 1000.0 == pytest.approx(2.9)  # the last sample's time (first one at t=0)
    sim2 = SimulatedSensor("s", ("x",), 10.0, 0, speed=0, missing_rate=0.3, chunk_s=1.0)
    got = []
    for c in sim2:
        got.append(c)
        if len(got) == 3:
            sim2.stop()
    assert len(got) == 3 and np.isnan(np.concatenate([c.values for c in got])).any()


# ----------------------------------------------------------------------------- streams

STREAM = [
    '{"ts": 1.0, "device_id": "a", "ax": 1, "ay": 2, "label": "x"}',
    '{"ts": 1.0, "device_id": "b", "ax": 3, "ay": null}',
    "",
    '{"ts": 1.1, "device_id": "a", "ax": 5, "ay": 6, "label": "y"}',
]


@pytest.mark.parametrize("binary", [False, True])
def test_json_lines_stream(binary: bool) -> None:
    text = "\n".join(STREAM) + "\n"
    f = io.BytesIO(text.encode()) if binary else io.StringIO(text)
    src = JsonLinesStream(f, name="<stdin>", chunk_rows=2)
    c = ReadingChunk.concat(list(src))
    assert src.channels == ("ax", "ay") and src.has_labels
    assert c.ts.tolist() == [1.0, 1.0, 1.1] and c.labels.tolist() == ["x", "", "y"]
    assert c.lines.tolist() == [1, 2, 4]
    assert np.isnan(c.values[1, 1])


def test_stream_errors_name_stdin_and_line(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n".join([*STREAM, '{"ts": 1.2, "device_id": "a", "ax": "oops", "ay": 6}']) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    src = StdinSource(channels=("ax", "ay"))
    got = []
    with pytest.raises(LogError) as ei:
        for c in src:
            got.append(c)
    assert str(ei.value) == "<stdin>:5: bad number \"oops\" in column 'ax'"
    assert sum(len(c) for c in got) == 3


def test_stream_skip_mode_and_partial_last_line() -> None:
    text = '{"ts":1,"device_id":"a","ax":1}\nnot json\n{"ts":2,"device_id":"a","ax":2}'
    src = JsonLinesStream(io.StringIO(text), on_error="skip")
    c = ReadingChunk.concat(list(src))
    assert c.ts.tolist() == [1.0, 2.0]
    assert src.stats.skipped_by_reason == {"bad json": 1}
    assert str(src.stats.first_errors[0]).startswith("<stream>:2: bad JSON")


# ----------------------------------------------------------------------------- follow file


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_follow_file_picks_up_appended_lines(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"live.{fmt}"
    if fmt == "csv":
        first = "ts,device_id,ax,label\n0,a,1,x\n"
        pieces = ["1,a,2,x\n2,b,3", ",y\n", "3,a,4,z\n4,a,5"]  # partial lines on purpose
    else:
        first = '{"ts":0,"device_id":"a","ax":1,"label":"x"}\n'
        pieces = [
            '{"ts":1,"device_id":"a","ax":2,"label":"x"}\n{"ts":2,"device_id":"b",',
            '"ax":3,"label":"y"}\n',
            '{"ts":3,"device_id":"a","ax":4,"label":"z"}\n{"ts":4',
        ]
    path.write_text(first)
    state = {"i": 0}
    ff: FollowFile

    def sleep(_dt: float) -> None:  # each poll: the writer appends the next piece, then stops
        if state["i"] < len(pieces):
            with path.open("a") as f:
                f.write(pieces[state["i"]])
            state["i"] += 1
        else:
            ff.stop()

    ff = FollowFile(path, poll_s=0.01, sleep=sleep)
    assert ff.channels == ("ax",)  # schema known at once
    chunks = list(ff)
    c = ReadingChunk.concat(chunks)
    assert c.ts.tolist() == [0, 1, 2, 3]
    assert c.device_ids.tolist() == ["a", "a", "b", "a"]
    assert c.labels.tolist() == ["x", "x", "y", "z"]
    assert len(chunks) >= 3  # data arrived in several polls
    assert ff.stats.skipped_by_reason == {"partial line at stop": 1}


def test_follow_file_waits_for_the_file_and_can_start_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "later.csv"
    calls = {"n": 0}
    ff: FollowFile

    def sleep(_dt: float) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_text("ts,device_id,ax\n0,a,1\n")
        elif calls["n"] > 3:
            ff.stop()

    ff = FollowFile(path, sleep=sleep)
    assert ff.channels is None
    c = ReadingChunk.concat(list(ff))
    assert c.ts.tolist() == [0.0] and ff.channels == ("ax",)

    path.write_text("ts,device_id,ax\n0,a,1\n1,a,2\n")
    state = {"done": False}

    def sleep2(_dt: float) -> None:
        if not state["done"]:
            with path.open("a") as f:
                f.write("2,a,3\n")
            state["done"] = True
        else:
            ff2.stop()

    ff2 = FollowFile(path, from_end=True, sleep=sleep2)
    c2 = ReadingChunk.concat(list(ff2))
    assert c2.ts.tolist() == [2.0] and c2.first_line == 4


# ----------------------------------------------------------------------------- one set of rules

ONE_RULE_CASES = [
    ("0.2,a,abc,2,3,x", "bad number 'abc' in column 'ax'"),
    ("0.2,a,1,2,1e39,x", "value '1e39' out of float32 range in column 'az'"),
    ("nan,a,1,2,3,x", "non-finite ts 'nan'"),
    ("1e16,a,1,2,3,x", "ts '1e16' out of range (seconds since 1970, at most 9.0072e+12 either way)"),
    ("0.2,,1,2,3,x", "empty field 'device_id'"),
    ("0.05,a,1,2,3,x", "non-monotonic ts 0.05 for device 'a' (previous 0.12 at line 4)"),
]


@pytest.mark.parametrize(("bad", "reason"), ONE_RULE_CASES)
def test_every_path_judges_a_line_by_the_same_rule(tmp_path: Path, bad: str, reason: str) -> None:
    """The vectorized CSV path, the line-by-line CSV path (a quoted field in the block), a followed
    file and a stream name the same line with the same reason: one set of rules serves them all."""
    lines = [HEADER, *GOOD, bad]
    line = len(lines)
    plain = write_lines(tmp_path / "plain.csv", lines)
    quoted = write_lines(tmp_path / "quoted.csv", [HEADER, '0.10,a,1,2,3,"x"', *GOOD[1:], bad])
    got = []
    for path in (plain, quoted):
        with pytest.raises(LogError) as ei:
            read_all(path)
        got.append(str(ei.value).replace(str(path), "LOG"))
    ff = FollowFile(plain, sleep=lambda _dt: ff.stop())
    with pytest.raises(LogError) as ei:
        list(ff)
    got.append(str(ei.value).replace(str(plain), "LOG"))
    stream = JsonLinesStream(io.BytesIO(plain.read_bytes()), name="LOG", format="csv")
    with pytest.raises(LogError) as ei:
        list(stream)
    got.append(str(ei.value))
    assert got == [f"LOG:{line}: {reason}"] * 4


# ----------------------------------------------------------------------------- gzip


def test_a_truncated_gzip_names_the_line_where_it_breaks_after_the_rows_before_it(tmp_path: Path) -> None:
    import zlib

    rows = make_readings(3000)
    whole = write_csv(tmp_path / "whole.csv.gz", rows).read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut.read_bytes())
    complete_lines = readable.count(b"\n")  # the header and the rows before the break
    got = []
    with pytest.raises(LogError) as ei:
        for chunk in read_log(cut, chunk_rows=1000):
            got.append(chunk)
    assert ei.value.line == complete_lines + 1 and "truncated" in ei.value.reason
    assert sum(len(c) for c in got) == complete_lines - 1


def test_gzip_members_one_after_the_other_read_as_one_log(tmp_path: Path) -> None:
    head = HEADER + "\n" + "".join(f"{i},a,1,2,3,x\n" for i in range(5000))
    tail = "".join(f"{i},a,1,2,3,x\n" for i in range(5000, 7000))
    path = tmp_path / "two.csv.gz"
    path.write_bytes(gzip.compress(head.encode()) + gzip.compress(tail.encode()) + b"\0" * 8)  # like `cat a.gz b.gz`
    c = read_all(path)
    assert len(c) == 7000 and c.ts[-1] == 6999 and c.lines[-1] == 7001


# ----------------------------------------------------------------------------- numeric labels


def test_a_numeric_label_column_reads_as_numbers_with_located_errors(tmp_path: Path) -> None:
    good = write_lines(tmp_path / "reg.csv", [HEADER, "0.1,a,1,2,3,24.26", "0.2,a,1,2,3,", "0.3,a,1,2,3,-1e2"])
    reader = read_log(good)
    assert reader.labels_are_numbers()
    c = reader.labels_as_numbers().read_all()
    assert c.labels.dtype == np.float64 and c.labels[0] == 24.26 and np.isnan(c.labels[1]) and c.labels[2] == -100
    assert not read_log(write_lines(tmp_path / "text.csv", [HEADER, "0.1,a,1,2,3,walk"])).labels_are_numbers()
    assert not read_log(write_lines(tmp_path / "none.csv", [HEADER, "0.1,a,1,2,3,"])).labels_are_numbers()
    for bad, reason in (("abc", "bad number 'abc' in column 'label' (the labels are numbers)"),
                        ("nan", "non-finite value 'nan' in column 'label'"),
                        ("inf", "non-finite value 'inf' in column 'label'")):
        path = write_lines(tmp_path / "bad.csv", [HEADER, "0.1,a,1,2,3,1.5", f"0.2,a,1,2,3,{bad}", "0.3,a,1,2,3,2"])
        with pytest.raises(LogError) as ei:
            read_log(path).labels_as_numbers().read_all()
        assert str(ei.value) == f"{path}:3: {reason}"
        reader = read_log(path, on_error="skip").labels_as_numbers()
        assert reader.read_all().labels.tolist() == [1.5, 2.0]
        assert reader.stats.rows_skipped == 1
    jl = write_lines(tmp_path / "reg.jsonl", ['{"ts":1,"device_id":"a","x":1,"label":2.5}',
                                              '{"ts":2,"device_id":"a","x":1,"label":"oops"}'])
    with pytest.raises(LogError, match=r"reg.jsonl:2: bad number 'oops' in column 'label'"):
        read_log(jl).labels_as_numbers().read_all()


# ----------------------------------------------------------------------------- real sensors' readings (fields.py)


def _feed(**kw) -> sources.SensorFeed:
    fields = sources.FieldMap((("t", ("env", "t")), ("rh", ("env", "rh", "0"))), **kw)
    return sources.SensorFeed("sensors", fields)


def _read(feed: sources.SensorFeed, payloads: list[bytes]) -> ReadingChunk | None:
    lines = b"".join(feed.take(f"m{i}", p, "d-1", 100.0 + i) for i, p in enumerate(payloads))
    chunks = list(feed.chunks(lines))
    return ReadingChunk.concat(chunks) if chunks else None


def test_sensor_fields_by_path_time_and_label() -> None:
    """Paths reach into objects and lists; a time in ms, ISO 8601 with an offset; a channel a reading lacks
    is a missing value, a label it lacks an unknown one."""
    feed = _feed(ts=("at",), ts_unit="ms", label=("state",))
    chunk = _read(feed, [b'{"at": 1700000000000, "env": {"t": 21.5, "rh": [40.5, 0]}, "state": "dry"}',
                         b'{"at": "1700000001500", "env": {"t": 21.6}}'])
    assert chunk is not None and feed.stats.rows_skipped == 0
    assert chunk.ts.tolist() == [1_700_000_000.0, 1_700_000_001.5]
    assert chunk.values[0].tolist() == [21.5, 40.5] and chunk.values[1, 0] == np.float32(21.6)
    assert math.isnan(chunk.values[1, 1]) and chunk.labels.tolist() == ["dry", ""]
    iso = _feed(ts=("at",))
    chunk = _read(iso, [b'{"at": "2026-12-06T13:00:00+01:00", "env": {"t": 1}}'])
    assert chunk is not None and chunk.ts.tolist() == [1_796_558_400.0]


@pytest.mark.parametrize(("payload", "kind", "reason"), [
    (b'{"env": {"t": 21', "bad json", "bad JSON"),
    (b"[1, 2]", "bad json", "expected a JSON object"),
    (b'{"action": "single"}', "missing column", "no channel field (env.t, env.rh.0)"),
    (b'{"at": 2, "env": {"t": true}}', "bad number", "bad number true in column 't'"),
    (b'{"at": 2, "env": {"t": 1e39}}', "non-finite value", "out of float32 range in column 't'"),
    (b'{"at": 2, "env": {"t": {"value": 21}}}', "bad number", "bad number {\"value\":21} in column 't'"),
    (b'{"env": {"t": 1}, "at": "yesterday"}', "bad value", "neither a number nor ISO 8601"),
    (b'{"env": {"t": 1}}', "missing column", "no time field 'at'"),
    (b'{"at": -2, "env": {"t": 1}}', "ts out of range", "ts -2.0 is before 1970"),  # no result key
    (b'{"at": 4102444800, "env": {"t": 1}}', "ts ahead of the clock", "ahead of this device's clock (a live"),
    (b'{"at": 1796000000000, "env": {"t": 1}}', "ts ahead of the clock", "milliseconds read as seconds?"),
])
def test_a_sensor_reading_that_is_none_is_counted_and_named(payload: bytes, kind: str, reason: str) -> None:
    feed = _feed(ts=("at",))
    chunk = _read(feed, [b'{"at": 1, "env": {"t": 1}}', payload, b'{"at": 3, "env": {"t": 3}}'])
    assert chunk is not None and chunk.ts.tolist() == [1.0, 3.0]  # the readings around it go on
    assert feed.stats.skipped_by_reason == {kind: 1}
    err = str(feed.stats.first_errors[0])
    assert err.startswith("m1: ") and reason in err, err


def test_sensor_readings_out_of_order_are_named_after_their_origin() -> None:
    feed = _feed(ts=("at",))
    _read(feed, [b'{"at": 5, "env": {"t": 1}}', b'{"at": 5, "env": {"t": 2}}'])
    assert [str(e) for e in feed.stats.first_errors] == [
        "m1: non-monotonic ts 5.0 for device 'd-1' (previous 5.0 at line 1)"]


def test_csv_sensor_lines_by_column() -> None:
    """A board's CSV line: columns by number, text where a number belongs named, its header passed over."""
    fields = sources.FieldMap((("t", ("1",)), ("rh", ("2",))), ts=("0",), label=("3",), csv=True)
    feed = sources.SensorFeed("/dev/ttyUSB0", fields)
    lines = [b"ts,t,rh,label", b"10,21.5,40,dry", b"11,x,41,dry", b"12,21.7,,humid"]
    chunk = _read(feed, lines)
    assert chunk is not None and chunk.ts.tolist() == [10.0, 12.0] and chunk.labels.tolist() == ["dry", "humid"]
    assert math.isnan(chunk.values[1, 1])
    assert [str(e) for e in feed.stats.first_errors] == ["m2: bad number \"x\" in column 't'"]


def test_place_values_are_the_matrix_product_bit_for_bit_without_a_float64_copy() -> None:
    """The digits' place values are summed column by column (Horner): exactly ``d @ 10**k`` in float64, to the
    widest field (14 bytes of the largest byte codes a field holds), and the parse keeps no float64 scratch of
    the digit matrix between blocks (0.6 MB of a replay's peak, #27 §4)."""
    rng = np.random.default_rng(7)
    for ell in range(1, 15):
        d = rng.integers(0, 10, (500, ell)).astype(np.uint8)
        codes = np.array([254, 253, 251, 9], np.uint8)  # '.', '-', '+' as their codes less 48, the largest digit
        d[:4] = codes[:, None]  # rows of one code: the largest sums
        d[4:8, 0] = codes
        want = d.astype(np.float64) @ numbers._POW10[ell - 1::-1]
        got = numbers._place_values(d)
        assert got.dtype == np.float64 and got.tobytes() == want.tobytes(), ell
        dots = d == 254
        assert numbers._place_values(dots).tobytes() == (dots.astype(np.float64) @ numbers._POW10[ell - 1::-1]).tobytes()
    ws = numbers.Workspace()
    texts = [f"{x:.6f}" for x in rng.normal(size=3000)]
    raw = b"\n" * 64 + ",".join(texts).encode()
    starts = np.cumsum([64] + [len(t) + 1 for t in texts[:-1]])
    vals, _ = numbers.parse_numbers(raw, starts, starts + np.array([len(t) for t in texts]), ws)
    assert vals.tolist() == [float(t) for t in texts]
    assert not [key for key in ws._bufs if np.dtype(key[1]) == np.float64]


@pytest.mark.parametrize("replay", [False, True])
def test_between_chunks_a_log_is_held_once_in_the_parsers_buffer(tmp_path: Path, replay: bool) -> None:
    """While a chunk is in use, the bytes read ahead of it live in the parser's buffer only: the read that fed
    it (256 kB) is not kept beside their concatenation with the last partial line (#27 §4)."""
    path = tmp_path / "log.csv"
    rows = [f"{i * 0.02:.2f},d{i % 3},{i * 0.5:.6f},-1.25" for i in range(40_000)]
    path.write_text("ts,device_id,ax,ay\n" + "\n".join(rows) + "\n")
    if replay:
        logs = sources.ReplayLogs([path], rows=4096)
        it = iter(logs)
        chunk = next(it)
        frames = [it.gi_frame]  # the merge, and the cursor's reading generator
        cursor = next(c for c in frames[0].f_locals["cursors"])
        gen = cursor._it
    else:
        reader = sources.read_log(path, chunk_rows=4096)
        chunk = next(reader)
        gen = reader._it
    assert len(chunk) == 4096
    held = [v for v in gen.gi_frame.f_locals.values() if isinstance(v, bytes) and len(v) > 1 << 14]
    assert held == [], f"the generator keeps {[len(v) for v in held]} bytes read"
    data = b"".join(c.values.tobytes() for c in ([chunk, *(reader if not replay else it)]))
    assert len(data) == 40_000 * 2 * 4


def test_a_refused_long_label_costs_nothing_afterwards(tmp_path: Path) -> None:
    """A hostile peer's finding: one refused 1 MiB label stayed in the label table, and numpy sized every later
    chunk's label cells to it (rows x 4 MiB: an agent on a stream went from 76 MB to 4.8 GB)."""
    from edge_agent.contract.wire import MAX_LABEL_CHARS

    rows = [{"ts": i * 0.01, "device_id": "a", "ax": 1.0, "ay": 2.0, "az": 3.0, "label": "walk"} for i in range(4000)]
    rows[5]["label"] = "x" * 8192  # 1 MiB took gigabytes; this is enough to see the cells sized to it
    path = write_lines(tmp_path / "long.jsonl", [orjson.dumps(r).decode() for r in rows])
    reader = read_log(path, on_error="skip")
    chunk = reader.read_all()
    assert reader.stats.rows_skipped == 1 and len(chunk) == 3999
    assert chunk.labels is not None and set(chunk.labels.tolist()) == {"walk"}
    assert chunk.labels.dtype.itemsize <= 4 * MAX_LABEL_CHARS, chunk.labels.dtype


@pytest.mark.parametrize("kind", ["numbers", "pairs", "text"])
def test_labels_that_differ_at_every_reading_keep_the_label_table_bounded(kind: str, monkeypatch) -> None:
    """A regression target or a position differs at every reading: each new label stayed in the parser's code
    table for as long as the source ran (~300 bytes a label: a live agent labelled at 1 Hz grew 26 MB a day).
    Past MAX_LABEL_CODES the table starts afresh; the labels that come out, and the bad ones refused with their
    line, are the same as with an unbounded table."""
    from edge_agent.sources import lines as lines_module

    monkeypatch.setattr(lines_module, "MAX_LABEL_CODES", 50)
    n = 5000

    def label(i: int) -> str:
        if i % 997 == 13:
            return "oops" if kind != "text" else "bad\x00label"  # a refused label, before and after the resets
        return {"numbers": f"{i}.5", "pairs": f"{i};{-i}", "text": f"spot-{i}"}[kind]

    records = [orjson.dumps({"ts": 1_700_000_000 + i, "device_id": "a", "x": 1.0, "label": label(i)}) for i in range(n)]
    parser = lines_module.LineParser("pos.jsonl", "jsonl", on_error="skip")
    parser.numeric_labels = kind != "text"
    data = b"\n".join(records) + b"\n"
    chunks = [c for k in range(0, len(data), 40_000) for c in parser.feed(data[k:k + 40_000], final=k + 40_000 >= len(data))]
    got = ReadingChunk.concat(chunks)
    kept = [i for i in range(n) if i % 997 != 13]
    assert got.ts.tolist() == [1_700_000_000 + i for i in kept]
    want: list[Any] = {"numbers": [i + 0.5 for i in kept], "pairs": [[float(i), float(-i)] for i in kept],
                       "text": [f"spot-{i}" for i in kept]}[kind]
    assert got.labels.tolist() == want
    assert [e.line for e in parser.stats.first_errors] == [i + 1 for i in range(n) if i % 997 == 13]
    assert parser.stats.rows_skipped == n - len(kept)
    assert len(parser.d.labels.names) <= 50 + 2048  # reset after the block that passed the bound


def test_a_live_source_naming_ever_new_devices_keeps_its_device_table_bounded(monkeypatch) -> None:
    """A live stream whose lines name ever new device ids (a writer's bug, a hostile peer) grew the parser's device
    table for as long as it ran (~300 bytes an id: 125 MB after 300,000 ids). Past MAX_LIVE_DEVICE_CODES the table
    starts afresh with the devices read most recently; every reading still comes out under its own id, and the
    agent's own device, read all along, still has its readings' order checked across the resets."""
    from edge_agent.sources import lines as lines_module
    from edge_agent.sources.chunk import NON_MONOTONIC_TS, ReadStats

    monkeypatch.setattr(lines_module, "MAX_LIVE_DEVICE_CODES", 100)
    monkeypatch.setattr(lines_module, "LIVE_DEVICES_KEPT", 4)
    t0 = float(int(time.time()) - 10_000)
    parser = lines_module.LineParser("<stdin>", "csv", on_error="skip")
    parser.live(ReadStats())
    parser.prime(b"ts,device_id,x\n")
    chunks, peak = [], 0
    for piece in range(20):  # 150 new ids a piece: the table starts afresh after each
        rows = [f"{t0 + piece * 150 - 100:.3f},me,9.0"] if piece in (8, 15) else []  # out of order: the first
        for i in range(piece * 150, (piece + 1) * 150):  # row after a reset, refused all the same
            rows += [f"{t0 + i:.3f},me,1.0", f"{t0 + i - 0.5:.3f},x-{i},2.0"]  # each id once, behind the device
        chunks += list(parser.feed(("\n".join(rows) + "\n").encode(), final=piece == 19))
        peak = max(peak, len(parser.d.devices.names))
    got = ReadingChunk.concat(chunks).by_device()
    assert got["me"][0].tolist() == [t0 + i for i in range(3000)] and set(got["me"][1][:, 0].tolist()) == {1.0}
    assert len(got) == 3001 and all(got[f"x-{i}"][0].tolist() == [t0 + i - 0.5] for i in range(3000))
    assert [e.kind for e in parser.stats.first_errors] == [NON_MONOTONIC_TS] * 2
    assert peak <= 100 + 200, peak  # reset after the block that passed the bound


def _following(path: Path, steps: list[Callable[[], object]], *, quiet_s: float = 0.0, **kw: Any) -> FollowFile:
    """A FollowFile of ``path`` whose polls run ``steps`` in turn (a logger's writes, a rotation), then go on for
    ``quiet_s`` of real time (past a rotation's grace), then stop it."""
    todo = iter(steps)
    until: list[float] = []
    ff: FollowFile

    def sleep(_dt: float) -> None:
        step = next(todo, None)
        if step is not None:
            step()
            return
        if not until:
            until.append(time.monotonic() + quiet_s)
        if time.monotonic() < until[0]:
            time.sleep(0.01)
        else:
            ff.stop()

    ff = FollowFile(path, poll_s=0.01, sleep=sleep, **kw)
    return ff


def test_follow_file_goes_on_with_the_new_file_when_the_log_is_rotated(tmp_path: Path) -> None:
    """A hostile peer's finding: a log rotated by rename and create (logrotate's default) left the agent reading
    the renamed file for ever, saying nothing. Now the renamed file is read to its end, then the new one from its
    start (its header too); a partial last line of the old one is counted."""
    path = tmp_path / "live.csv"
    path.write_text("ts,device_id,ax,label\n0,a,1,x\n1,a,2,x\n")
    ff = _following(path, [
        lambda: path.open("a").write("2,a,3,x\n"),
        lambda: path.rename(tmp_path / "live.csv.1"),  # renamed, not yet created: the old one is read on
        lambda: (tmp_path / "live.csv.1").open("a").write("3,a,4,x\n3.5,a,"),  # its last line cut
        lambda: path.write_text("ts,device_id,ax,label\n4,a,5,y\n5,a,6,y\n"),
        lambda: path.open("a").write("6,a,7,y\n"),
    ], rotate_grace_s=0.0)
    c = ReadingChunk.concat(list(ff))
    assert c.ts.tolist() == [0, 1, 2, 3, 4, 5, 6] and c.labels.tolist() == ["x"] * 4 + ["y"] * 3
    assert ff.stats.skipped_by_reason == {"partial line at rotation": 1}


def test_follow_file_refuses_a_rotated_file_with_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "live.csv"
    path.write_text("ts,device_id,ax\n0,a,1\n")
    ff = _following(path, [lambda: (path.rename(tmp_path / "old.csv"), path.write_text("ts,device_id,t,rh\n1,a,20,40\n"))],
                    rotate_grace_s=0.0)
    with pytest.raises(LogError, match=r"live.csv:1: the file that replaced it has other columns \(\('t', 'rh'\)"):
        list(ff)


def test_a_live_reading_from_the_future_is_refused_and_the_stream_goes_on() -> None:
    """A hostile peer's finding: one reading dated 2100 on a live source made every later one "non-monotonic"
    (the device stopped inferring, for good, saying it was online). A live source now refuses a reading more
    than a day ahead of the device's clock; a recorded log keeps its own dates."""
    import time

    now = round(time.time(), 1)
    lines = [{"ts": now - 2, "device_id": "a", "ax": 1}, {"ts": 4_102_444_800.0, "device_id": "a", "ax": 2},
             {"ts": now - 1, "device_id": "a", "ax": 3}, {"ts": now, "device_id": "a", "ax": 4}]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    live = JsonLinesStream(io.BytesIO(data), name="<stdin>", on_error="skip", noted=True)
    c = ReadingChunk.concat(list(live))
    assert c.ts.tolist() == [now - 2, now - 1, now]
    assert live.stats.skipped_by_reason == {"ts ahead of the clock": 1}
    assert "line 2: ts 4102444800.0 is" in str(live.stats.first_errors[0]), live.stats.first_errors
    recorded = JsonLinesStream(io.BytesIO(data), name="log", on_error="skip")
    assert ReadingChunk.concat(list(recorded)).ts.tolist() == [now - 2, 4_102_444_800.0]  # then non-monotonic


def test_a_rotated_log_created_empty_gets_its_columns_checked_once_its_header_comes(tmp_path: Path) -> None:
    """logrotate's `create` makes the new file empty; its header comes with the logger's first write. Other
    columns were taken as they came (the review's catch): the model would have read the wrong channels."""
    path = tmp_path / "live.csv"
    path.write_text("ts,device_id,ax,ay\n0,a,1,2\n")
    ff = _following(path, [lambda: (path.rename(tmp_path / "old.csv"), path.write_text("")),
                           lambda: path.write_text("ts,device_id,bx,by,bz\n1,a,1,2,3\n")], rotate_grace_s=0.0)
    with pytest.raises(LogError, match=r"live.csv:1: the file that replaced it has other columns"):
        list(ff)


def test_a_rotated_jsonl_log_keeps_its_columns_its_devices_time_and_its_line_count(tmp_path: Path) -> None:
    """The review's catches: a JSON Lines record with its keys in another order was taken for other columns; a
    device's time could go back across files (keys made twice); the line count doubled."""
    path = tmp_path / "live.jsonl"
    path.write_text("".join(orjson.dumps({"ts": t, "device_id": "a", "ax": t, "ay": 0}).decode() + "\n" for t in range(5)))
    new = [{"ay": 0, "ts": 3.5, "device_id": "a", "ax": 9}, {"ay": 1, "ax": 8, "device_id": "a", "ts": 6}]
    ff = _following(path, [lambda: (path.rename(tmp_path / "old.jsonl"),
                                    path.write_text("".join(orjson.dumps(x).decode() + "\n" for x in new)))],
                    on_error="skip", rotate_grace_s=0.0)
    c = ReadingChunk.concat(list(ff))
    assert c.ts.tolist() == [0, 1, 2, 3, 4, 6] and c.values[-1].tolist() == [8.0, 1.0]
    assert ff.stats.skipped_by_reason == {"non-monotonic ts": 1}  # 3.5 after 4: across the files
    assert ff.stats.lines == 7


def test_lines_written_to_a_renamed_log_before_the_logger_reopens_are_read(tmp_path: Path) -> None:
    """A new user's finding: logrotate renames and creates, and the logger writes on to the renamed file until it
    reopens the path (3 s in the trial): 250 of 700 readings were lost. The renamed file is now read on until it
    has been quiet for ``rotate_grace_s``, then the new one from its start."""
    path, old = tmp_path / "live.csv", tmp_path / "live.csv.1"
    path.write_text("ts,device_id,ax\n0,a,0\n")
    ff = _following(path, [lambda: (path.rename(old), path.write_text("ts,device_id,ax\n")),
                           lambda: old.open("a").write("1,a,1\n"),  # the logger has not reopened yet
                           lambda: old.open("a").write("2,a,2\n"),
                           lambda: path.open("a").write("3,a,3\n")],  # now it has
                    quiet_s=0.4, rotate_grace_s=0.2)  # past the grace
    c = ReadingChunk.concat(list(ff))
    assert c.ts.tolist() == [0, 1, 2, 3]


def test_a_live_sources_last_count_is_said_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    """A new user's finding: after ten skipped readings named one by one and one count, a run on stdin ended with 289
    more skipped said nowhere (the count comes once a minute). The end of a run says the total."""
    from edge_agent.sources.chunk import NotedStats

    stats = NotedStats("<stdin>")
    for i in range(300):
        stats.note(f"line {i + 2}", "missing column", "missing key 'device_id'")
    stats.final()
    assert "<stdin>: 300 readings skipped in all (missing column: 300)" in caplog.text
    caplog.clear()
    stats.final()  # said once
    assert caplog.text == ""


def test_a_live_line_that_never_ends_is_skipped_not_kept() -> None:
    """A hostile peer's note: stdin and followed files kept a line without a newline whole, however long (a writer
    gone wrong: memory without bound). Past 1 MiB it is skipped to its end, named, and the stream goes on."""
    import time

    now = round(time.time(), 1)
    good = [orjson.dumps({"ts": now - 3 + i, "device_id": "a", "ax": i}) + b"\n" for i in range(3)]
    data = good[0] + b'{"ts": 1, "device_id": "a", "ax": "' + b"x" * (3 << 20) + b'"}\n' + good[1] + good[2]
    live = JsonLinesStream(io.BytesIO(data), name="<stdin>", on_error="skip", noted=True)
    c = ReadingChunk.concat(list(live))
    assert c.ts.tolist() == [now - 3, now - 2, now - 1]
    assert live.stats.skipped_by_reason == {"line too long": 1}
    assert "line 2: a line longer than 1048576 bytes: skipped to its end" in str(live.stats.first_errors[0])
    assert len(live.parser.partial) == 0 and live.parser.line == 5


@pytest.mark.parametrize("lines_a_block", [1, 7, 5000])
def test_a_live_device_whose_clock_glitched_ahead_once_goes_on_after_a_run_of_readings(lines_a_block, caplog) -> None:
    """A hostile sensor's finding: one reading 12 h ahead (less than the day a live source allows) made every later
    reading "non-monotonic" until the clock caught up: 12 h of readings skipped. Now LIVE_REANCHOR_READINGS readings
    in a row dated before it, each later than the one before, take it for the glitch and the device goes on. A
    reading that arrives late now and then (the other device's too) is skipped as before, and never re-anchors."""
    from edge_agent.sources import lines as lines_module
    from edge_agent.sources.chunk import NON_MONOTONIC_TS, ReadStats

    n = lines_module.LIVE_REANCHOR_READINGS
    t0 = float(int(time.time()) - 10_000)
    rows = [f"{t0 + i * 0.02:.3f},me,1.0" for i in range(500)]
    rows.insert(250, f"{t0 + 43_200:.3f},me,9.0")  # the glitch, after the 250th reading
    for i in range(0, 500, 5):  # another device: every other reading late, 100 of them (more than n)
        rows.append(f"{t0 + i * 0.02:.3f},other,2.0")
        rows.append(f"{t0 + i * 0.02 - 1.0:.3f},other,3.0")
    parser = lines_module.LineParser("<stdin>", "csv", on_error="skip")
    parser.live(ReadStats())
    parser.prime(b"ts,device_id,x\n")
    chunks = []
    with caplog.at_level("WARNING"):
        for i in range(0, len(rows), lines_a_block):
            chunks += list(parser.feed(("\n".join(rows[i:i + lines_a_block]) + "\n").encode(),
                                       final=i + lines_a_block >= len(rows)))
    got = ReadingChunk.concat(chunks).by_device()
    me = got["me"][0].tolist()
    assert me == [t0 + i * 0.02 for i in range(250)] + [t0 + 43_200] + [t0 + i * 0.02 for i in range(250 + n - 1, 500)]
    assert got["other"][0].tolist() == [t0 + i * 0.02 for i in range(0, 500, 5)]
    assert parser.stats.skipped_by_reason == {NON_MONOTONIC_TS: n - 1 + 100}
    said = [r.getMessage() for r in caplog.records if "glitch" in r.getMessage()]
    assert len(said) == 1 and "'me'" in said[0] and "43" in said[0], said


@pytest.mark.parametrize("late", ["clock reset", "second writer behind", "not going forward"])
def test_late_readings_that_do_not_show_a_glitch_ahead_never_reanchor_a_live_device(late: str) -> None:
    """The review's catch: the rule took any run of late readings for a glitch, a sensor clock reset to 1970 and a
    second writer whose clock is 12 h behind too. Only a last reading ahead of the clock can be the glitch, and the
    late readings must go forward among themselves."""
    from edge_agent.sources import lines as lines_module
    from edge_agent.sources.chunk import NON_MONOTONIC_TS, ReadStats

    n = lines_module.LIVE_REANCHOR_READINGS
    now = float(int(time.time()))
    rows = [f"{now - 100 + i * 0.02:.3f},me,1.0" for i in range(100)]  # on time, the last one behind the clock
    if late == "clock reset":
        rows += [f"{1.0 + i * 0.02:.3f},me,2.0" for i in range(3 * n)]
    elif late == "second writer behind":
        for burst in range(3):
            rows += [f"{now - 43_200 + burst * 10 + i * 0.02:.3f},me,2.0" for i in range(2 * n)]
    else:  # ahead of the clock once, then readings that repeat one ts
        rows += [f"{now + 43_200:.3f},me,9.0"] + [f"{now - 50:.3f},me,2.0"] * (3 * n)
    parser = lines_module.LineParser("<stdin>", "csv", on_error="skip")
    parser.live(ReadStats())
    parser.keys = True
    parser.prime(b"ts,device_id,x\n")
    got = ReadingChunk.concat(list(parser.feed(("\n".join(rows) + "\n").encode(), final=True))).by_device()
    kept = got["me"][0].tolist()
    assert kept[:100] == [now - 100 + i * 0.02 for i in range(100)]
    assert len(kept) == 100 + (late == "not going forward"), kept[100:105]
    assert parser.stats.skipped_by_reason == {NON_MONOTONIC_TS: len(rows) - len(kept)}


def test_a_json_line_with_nan_or_infinity_names_them_and_null() -> None:
    """A hostile sensor's finding: NaN and Infinity, which Python's json.dumps writes, were refused as "bad JSON:
    unexpected character ... column 50", where a CSV line's "inf" is named. The reason now says what they are and
    what to write instead."""
    from edge_agent.sources.chunk import BAD_JSON, ReadStats
    from edge_agent.sources.lines import LineParser

    parser = LineParser("<stdin>", "jsonl", on_error="skip")
    parser.live(ReadStats())
    lines = [b'{"ts": 1700000000.0, "device_id": "d", "x": 1.0}', b'{"ts": 1700000000.02, "device_id": "d", "x": NaN}',
             b'{"ts": 1700000000.04, "device_id": "d", "x": -Infinity}', b'{"ts": 1700000000.06, "device_id": "d", "x": }']
    parser.prime(lines[0] + b"\n")
    list(parser.feed(b"\n".join(lines[1:]) + b"\n", final=True))
    errors = parser.stats.first_errors
    assert [e.kind for e in errors] == [BAD_JSON] * 3
    assert all("write null for a missing reading" in e.reason for e in errors[:2]), [e.reason for e in errors]
    assert "null" not in errors[2].reason  # another mistake: the parser's own words only
