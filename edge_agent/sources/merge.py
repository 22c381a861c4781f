"""Recorded logs replayed in true time order, whatever order their rows are in.

A log may be sorted by time, grouped by device (all of A, then all of B), or be one of several
files; replay must release every device's readings at their own recorded time, together.  Sorting
a large log in memory would hold all of it, so :class:`ReplayLogs` reads each file twice instead:

1. **Index** (one pass, the full parse and its rules): cut the file into *runs*, stretches in time
   order.  A run ends where a reading goes back in time by more than ``slack`` seconds below the
   run's latest (jitter between devices' clocks below that is no new run).  A run start is noted as
   its line and byte offset; for a ``.gz``, also a copy of the decompressor's state shortly before it
   (:meth:`Gunzip.checkpoint`, about 45 kB), since a gzip stream cannot be entered in the middle.
   A time-sorted file is one run, a file grouped by device one run per device.
2. **Merge**: one cursor per run reads its stretch (a file handle and one small chunk each) and a
   k-way merge interleaves them by time, a chunk at a time (vectorized): every step takes, from
   each cursor, the rows up to the earliest of the cursors' last buffered times, so at least one
   cursor's chunk is used up per step.  A row's key is its run's running maximum of ts (a run is
   in time order up to ``slack``), ties go to the earlier run.

Memory is bounded by the number of runs, not rows: ``rows`` rows are buffered in all (split between
the cursors, at least 256 each).  More than ``max_runs`` runs (rows in no usable order) is refused
before any reading goes out, with the command that sorts the log.  A device's readings must still
go forward in time in the merged order (:func:`increasing`, the parser's rule): a device whose
readings overlap in two files is refused at the first overlapping row (or it is skipped).
"""

from __future__ import annotations

import bisect
import csv
import math
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.sources.chunk import (
    MAX_ERRORS_KEPT,
    NON_MONOTONIC_TS,
    LogError,
    ReadingChunk,
    ReadStats,
    grow_last,
    increasing,
)
from edge_agent.sources.formats import shorten
from edge_agent.sources.logs import (
    BROKEN_FILE,
    DEFAULT_CHUNK_ROWS,
    Gunzip,
    GzipCheckpoint,
    LineParser,
    broken_reason,
    log_format,
    read_log,
)
from edge_agent.sources.numbers import OK, PAD, Codes, parse_numbers

SLACK_S = 1.0  # seconds a reading may lie below its run's latest and stay in the run (clock jitter)
MAX_RUNS = 256  # stretches in time order merged at once (a cursor and an open file each)
_MIN_CURSOR_ROWS = 256
_READ = 1 << 18  # bytes read at once, split between the cursors (at least _MIN_READ each)
_MIN_READ = 1 << 14
_LINE_BITS = 40  # a row's tag in the merge: file index << 40 | line


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
class _Start:
    """Where a run begins: its first line and byte offset, and (gz) a decompressor state before it."""

    line: int
    offset: int
    checkpoint: tuple[int, GzipCheckpoint] | None = None  # (uncompressed offset, state)
    devices: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None  # each device's last ts and line before


@dataclass
class _Index:
    path: str
    format: str
    gz: bool
    header: bytes
    channels: tuple[str, ...]
    has_labels: bool
    outputs: int | None
    ts_column: int
    runs: list[_Start]
    rows: int


