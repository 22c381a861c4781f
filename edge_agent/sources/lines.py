"""Lines of a CSV / JSON Lines log in, columnar chunks out: :class:`LineParser`, fed bytes as they come.

The recorded logs (``logs.py``) and the live sources (``live.py``) both parse through it. It cuts the lines
into blocks of at most 2048 (bigger temporaries are mmap'd by malloc and page-fault on every block) that
``formats.py`` decodes, so results never depend on chunking; state that spans lines (device and label
codes, the last ts per device, the skip/raise policy, a live source's clock bound and line cap) lives here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from edge_agent.sources.chunk import (
    LINE_TOO_LONG,
    LIVE_AHEAD_S,
    LIVE_MAX_LINE,
    NON_MONOTONIC_TS,
    LogError,
    ReadingChunk,
    ReadStats,
    grow_last,
    increasing,
    ts_ahead_reason,
    ts_before_1970_reason,
)
from edge_agent.sources.formats import Block, Csv, Decoder, Jsonl, Rules, shorten

DEFAULT_CHUNK_ROWS = 8192
_PART_ROWS = 2048  # lines parsed at once
MAX_LIVE_DEVICE_CODES = 1 << 12  # distinct device ids a live source keeps coded; past it only the latest stay
LIVE_DEVICES_KEPT = 64  # ... the devices read most recently, whose readings' order is still checked
MAX_LABEL_CODES = 1 << 14  # distinct labels kept coded between blocks (~5 MB); past it the table starts afresh
LIVE_REANCHOR_READINGS = 50
"""A live device's readings that keep coming dated before its last one, this many in a row and each later than the
one before it, while that one is still ahead of the device's clock: it is taken for a glitch of the sensor's clock (a reading 12 h ahead made every later
one "non-monotonic" until the clock caught up: 12 h of readings skipped), and its readings go on from there."""

log = logging.getLogger(__name__)


class LineParser:
    """Bytes of a CSV / JSON Lines log in, :class:`ReadingChunk` out, as the bytes come.

    :meth:`prime` buffers data until the schema is known (the CSV header, or the first JSON record
    unless ``channels`` are given); :meth:`feed` parses the complete lines buffered so far.  State
    that spans lines lives here: device and label codes, the last ts per device, the error policy.
    """

    def __init__(self, source: str, fmt: str, *, on_error: str = "raise", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 channels: Sequence[str] | None = None, has_labels: bool | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"unknown format {fmt!r}")
        self.source, self.format, self.on_error, self.chunk_rows = source, fmt, on_error, chunk_rows
        self.stats = ReadStats()
        self.line = 1  # physical line of the next byte in the buffer
        self.d = Decoder(source)
        self._fmt: Csv | Jsonl | None = None
        self._given = (tuple(channels), has_labels is not False) if channels is not None and fmt == "jsonl" else None
        self.numeric_labels = False  # labels as numbers (regression targets): see LogReader.labels_as_numbers
        self.ahead_s: float | None = None  # a live source: readings further ahead of the clock are refused
        self.keys = False  # the readings become results (the agent's): a ts before 1970 is refused (no key)
        self.max_line: int | None = None  # a live stream: a line longer than this is skipped, not buffered for ever
        self._cutting = False  # the rest of such a line is being dropped, up to its newline
        self._buf = b""
        self._acc: list[ReadingChunk] = []
        self._acc_lines = 0
        self._last_ts = np.empty(0)
        self._last_line = np.empty(0, dtype=np.int64)
        self._behind = np.empty(0, dtype=np.int64)  # a live source: each device's late readings in a row
        self._behind_ts = np.empty(0)  # ... and the ts of the latest of them
        self._glitch_said = -math.inf  # when a re-anchored device was last said

    def live(self, stats: ReadStats) -> None:
        """A live source's parser: what it skips is said as it comes (``stats``: a NotedStats), a reading more than
        a day ahead of the clock is refused, and a line that never ends is not kept whole."""
        self.stats, self.ahead_s, self.max_line = stats, LIVE_AHEAD_S, LIVE_MAX_LINE

    @property
    def ready(self) -> bool:
        return self._fmt is not None

    @property
    def channels(self) -> tuple[str, ...] | None:
        return self.d.rules.channels if self.ready else None

    @property
    def has_labels(self) -> bool | None:
        return self.d.rules.has_labels if self.ready else None

    @property
    def partial(self) -> bytes:
        return self._buf

    def prime(self, data: bytes = b"") -> bool:
        """Buffer ``data`` and set up the schema when it can be; True once it is."""
        if data and self._cutting:  # the rest of a line too long to keep: dropped up to its newline
            nl = data.find(b"\n")
            if nl < 0:
                return self._fmt is not None
            data, self._cutting = data[nl + 1:], False
            self.line += 1
            self.stats.lines += 1
        if data:
            self._buf = self._buf + data if self._buf else data
        if self._fmt is None:
            self._setup()
        return self._fmt is not None

    def _setup(self) -> None:
        buf = self._buf
        if self.format == "csv":
            end = buf.find(b"\n") + 1
            if end:
                self._fmt = Csv(self.d, buf[:end])
                self._buf, self.line = buf[end:], 2
                self.stats.lines += 1  # the header (added: a followed log's next file counts on)
            return
        if self._given is None:
            start = skipped = 0  # skip mode (a live stream): bad lines before the first good record are dropped
            for lineno, ln in enumerate(buf.split(b"\n")[:-1], self.line):
                if ln.strip():
                    try:
                        self._given = Jsonl.schema(self.source, ln, lineno)
                        break
                    except LogError as err:
                        if self.on_error == "raise":
                            raise
                        self.stats.record(err)
                        skipped = start + len(ln) + 1
                start += len(ln) + 1
            if skipped:  # the next record may fix the channels
                lines = buf.count(b"\n", 0, skipped)
                self._buf, self.line, self.stats.lines = buf[skipped:], self.line + lines, self.stats.lines + lines
            if self._given is None:
                return
        self.d.rules = Rules(*self._given)
        self._fmt = Jsonl(self.d)

    def feed(self, data: bytes = b"", *, flush: bool = True, final: bool = False) -> Iterator[ReadingChunk]:
        """Chunks from the complete lines buffered (``final``: the last line needs no newline).

        With ``flush`` every complete line is parsed now; without, only whole chunks of
        ``chunk_rows`` lines are yielded (a file read in blocks).  In raise mode the rows before a
        bad line are yielded first, then its :class:`LogError` is raised.
        """
        if final and (data or self._buf)[-1:] not in (b"", b"\n"):
            data += b"\n"
        if not self.prime(data):
            self._cut_long_line()
            return
        buf = self._buf
        nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
        i = off = 0
        while i < nl.shape[0]:
            want = min(_PART_ROWS, self.chunk_rows - self._acc_lines)
            k = min(want, nl.shape[0] - i)
            if k < want and not flush:
                break
            end = int(nl[i + k - 1]) + 1
            error = self._part(buf[off:end], k)
            off, i = end, i + k
            if error is not None:
                self._buf = buf[off:]
                yield from self._take()
                raise error
            if self._acc_lines == self.chunk_rows:
                yield from self._take()
        self._buf = buf[off:]
        if flush:
            yield from self._take()
            self._cut_long_line()

    def _cut_long_line(self) -> None:
        """A live stream's partial line past ``max_line`` bytes (a writer that never ends its line): skipped."""
        if self.max_line is None or len(self._buf) <= self.max_line or b"\n" in self._buf:
            return
        err = LogError(self.source, self.line, f"a line longer than {self.max_line} bytes: skipped to its end",
                       LINE_TOO_LONG)
        self._buf, self._cutting = b"", True
        if self.on_error == "raise":
            raise err
        self.stats.record(err)

    def _take(self) -> Iterator[ReadingChunk]:
        acc, self._acc, self._acc_lines = self._acc, [], 0
        if acc:
            yield acc[0] if len(acc) == 1 else ReadingChunk.concat(acc)

    def skip_complete_lines(self) -> None:
        """Drop the buffered complete lines (counted in ``stats.lines``): follow from the end."""
        end = self._buf.rfind(b"\n") + 1
        n = self._buf.count(b"\n", 0, end)
        self.line += n
        self.stats.lines += n
        self._buf = self._buf[end:]

    @staticmethod
    def _refuse(b: Block, rows: np.ndarray, reason: Callable[[float], tuple[str, str]]) -> bool:
        """The ``rows`` of ``b`` are problems, for ``reason(ts)``; True when no row is left."""
        if rows.any():
            for r in np.flatnonzero(rows).tolist():
                b.problems.append((int(b.lines[r]), *reason(float(b.ts[r]))))
            b.keep(~rows)
        return b.ts.shape[0] == 0

    def last_readings(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(devices, each one's last ts, its line) so far: for :meth:`continue_after` in another parser."""
        names = list(self.d.devices.names)
        self._last_ts, self._last_line = grow_last(self._last_ts, self._last_line, len(names))
        return names, self._last_ts[: len(names)].copy(), self._last_line[: len(names)].copy()

    def continue_after(self, devices: Sequence[str], last_ts: np.ndarray, last_line: np.ndarray) -> np.ndarray:
        """Parse from the middle of a file whose earlier lines (read elsewhere) left ``devices[i]`` at
        ``last_ts[i]`` (line ``last_line[i]``): the rule that a device's ts increases holds across.
        Returns the devices' codes in this parser's chunks."""
        if not devices:
            return np.empty(0, dtype=np.int32)
        codes = self.d.devices.encode_values(list(devices))
        self._last_ts, self._last_line = grow_last(self._last_ts, self._last_line, len(self.d.devices.names))
        self._last_ts[codes] = last_ts[: len(devices)]
        self._last_line[codes] = last_line[: len(devices)]
        return codes

    def _part(self, block: bytes, nlines: int) -> LogError | None:
        """Parse one block of lines into the current chunk; the error to raise, if any."""
        assert self._fmt is not None
        b = self._fmt.parse(block, self.line, nlines)
        self.line += nlines
        self.stats.lines += nlines
        self.stats.blank_lines += b.blank
        self._acc_lines += nlines
        if b.lab is not None:
            if self.numeric_labels:
                self.d.check_label_numbers(b)
            else:
                self.d.check_label_text(b)
        self._times(b)
        error = None
        if b.problems:
            b.problems.sort()
            if self.on_error == "raise":
                line, kind, reason = b.problems[0]
                error = LogError(self.source, line, reason, kind)
                b.keep(b.lines < line)
            else:
                for line, kind, reason in b.problems:
                    self.stats.record(LogError(self.source, line, reason, kind))
        self.stats.rows_read += b.ts.shape[0]
        if b.ts.shape[0]:
            if b.lab is None:
                labels = None
            elif self.numeric_labels:
                labels = self.d.label_numbers(b.lab)
            else:
                labels = self.d.labels.names_array[b.lab]
            self._acc.append(ReadingChunk(
                ts=b.ts, device_codes=b.dev, device_names=self.d.devices.names_tuple, values=b.vals,
                channels=self.d.rules.channels, labels=labels, source=self.source, first_line=int(b.lines[0]),
                lines=b.lines))
        if len(self.d.labels.names) > MAX_LABEL_CODES:
            self.d.forget_labels()
        if self.ahead_s is not None and len(self.d.devices.names) > MAX_LIVE_DEVICE_CODES:
            self._forget_devices()
        return error

    def _reanchor(self, b: Block, late: list[tuple[int, float, int]], last_ts: np.ndarray, last_line: np.ndarray
                  ) -> list[tuple[int, float, int]]:
        """A live source's rule on late readings: a device whose readings come dated before its last one
        :data:`LIVE_REANCHOR_READINGS` times in a row, each later than the one before, while that one is ahead of the
        clock, goes on from them (its last reading was the glitch). ``last_ts``/``last_line``: the devices' state before the block. Returns the rows
        that stay late."""
        nd = last_ts.shape[0]
        if self._behind.shape[0] < nd:
            grow = nd - self._behind.shape[0]
            self._behind = np.concatenate([self._behind, np.zeros(grow, np.int64)])
            self._behind_ts = np.concatenate([self._behind_ts, np.full(grow, -np.inf)])
        if not late:
            if self._behind.any():
                self._behind[b.dev] = 0  # every device of the block went forward
            return late
        out = []  # rare: the block walked again from the state before it, as increasing() walks it
        behind, behind_ts, now = self._behind, self._behind_ts, time.time()
        for r, (t, c, line) in enumerate(zip(b.ts.tolist(), b.dev.tolist(), b.lines.tolist(), strict=True)):
            if t > last_ts[c]:
                last_ts[c], last_line[c], behind[c] = t, line, 0
                continue
            behind[c] = behind[c] + 1 if behind[c] and t > behind_ts[c] else 1
            behind_ts[c] = t
            # only a last reading ahead of the clock can be the glitch: a sensor clock reset to 1970, or a second
            # writer whose clock is behind, keeps its readings refused
            if behind[c] < LIVE_REANCHOR_READINGS or last_ts[c] <= now:
                out.append((r, float(last_ts[c]), int(last_line[c])))
                continue
            if (said := time.monotonic()) - self._glitch_said >= 60.0:
                self._glitch_said = said
                log.warning("%s: line %d: %d readings of device '%s' in a row dated before its reading of line %d "
                            "(ts %r, %.0f s ahead of them): that one taken for a glitch of the sensor's clock, the "
                            "readings go on from this line", self.source, line, int(behind[c]),
                            shorten(self.d.devices.names[c]), int(last_line[c]), float(last_ts[c]),
                            float(last_ts[c]) - t)
            last_ts[c], last_line[c], behind[c] = t, line, 0
        self._last_ts, self._last_line = last_ts, last_line
        return out

    def _forget_devices(self) -> None:
        """A live source naming ever new device ids (a writer's bug, a hostile peer on the stream) grew the device
        table for as long as it ran (~300 bytes an id). Past :data:`MAX_LIVE_DEVICE_CODES` ids the table starts
        afresh with the :data:`LIVE_DEVICES_KEPT` devices read most recently, each keeping its last ts (its
        readings must still go forward); a device forgotten and met again starts afresh. A live agent runs one
        device and skips the others' readings; a chunk's codes index its own ``device_names``, so nothing
        downstream sees the change. A log (replay, training) keeps every device."""
        names, last_ts, last_line = self.last_readings()
        keep = np.argsort(last_ts, kind="stable")[-LIVE_DEVICES_KEPT:]
        self.d.forget_devices()
        self._last_ts, self._last_line = np.empty(0), np.empty(0, dtype=np.int64)
        self._behind, self._behind_ts = np.empty(0, dtype=np.int64), np.empty(0)
        self.continue_after([names[i] for i in keep], last_ts[keep], last_line[keep])

    def _times(self, b: Block) -> None:
        """The rules on a row's time that need more than its line: before 1970 where it would be a key, ahead of
        the clock on a live source, then, per device, ts must increase strictly (a row at or below the device's
        last ts is a problem). The first two go first: such a row must not become a device's last ts."""
        nd = len(self.d.devices.names)
        if b.ts.shape[0] == 0:
            return
        if self.keys and self._refuse(b, b.ts < 0.0, ts_before_1970_reason):
            return
        if self.ahead_s is not None:
            now, ahead_s = time.time(), self.ahead_s
            if self._refuse(b, b.ts > now + ahead_s, lambda ts: ts_ahead_reason(ts, now, ahead_s)):
                return
        self._last_ts, self._last_line = grow_last(self._last_ts, self._last_line, nd)
        before = (self._last_ts.copy(), self._last_line.copy()) if self.ahead_s is not None else None
        late = increasing(b.dev, b.ts, b.lines, self._last_ts, self._last_line)
        if before is not None:
            late = self._reanchor(b, late, *before)
        if not late:
            return
        bad = np.zeros(b.ts.shape[0], dtype=bool)
        names = self.d.devices.names
        for r, prev, prev_line in late:
            bad[r] = True
            b.problems.append((int(b.lines[r]), NON_MONOTONIC_TS,
                               f"non-monotonic ts {float(b.ts[r])!r} for device '{shorten(names[int(b.dev[r])])}' "
                               f"(previous {prev!r} at line {prev_line})"))
        b.keep(~bad)
