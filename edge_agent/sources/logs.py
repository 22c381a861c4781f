"""Recorded logs: CSV and JSON Lines (optionally gzip) read as columnar chunks, with located errors.

:func:`read_log` -> :class:`LogReader`, an iterator of :class:`ReadingChunk` that raises
:class:`LogError` (file, 1-based physical line, reason) at the first bad line, or with
``on_error="skip"`` drops bad lines and counts them per reason in ``reader.stats``. The lines are
parsed by :class:`~edge_agent.sources.lines.LineParser` (``lines.py``), as the live sources' are; the
file is read here, through a streaming gunzip that names the line where a truncated .gz breaks.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from typing import Any

from edge_agent.sources.chunk import BAD_HEADER, LogError, ReadingChunk, file_error
from edge_agent.sources.formats import Rules
from edge_agent.sources.lines import DEFAULT_CHUNK_ROWS, LineParser


def log_format(path: str | os.PathLike) -> tuple[str, bool]:
    """``('csv' | 'jsonl', gzipped)`` from the file name."""
    p = str(path).lower().removesuffix(".gz")
    gz = p != str(path).lower()
    if p.endswith(".csv"):
        return "csv", gz
    if p.endswith((".jsonl", ".ndjson")):
        return "jsonl", gz
    raise file_error(path, "unknown log format: name it .csv, .jsonl or .ndjson (optionally .gz)")


BROKEN_FILE = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError
GzipCheckpoint = tuple[int, Any, bool]  # Gunzip.checkpoint(): compressed position, decompressor, started


def broken_reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the compressed file ends early (truncated .gz)"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return f"not a valid gzip file ({exc})"
    return f"read error: {exc}"


class Gunzip:
    """Decompress a .gz file as it is read (members one after the other, like ``gzip.open``), giving
    every byte that can be decompressed before a truncation or corruption is reported: the error then
    names the line where the file breaks. (``GzipFile.read`` loses what it decompressed in the read
    that fails.)"""

    def __init__(self, path: str) -> None:
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._error: BaseException | None = None
        self._started = False

    def read(self, n: int) -> bytes:
        if self._error is not None:
            raise self._error
        out = b""
        while not out:
            data = self._z.unused_data or self.raw.read(max(n // 4, 1 << 14))
            if self._z.eof:  # the next member of a multi-member file
                if not data.strip(b"\0"):
                    return b""
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif not data:
                if self._started:  # the stream stops inside a member
                    self._error = EOFError("truncated")
                    raise self._error
                return b""
            try:
                out = self._z.decompress(data)
            except zlib.error as exc:
                self._error = gzip.BadGzipFile(str(exc))
                raise self._error from exc
            self._started = True
        return out

    def checkpoint(self) -> GzipCheckpoint:
        """Where the next :meth:`read` starts, to :meth:`resume` from later: the compressed position and
        a copy of the decompressor (its 32 kB window and state: about 45 kB)."""
        return self.raw.tell(), self._z.copy(), self._started

    @classmethod
    def resume(cls, path: str, checkpoint: GzipCheckpoint) -> Gunzip:
        """A reader whose first :meth:`read` continues where ``checkpoint`` was taken (no decompression
        from the start of the file)."""
        g = cls(path)
        pos, z, g._started = checkpoint
        g.raw.seek(pos)
        g._z = z.copy()  # the checkpoint stays reusable
        return g

    def close(self) -> None:
        self.raw.close()


class LogReader:
    """Iterator of :class:`ReadingChunk` over a recorded log (``chunk_rows`` lines each).

    Attributes: ``path``, ``format``, ``channels``, ``has_labels``, ``stats``, ``device_names``
    (grows as devices are met).  The schema is read at once, so header errors raise here.
    """

    def __init__(self, path: str | os.PathLike, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, on_error: str = "raise",
                 format: str | None = None):
        self.path = str(path)
        fmt, gz = log_format(path)
        self.format = format or fmt
        self.parser = LineParser(self.path, self.format, on_error=on_error, chunk_rows=chunk_rows)
        self.stats = self.parser.stats
        try:
            self._f: Any = Gunzip(self.path) if gz else open(self.path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise file_error(self.path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            while not self.parser.prime(data := self._read(1 << 16)):
                if not data and not (self.parser.partial[-1:] not in (b"", b"\n") and self.parser.prime(b"\n")):
                    what = "no header" if self.format == "csv" else "no records"
                    raise LogError(self.path, max(self.parser.partial.count(b"\n"), 1), f"empty file ({what})",
                                   BAD_HEADER)
                if not data:
                    break
        except BaseException:
            self._f.close()
            raise
        self._it: Iterator[ReadingChunk] | None = None
        self._peeked: list[str] | None = None

    def _read(self, n: int) -> bytes:
        """Read while looking for the schema: a broken file is an error about the whole file."""
        try:
            return self._f.read(n)
        except BROKEN_FILE as exc:
            raise file_error(self.path, broken_reason(exc)) from exc

    @property
    def channels(self) -> tuple[str, ...]:
        assert self.parser.channels is not None
        return self.parser.channels

    def labels_as_numbers(self) -> LogReader:
        """Read the label column as numbers (regression targets): chunks carry float64 labels, NaN
        where a label is empty; a label that is not a finite number is a bad line (``file:line``).
        Call before iterating.

        The labels' shape (``[n]``, or ``[n, outputs]`` for ``x;y``) is fixed here by the file's first
        label that holds numbers, so it is the same in every chunk however the file is cut (chunks of
        unlabelled rows before it included)."""
        self.parser.numeric_labels = True
        numbers = next((n for n in (Rules.label_numbers(x)[0] for x in self._first_labels()) if n), None)
        if numbers is not None:
            self.parser.d.outputs = len(numbers)
        return self

    def labels_are_numbers(self) -> bool:
        """Whether every label that is not empty in the log's first chunk that has one is a number:
        a regression target rather than a class."""
        texts = self._first_labels()
        return bool(texts) and all(Rules.label_numbers(x)[1] is None for x in texts)

    def _first_labels(self) -> list[str]:
        """The labels that are not empty of the first chunk that has one (read again from the start,
        skipping bad lines: they are this reader's to report; the whole file when no row has a label)."""
        if self._peeked is None:
            self._peeked = []
            with read_log(self.path, format=self.format, chunk_rows=self.parser.chunk_rows, on_error="skip") as again:
                for chunk in again:
                    self._peeked = [] if chunk.labels is None else [x for x in chunk.labels.tolist() if x.strip()]
                    if self._peeked or chunk.labels is None:
                        break
        return self._peeked

    @property
    def has_labels(self) -> bool:
        return bool(self.parser.has_labels)

    @property
    def device_names(self) -> tuple[str, ...]:
        return self.parser.d.devices.names_tuple

    def __iter__(self) -> LogReader:
        return self

    def __next__(self) -> ReadingChunk:
        if self._it is None:
            self._it = self._chunks()
        return next(self._it)

    def _chunks(self) -> Iterator[ReadingChunk]:
        try:
            while True:
                try:
                    data = self._f.read(1 << 18)
                except BROKEN_FILE as exc:  # a truncated or corrupt .gz, a read error of the disk
                    yield from self.parser.feed()  # the complete lines before the break, then where it is
                    raise LogError(self.path, self.parser.line, broken_reason(exc), "bad file") from exc
                if not data:
                    break
                self.parser.prime(data)
                del data  # held while the chunks are used: the parser's buffer is the one copy (#27 §4)
                yield from self.parser.feed(flush=False)
            yield from self.parser.feed(final=True)
        finally:
            self.close()

    def position(self) -> int:
        """Bytes of the file read so far (compressed bytes for .gz): progress against its size."""
        raw = getattr(self._f, "raw", None) or self._f  # a .gz is read from .raw
        try:
            return int(raw.tell())
        except (OSError, ValueError):  # closed
            return os.path.getsize(self.path)

    def read_all(self) -> ReadingChunk | None:
        """All remaining rows as one chunk (None if there are none)."""
        chunks = list(self)
        return ReadingChunk.concat(chunks) if chunks else None

    def close(self) -> None:
        self._f.close()

    def __del__(self) -> None:
        f = self.__dict__.get("_f")
        if f is not None:
            f.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, on_error: str = "raise",
             format: str | None = None) -> LogReader:
    """Open a recorded log (``.csv`` / ``.jsonl`` / ``.ndjson``, optionally ``.gz``).

    ``on_error="raise"`` raises :class:`LogError` at the first bad line; ``"skip"`` drops bad lines
    and counts them in ``reader.stats``.
    """
    return LogReader(path, chunk_rows=chunk_rows, on_error=on_error, format=format)
