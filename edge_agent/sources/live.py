"""Live sources.

:class:`SimulatedSensor` is a
seeded synthetic IMU-like signal with a hidden, changing activity class; :class:`JsonLinesStream`
(and :func:`StdinSource`) read JSON lines from a stream; :class:`FollowFile` follows a growing CSV /
JSONL log like ``tail -f``.  Streams parse with the log reader's :class:`LineParser`: the same
rules and the same ``name:line`` errors as a recorded log.
"""

from __future__ import annotations

import io
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, BinaryIO, TextIO

import numpy as np

from edge_agent.sources.chunk import LogError, NotedStats, ReadingChunk
from edge_agent.sources.lines import DEFAULT_CHUNK_ROWS, LineParser
from edge_agent.sources.logs import log_format


class SimulatedSensor:
    """Deterministic synthetic sensor(s).

    Each device emits ``channels`` at ``rate_hz``: per channel a sinusoid whose frequency, amplitude
    and offset depend on a hidden activity class, plus Gaussian noise.  The class changes every
    ``segment_s`` seconds (seeded) and is emitted as ``label``.  Chunks of ``chunk_s`` seconds are
    released in real time scaled by ``speed`` (``0``: as fast as possible); ``limit`` (samples per
    device) or ``duration_s`` bound the stream, ``stop()`` ends it; ``missing_rate`` makes a
    fraction of the values NaN (missing readings).
    """

    def __init__(self, device_id: str | Sequence[str] = "sim-0",
                 channels: Sequence[str] = ("ax", "ay", "az", "wx", "wy", "wz"), rate_hz: float = 50.0,
                 seed: int = 0, labels: Sequence[str] | None = ("idle", "walk", "run", "lift"), *,
                 segment_s: float = 10.0, chunk_s: float = 0.2, limit: int | None = None,
                 duration_s: float | None = None, start_ts: float = 0.0, speed: float = 1.0, noise: float = 0.05,
                 missing_rate: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep, stop_event: threading.Event | None = None):
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        self.devices = (device_id,) if isinstance(device_id, str) else tuple(device_id)
        if not self.devices:
            raise ValueError("no device_id")
        self.channels, self.rate_hz, self.seed = tuple(channels), float(rate_hz), seed
        self.class_names = tuple(labels) if labels else ("c0", "c1", "c2")
        self.has_labels = bool(labels)
        self.segment_s = segment_s
        self.chunk_rows = max(1, int(round(chunk_s * rate_hz)))
        if duration_s is not None:
            by_time = int(math.floor(duration_s * rate_hz + 1e-9))
            limit = by_time if limit is None else min(limit, by_time)
        self.limit, self.start_ts, self.speed, self.noise = limit, start_ts, speed, noise
        self.missing_rate, self.clock, self.sleep = missing_rate, clock, sleep
        self.stop_event = stop_event or threading.Event()
        self.source = "sim:" + ",".join(self.devices)
        K, C = len(self.class_names), len(self.channels)
        prm = np.random.default_rng([seed, 0x5EED])
        base = 0.4 + 1.6 * np.arange(K)  # Hz, class dependent bands
        self._freq = base[:, None] * (1.0 + 0.25 * prm.random((K, C)))
        self._amp = (0.2 + 0.8 * (np.arange(K) + 1) / K)[:, None] * (0.5 + prm.random((K, C)))
        self._offset = prm.normal(0.0, 0.5, (K, C))
        self._phase = prm.uniform(0, 2 * np.pi, (len(self.devices), C))

    def stop(self) -> None:
        self.stop_event.set()

    def _classes(self, rng: np.random.Generator, upto: int, seq: list[int]) -> None:
        K = len(self.class_names)
        while len(seq) <= upto:
            c = int(rng.integers(K))
            seq.append((c + 1) % K if seq and c == seq[-1] and K > 1 else c)

    def __iter__(self) -> Iterator[ReadingChunk]:
        D, C = len(self.devices), len(self.channels)
        rngs_cls = [np.random.default_rng([self.seed, 1, d]) for d in range(D)]
        rngs_noise = [np.random.default_rng([self.seed, 2, d]) for d in range(D)]
        seqs: list[list[int]] = [[] for _ in range(D)]
        names_arr = np.array(self.class_names)
        seg_len = max(1, int(round(self.segment_s * self.rate_hz)))
        k, t0_clock = 0, None  # samples emitted per device, wall clock of sample 0
        while not self.stop_event.is_set():
            n = self.chunk_rows if self.limit is None else min(self.chunk_rows, self.limit - k)
            if n <= 0:
                return
            idx = np.arange(k, k + n)
            t = idx / self.rate_hz
            vals = np.empty((n, D, C), dtype=np.float64)
            cls = np.empty((n, D), dtype=np.int64)
            for d in range(D):
                seg = idx // seg_len
                self._classes(rngs_cls[d], int(seg[-1]), seqs[d])
                c = cls[:, d] = np.asarray(seqs[d])[seg]
                v = self._offset[c] + self._amp[c] * np.sin(2 * np.pi * self._freq[c] * t[:, None] + self._phase[d])
                v += rngs_noise[d].normal(0.0, self.noise, (n, C))
                if self.missing_rate > 0:
                    v[rngs_noise[d].random((n, C)) < self.missing_rate] = np.nan
                vals[:, d, :] = v
            k += n
            chunk = ReadingChunk(
                ts=np.repeat(self.start_ts + t, D), device_codes=np.tile(np.arange(D, dtype=np.int32), n),
                device_names=self.devices, values=vals.reshape(n * D, C).astype(np.float32),
                channels=self.channels, labels=names_arr[cls.reshape(-1)] if self.has_labels else None,
                source=self.source)
            if self.speed > 0 and not math.isinf(self.speed):
                if t0_clock is None:
                    t0_clock = self.clock() - float(t[0]) / self.speed
                delay = t0_clock + float(t[-1]) / self.speed - self.clock()  # due once its last sample is taken
                if delay > 0:
                    self.sleep(delay)
            if self.stop_event.is_set():
                return
            yield chunk


