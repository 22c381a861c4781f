"""What every source yields and how it fails: :class:`ReadingChunk`, :class:`LogError`, :class:`ReadStats`."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent import exits

MAX_ERRORS_KEPT = 10
NOTED_ONE_BY_ONE = 10  # skipped readings a live source names one by one; after that, a count once a minute
NOTED_SUMMARY_S = 60.0
log = logging.getLogger(__name__)

# Reason kinds (keys of ReadStats.skipped_by_reason).
BAD_NUMBER = "bad number"
NON_FINITE_VALUE = "non-finite value"
EMPTY_FIELD = "empty field"
MISSING_COLUMN = "missing column"
EXTRA_COLUMN = "extra column"
NON_FINITE_TS = "non-finite ts"
TS_OUT_OF_RANGE = "ts out of range"
TS_AHEAD = "ts ahead of the clock"
NON_MONOTONIC_TS = "non-monotonic ts"
BAD_JSON = "bad json"
BAD_ENCODING = "bad encoding"
BAD_QUOTING = "bad quoting"
BAD_VALUE = "bad value"
BAD_HEADER = "bad header"
LINE_TOO_LONG = "line too long"
LIVE_MAX_LINE = 1 << 20  # bytes of one line a live stream keeps while it waits for its end

# A live source (stdin, a followed file, a sensor) refuses a reading further ahead of the device's clock than
# this: one reading dated 2100 made every later one "non-monotonic", and the device stopped inferring for good.
LIVE_AHEAD_S = 86_400.0
# A reading's ts is seconds since 1970. Where readings become results (the agent), their key is the window's start
# in integer milliseconds, which the contract takes from 0 on: a ts before 1970 made a key every hub refuses, and
# the result's batch, sent again for ever, took its good results down with it (LineParser.keys). Everywhere, a
# float64 holds whole milliseconds exactly only up to 2**53 ms (the year 287,396) either way.
TS_MAX = 2**53 / 1000.0


_NOT_JSON_NUMBER = re.compile(rb"[:\[,]\s*-?(NaN|Infinity)\b")


def bad_json_reason(exc: Exception, line: bytes) -> str:
    """A JSON line's refusal, naming the usual cause: NaN and Infinity, which Python's json.dumps writes, are not
    JSON (a missing reading is null)."""
    if _NOT_JSON_NUMBER.search(line[:65536]):
        return f"bad JSON: NaN and Infinity are not JSON numbers (write null for a missing reading): {exc}"
    return f"bad JSON: {exc}"


def ts_in_range(ts: np.ndarray) -> np.ndarray:
    """Which ``ts`` a reading may have (False for NaN too)."""
    return np.abs(ts) <= TS_MAX


def ts_range_reason(shown: str) -> tuple[str, str]:
    return TS_OUT_OF_RANGE, f"ts {shown} out of range (seconds since 1970, at most {TS_MAX:.6g} either way)"


def ts_before_1970_reason(ts: float) -> tuple[str, str]:
    return TS_OUT_OF_RANGE, f"ts {ts!r} is before 1970: a result's key, its window's start in ms, is 0 or more"


def ts_ahead_reason(ts: float, now: float, ahead_s: float) -> tuple[str, str]:
    unit = "; milliseconds read as seconds? a sensor's unit is sensor_ts_unit" if ts > 1e11 else ""
    return TS_AHEAD, (f"ts {ts!r} is {ts - now:.0f} s ahead of this device's clock (a live reading more than "
                      f"{ahead_s:g} s ahead is refused{unit})")


# --------------------------------------------------------------------------- errors


class LogError(exits.Failure, ValueError):
    """A malformed log line (or header).

    ``str(err)`` is ``"<path>:<line>: <reason>"``, ``line`` is the 1-based
    physical line number (the CSV header is line 1), ``kind`` the short reason
    class used for the skip counters (e.g. ``"bad number"``).
    """

    exit_code = exits.INPUT

    def __init__(self, path: str, line: int, reason: str, kind: str | None = None):
        self.path = str(path)
        self.line = int(line)
        self.reason = reason
        self.kind = kind or reason
        super().__init__(f"{self.path}:{self.line}: {reason}" if self.line > 0 else f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.reason, self.kind))


def file_error(path: str | os.PathLike, reason: str) -> LogError:
    """An error about the whole file (missing, unreadable, unknown format): ``"<path>: <reason>"``."""
    return LogError(str(path), 0, reason, "bad file")


@dataclass
class ReadStats:
    """Counters of a reader.  ``rows_read`` counts rows yielded."""

    lines: int = 0  # physical lines consumed, header included
    rows_read: int = 0
    rows_skipped: int = 0
    blank_lines: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    first_errors: list[LogError] = field(default_factory=list)

    def record(self, err: LogError) -> None:
        """Count a skipped line (the first few errors are kept for the summary)."""
        self.rows_skipped += 1
        self.skipped_by_reason[err.kind] = self.skipped_by_reason.get(err.kind, 0) + 1
        if len(self.first_errors) < MAX_ERRORS_KEPT:
            self.first_errors.append(err)

    def summary(self) -> str:
        s = f"{self.rows_read} rows read, {self.rows_skipped} skipped"
        if self.skipped_by_reason:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())) + ")"
        for e in self.first_errors:
            s += f"\n  {e}"
        return s


class NotedStats(ReadStats):
    """The counters of a live source, which also says what it skipped in the log, since no summary comes at the
    end: the first :data:`NOTED_ONE_BY_ONE` readings one by one, then a count once a minute (a stream of nothing
    but bad lines must not flood the log). ``name`` is the source (a file, ``<stdin>``, a topic or a port)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._summary_due = 0.0
        self._told = 0  # readings skipped as of the last line said

    def record(self, err: LogError) -> None:  # a line of a file or stream the parser refused
        self.note(f"line {err.line}", err.kind, err.reason)

    def note(self, origin: str, kind: str, reason: str, count: int = 1) -> None:
        """Count a reading that is not one (``origin``: where it came from; ``count`` of them) and say so."""
        ReadStats.record(self, LogError(origin, 0, reason, kind))
        if count > 1:
            self.rows_skipped += count - 1
            self.skipped_by_reason[kind] += count - 1
        now = time.monotonic()
        if self.rows_skipped <= NOTED_ONE_BY_ONE:
            log.warning("%s: %s: reading skipped (%s)", self.name, origin, reason)
            self._told = self.rows_skipped
        elif now >= self._summary_due:
            self._summary_due = now + NOTED_SUMMARY_S
            log.warning("%s: %d readings skipped so far (%s); the latest: %s: %s", self.name, self.rows_skipped,
                        ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())), origin, reason)
            self._told = self.rows_skipped

    def final(self) -> None:
        """At the end of a run: the count of what was skipped since the last line said (none: nothing said)."""
        if self.rows_skipped > self._told:
            log.warning("%s: %d readings skipped in all (%s)", self.name, self.rows_skipped,
                        ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())))
            self._told = self.rows_skipped