class _Indexer:
    """The index pass over one file: where its runs start, and about how many rows it holds.

    CSV is scanned for the ts field alone (numbers decoded in bulk by :func:`parse_numbers`, the
    parser's number rule): a third of a full parse.  Lines are judged when replayed, by the parser
    (a line whose ts is not a plain number is skipped here, and cannot start a run).  JSON Lines go
    through the parser (``ts`` cannot be found without decoding the record)."""

    def __init__(self, path: str, fmt: str, gz: bool, on_error: str, numeric: bool, slack: float, room: int):
        self.path, self.format, self.gz, self.slack, self.room = path, fmt, gz, slack, room
        self.parser = LineParser(path, fmt, on_error=on_error)
        self.parser.numeric_labels = numeric
        self.runs: list[_Start] = []
        self.top = -math.inf  # the current run's latest ts
        self.nl = np.empty(0, dtype=np.int64)  # offsets of the newlines ending lines nl_line, nl_line + 1, ...
        self.nl_line = 1
        self.cps: list[tuple[int, GzipCheckpoint]] = []
        self.header = b""
        self.its, self.idev, self.ncols = 0, 1, 2  # CSV: the ts and device_id columns, the number of columns
        self.buf, self.line, self.rows = b"", 2, 0  # CSV: the partial line, its number, rows seen
        self.codes = Codes(allow_empty=False)  # CSV: the device ids
        self.last_ts, self.last_line = np.empty(0), np.empty(0, dtype=np.int64)  # per device, as the parser's

    def run(self) -> _Index:
        f: Any = Gunzip(self.path) if self.gz else open(self.path, "rb")  # noqa: SIM115 - closed below
        off = 0
        csv_ = self.format == "csv"
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
                self.nl = np.concatenate([self.nl, np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + off])
                off += len(data)
                if csv_:
                    self._scan(data[body:])
                else:
                    self._chunks(self.parser.feed(data, flush=False))
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
        return _Index(self.path, self.format, self.gz, self.header, self._schema[0], self._schema[1],
                      d.outputs, self.its + 1, self.runs or [self._first()], rows)

    def _body(self, data: bytes) -> int:
        """Where the rows begin in the first block read (after the CSV header), noted as the first run."""
        if self.format == "csv":
            self.header = data[: data.find(b"\n") + 1] or data
            names = [c.strip() for c in next(csv.reader([self.header.removeprefix(b"\xef\xbb\xbf").decode(
                "utf-8", "replace").rstrip("\r\n")]))]
            self.its, self.idev, self.ncols = names.index("ts"), names.index("device_id"), len(names)
        self.runs.append(self._first())
        return len(self.header)

    @property
    def _schema(self) -> tuple[tuple[str, ...], bool]:
        return self.parser.d.rules.channels, self.parser.d.rules.has_labels

    def _first(self) -> _Start:
        line, offset = (2, len(self.header)) if self.format == "csv" else (1, 0)
        return _Start(line, offset, self.cps[0] if self.gz and self.cps else None)

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

        quoted = np.flatnonzero(a[:end] == 34)  # a quoted field may hold commas: left to the parser
        if quoted.shape[0]:
            ok[np.unique(np.searchsorted(nl, quoted))] = False
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
        self.buf = buf[end:]
        self._forget(self.line - 1)

    def _cut(self, ts: np.ndarray, codes: np.ndarray, lines: np.ndarray, names: tuple[str, ...]) -> None:
        """Note every row that goes back in time by more than the slack: a new run starts there, and
        takes along each device's last ts before it (the parser's rule holds across runs)."""
        self.last_ts, self.last_line = grow_last(self.last_ts, self.last_line, len(names))
        i, n = 0, ts.shape[0]
        while i < n:
            top = np.maximum(np.maximum.accumulate(ts[i:]), self.top)
            before = np.empty(n - i)
            before[0] = self.top
            before[1:] = top[:-1]
            back = np.flatnonzero(ts[i:] < before - self.slack)
            j = n if back.shape[0] == 0 else i + int(back[0])
            increasing(codes[i:j], ts[i:j], lines[i:j], self.last_ts, self.last_line)
            if j == n:
                self.top = float(top[-1])
                return
            devices = (names, self.last_ts.copy(), self.last_line.copy())
            self._start(int(lines[j]), float(ts[j]), float(before[back[0]]), devices)
            self.top, i = float(ts[j]), j

    def _start(self, line: int, t: float, top: float, devices: tuple[tuple[str, ...], np.ndarray, np.ndarray]
               ) -> None:
        offset = int(self.nl[line - 1 - self.nl_line]) + 1
        cp = None
        if self.gz:
            k = bisect.bisect_right([o for o, _ in self.cps], offset) - 1
            cp = self.cps[k]
        self.runs.append(_Start(line, offset, cp, devices))
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