class _Lines:
    """A source whose lines go through a :class:`LineParser` (schema, rules, ``name:line`` errors)."""

    parser: LineParser

    @property
    def channels(self) -> tuple[str, ...] | None:
        return self.parser.channels

    @property
    def has_labels(self) -> bool | None:
        return self.parser.has_labels


QUIET_TICK_S = 0.5  # a live stream that gives nothing: the agent's idle work runs this often meanwhile


class JsonLinesStream(_Lines):
    """JSON lines from a live stream (a text or binary file object, e.g. stdin):
    ``{"ts":..., "device_id":..., "<channel>":..., "label":...}``.

    Channels come from the first record unless given (then ``label`` is accepted unless
    ``has_labels=False``).  With a binary buffer (``read1``) the lines available so far form one
    chunk; otherwise up to ``chunk_rows`` lines are read at a time.
    """

    def __init__(self, file_obj: TextIO | BinaryIO, *, name: str | None = None,
                 channels: Sequence[str] | None = None, has_labels: bool | None = None, chunk_rows: int = 1024,
                 on_error: str = "raise", format: str = "jsonl", noted: bool = False,
                 stop: threading.Event | None = None, idle: Callable[[], None] | None = None):
        self.file = file_obj
        self.stop, self.idle = stop, idle  # a live agent's: see _readable
        name = name or getattr(file_obj, "name", None)
        self.name = name if isinstance(name, str) else "<stream>"
        self.parser = LineParser(self.name, format, on_error=on_error, chunk_rows=chunk_rows, channels=channels,
                                 has_labels=has_labels)
        self.parser.keys = True  # the agent's: its readings become results
        if noted:  # a live stream: what it skips is said as it comes (no summary comes at the end)
            self.parser.live(NotedStats(self.name))
        self.stats = self.parser.stats

    def _reader(self) -> Callable[[], bytes]:
        f = self.file
        raw: Any = getattr(f, "buffer", None)
        if isinstance(f, io.TextIOWrapper) and hasattr(raw, "read1"):
            return lambda: raw.read1(1 << 16)
        if hasattr(f, "read1") and not isinstance(f, io.TextIOBase):
            return lambda: f.read1(1 << 16)

        def read_lines() -> bytes:
            parts = []
            for _ in range(self.parser.chunk_rows):
                ln = f.readline()
                parts.append(ln.encode("utf-8", "surrogateescape") if isinstance(ln, str) else ln)
                if not parts[-1].endswith(b"\n"):
                    break
            return b"".join(parts)

        return read_lines

    def __iter__(self) -> Iterator[ReadingChunk]:
        read = self._reader()
        while self._readable() and (data := read()):
            yield from self.parser.feed(data)
        yield from self.parser.feed(final=True)

    def _readable(self) -> bool:
        """With ``stop`` (a live agent's stream): wait until the stream has data, calling ``idle`` every
        :data:`QUIET_TICK_S` meanwhile; False once ``stop`` is set. A blocking read had held the agent for as long
        as its stdin was open and quiet: no status, no model update, no round, and SIGTERM unheard (a hostile
        peer's finding). Each read takes all the buffer holds (``read1`` of 64 KiB from a buffer of 8), so the
        descriptor alone tells whether data waits."""
        if self.stop is None:
            return True
        try:
            fd = self.file.fileno()
        except (AttributeError, OSError, ValueError):  # not a real stream (a test's BytesIO): it never blocks
            return not self.stop.is_set()
        while not self.stop.is_set():
            try:
                if select.select([fd], [], [], QUIET_TICK_S)[0]:
                    return True
            except (OSError, ValueError):  # closed under us: the read says so
                return True
            if self.idle is not None:
                self.idle()
        return False


