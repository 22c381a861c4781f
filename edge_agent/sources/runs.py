"""The index pass of a replay: where a recorded log's stretches in time order (*runs*) begin.

:func:`index_file` reads a file once and returns an :class:`Index`: its runs (line, byte offset, each
device's last ts before it, and for a ``.gz`` a decompressor checkpoint shortly before it) and about
how many rows it holds.  A run ends where a reading goes back in time by more than ``slack`` seconds
below the run's latest.  More runs than the caller has room for is a :class:`LogError` that gives the
command that sorts the log (:func:`sort_hint`).  :mod:`edge_agent.sources.merge` reads the runs back
and merges them by time.
"""

from __future__ import annotations

import bisect
import csv
import math
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.sources.chunk import NON_MONOTONIC_TS, LogError, ReadingChunk, grow_last, increasing
from edge_agent.sources.lines import LineParser
from edge_agent.sources.logs import BROKEN_FILE, Gunzip, GzipCheckpoint, broken_reason
from edge_agent.sources.numbers import OK, PAD, Codes, parse_numbers

SLACK_S = 1.0  # seconds a reading may lie below its run's latest and stay in the run (clock jitter)
MAX_RUNS = 256  # stretches in time order merged at once (a cursor and an open file each)
_READ = 1 << 18


Devices = tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]  # names; their last ts, line, merge key


def merge_keys(ts: np.ndarray, floor: np.ndarray, top: float) -> np.ndarray:
    """A run's merge keys: the running maximum of ``ts`` (from ``top``, the run's so far), each row's at
    least its device's last key in the file's earlier runs (``floor``, per row): merged by these keys,
    every device's rows keep their file order, and a run is in key order though in time order only up
    to the slack."""
    return np.maximum.accumulate(np.maximum(np.maximum(ts, floor), top))


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    return a if a.shape[0] >= n else np.concatenate([a, np.full(n - a.shape[0], -np.inf)])


def sort_hint(path: str, fmt: str, gz: bool, ts_column: int = 1) -> str:
    """The command that sorts a log by time (a CSV with GNU sort, which spills to disk when it must)."""
    q = shlex.quote(path)
    stem, _, ext = path.removesuffix(".gz").rpartition(".")
    out = shlex.quote(f"{stem}.sorted.{ext}" if stem else f"{path}.sorted")
    read = f"zcat {q} | " if gz else ""
    if fmt == "csv":
        k = ts_column
        head, body = (f"{read}head -n 1", f"{read}tail -n +2") if gz else (f"head -n 1 {q}", f"tail -n +2 {q}")
        return f"({head}; {body} | LC_ALL=C sort -s -t, -k{k},{k}g) > {out}"
    return (f"{read}python3 -c \"import sys, json; rows = [l.rstrip() + '\\n' for l in sys.stdin if l.strip()]; "
            f"rows.sort(key=lambda l: json.loads(l)['ts']); sys.stdout.writelines(rows)\" "
            f"{'' if gz else '< ' + q + ' '}> {out}")


def with_hint(exc: LogError, hint: str) -> LogError:
    """A reading of a device that goes back in time, with how to sort the log."""
    return LogError(exc.path, exc.line, f"{exc.reason}: a device's readings must go forward in time; "
                    f"to sort the log by time: {hint}", exc.kind)


@dataclass(frozen=True)
class Start:
    """Where a run begins: its first line and byte offset, and (gz) a decompressor state before it."""

    line: int
    offset: int
    checkpoint: tuple[int, GzipCheckpoint] | None = None  # (uncompressed offset, state)
    devices: Devices | None = None  # each device's last ts, line and merge key before the run


@dataclass
class Index:
    """A file's schema as the replay's cursors need it, and its runs (the first starts at its first row)."""

    path: str
    format: str
    gz: bool
    header: bytes
    channels: tuple[str, ...]
    has_labels: bool
    outputs: int | None
    ts_column: int
    runs: list[Start]
    rows: int