class _Cursor:
    """Reads one run of a file: its chunks, each with its merge keys and the merge's device codes."""

    def __init__(self, idx: _Index, k: int, rows: int, read: int, on_error: str, numeric: bool, file_no: int) -> None:
        start = idx.runs[k]
        self.read_size = read
        self.hint = sort_hint(idx.path, idx.format, idx.gz, idx.ts_column)
        self.end = idx.runs[k + 1].offset if k + 1 < len(idx.runs) else None
        self.path, self.file_no = idx.path, file_no
        jsonl = idx.format == "jsonl"
        self.parser = LineParser(idx.path, idx.format, on_error=on_error, chunk_rows=rows,
                                 channels=idx.channels if jsonl else None, has_labels=idx.has_labels if jsonl else None)
        self.parser.prime(b"" if jsonl else idx.header)
        self.parser.line, self.parser.stats.lines = start.line, 0
        self.parser.numeric_labels = numeric
        self.parser.d.outputs = idx.outputs
        if start.devices is not None:
            self.parser.continue_after(*start.devices)
        if start.checkpoint is None:
            self.f: Any = open(idx.path, "rb")  # noqa: SIM115 - closed by close()
            self.f.seek(start.offset)
            self.pos = start.offset
        else:
            self.pos, state = start.checkpoint
            self.f = Gunzip.resume(idx.path, state)
        self.skip = start.offset - self.pos
        self.top = -math.inf
        self.remap = np.empty(0, dtype=np.int32)  # this parser's device codes -> the merge's
        self.chunk: ReadingChunk | None = None
        self.keys = self.codes = np.empty(0)
        self.at = 0
        self._it = self._chunks()

    def _read(self) -> bytes:
        while True:
            try:
                n = self.read_size
                data = self.f.read(n if self.end is None else min(n, max(self.end - self.pos, 1)))
            except BROKEN_FILE as exc:
                raise LogError(self.path, self.parser.line, broken_reason(exc), "bad file") from exc
            self.pos += len(data)
            if self.skip and data:  # a .gz resumed at a checkpoint before the run's start
                cut = min(self.skip, len(data))
                data, self.skip = data[cut:], self.skip - cut
                if not data:
                    continue
            if self.end is not None and self.pos > self.end:
                data = data[: len(data) - (self.pos - self.end)]
            return data

    def _chunks(self) -> Iterator[ReadingChunk]:
        while self.end is None or self.pos < self.end:
            data = self._read()
            if not data:
                break
            yield from self.parser.feed(data, flush=False)
        yield from self.parser.feed(final=True)

    def advance(self, codes_of: dict[str, int]) -> bool:
        """Buffer the run's next chunk (False once the run is done)."""
        try:
            return self._advance(codes_of)
        except LogError as exc:
            if exc.kind == NON_MONOTONIC_TS:
                raise with_hint(exc, self.hint) from None
            raise

    def _advance(self, codes_of: dict[str, int]) -> bool:
        for chunk in self._it:
            if len(chunk) == 0:
                continue
            names = chunk.device_names
            if self.remap.shape[0] < len(names):
                self.remap = np.array([codes_of.setdefault(nm, len(codes_of)) for nm in names], dtype=np.int32)
            self.chunk, self.at = chunk, 0
            self.keys = np.maximum(np.maximum.accumulate(chunk.ts), self.top)
            self.top = float(self.keys[-1])
            self.codes = self.remap[chunk.device_codes]
            return True
        self.chunk = None
        return False

    def close(self) -> None:
        self.f.close()