def StdinSource(**kwargs: Any) -> JsonLinesStream:
    """JSON lines from standard input (errors name ``<stdin>:line``)."""
    kwargs.setdefault("name", "<stdin>")
    return JsonLinesStream(sys.stdin, **kwargs)


# A log rotated by rename and create: the renamed file is read on until it has given nothing for this long.
ROTATE_GRACE_S = 5.0


class FollowFile(_Lines):
    """Follow a CSV / JSONL log as it grows (like ``tail -f``).

    The schema is read at construction when the file exists (``channels`` is None until it does).
    Complete lines are parsed as they appear; a partial last line waits for its newline.
    ``from_end=True`` skips the lines already there.  Iteration ends once :meth:`stop` is called (or
    ``stop_event`` set) and the data written so far is consumed; a partial line left then is counted
    as skipped (``"partial line at stop"``).  ``sleep`` defaults to waiting on the stop event.
    """

    def __init__(self, path: str | os.PathLike, *, poll_s: float = 0.2, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 on_error: str = "raise", format: str | None = None, from_end: bool = False,
                 stop_event: threading.Event | None = None, sleep: Callable[[float], Any] | None = None,
                 noted: bool = False, rotate_grace_s: float = ROTATE_GRACE_S):
        self.path = str(path)
        self.rotate_grace_s = rotate_grace_s
        self._quiet_since: float | None = None  # a rotated file: since when it has given nothing
        fmt, gz = log_format(path) if format is None else (format, False)
        if gz:
            raise ValueError("cannot follow a gzip file")
        self.poll_s, self.from_end = poll_s, from_end
        self.stop_event = stop_event or threading.Event()
        self._sleep = sleep or self.stop_event.wait
        self._parser_args = (fmt, on_error, chunk_rows)
        self.parser = LineParser(self.path, fmt, on_error=on_error, chunk_rows=chunk_rows)
        self.parser.keys = True  # the agent's: its readings become results
        if noted:  # a followed file (the agent's): live
            self.parser.live(NotedStats(self.path))
        self.stats = self.parser.stats
        self._f: BinaryIO | None = None
        self._pos = 0
        self._columns: tuple[tuple[str, ...] | None, bool | None] | None = None  # a rotated CSV's, until its header
        self._open()

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __del__(self) -> None:
        if self.__dict__.get("_f") is not None:
            self.close()

    def _read(self, n: int) -> bytes:
        assert self._f is not None
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def _open(self) -> bool:
        """Open the file if it exists, read its schema (and skip the lines there with ``from_end``)."""
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - kept open while following
            except FileNotFoundError:
                return False
            while not self.parser.prime(data := self._read(1 << 16)) and data:
                pass
            while self.from_end and self.parser.ready:
                self.parser.skip_complete_lines()
                if not (data := self._read(1 << 20)):
                    break
                self.parser.prime(data)
        return True

    def __iter__(self) -> Iterator[ReadingChunk]:
        try:
            while True:
                stopping = self.stop_event.is_set()
                if not self._open():
                    if stopping:
                        return
                    self._sleep(self.poll_s)
                    continue
                got = yield from self._new_lines()
                if stopping:
                    if self.parser.partial.strip():
                        self.stats.record(LogError(self.path, self.parser.line, "partial line at stop (no newline)",
                                                   "partial line at stop"))
                    return
                if not got:
                    self._sleep(self.poll_s)
        finally:
            self.close()

    def _new_lines(self) -> Generator[ReadingChunk, None, bool]:
        """Chunks of what was appended since the last poll; returns whether anything was."""
        assert self._f is not None
        self._check_columns()
        yield from self.parser.feed()  # lines buffered while reading the schema
        got = False
        while True:
            if os.fstat(self._f.fileno()).st_size < self._pos:
                raise LogError(self.path, self.parser.line, "file truncated while following", "truncated")
            data = self._read(1 << 20)
            if not data:
                if not self._rotated():
                    return got
                # The logger may write to the renamed file until it reopens the path: read it on until it has
                # been quiet for a while (its lines all come before the new file's).
                now = time.monotonic()
                if self._quiet_since is None:
                    self._quiet_since = now
                if now - self._quiet_since < self.rotate_grace_s:
                    return got
                self._quiet_since = None
                yield from self._next_file()
                if self._f is None:  # the new file went away again: waited for as at the start
                    return got
                continue
            got, self._quiet_since = True, None
            if self._columns is not None:  # a rotated file's header came: its columns before its rows
                self.parser.prime(data)
                data = b""
                self._check_columns()
            yield from self.parser.feed(data)

    def _rotated(self) -> bool:
        """The path names another file now (a log rotated by rename and create): the one open is read to its end.
        Until the new one is created, the renamed one is read on."""
        assert self._f is not None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        was = os.fstat(self._f.fileno())
        return (now.st_ino, now.st_dev) != (was.st_ino, was.st_dev)

    def _next_file(self) -> Generator[ReadingChunk, None, None]:
        """Go on with the new file at the path, from its start (a CSV's header too): the same columns (a CSV's
        are checked once its header is there: logrotate creates the file empty), each device's time forward."""
        yield from self.parser.feed()  # (every complete line is parsed already)
        old = self.parser
        if old.partial.strip():
            self.stats.record(LogError(self.path, old.line, "partial line at rotation (no newline)",
                                       "partial line at rotation"))
        fmt, on_error, chunk_rows = self._parser_args
        self.close()
        jsonl = fmt == "jsonl"  # its columns are given: a record's keys may come in any order
        self.parser = LineParser(self.path, fmt, on_error=on_error, chunk_rows=chunk_rows,
                                 channels=old.channels if jsonl else None, has_labels=old.has_labels if jsonl else None)
        self.parser.stats = self.stats  # one count for the path
        self.parser.ahead_s, self.parser.keys, self.parser.numeric_labels = old.ahead_s, old.keys, old.numeric_labels
        self.parser.max_line = old.max_line
        self.parser.continue_after(*old.last_readings())
        self._columns = None if jsonl else (old.channels, old.has_labels)
        self._pos, self.from_end = 0, False
        if self._open():
            self._check_columns()

    def _check_columns(self) -> None:
        if self._columns is not None and self.parser.ready:
            if (self.parser.channels, self.parser.has_labels) != self._columns:
                raise LogError(self.path, 1, f"the file that replaced it has other columns ({self.parser.channels} "
                                             f"instead of {self._columns[0]})", "bad header")
            self._columns = None
