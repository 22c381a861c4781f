"""Recorded logs replayed in true time order, whatever order their rows are in.

A log may be sorted by time, grouped by device (all of A, then all of B), or be one of several
files; replay must release every device's readings at their own recorded time, together.  Sorting
a large log in memory would hold all of it, so :class:`ReplayLogs` reads each file twice instead:

1. **Index** (one pass, :mod:`edge_agent.sources.runs`): cut the file into *runs*, stretches in time order.  A run ends where a
   reading goes back in time by more than ``slack`` seconds below the run's latest (jitter between
   devices' clocks below that is no new run).  A run start is noted as its line and byte offset,
   each device's last ts before it (so the parser's rule, a device's ts increases in file order,
   holds across runs: :meth:`LineParser.continue_after`), and for a ``.gz`` a copy of the
   decompressor's state shortly before it (:meth:`Gunzip.checkpoint`, about 45 kB), since a gzip
   stream cannot be entered in the middle.  A time-sorted file is one run, a file grouped by device
   one run per device.
2. **Merge**: one cursor per run reads its stretch (a file handle and one small chunk each) and a
   k-way merge interleaves them by time, a chunk at a time (vectorized): every step takes, from
   each cursor, the rows up to the earliest of the cursors' last buffered times, so at least one
   cursor's chunk is used up per step.  A row's key is its run's running maximum of ts (a run is
   in time order up to ``slack``), at least its device's last key in the file's earlier runs
   (:func:`merge_keys`), so each device's rows keep their file order; ties go to the earlier run.

Memory is bounded by the number of runs, not rows: :data:`ROWS_IN_ALL` rows are buffered in all, split
between the cursors (at most ``rows``, at least :data:`MIN_CURSOR_ROWS` each).  More than ``max_runs`` runs (rows in no usable
order) is refused before any reading goes out, with the command that sorts the log.  Across files,
a device's readings must go forward in time in the merged order (:func:`increasing`, the parser's
rule): a device whose readings overlap in two files is refused at the first overlapping row (or the
row is skipped).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
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
from edge_agent.sources.lines import DEFAULT_CHUNK_ROWS, LineParser
from edge_agent.sources.logs import BROKEN_FILE, Gunzip, broken_reason, log_format, read_log
from edge_agent.sources.numbers import Workspace
from edge_agent.sources.runs import MAX_RUNS, SLACK_S, Index, index_file, merge_keys, sort_hint, with_hint

ROWS_IN_ALL = 32768  # rows the cursors buffer together (a sorted log's one cursor: ``rows``, 8,192)
MIN_CURSOR_ROWS = 256  # rows a cursor buffers at least (smaller parses cost more per row)
_READ = 1 << 18  # bytes read at once, split between the cursors (at least _MIN_READ each)
_MIN_READ = 1 << 14
_LINE_BITS = 40  # a row's tag in the merge: file index << 40 | line


class _Cursor:
    """Reads one run of a file: its chunks, each with its merge keys and the merge's device codes."""

    def __init__(self, idx: Index, k: int, rows: int, read: int, on_error: str, numeric: bool, file_no: int,
                 ws: Workspace) -> None:
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
        self.parser.keys = True  # a replay's readings become results: a ts before 1970 has no key
        self.parser.d.outputs = idx.outputs
        self.parser.d.ws = ws  # the cursors parse one at a time: one set of scratch buffers for all
        self.floor = np.empty(0)  # per device code: its last merge key in the file's earlier runs
        if start.devices is not None:
            names, last_ts, last_line, last_key = start.devices
            codes = self.parser.continue_after(names, last_ts, last_line)
            self.floor = np.full(len(self.parser.d.devices.names), -np.inf)
            self.floor[codes] = last_key[: len(names)]
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
            self.parser.prime(data)
            del data  # held while the chunks are used: the parser's buffer is the one copy (#27 §4)
            yield from self.parser.feed(flush=False)
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
            if self.floor.shape[0] < len(names):
                self.floor = np.concatenate([self.floor, np.full(len(names) - self.floor.shape[0], -np.inf)])
            self.keys = merge_keys(chunk.ts, self.floor[chunk.device_codes], self.top)
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
        self._indexes: list[Index] | None = None
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
            out: list[Index] = []
            for p in self.paths:
                fmt, gz = log_format(p)
                room = self.max_runs - sum(len(i.runs) for i in out)
                out.append(index_file(p, fmt, gz, on_error=self.on_error, numeric=self.numeric, slack=self.slack,
                                      room=room))
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
        per = min(self.rows_buffered, max(MIN_CURSOR_ROWS, ROWS_IN_ALL // runs))
        read = max(_MIN_READ, _READ // runs)
        ws = Workspace()
        cursors = [_Cursor(idx, k, per, read, self.on_error, self.numeric, n, ws)
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
            labels=labels, source=", ".join(dict.fromkeys(c.path for c, _, _ in parts)),
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