# --------------------------------------------------------------------------- chunk


@dataclass(eq=False)
class ReadingChunk:
    """A columnar block of readings.

    * ``ts``            float64[n], seconds
    * ``device_codes``  int32[n], index into ``device_names``
    * ``device_names``  tuple of device ids (shared by the chunks of a source; codes are stable for
                        its lifetime, except a live source's past ``MAX_LIVE_DEVICE_CODES`` ids:
                        read a chunk's codes through its own names)
    * ``values``        float32[n, len(channels)], NaN = missing reading
    * ``channels``      tuple of channel names
    * ``labels``        str array [n] (ground truth, "" = unknown) or None
    * ``source``        file path, ``<stdin>``, ``sim:<device>``...
    * ``first_line``    physical line of the first row (0 if not from a file)
    * ``lines``         int64[n] physical line of every row, or None
    """

    ts: np.ndarray
    device_codes: np.ndarray
    device_names: tuple[str, ...]
    values: np.ndarray
    channels: tuple[str, ...]
    labels: np.ndarray | None = None
    source: str = ""
    first_line: int = 0
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def n(self) -> int:
        return len(self)

    @property
    def device_ids(self) -> np.ndarray:
        """Per-row device id as a str array."""
        names = np.array(self.device_names, dtype=str) if self.device_names else np.array([], dtype=str)
        return names[self.device_codes]

    def take(self, index: slice | np.ndarray) -> ReadingChunk:
        """Rows selected by a slice, boolean mask or index array."""
        lines = self.lines[index] if self.lines is not None else None
        first = int(lines[0]) if lines is not None and len(lines) else 0
        return ReadingChunk(
            ts=self.ts[index],
            device_codes=self.device_codes[index],
            device_names=self.device_names,
            values=self.values[index],
            channels=self.channels,
            labels=self.labels[index] if self.labels is not None else None,
            source=self.source,
            first_line=first,
            lines=lines,
        )

    def by_device(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Split per device: ``{device_id: (ts, values, labels)}`` in file order
        within each device.  Vectorized (one radix argsort, no per-row loop)."""
        n = len(self)
        if n == 0:
            return {}
        codes = self.device_codes
        c0 = codes[0]
        if (codes == c0).all():
            return {self.device_names[int(c0)]: (self.ts, self.values, self.labels)}
        order = group_order(codes, len(self.device_names))
        sc = codes[order]
        starts = np.flatnonzero(np.concatenate(([True], sc[1:] != sc[:-1])))
        ends = np.append(starts[1:], n)
        ts = self.ts[order]
        vals = self.values[order]
        labs = self.labels[order] if self.labels is not None else None
        out = {}
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            out[self.device_names[int(sc[s])]] = (
                ts[s:e],
                vals[s:e],
                labs[s:e] if labs is not None else None,
            )
        return out

    @staticmethod
    def concat(chunks: Sequence[ReadingChunk]) -> ReadingChunk:
        """Concatenate chunks (device codes are re-mapped if sources differ)."""
        chunks = list(chunks)
        if not chunks:
            raise ValueError("concat of no chunks")
        if len(chunks) == 1:
            return chunks[0]
        channels = chunks[0].channels
        for c in chunks:
            if c.channels != channels:
                raise ValueError(f"channel mismatch: {c.channels} != {channels}")
        names = max((c.device_names for c in chunks), key=len)
        if all(names[: len(c.device_names)] == c.device_names for c in chunks):
            codes = np.concatenate([c.device_codes for c in chunks])
        else:
            index: dict[str, int] = {}
            parts = []
            for c in chunks:
                remap = np.array([index.setdefault(nm, len(index)) for nm in c.device_names], dtype=np.int32)
                parts.append(remap[c.device_codes] if len(remap) else c.device_codes)
            names = tuple(index)
            codes = np.concatenate(parts)
        has_labels = all(c.labels is not None for c in chunks)
        has_lines = all(c.lines is not None for c in chunks)
        return ReadingChunk(
            ts=np.concatenate([c.ts for c in chunks]),
            device_codes=codes.astype(np.int32, copy=False),
            device_names=tuple(names),
            values=np.concatenate([c.values for c in chunks]),
            channels=channels,
            labels=np.concatenate([c.labels for c in chunks]) if has_labels else None,
            source=chunks[0].source,
            first_line=chunks[0].first_line,
            lines=np.concatenate([c.lines for c in chunks]) if has_lines else None,
        )


def group_order(codes: np.ndarray, ncodes: int) -> np.ndarray:
    """Stable argsort of small integer codes (radix sort through uint16)."""
    if ncodes <= 0xFFFF:
        return np.argsort(codes.astype(np.uint16), kind="stable")
    return np.argsort(codes, kind="stable")




def grow_last(last_ts: np.ndarray, last_tag: np.ndarray, ncodes: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-code state of :func:`increasing` grown to ``ncodes`` codes (new codes: no reading yet)."""
    grow = ncodes - last_ts.shape[0]
    if grow <= 0:
        return last_ts, last_tag
    return (np.concatenate([last_ts, np.full(grow, -np.inf)]),
            np.concatenate([last_tag, np.zeros(grow, dtype=np.int64)]))


def increasing(codes: np.ndarray, ts: np.ndarray, tags: np.ndarray, last_ts: np.ndarray,
               last_tag: np.ndarray) -> list[tuple[int, float, int]]:
    """The rule that a device's readings go forward in time: per device code, ``ts`` increases strictly.

    ``last_ts`` / ``last_tag`` (indexed by code, see :func:`grow_last`) hold each device's latest ts and
    where it came from (a line, or any int the caller decodes); they are updated in place with the rows
    that pass, in order.  Returns the rows that fail as ``(row, previous ts, previous tag)`` (usually
    none: checked vectorized, walked row by row only when a row fails)."""
    n = ts.shape[0]
    if n == 0:
        return []
    single = bool((codes == codes[0]).all())
    order = None if single else group_order(codes, last_ts.shape[0])
    sc, st = (codes, ts) if order is None else (codes[order], ts[order])
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sc[1:], sc[:-1], out=first[1:])
    prev = np.empty(n)
    prev[1:] = st[:-1]
    prev[first] = last_ts[sc[first]]
    if not (st <= prev).any():
        last = np.append(np.flatnonzero(first)[1:] - 1, n - 1)
        last_ts[sc[last]] = st[last]
        last_tag[sc[last]] = (tags if order is None else tags[order])[last]
        return []
    late = []  # rare: walk the rows in their order
    for r, (t, c, tag) in enumerate(zip(ts.tolist(), codes.tolist(), tags.tolist(), strict=True)):
        if t > last_ts[c]:
            last_ts[c], last_tag[c] = t, tag
        else:
            late.append((r, float(last_ts[c]), int(last_tag[c])))
    return late