class ReplayLogs:
    """Readings of recorded logs in time order across every device and file (see the module docstring).

    The schema of every file is read at once (header errors raise here); :meth:`index` reads each file
    once more and refuses what cannot be merged, before any reading is released; iterating merges.
    ``stats`` counts what was read and skipped; ``rows`` (after :meth:`index`) the rows to replay,
    ``released`` those yielded so far; ``peak_cursors`` / ``peak_rows`` what the merge held at most.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, on_error: str = "raise", slack: float = SLACK_S,
                 max_runs: int = MAX_RUNS, rows: int = DEFAULT_CHUNK_ROWS):
        self.paths = [str(p) for p in paths]
        self.on_error, self.slack, self.max_runs, self.rows_buffered = on_error, slack, max_runs, rows
        self.schemas = []
        for p in self.paths:
            with read_log(p, on_error=on_error) as r:
                self.schemas.append((r.channels, r.has_labels))
        self.numeric = False
        self.stats = ReadStats()
        self._indexes: list[_Index] | None = None
        self.rows = self.released = self.peak_cursors = self.peak_rows = 0
        self.device_names: tuple[str, ...] = ()

    @property
    def channels(self) -> tuple[str, ...]:
        return self.schemas[0][0]

    @property
    def source(self) -> str:
        return ", ".join(self.paths)

    def labels_as_numbers(self) -> ReplayLogs:
        """Read the label columns as numbers (regression targets; see :meth:`LogReader.labels_as_numbers`)."""
        self.numeric = True
        return self

    def index(self) -> ReplayLogs:
        """The index pass over every file (bad lines raise here in raise mode, as they would replaying)."""
        if self._indexes is None:
            out: list[_Index] = []
            for p in self.paths:
                fmt, gz = log_format(p)
                room = self.max_runs - sum(len(i.runs) for i in out)
                out.append(_Indexer(p, fmt, gz, self.on_error, self.numeric, self.slack, room).run())
            self._indexes = out
            self.rows = sum(i.rows for i in out)
        return self

    @property
    def runs(self) -> int:
        return sum(len(i.runs) for i in self.index()._indexes or ())

    def __iter__(self) -> Iterator[ReadingChunk]:
        indexes = self.index()._indexes
        assert indexes is not None
        runs = max(self.runs, 1)
        per, read = max(_MIN_CURSOR_ROWS, self.rows_buffered // runs), max(_MIN_READ, _READ // runs)
        cursors = [_Cursor(idx, k, per, read, self.on_error, self.numeric, n)
                   for n, idx in enumerate(indexes) for k in range(len(idx.runs))]
        try:
            yield from self._merge(cursors)
        finally:
            for c in cursors:
                c.close()
        self.stats.first_errors.sort(key=lambda e: (self.paths.index(e.path), e.line))
        del self.stats.first_errors[MAX_ERRORS_KEPT:]

    def _merge(self, cursors: list[_Cursor]) -> Iterator[ReadingChunk]:
        codes_of: dict[str, int] = {}
        last_ts, last_tag = np.empty(0), np.empty(0, dtype=np.int64)
        active = [c for c in cursors if c.advance(codes_of) or self._done(c)]
        while active:
            self.peak_cursors = max(self.peak_cursors, len(active))
            self.peak_rows = max(self.peak_rows, sum(len(c.chunk) for c in active if c.chunk is not None))
            horizon = min(float(c.keys[-1]) for c in active)
            parts = []
            for c in active:
                j = int(np.searchsorted(c.keys, horizon, side="right"))
                if j > c.at:
                    parts.append((c, c.at, j))
                    c.at = j
            names = self.device_names = tuple(codes_of)
            out = self._combine(parts, names)
            last_ts, last_tag = grow_last(last_ts, last_tag, len(names))
            if len(cursors) > 1:  # one run: the parser's own rule has seen this order
                out = self._forward(out, last_ts, last_tag)
            else:
                assert out.lines is not None
                out.lines = out.lines & ((1 << _LINE_BITS) - 1)
            self.released += len(out)
            self.stats.rows_read += len(out)
            if len(out):
                yield out
            active = [c for c in active if c.at < len(c.keys) or c.advance(codes_of) or self._done(c)]

    def _done(self, c: _Cursor) -> bool:
        """Fold a finished cursor's counts of skipped lines into ``stats``; False (drop it)."""
        s = c.parser.stats
        self.stats.rows_skipped += s.rows_skipped
        self.stats.blank_lines += s.blank_lines
        for kind, k in s.skipped_by_reason.items():
            self.stats.skipped_by_reason[kind] = self.stats.skipped_by_reason.get(kind, 0) + k
        self.stats.first_errors += s.first_errors
        c.close()
        return False

    @staticmethod
    def _combine(parts: list[tuple[_Cursor, int, int]], names: tuple[str, ...]) -> ReadingChunk:
        """The parts' rows in key order (stable: ties in cursor order), with the merge's device codes."""
        def cat(get: Any) -> np.ndarray:
            arrays = [get(c, i, j) for c, i, j in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        keys = cat(lambda c, i, j: c.keys[i:j])
        order = None if len(parts) == 1 else np.argsort(keys, kind="stable")
        pick = (lambda a: a) if order is None else (lambda a: a[order])
        first = parts[0][0].chunk
        assert first is not None
        labelled = [c.chunk.labels for c, _, _ in parts if c.chunk is not None and c.chunk.labels is not None]
        labels = pick(cat(lambda c, i, j: _labels(c.chunk, i, j, labelled[0]))) if labelled else None
        tags = cat(lambda c, i, j: c.chunk.lines[i:j] | (np.int64(c.file_no) << _LINE_BITS))
        return ReadingChunk(
            ts=pick(cat(lambda c, i, j: c.chunk.ts[i:j])), device_codes=pick(cat(lambda c, i, j: c.codes[i:j])),
            device_names=names, values=pick(cat(lambda c, i, j: c.chunk.values[i:j])), channels=first.channels,
            labels=labels, source=first.source if all(c.path == first.source for c, _, _ in parts) else "the logs",
            lines=pick(tags))

    def _forward(self, out: ReadingChunk, last_ts: np.ndarray, last_tag: np.ndarray) -> ReadingChunk:
        """Each device's readings go forward in time in the merged order (files that overlap do not);
        ``lines`` become the rows' own lines again."""
        assert out.lines is not None
        tags = out.lines
        late = increasing(out.device_codes, out.ts, tags, last_ts, last_tag)
        out.lines = tags & ((1 << _LINE_BITS) - 1)
        if not late:
            return out
        keep = np.ones(len(out), dtype=bool)
        for r, prev, prev_tag in late:
            path, line = self.paths[int(tags[r]) >> _LINE_BITS], int(out.lines[r])
            where = f"{self.paths[prev_tag >> _LINE_BITS]}:{prev_tag & ((1 << _LINE_BITS) - 1)}"
            err = LogError(path, line, f"device '{shorten(out.device_names[int(out.device_codes[r])])}': reading at "
                           f"ts {float(out.ts[r])!r} comes after ts {prev!r} ({where}) once the logs are merged by "
                           "time (a device's readings overlap in time between files or stretches of a file); "
                           "give each device's readings once, in time order", NON_MONOTONIC_TS)
            if self.on_error == "raise":
                raise err
            keep[r] = False
            self.stats.record(err)
        return out.take(keep)


def _labels(chunk: Any, i: int, j: int, like: np.ndarray) -> np.ndarray:
    """A chunk's labels, or unknown ones (empty text, NaN numbers: shaped ``like``) where its file has
    no label column and another file has."""
    if chunk.labels is not None:
        return chunk.labels[i:j]
    if like.dtype.kind == "f":
        return np.full((j - i, *like.shape[1:]), np.nan)
    return np.full(j - i, "", dtype=like.dtype)