class _Indexer:
    """The index pass over one file: where its runs start, and about how many rows it holds.

    CSV is scanned for the ts field alone (numbers decoded in bulk by :func:`parse_numbers`, the
    parser's number rule): a third of a full parse.  Lines are judged when replayed, by the parser
    (a line whose ts is not a plain number is skipped here, and cannot start a run).  JSON Lines go
    through the parser (``ts`` cannot be found without decoding the record), and so does CSV when bad
    lines are skipped: a skipped line's ts must not count as its device's last (the scan cannot tell a
    bad line from a good one, and a bad line with a ts ahead of the rest made every later row of its
    device "non-monotonic": hundreds of good rows dropped for one bad one)."""

    def __init__(self, path: str, fmt: str, gz: bool, on_error: str, numeric: bool, slack: float, room: int):
        self.path, self.format, self.gz, self.slack, self.room = path, fmt, gz, slack, room
        self.scan = fmt == "csv" and on_error != "skip"  # the ts field alone; else every line through the parser
        self.parser = LineParser(path, fmt, on_error=on_error)
        self.parser.numeric_labels = numeric
        self.parser.keys = True  # as the replay's own parsers (merge.py): the lines it skips are theirs
        self.runs: list[Start] = []
        self.top = -math.inf  # the current run's latest ts
        self.nl = np.empty(0, dtype=np.int64)  # offsets of the newlines ending lines nl_line, nl_line + 1, ...
        self.nl_line = 1
        self.cps: list[tuple[int, GzipCheckpoint]] = []
        self.header = b""
        self.its, self.idev, self.ncols = 0, 1, 2  # CSV: the ts and device_id columns, the number of columns
        self.buf, self.line, self.rows = b"", 2, 0  # CSV: the partial line, its number, rows seen
        self.base = 0  # CSV: the offset of the partial line
        self.codes = Codes(allow_empty=False)  # CSV: the device ids
        self.last_ts, self.last_line = np.empty(0), np.empty(0, dtype=np.int64)  # per device, as the parser's
        self.last_key, self.floor, self.ktop = np.empty(0), np.empty(0), -math.inf  # the merge's keys

    def run(self) -> Index:
        f: Any = Gunzip(self.path) if self.gz else open(self.path, "rb")  # noqa: SIM115 - closed below
        off = 0
        csv_ = self.scan
        try:
            while True:
                if self.gz:
                    self.cps.append((off, f.checkpoint()))
                try:
                    data = f.read(_READ)
                except BROKEN_FILE as exc:
                    if not csv_:
                        self._chunks(self.parser.feed())
                    line = self.line if csv_ else self.parser.line
                    raise LogError(self.path, line, broken_reason(exc), "bad file") from exc
                if not data:
                    break
                body = self._body(data) if off == 0 else 0
                if csv_:
                    self._scan(data[body:])  # notes its newlines itself
                else:
                    self.nl = np.concatenate([self.nl, np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + off])
                    self._chunks(self.parser.feed(data, flush=False))
                off += len(data)
            if csv_:
                self._scan(b"", final=True)
            else:
                self._chunks(self.parser.feed(final=True))
        except LogError as exc:
            if exc.kind == NON_MONOTONIC_TS:
                raise with_hint(exc, self._hint()) from None
            raise
        finally:
            f.close()
        d = self.parser.d
        rows = self.rows if csv_ else self.parser.stats.rows_read
        return Index(self.path, self.format, self.gz, self.header, self._schema[0], self._schema[1],
                      d.outputs, self.its + 1, self.runs or [self._first()], rows)

    def _body(self, data: bytes) -> int:
        """Where the rows begin in the first block read (after the CSV header), noted as the first run."""
        if self.format == "csv":
            self.header = data[: data.find(b"\n") + 1] or data
            names = [c.strip() for c in next(csv.reader([self.header.removeprefix(b"\xef\xbb\xbf").decode(
                "utf-8", "replace").rstrip("\r\n")]))]
            self.its, self.idev, self.ncols = names.index("ts"), names.index("device_id"), len(names)
        self.runs.append(self._first())
        self.base, self.nl_line = len(self.header), 2 if self.scan else 1
        return len(self.header) if self.scan else 0  # the parser reads the header itself

    @property
    def _schema(self) -> tuple[tuple[str, ...], bool]:
        return self.parser.d.rules.channels, self.parser.d.rules.has_labels

    def _first(self) -> Start:
        line, offset = (2, len(self.header)) if self.format == "csv" else (1, 0)
        return Start(line, offset, self.cps[0] if self.gz and self.cps else None)

    def _hint(self) -> str:
        return sort_hint(self.path, self.format, self.gz, self.its + 1)

    def _chunks(self, chunks: Iterator[ReadingChunk]) -> None:
        for chunk in chunks:
            assert chunk.lines is not None
            self._cut(chunk.ts, chunk.device_codes, chunk.lines, chunk.device_names)
            self._forget(int(chunk.lines[-1]))

    def _scan(self, data: bytes, final: bool = False) -> None:
        """CSV: the ts of every complete line buffered (NaN where it is not a plain number)."""
        buf = self.buf + data if self.buf else data
        if final and buf[-1:] not in (b"", b"\n"):
            buf += b"\n"
        a = np.frombuffer(buf, np.uint8)
        nl = np.flatnonzero(a == 10)
        n = nl.shape[0]
        if n == 0:
            self.buf = buf
            return
        end = int(nl[-1]) + 1
        self.nl = np.concatenate([self.nl, nl + self.base])
        starts = np.empty_like(nl)
        starts[0] = 0
        starts[1:] = nl[:-1] + 1
        commas = np.flatnonzero(a[:end] == 44)
        m = commas.shape[0]
        j = np.searchsorted(commas, starts)  # each line's first comma
        ok = np.ones(n, dtype=bool)

        def comma(k: np.ndarray) -> np.ndarray:
            ok[:] &= k < m
            return commas[np.minimum(k, m - 1)] if m else nl

        def field(col: int) -> tuple[np.ndarray, np.ndarray]:
            S = starts if col == 0 else comma(j + col - 1) + 1
            last = col == self.ncols - 1  # the field ends at the line's end (before a \r)
            E = nl - (a[np.maximum(nl - 1, 0)] == 13) if last else comma(j + col)
            ok[:] &= (S <= E) & (nl >= E)
            return np.where(ok, S, 0) + PAD, np.where(ok, E, 0) + PAD

        if buf.find(b'"', 0, end) >= 0:  # a quoted field may hold commas: its line is left to the parser
            ok[np.unique(np.searchsorted(nl, np.flatnonzero(a[:end] == 34)))] = False
        (Sts, Ets), (Sdev, Edev) = field(self.its), field(self.idev)
        raw = b"\n" * PAD + buf[:end]
        ts, st = parse_numbers(raw, Sts, Ets)
        good = ok & (st == OK)
        lines = np.arange(self.line, self.line + n, dtype=np.int64)
        self.rows += int(good.sum())
        if good.any():
            codes = self.codes.encode_fields(raw, Sdev[good], Edev[good], b"\0" in raw)
            self._cut(ts[good], codes, lines[good], self.codes.names_tuple)
        self.line += n
        self.buf, self.base = buf[end:], self.base + end
        self._forget(self.line - 1)

    def _cut(self, ts: np.ndarray, codes: np.ndarray, lines: np.ndarray, names: tuple[str, ...]) -> None:
        """Note every row that goes back in time by more than the slack: a new run starts there, and
        takes along each device's last ts before it (the parser's rule holds across runs) and its last
        merge key (:func:`merge_keys`)."""
        nd = len(names)
        self.last_ts, self.last_line = grow_last(self.last_ts, self.last_line, nd)
        self.last_key, self.floor = _grow(self.last_key, nd), _grow(self.floor, nd)
        i, n = 0, ts.shape[0]
        while i < n:
            top = np.maximum(np.maximum.accumulate(ts[i:]), self.top)
            before = np.empty(n - i)
            before[0] = self.top
            before[1:] = top[:-1]
            back = np.flatnonzero(ts[i:] < before - self.slack)
            j = n if back.shape[0] == 0 else i + int(back[0])
            if j > i:
                c = codes[i:j]
                increasing(c, ts[i:j], lines[i:j], self.last_ts, self.last_line)
                keys = merge_keys(ts[i:j], self.floor[c], self.ktop)
                self.ktop = float(keys[-1])
                u, first = np.unique(c[::-1], return_index=True)  # each device's last row: its highest key
                self.last_key[u] = keys[c.shape[0] - 1 - first]
            if j == n:
                self.top = float(top[-1])
                return
            devices = (names, self.last_ts.copy(), self.last_line.copy(), self.last_key.copy())
            self._start(int(lines[j]), float(ts[j]), float(before[back[0]]), devices)
            self.top, self.ktop, self.floor, i = float(ts[j]), -math.inf, self.last_key.copy(), j

    def _start(self, line: int, t: float, top: float, devices: Devices) -> None:
        offset = int(self.nl[line - 1 - self.nl_line]) + 1
        cp = None
        if self.gz:
            k = bisect.bisect_right([o for o, _ in self.cps], offset) - 1
            cp = self.cps[k]
        self.runs.append(Start(line, offset, cp, devices))
        if len(self.runs) > self.room:
            raise LogError(self.path, line, f"the readings go back in time ({t!r} after {top!r}) at more places than "
                           f"replay can merge (at most {MAX_RUNS} stretches in time order across the logs, e.g. one "
                           f"per device); sort the log by time: {self._hint()}", "unordered log")

    def _forget(self, line: int) -> None:
        """Drop what no later run start can need: newlines of lines before ``line``, older checkpoints."""
        k = line - 1 - self.nl_line
        if k > 0:
            self.nl, self.nl_line = self.nl[k:], line - 1
        if len(self.cps) > 1 and self.nl.shape[0]:
            offset = int(self.nl[0])
            while len(self.cps) > 1 and self.cps[1][0] <= offset:
                self.cps.pop(0)


def index_file(path: str, fmt: str, gz: bool, *, on_error: str = "raise", numeric: bool = False,
               slack: float = SLACK_S, room: int = MAX_RUNS) -> Index:
    """Read ``path`` once: its runs (at most ``room``, else a :class:`LogError` saying how to sort it)."""
    return _Indexer(path, fmt, gz, on_error, numeric, slack, room).run()
