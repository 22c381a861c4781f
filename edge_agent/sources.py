"""Device-side sensor sources: recorded logs (CSV / JSON Lines) and live sources.

Everything here yields :class:`ReadingChunk` objects: columnar blocks of readings
(``ts`` float64, per-row device codes, ``values`` float32 ``[n, channels]``,
optional ground-truth ``labels``).

Recorded logs
    :func:`read_log` -> :class:`LogReader`, an iterator of chunks with strict,
    typed errors (:class:`LogError`, carrying file, 1-based physical line and
    reason) or a ``skip`` policy that counts every dropped line per reason.

Live sources
    :class:`SimulatedSensor` (seeded synthetic IMU-like signal with a hidden,
    changing activity class), :class:`JsonLinesStream` / :func:`StdinSource`
    (JSON lines from a text or binary stream), :class:`FollowFile` (``tail -f``
    of a growing CSV / JSONL log).

Replay pacing
    :func:`pace` releases readings according to their recorded timestamps,
    scaled by a speed factor; clock and sleep are injectable.

Speed notes (this is the device hot path).  The CSV fast path never creates
per-row Python objects: a block of complete lines is scanned as a ``uint8``
array; separator positions give every field's ``[start, end)``; numeric fields
are parsed by a vectorized decimal parser (exact: mantissa and power of ten are
both exact doubles, so one correctly rounded division equals ``float()``);
categorical fields (device id, label) of up to 8 bytes become ``uint64`` keys
mapped to codes with ``searchsorted``.  Anything unusual (quotes, wrong column
count, blank lines, exponents, ``nan``...) falls back, per block or per field,
to slower Python code that applies the same rules, so results never depend on
chunking.  Lines are parsed in parts of at most 2048 (chunks of ``chunk_rows``
are concatenated from them) with reused scratch buffers: bigger temporaries
are mmap'd by malloc and page-fault on every block, which cost ~40% more CPU.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, BinaryIO, TextIO

import numpy as np
import orjson

__all__ = [
    "LogError",
    "ReadStats",
    "ReadingChunk",
    "LogReader",
    "read_log",
    "pace",
    "SimulatedSensor",
    "JsonLinesStream",
    "StdinSource",
    "FollowFile",
    "log_format",
]

DEFAULT_CHUNK_ROWS = 8192
MAX_ERRORS_KEPT = 10

# Reason kinds (keys of ReadStats.skipped_by_reason).
BAD_NUMBER = "bad number"
NON_FINITE_VALUE = "non-finite value"
EMPTY_FIELD = "empty field"
MISSING_COLUMN = "missing column"
EXTRA_COLUMN = "extra column"
NON_FINITE_TS = "non-finite ts"
NON_MONOTONIC_TS = "non-monotonic ts"
BAD_JSON = "bad json"
BAD_ENCODING = "bad encoding"
BAD_QUOTING = "bad quoting"
BAD_VALUE = "bad value"
BAD_HEADER = "bad header"


# --------------------------------------------------------------------------- errors


class LogError(ValueError):
    """A malformed log line (or header).

    ``str(err)`` is ``"<path>:<line>: <reason>"``, ``line`` is the 1-based
    physical line number (the CSV header is line 1), ``kind`` the short reason
    class used for the skip counters (e.g. ``"bad number"``).
    """

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

    def summary(self) -> str:
        s = f"{self.rows_read} rows read, {self.rows_skipped} skipped"
        if self.skipped_by_reason:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())) + ")"
        for e in self.first_errors:
            s += f"\n  {e}"
        return s


# --------------------------------------------------------------------------- chunk


@dataclass(eq=False)
class ReadingChunk:
    """A columnar block of readings.

    * ``ts``            float64[n], seconds
    * ``device_codes``  int32[n], index into ``device_names``
    * ``device_names``  tuple of device ids (shared by all chunks of a source;
                        codes are stable for the source's lifetime)
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
        order = _group_order(codes, len(self.device_names))
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


def _group_order(codes: np.ndarray, ncodes: int) -> np.ndarray:
    """Stable argsort of small integer codes (radix sort through uint16)."""
    if ncodes <= 0xFFFF:
        return np.argsort(codes.astype(np.uint16), kind="stable")
    return np.argsort(codes, kind="stable")


# --------------------------------------------------------------------------- field parsing

_PAD = 64  # bytes of b"\n" put in front of every parse buffer (window gathers)
_FAST_MAX = 14  # longest numeric field handled by the vectorized parser
_POW10 = 10.0 ** np.arange(0, 23)

OK, EMPTY, NAN, INF, BAD = 0, 1, 2, 3, 4


class _Workspace:
    """Reusable scratch buffers for the largest parse temporaries (fresh
    large allocations are mmap'd by malloc and page-fault on every block)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        size = 1
        for d in shape:
            size *= d
        key = (name, np.dtype(dtype).str)
        b = self._bufs.get(key)
        if b is None or b.shape[0] < size:
            b = np.empty(max(size, 1024, int(b.shape[0] * 1.5) if b is not None else 0), dtype=dtype)
            self._bufs[key] = b
        return b[:size].reshape(shape)


def _num_fallback(text: bytes) -> tuple[float, int]:
    """Python parse of one numeric field: (value, status)."""
    if not text.strip():
        return math.nan, EMPTY
    if b"_" in text:
        return math.nan, BAD
    try:
        v = float(text)
    except ValueError:
        return math.nan, BAD
    if v != v:
        return math.nan, NAN
    if v in (math.inf, -math.inf):
        return v, INF
    return v, OK


def _windows(raw: bytes, width: int) -> np.ndarray:
    """Read-only (len - width + 1, width) uint8 view: row i = raw[i:i+width]."""
    return np.ndarray(shape=(len(raw) - width + 1, width), dtype=np.uint8, buffer=raw, strides=(1, 1))


def _parse_numeric(
    raw: bytes, S: np.ndarray, E: np.ndarray, ws: _Workspace | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse the numeric fields ``raw[S[i]:E[i]]``.

    Returns (float64 values, int8 status) with the shape of ``S``.  Plain
    decimals (``[+-]digits[.digits]``, at most 14 chars) are parsed exactly in
    vectorized form, grouped by length: with the digit bytes ``d`` of a group
    (dot and sign included with their byte codes) ``A = d @ 10**k`` and
    ``P = isdot @ 10**k`` are exact integers in float64, which give the
    mantissa, and one correctly rounded division by ``10**fraction_digits``
    yields exactly what ``float()`` yields.  Other fields go through
    :func:`_num_fallback`.
    """
    shape = S.shape
    S = S.ravel()
    E = E.ravel()
    m = S.shape[0]
    vals = np.empty(m, dtype=np.float64)
    status = np.zeros(m, dtype=np.int8)
    if m == 0:
        return vals.reshape(shape), status.reshape(shape)
    if ws is None:
        ws = _Workspace()
    flen = E - S
    counts = np.bincount(flen)
    fallback: list[np.ndarray] = []
    if counts[0]:
        z = np.flatnonzero(flen == 0)
        vals[z] = math.nan
        status[z] = EMPTY
    for ell in (np.flatnonzero(counts[1 : _FAST_MAX + 1]) + 1).tolist():
        whole = counts[ell] == m
        idx = None if whole else np.flatnonzero(ell == flen)
        starts = S if whole else S[idx]
        k = starts.shape[0]
        d = _windows(raw, ell)[starts]  # (k, ell) uint8 copy
        d -= np.uint8(48)  # digits 0..9, '.' -> 254, '-' -> 253, '+' -> 251
        isdot = np.equal(d, 254, out=ws.get("isdot", (k, ell), bool))
        c0 = d[:, 0]
        sign = c0 == 253
        sign |= c0 == 251
        n_sign = np.count_nonzero(sign)
        n_dot = np.count_nonzero(isdot)
        n_notdig = np.count_nonzero(d > 9)
        w = _POW10[ell - 1 :: -1]
        df = ws.get("df", (k, ell), np.float64)
        np.copyto(df, d)
        A = df @ w  # digits (dot and sign included with their code values)
        if n_dot:
            np.copyto(df, isdot)
            P = df @ w  # 10**fraction_digits, 0 if no dot
            A -= 254.0 * P
        if n_sign:
            A -= np.where(sign, c0, 0).astype(np.float64) * _POW10[ell - 1]
        badrow = None
        if n_notdig != n_dot + n_sign:  # some other character somewhere
            bad = d > 9
            bad &= ~isdot
            bad[:, 0] &= ~sign
            badrow = bad.any(axis=1)
        if n_dot and n_dot != np.count_nonzero(P):  # a row with 2+ dots
            two = isdot.sum(axis=1) > 1
            badrow = two if badrow is None else (badrow | two)
        if ell <= 2:  # "-", ".", "-." ... have no digit
            nodig = (d <= 9).sum(axis=1) == 0
            badrow = nodig if badrow is None else (badrow | nodig)
        if n_dot == 0:
            v = A
        elif n_dot == k and badrow is None:  # every row has exactly one dot
            FP = A - np.floor(A / P) * P  # fraction digits as an integer
            v = ((A - FP) / 10.0 + FP) / P
        else:
            hasdot = P > 0
            Pp = np.where(hasdot, P, 1.0)
            FP = A - np.floor(A / Pp) * Pp
            v = np.where(hasdot, ((A - FP) / 10.0 + FP) / Pp, A)
        if n_sign:
            np.negative(v, out=v, where=c0 == 253)
        if whole:
            vals[:] = v
        else:
            vals[idx] = v
        if badrow is not None and badrow.any():
            fallback.append(np.flatnonzero(badrow) if idx is None else idx[badrow])
    if counts.shape[0] > _FAST_MAX + 1:
        long_ = np.flatnonzero(flen > _FAST_MAX)
        if long_.size:
            fallback.append(long_)
    if fallback:
        fb = np.concatenate(fallback)
        for i, s, e in zip(fb.tolist(), S[fb].tolist(), E[fb].tolist(), strict=True):
            vals[i], status[i] = _num_fallback(raw[s:e])
    return vals.reshape(shape), status.reshape(shape)


class _Cat:
    """Incremental string -> code table for a categorical column.

    Short fields (<= 8 bytes, no NUL) are keyed by a uint64 made of their
    bytes (vectorized); others by their bytes (Python dict).  Codes are given
    in order of first appearance, so they do not depend on chunking.
    """

    def __init__(self, column: str, allow_empty: bool):
        self.column = column
        self.allow_empty = allow_empty
        self.names: list[str] = []
        self.invalid: dict[int, tuple[str, str]] = {}  # code -> (kind, reason)
        self.by_bytes: dict[bytes, int] = {}
        self.by_str: dict[Any, int] = {}
        self._keys = np.empty(0, dtype=np.uint64)
        self._keycodes = np.empty(0, dtype=np.int32)
        self._new_keys: list[tuple[int, int]] = []
        self._names_t: tuple[str, ...] = ()
        self._names_arr: np.ndarray | None = None
        self._invalid_arr = np.empty(0, dtype=np.int32)

    # -- table

    def _add(self, b: bytes) -> int:
        code = len(self.names)
        try:
            name = b.decode("utf-8")
        except UnicodeDecodeError:
            name = b.decode("utf-8", "replace")
            self.invalid[code] = (BAD_ENCODING, f"invalid UTF-8 in column '{self.column}'")
        if not self.allow_empty and not name.strip() and code not in self.invalid:
            self.invalid[code] = (EMPTY_FIELD, f"empty field '{self.column}'")
        self.names.append(name)
        self.by_bytes[b] = code
        if name not in self.by_str:
            self.by_str[name] = code
        if len(b) <= 8 and b"\0" not in b:
            self._new_keys.append((int.from_bytes(b, "little"), code))
        if code in self.invalid:
            self._invalid_arr = np.array(sorted(self.invalid), dtype=np.int32)
        return code

    def _flush_keys(self) -> None:
        """Merge keys added since the last flush into the sorted key table."""
        if self._new_keys:
            nk = np.array([k for k, _ in self._new_keys], dtype=np.uint64)
            nc = np.array([c for _, c in self._new_keys], dtype=np.int32)
            self._new_keys = []
            keys = np.concatenate([self._keys, nk])
            codes = np.concatenate([self._keycodes, nc])
            order = np.argsort(keys, kind="stable")
            self._keys = keys[order]
            self._keycodes = codes[order]

    def add_str(self, s: str) -> int:
        b = s.encode("utf-8", "surrogatepass")
        code = self.by_bytes.get(b)
        if code is None:
            code = self._add(b)
        self.by_str[s] = code
        return code

    @property
    def names_tuple(self) -> tuple[str, ...]:
        if len(self._names_t) != len(self.names):
            self._names_t = tuple(self.names)
        return self._names_t

    @property
    def names_array(self) -> np.ndarray:
        if self._names_arr is None or len(self._names_arr) != len(self.names):
            self._names_arr = np.array(self.names, dtype=str) if self.names else np.array([], dtype=str)
        return self._names_arr

    # -- encoding

    def encode_fields(
        self, raw: bytes, buf: np.ndarray, S: np.ndarray, E: np.ndarray, has_nul: bool
    ) -> np.ndarray:
        n = S.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.int32)
        flen = E - S
        if not has_nul and int(flen.max()) <= 8:
            word = _windows(raw, 8)[E - 8].view("<u8").ravel()  # field right-aligned
            shift = (64 - 8 * flen).astype(np.uint64)
            empty = flen == 0
            if empty.any():
                shift[empty] = 0
                keys = np.where(empty, np.uint64(0), word >> shift)
            else:
                keys = word >> shift
            return self._encode_keys(keys, raw, S, E)
        fields = [raw[s:e] for s, e in zip(S.tolist(), E.tolist(), strict=True)]
        table = self.by_bytes
        if not table.keys() >= set(fields):
            for b in dict.fromkeys(fields):
                if b not in table:
                    self._add(b)
        return np.fromiter(map(table.__getitem__, fields), dtype=np.int32, count=n)

    def _encode_keys(self, keys: np.ndarray, raw: bytes, S: np.ndarray, E: np.ndarray) -> np.ndarray:
        self._flush_keys()
        K = self._keys
        if K.size:
            pos = np.searchsorted(K, keys)
            np.minimum(pos, K.size - 1, out=pos)
            hit = K[pos] == keys
            if hit.all():
                return self._keycodes[pos]
            miss = np.flatnonzero(~hit)
        else:
            miss = np.arange(keys.shape[0])
        _, first = np.unique(keys[miss], return_index=True)
        for i in np.sort(miss[first]).tolist():
            b = raw[int(S[i]) : int(E[i])]
            if b not in self.by_bytes:
                self._add(b)
        self._flush_keys()
        pos = np.searchsorted(self._keys, keys)
        return self._keycodes[pos]

    def encode_values(self, col: Sequence[Any]) -> np.ndarray:
        """Encode a column of Python str (or None -> "") values."""
        table = self.by_str
        if not table.keys() >= set(col):
            for v in dict.fromkeys(col):
                if v not in table:
                    if v is None:
                        table[None] = self.add_str("")
                    else:
                        self.add_str(v)
        return np.fromiter(map(table.__getitem__, col), dtype=np.int32, count=len(col))

    def invalid_mask(self, codes: np.ndarray) -> np.ndarray | None:
        if not self.invalid:
            return None
        m = np.isin(codes, self._invalid_arr)
        return m if m.any() else None


# --------------------------------------------------------------------------- engine


class _Parsed:
    """Result of parsing one block of lines, before monotonic/error policy."""

    __slots__ = ("n", "ts", "dev", "vals", "lab", "lines", "errors", "blank", "line_errors")

    def __init__(self, n, ts, dev, vals, lab, lines, errors, blank, line_errors=()):
        self.n = n  # rows (blank lines excluded)
        self.ts = ts  # float64[n]
        self.dev = dev  # int32[n]
        self.vals = vals  # float32[n, c]
        self.lab = lab  # int32[n] or None
        self.lines = lines  # int64[n]
        self.errors = errors  # dict row -> (kind, reason); bad rows (not in arrays as valid)
        self.blank = blank  # number of blank lines
        self.line_errors = line_errors  # [(line, kind, reason)] of lines that gave no row


def _short(b: bytes | str, limit: int = 40) -> str:
    s = b.decode("utf-8", "replace") if isinstance(b, (bytes, bytearray)) else str(b)
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return s


class _Engine:
    """State shared by all blocks of one source: schema, code tables, last ts
    per device, error policy and statistics."""

    def __init__(
        self, source: str, channels: Sequence[str], has_labels: bool, on_error: str, stats: ReadStats
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.source = source
        self.channels = tuple(channels)
        self.has_labels = has_labels
        self.on_error = on_error
        self.stats = stats
        self.devices = _Cat("device_id", allow_empty=False)
        self.labels = _Cat("label", allow_empty=True) if has_labels else None
        self._last_ts = np.empty(0, dtype=np.float64)
        self._last_line = np.empty(0, dtype=np.int64)
        self.ws = _Workspace()
        self.pending_error: LogError | None = None

    # -- errors

    @property
    def label_cat(self) -> _Cat:
        assert self.labels is not None
        return self.labels

    def error(self, line: int, kind: str, reason: str) -> LogError:
        return LogError(self.source, line, reason, kind)

    def _record_skip(self, err: LogError) -> None:
        st = self.stats
        st.rows_skipped += 1
        st.skipped_by_reason[err.kind] = st.skipped_by_reason.get(err.kind, 0) + 1
        if len(st.first_errors) < MAX_ERRORS_KEPT:
            st.first_errors.append(err)

    # -- finishing a block

    def finish(self, p: _Parsed) -> ReadingChunk | None:
        """Apply ts checks and the error policy; update state; build a chunk."""
        self.stats.blank_lines += p.blank
        n = p.n
        errors = p.errors
        bad = None
        if errors:
            bad = np.zeros(n, dtype=bool)
            bad[list(errors)] = True
        # device state arrays
        nd = len(self.devices.names)
        if self._last_ts.shape[0] < nd:
            grow = nd - self._last_ts.shape[0]
            self._last_ts = np.concatenate([self._last_ts, np.full(grow, -np.inf)])
            self._last_line = np.concatenate([self._last_line, np.zeros(grow, dtype=np.int64)])
        ts, dev = p.ts, p.dev
        if bad is not None:
            good = np.flatnonzero(~bad)
            mono_bad = self._monotonic(ts[good], dev[good], p.lines[good], errors, good)
        else:
            mono_bad = self._monotonic(ts, dev, p.lines, errors, None)
        if mono_bad is not None:
            if bad is None:
                bad = np.zeros(n, dtype=bool)
            bad[mono_bad] = True
        if errors or p.line_errors:
            found = [(int(p.lines[r]), k, why) for r, (k, why) in errors.items()]
            found.extend(p.line_errors)
            found.sort(key=lambda t: t[0])
            if self.on_error == "raise":
                # deliver the rows before the bad line, then raise (see _chunks_from_parts)
                line, kind, reason = found[0]
                self.pending_error = self.error(line, kind, reason)
                if bad is None:
                    bad = np.zeros(n, dtype=bool)
                bad |= p.lines >= line
            else:
                for line, kind, reason in found:
                    self._record_skip(self.error(line, kind, reason))
        if bad is not None:
            keep = np.flatnonzero(~bad)
            ts = ts[keep]
            dev = dev[keep]
            vals = p.vals[keep]
            lab = p.lab[keep] if p.lab is not None else None
            lines = p.lines[keep]
        else:
            vals, lab, lines = p.vals, p.lab, p.lines
        nk = ts.shape[0]
        self.stats.rows_read += nk
        if nk == 0:
            return None
        return ReadingChunk(
            ts=ts,
            device_codes=dev,
            device_names=self.devices.names_tuple,
            values=vals,
            channels=self.channels,
            labels=self.labels.names_array[lab] if self.labels is not None else None,
            source=self.source,
            first_line=int(lines[0]),
            lines=lines,
        )

    def _monotonic(self, ts, dev, lines, errors, rowmap) -> np.ndarray | None:
        """Strictly increasing ts per device.  Adds errors (keyed by block row)
        and returns the block rows rejected, or None.  Updates last ts."""
        n = ts.shape[0]
        if n == 0:
            return None
        last_ts, last_line = self._last_ts, self._last_line
        c0 = dev[0]
        single = bool((dev == c0).all())
        if single:
            order = None
            sc = dev
            st = ts
            prev = np.empty(n)
            prev[0] = last_ts[c0]
            prev[1:] = ts[:-1]
            ends = np.array([n - 1])
        else:
            order = _group_order(dev, len(self.devices.names))
            sc = dev[order]
            st = ts[order]
            newg = np.empty(n, dtype=bool)
            newg[0] = True
            np.not_equal(sc[1:], sc[:-1], out=newg[1:])
            prev = np.empty(n)
            prev[1:] = st[:-1]
            gs = np.flatnonzero(newg)
            prev[gs] = last_ts[sc[gs]]
            ends = np.append(gs[1:] - 1, n - 1)
        viol = st <= prev
        if not viol.any():
            last_ts[sc[ends]] = st[ends]
            last_line[sc[ends]] = (lines if order is None else lines[order])[ends]
            return None
        # Slow path: accepted iff ts > running max of earlier rows of the device
        # (rejected rows never exceed the max, so this equals the max of accepted).
        sl = lines if order is None else lines[order]
        rejected = []
        gstarts = [0] if single else gs.tolist()
        gends = ends.tolist()
        for s, e in zip(gstarts, gends, strict=True):
            e += 1
            if not viol[s:e].any():
                last_ts[sc[s]] = st[e - 1]
                last_line[sc[s]] = sl[e - 1]
                continue
            code = int(sc[s])
            seg = st[s:e]
            run = np.maximum.accumulate(np.concatenate(([last_ts[code]], seg)))
            prevmax = run[:-1]
            bad = np.flatnonzero(seg <= prevmax)
            seg_lines = sl[s:e]
            # line of the row holding the running max, for the message
            okmask = np.ones(e - s, dtype=bool)
            okmask[bad] = False
            ok_idx = np.flatnonzero(okmask)
            name = self.devices.names[code]
            for b in bad.tolist():
                j = np.searchsorted(ok_idx, b) - 1
                if j >= 0:
                    pl = int(seg_lines[ok_idx[j]])
                    pt = float(st[s + ok_idx[j]])
                else:
                    pl = int(last_line[code])
                    pt = float(last_ts[code])
                row = s + b
                blockrow = row if order is None else int(order[row])
                if rowmap is not None:
                    blockrow = int(rowmap[blockrow])
                errors[blockrow] = (
                    NON_MONOTONIC_TS,
                    f"non-monotonic ts {float(st[row])!r} for device '{_short(name)}' "
                    f"(previous {pt!r} at line {pl})",
                )
                rejected.append(blockrow)
            if ok_idx.size:
                lastok = ok_idx[-1]
                last_ts[code] = seg[lastok]
                last_line[code] = seg_lines[lastok]
        return np.array(rejected, dtype=np.int64)


# --------------------------------------------------------------------------- CSV


class _CsvFormat:
    """CSV parsing of blocks of complete lines (bytes ending with b'\\n')."""

    def __init__(
        self,
        engine: _Engine,
        ncols: int,
        its: int,
        idev: int,
        ichan: list[int],
        ilab: int | None,
        names: list[str],
    ):
        self.e = engine
        self.ncols = ncols
        self.its = its
        self.idev = idev
        self.ichan = ichan
        self.ilab = ilab
        self.names = names
        self.numcols = np.array([its] + ichan, dtype=np.intp)

    @staticmethod
    def parse_header(source: str, line: bytes) -> tuple[list[str], int, int, list[int], int | None]:
        if line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise LogError(source, 1, "invalid UTF-8 in header", BAD_HEADER) from None
        if not text.strip():
            raise LogError(source, 1, "empty header line", BAD_HEADER)
        try:
            names = [c.strip() for c in next(csv.reader([text], strict=True))]
        except csv.Error as exc:
            raise LogError(source, 1, f"bad header: {exc}", BAD_HEADER) from None
        seen = set()
        for nm in names:
            if not nm:
                raise LogError(source, 1, "empty column name in header", BAD_HEADER)
            if nm in seen:
                raise LogError(source, 1, f"duplicate column '{nm}' in header", BAD_HEADER)
            seen.add(nm)
        for req in ("ts", "device_id"):
            if req not in seen:
                raise LogError(source, 1, f"missing header column '{req}'", BAD_HEADER)
        its = names.index("ts")
        idev = names.index("device_id")
        ilab = names.index("label") if "label" in seen else None
        ichan = [i for i, nm in enumerate(names) if nm not in ("ts", "device_id", "label")]
        if not ichan:
            raise LogError(source, 1, "no channel columns in header", BAD_HEADER)
        return names, its, idev, ichan, ilab

    def parse(self, block: bytes, first_line: int, nlines: int) -> _Parsed:
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        raw = b"\n" * _PAD + block
        buf = np.frombuffer(raw, dtype=np.uint8)
        a = buf[_PAD:]
        nc = self.ncols
        if b'"' not in block and b"\0" not in block:
            sep = a == 44
            sep |= a == 10
            flat = np.flatnonzero(sep)
            if flat.shape[0] == nlines * nc:
                pos = flat.reshape(nlines, nc)
                # nlines == number of b"\n": if every row ends on one, all others are commas
                if (a[pos[:, -1]] == 10).all():
                    E = pos + _PAD
                    S = np.empty_like(E)
                    S[:, 1:] = E[:, :-1] + 1
                    S[1:, 0] = E[:-1, -1] + 1
                    S[0, 0] = _PAD
                    lines = np.arange(first_line, first_line + nlines, dtype=np.int64)
                    return self._columns(raw, buf, S, E, lines, {}, 0, False)
        return self._slow(block, first_line)

    def _slow(self, block: bytes, first_line: int) -> _Parsed:
        """Line-by-line structure parse (quotes, blank lines, column counts)."""
        nc = self.ncols
        rows: list[list[bytes]] = []
        lines: list[int] = []
        line_errors: list[tuple[int, str, str]] = []
        blank = 0
        for i, ln in enumerate(block.split(b"\n")[:-1]):
            lineno = first_line + i
            if not ln.strip():
                blank += 1
                continue
            if b'"' in ln:
                try:
                    fields = [f.encode("utf-8") for f in next(csv.reader([ln.decode("utf-8")], strict=True))]
                except UnicodeDecodeError:
                    line_errors.append((lineno, BAD_ENCODING, "invalid UTF-8"))
                    continue
                except csv.Error as exc:
                    line_errors.append((lineno, BAD_QUOTING, f"bad quoting: {exc}"))
                    continue
            else:
                fields = ln.split(b",")
            if len(fields) != nc:
                k = len(fields)
                kind = MISSING_COLUMN if k < nc else EXTRA_COLUMN
                what = "missing column(s)" if k < nc else "extra column(s)"
                line_errors.append((lineno, kind, f"{what}: expected {nc} fields, got {k}"))
                continue
            rows.append(fields)
            lines.append(lineno)
        n = len(rows)
        flat = [f for r in rows for f in r]
        lens = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
        raw = b"\n" * _PAD + b"".join(flat)
        buf = np.frombuffer(raw, dtype=np.uint8)
        E = (np.cumsum(lens) + _PAD).reshape(n, nc)
        S = E - lens.reshape(n, nc)
        has_nul = b"\0" in raw
        p = self._columns(raw, buf, S, E, np.array(lines, dtype=np.int64), {}, blank, has_nul)
        p.line_errors = line_errors
        return p

    def _columns(self, raw, buf, S, E, lines, errors, blank, has_nul) -> _Parsed:
        e = self.e
        n = S.shape[0]
        num, st = _parse_numeric(raw, S[:, self.numcols], E[:, self.numcols], e.ws)
        ts = num[:, 0]
        dev = e.devices.encode_fields(raw, buf, S[:, self.idev], E[:, self.idev], has_nul)
        lab = None
        if self.ilab is not None:
            lab = e.label_cat.encode_fields(raw, buf, S[:, self.ilab], E[:, self.ilab], has_nul)
        with np.errstate(over="ignore"):
            vals = num[:, 1:].astype(np.float32)
        # --- field errors (first offending column in file order wins)
        sts = st[:, 0]
        stc = st[:, 1:]
        ts_bad = sts != OK
        ch_bad = (stc >= INF) | np.isinf(vals)
        dev_bad = e.devices.invalid_mask(dev)
        lab_bad = e.label_cat.invalid_mask(lab) if lab is not None else None
        if ts_bad.any() or ch_bad.any() or dev_bad is not None or lab_bad is not None:
            cols: list[tuple[int, np.ndarray]] = [(self.its, ts_bad)]
            for k, ci in enumerate(self.ichan):
                if ch_bad[:, k].any():
                    cols.append((ci, ch_bad[:, k]))
            if dev_bad is not None:
                cols.append((self.idev, dev_bad))
            if lab_bad is not None and self.ilab is not None:
                cols.append((self.ilab, lab_bad))
            cols.sort(key=lambda t: t[0])
            for ci, mask in cols:
                for r in np.flatnonzero(mask).tolist():
                    if r in errors:
                        continue
                    errors[r] = self._field_error(raw, S, E, r, ci, st, ts, dev, lab)
        return _Parsed(n, ts, dev, vals, lab, lines, errors, blank)

    def _field_error(self, raw, S, E, r, ci, st, ts, dev, lab) -> tuple[str, str]:
        text = raw[int(S[r, ci]) : int(E[r, ci])]
        name = self.names[ci]
        if ci == self.its:
            s = st[r, 0]
            if s == EMPTY:
                return EMPTY_FIELD, "empty field 'ts'"
            if s == BAD:
                return BAD_NUMBER, f"bad number '{_short(text)}' in column 'ts'"
            return NON_FINITE_TS, f"non-finite ts '{_short(text)}'"
        if ci == self.idev:
            return self.e.devices.invalid[int(dev[r])]
        if ci == self.ilab:
            return self.e.label_cat.invalid[int(lab[r])]
        k = self.ichan.index(ci)
        if st[r, k + 1] == INF:
            return NON_FINITE_VALUE, f"non-finite value '{_short(text)}' in column '{name}'"
        if st[r, k + 1] == OK:
            return NON_FINITE_VALUE, f"value '{_short(text)}' out of float32 range in column '{name}'"
        return BAD_NUMBER, f"bad number '{_short(text)}' in column '{name}'"


# --------------------------------------------------------------------------- JSON Lines

_NUMTYPES = frozenset((int, float))
_NUMTYPES_NULL = frozenset((int, float, type(None)))


class _JsonFormat:
    """JSON Lines parsing of blocks of complete lines."""

    def __init__(self, engine: _Engine):
        self.e = engine
        self.keys = ("ts", "device_id") + engine.channels + (("label",) if engine.has_labels else ())
        self.keyset = frozenset(self.keys)
        self.getter = itemgetter(*self.keys)
        self.getter_nolabel = itemgetter(*self.keys[:-1]) if engine.has_labels else self.getter
        self.nkeys = len(self.keys)

    @staticmethod
    def schema(source: str, line: bytes, lineno: int) -> tuple[tuple[str, ...], bool]:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise LogError(source, lineno, f"bad JSON: {exc}", BAD_JSON) from None
        if type(rec) is not dict:
            raise LogError(source, lineno, "expected a JSON object", BAD_JSON)
        for req in ("ts", "device_id"):
            if req not in rec:
                raise LogError(source, lineno, f"missing key '{req}' in first record", BAD_HEADER)
        chans = tuple(k for k in rec if k not in ("ts", "device_id", "label"))
        if not chans:
            raise LogError(source, lineno, "no channel keys in first record", BAD_HEADER)
        return chans, "label" in rec

    def parse(self, block: bytes, first_line: int, nlines: int) -> _Parsed:
        lines_b = block.split(b"\n")
        del lines_b[-1]
        try:
            recs = orjson.loads(b"[" + b",".join(lines_b) + b"]")
        except orjson.JSONDecodeError:
            recs = None
        if recs is not None and len(recs) == nlines and set(map(type, recs)) == {dict}:
            lens = set(map(len, recs))
            cols = None
            try:
                if lens == {self.nkeys}:
                    cols = list(zip(*map(self.getter, recs), strict=True))
                elif lens == {self.nkeys - 1} and self.e.has_labels:  # no row has a label
                    cols = list(zip(*map(self.getter_nolabel, recs), strict=True))
                    cols.append((None,) * nlines)
            except KeyError:
                cols = None
            if cols is not None and self._fast_ok(cols):
                lines = np.arange(first_line, first_line + nlines, dtype=np.int64)
                try:
                    return self._columns(cols, lines, {}, 0)
                except (OverflowError, ValueError, TypeError):
                    pass  # e.g. a huge integer: the slow path reports it
        return self._slow(lines_b, first_line)

    def _fast_ok(self, cols) -> bool:
        if not set(map(type, cols[0])) <= _NUMTYPES:
            return False
        if set(map(type, cols[1])) != {str}:
            return False
        nch = len(self.e.channels)
        for c in cols[2 : 2 + nch]:
            if not set(map(type, c)) <= _NUMTYPES_NULL:
                return False
        return not self.e.has_labels or set(map(type, cols[-1])) <= {str, type(None)}

    def _slow(self, lines_b: list[bytes], first_line: int) -> _Parsed:
        rows: list[tuple] = []
        lines: list[int] = []
        line_errors: list[tuple[int, str, str]] = []
        blank = 0
        for i, ln in enumerate(lines_b):
            lineno = first_line + i
            if not ln.strip():
                blank += 1
                continue
            row, err = self._row(ln)
            if err is not None or row is None:
                line_errors.append((lineno, *(err or (BAD_JSON, "bad record"))))
                continue
            rows.append(row)
            lines.append(lineno)
        cols = list(zip(*rows, strict=True)) if rows else [()] * self.nkeys
        p = self._columns(cols, np.array(lines, dtype=np.int64), {}, blank)
        p.line_errors = line_errors
        return p

    def _row(self, ln: bytes) -> tuple[tuple | None, tuple[str, str] | None]:
        try:
            rec = orjson.loads(ln)
        except orjson.JSONDecodeError as exc:
            return None, (BAD_JSON, f"bad JSON: {exc}")
        return _json_record(rec, self.e.channels, self.e.has_labels, self.keyset)

    def _columns(self, cols, lines, errors, blank) -> _Parsed:
        e = self.e
        n = len(lines)
        nch = len(e.channels)
        if n == 0:
            return _Parsed(
                0,
                np.empty(0),
                np.empty(0, np.int32),
                np.empty((0, nch), np.float32),
                np.empty(0, np.int32) if e.has_labels else None,
                lines,
                errors,
                blank,
            )
        ts = np.array(cols[0], dtype=np.float64)
        vals = np.empty((n, nch), dtype=np.float32)
        with np.errstate(over="ignore"):
            for k in range(nch):
                vals[:, k] = np.array(cols[2 + k], dtype=np.float64)
        dev = e.devices.encode_values(cols[1])
        lab = e.label_cat.encode_values(cols[-1]) if e.has_labels else None
        fin = np.isfinite(ts)
        if not fin.all():
            for r in np.flatnonzero(~fin).tolist():
                errors.setdefault(r, (NON_FINITE_TS, f"non-finite ts {cols[0][r]!r}"))
        vbad = np.isinf(vals)
        if vbad.any():
            for r, k in zip(*np.nonzero(vbad), strict=True):
                errors.setdefault(
                    int(r),
                    (
                        NON_FINITE_VALUE,
                        f"value {cols[2 + k][r]!r} out of float32 range in column '{e.channels[k]}'",
                    ),
                )
        dbad = e.devices.invalid_mask(dev)
        if dbad is not None:
            for r in np.flatnonzero(dbad).tolist():
                errors.setdefault(r, e.devices.invalid[int(dev[r])])
        return _Parsed(n, ts, dev, vals, lab, lines, errors, blank)


def _json_record(
    rec: Any, chans: tuple[str, ...], has_labels: bool, keyset: frozenset
) -> tuple[tuple | None, tuple[str, str] | None]:
    """Validate/normalize one decoded JSON record -> (row tuple, None) or (None, error)."""
    if type(rec) is not dict:
        return None, (BAD_JSON, "expected a JSON object")
    for k in ("ts", "device_id") + chans:
        if k not in rec:
            return None, (MISSING_COLUMN, f"missing key '{k}'")
    for k in rec:
        if k not in keyset:
            return None, (EXTRA_COLUMN, f"unexpected key '{_short(k)}'")
    ts = rec["ts"]
    if ts is None:
        return None, (EMPTY_FIELD, "empty field 'ts'")
    if type(ts) not in _NUMTYPES:
        return None, (BAD_NUMBER, f"bad number {_short(orjson.dumps(ts))} in column 'ts'")
    try:
        tsf = float(ts)
    except OverflowError:
        return None, (NON_FINITE_TS, f"non-finite ts {_short(str(ts))}")
    if not math.isfinite(tsf):
        return None, (NON_FINITE_TS, f"non-finite ts {ts!r}")
    dev = rec["device_id"]
    if type(dev) is int:
        dev = str(dev)
    elif type(dev) is not str:
        return None, (BAD_VALUE, f"bad device_id {_short(orjson.dumps(dev))}")
    if not dev.strip():
        return None, (EMPTY_FIELD, "empty field 'device_id'")
    vals: list[float | None] = []
    for k in chans:
        v = rec[k]
        if v is None:
            vals.append(None)
            continue
        if type(v) not in _NUMTYPES:
            return None, (BAD_NUMBER, f"bad number {_short(orjson.dumps(v))} in column '{k}'")
        try:
            fv = float(v)
        except OverflowError:
            fv = math.inf
        if math.isinf(fv):
            return None, (NON_FINITE_VALUE, f"non-finite value {_short(str(v))} in column '{k}'")
        vals.append(fv)
    row = (tsf, dev, *vals)
    if has_labels:
        lab = rec.get("label")
        if lab is None:
            lab = ""
        elif type(lab) is bool:
            lab = "true" if lab else "false"
        elif type(lab) in _NUMTYPES:
            lab = str(lab)
        elif type(lab) is not str:
            return None, (BAD_VALUE, f"bad label {_short(orjson.dumps(lab))}")
        row = row + (lab,)
    return row, None


# --------------------------------------------------------------------------- blocks of lines


_PART_ROWS = 2048  # lines parsed at once: keeps temporaries small (no mmap page faults)


def _part_sizes(chunk_rows: int, part_rows: int) -> list[int]:
    """Split a chunk of ``chunk_rows`` lines into parts of <= part_rows lines."""
    k = -(-chunk_rows // part_rows)
    base, extra = divmod(chunk_rows, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _iter_parts(
    read: Callable[[int], bytes], chunk_rows: int, read_size: int = 1 << 18, part_rows: int | None = None
) -> Iterator[tuple[bytes, int, bool]]:
    """Yield ``(block, nlines, chunk_done)``: blocks of complete lines; every
    ``chunk_rows`` lines form a chunk made of parts of <= ``part_rows`` lines
    (``chunk_done`` marks the last part of a chunk).  A missing final newline
    is added at EOF; the last chunk may be shorter."""
    sizes = _part_sizes(chunk_rows, part_rows or _PART_ROWS)
    pi = 0
    pending = b""
    while True:
        data = read(read_size)
        if not data:
            break
        buf = pending + data if pending else data
        nlpos = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
        avail = nlpos.shape[0]
        i = 0
        off = 0
        while avail - i >= sizes[pi]:
            k = sizes[pi]
            end = int(nlpos[i + k - 1]) + 1
            pi += 1
            done = pi == len(sizes)
            if done:
                pi = 0
            yield buf[off:end], k, done
            off = end
            i += k
        pending = buf[off:] if off else buf
    if pending:
        if not pending.endswith(b"\n"):
            pending += b"\n"
        # fewer lines than the current part (else they would have been cut)
        yield pending, pending.count(b"\n"), True


def _chunks_from_parts(
    parts: Iterable[tuple[bytes, int, bool]],
    parse: Callable[[bytes, int], ReadingChunk | None],
    engine: Callable[[], _Engine | None],
) -> Iterator[ReadingChunk]:
    """Parse parts, group them into chunks; in raise mode the rows before a
    bad line are yielded first, then the LogError is raised."""
    acc: list[ReadingChunk] = []
    for blk, n, done in parts:
        c = parse(blk, n)
        if c is not None:
            acc.append(c)
        e = engine()
        if e is not None and e.pending_error is not None:
            err, e.pending_error = e.pending_error, None
            if acc:
                yield acc[0] if len(acc) == 1 else ReadingChunk.concat(acc)
            raise err
        if done and acc:
            yield acc[0] if len(acc) == 1 else ReadingChunk.concat(acc)
            acc = []
    if acc:
        yield acc[0] if len(acc) == 1 else ReadingChunk.concat(acc)


def log_format(path: str | os.PathLike) -> tuple[str, bool]:
    """('csv' | 'jsonl', gzipped) from the file name."""
    p = str(path).lower()
    gz = p.endswith(".gz")
    if gz:
        p = p[:-3]
    if p.endswith(".csv"):
        return "csv", gz
    if p.endswith(".jsonl") or p.endswith(".ndjson"):
        return "jsonl", gz
    raise file_error(path, "unknown log format: name it .csv, .jsonl or .ndjson (optionally .gz)")


# --------------------------------------------------------------------------- LogReader

_BROKEN_FILE = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


def _broken(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the compressed file ends early (truncated .gz)"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return f"not a valid gzip file ({exc})"
    return f"read error: {exc}"



class LogReader:
    """Iterator of :class:`ReadingChunk` over a recorded log.

    Attributes: ``path``, ``format``, ``channels``, ``has_labels``, ``stats``,
    ``device_names`` (grows as devices are met).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_error: str = "raise",
        format: str | None = None,
    ):
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.path = str(path)
        fmt, gz = log_format(path)
        if format is not None:
            fmt = format
        self.format = fmt
        self.chunk_rows = chunk_rows
        self.stats = ReadStats()
        try:
            self._f: BinaryIO = gzip.open(self.path, "rb") if gz else open(self.path, "rb")  # type: ignore[assignment]  # noqa: SIM115
        except OSError as exc:
            raise file_error(self.path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            self._setup(on_error)
        except _BROKEN_FILE as exc:
            self._f.close()
            raise file_error(self.path, _broken(exc)) from exc
        except BaseException:
            self._f.close()
            raise

    def _setup(self, on_error: str) -> None:
        f = self._f
        pending: list[tuple[bytes, int]] = []
        first_line = 1
        if self.format == "csv":
            header = f.readline()
            if not header:
                raise LogError(self.path, 1, "empty file (no header)", BAD_HEADER)
            names, its, idev, ichan, ilab = _CsvFormat.parse_header(self.path, header)
            self.stats.lines = 1
            first_line = 2
            self._engine = _Engine(
                self.path, [names[i] for i in ichan], ilab is not None, on_error, self.stats
            )
            self._fmt: _CsvFormat | _JsonFormat = _CsvFormat(
                self._engine, len(names), its, idev, ichan, ilab, names
            )
        elif self.format == "jsonl":
            # schema from the first non-blank line (which is data, not a header)
            lineno = 0
            while True:
                ln = f.readline()
                if not ln:
                    raise LogError(self.path, max(lineno, 1), "empty file (no records)", BAD_HEADER)
                lineno += 1
                pending.append((ln if ln.endswith(b"\n") else ln + b"\n", 1))
                if ln.strip():
                    break
            chans, has_labels = _JsonFormat.schema(self.path, pending[-1][0], lineno)
            self._engine = _Engine(self.path, chans, has_labels, on_error, self.stats)
            self._fmt = _JsonFormat(self._engine)
        else:
            raise ValueError(f"unknown format {self.format!r}")
        self._first_line = first_line
        self._pending = pending

    @property
    def channels(self) -> tuple[str, ...]:
        return self._engine.channels

    @property
    def has_labels(self) -> bool:
        return self._engine.has_labels

    @property
    def device_names(self) -> tuple[str, ...]:
        return self._engine.devices.names_tuple

    def __iter__(self) -> LogReader:
        return self

    def _gen(self) -> Iterator[ReadingChunk]:
        f_read = self._f.read
        head = b"".join(b for b, _ in self._pending)  # lines read to find the JSONL schema
        self._pending = []

        def read(n: int) -> bytes:
            nonlocal head
            try:
                if head:
                    out, head = head + f_read(n), b""
                    return out
                return f_read(n)
            except _BROKEN_FILE as exc:  # a truncated or corrupt .gz, a read error of the disk
                raise LogError(self.path, line, _broken(exc), "bad file") from exc

        line = self._first_line

        def parse(blk: bytes, n: int) -> ReadingChunk | None:
            nonlocal line
            p = self._fmt.parse(blk, line, n)
            line += n
            self.stats.lines += n
            return self._engine.finish(p)

        try:
            yield from _chunks_from_parts(_iter_parts(read, self.chunk_rows), parse, lambda: self._engine)
        finally:
            self.close()

    def __next__(self) -> ReadingChunk:
        it = self.__dict__.get("_it")
        if it is None:
            it = self._it = self._gen()
        return next(it)

    def position(self) -> int:
        """Bytes of the file read so far (compressed bytes for .gz): progress against its size."""
        f = self._f
        raw = getattr(f, "fileobj", None) or f  # a GzipFile reads from .fileobj
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

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(
    path: str | os.PathLike,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_error: str = "raise",
    format: str | None = None,
) -> LogReader:
    """Open a recorded log (``.csv`` / ``.jsonl`` / ``.ndjson``, optionally
    ``.gz``).  ``on_error="raise"`` raises :class:`LogError` at the first bad
    line; ``"skip"`` drops bad lines and counts them in ``reader.stats``."""
    return LogReader(path, chunk_rows=chunk_rows, on_error=on_error, format=format)


# --------------------------------------------------------------------------- pacing


_PACE_SLACK = 1e-4  # seconds


def pace(
    chunks: Iterable[ReadingChunk],
    speed: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> Iterator[ReadingChunk]:
    """Release readings according to their recorded timestamps.

    A reading with timestamp ``t`` is released at wall time
    ``start + (t - t_first) / speed`` (``t`` is taken as a running max so a
    non time-sorted log never moves the schedule back).  Readings due at the
    same moment are released together as a sub-chunk.  ``speed <= 0`` or
    infinite: no pacing at all (chunks pass through untouched).
    """
    if speed != speed:
        raise ValueError("speed is NaN")
    if speed <= 0 or math.isinf(speed):
        yield from chunks
        return
    t0_rec = None
    t0_clock = 0.0
    run_max = -math.inf
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        if t0_rec is None:
            t0_rec = float(chunk.ts[0])
            t0_clock = clock()
        rec = np.maximum.accumulate(chunk.ts)
        if run_max > rec[0]:
            np.maximum(rec, run_max, out=rec)
        run_max = float(rec[-1])
        due = (rec - t0_rec) / speed
        i = 0
        while i < n:
            now = clock() - t0_clock
            # readings due within _PACE_SLACK are released now (a sleep that short is pointless,
            # and clock rounding could otherwise make us sleep ever-shorter times)
            j = int(np.searchsorted(due, now + _PACE_SLACK, side="right"))
            if j > i:
                yield chunk if (i == 0 and j == n) else chunk.take(slice(i, j))
                i = j
                continue
            sleep(float(due[i]) - now)


# --------------------------------------------------------------------------- simulated sensor


class SimulatedSensor:
    """Deterministic synthetic sensor(s).

    Each device emits ``channels`` at ``rate_hz``: per channel a sum of a
    sinusoid whose frequency / amplitude / offset depend on a hidden activity
    class, plus Gaussian noise.  The class changes every ``segment_s`` seconds
    (drawn from the seeded generator) and is emitted as ``label``.  Chunks of
    ``chunk_s`` seconds are released in real time scaled by ``speed`` (``0`` =
    as fast as possible) with an injectable ``clock``/``sleep``.  ``limit``
    (samples per device) or ``duration_s`` bound the stream; ``stop()`` ends it.
    ``missing_rate`` sets a fraction of values to NaN (missing readings).
    """

    def __init__(
        self,
        device_id: str | Sequence[str] = "sim-0",
        channels: Sequence[str] = ("ax", "ay", "az", "wx", "wy", "wz"),
        rate_hz: float = 50.0,
        seed: int = 0,
        labels: Sequence[str] | None = ("idle", "walk", "run", "lift"),
        *,
        segment_s: float = 10.0,
        chunk_s: float = 0.2,
        limit: int | None = None,
        duration_s: float | None = None,
        start_ts: float = 0.0,
        speed: float = 1.0,
        noise: float = 0.05,
        missing_rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
        stop_event: threading.Event | None = None,
    ):
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        self.devices = (device_id,) if isinstance(device_id, str) else tuple(device_id)
        if not self.devices:
            raise ValueError("no device_id")
        self.channels = tuple(channels)
        self.rate_hz = float(rate_hz)
        self.seed = seed
        self.class_names = tuple(labels) if labels else ("c0", "c1", "c2")
        self.has_labels = bool(labels)
        self.segment_s = segment_s
        self.chunk_rows = max(1, int(round(chunk_s * rate_hz)))
        total = limit
        if duration_s is not None:
            dl = int(math.floor(duration_s * rate_hz + 1e-9))
            total = dl if total is None else min(total, dl)
        self.limit = total
        self.start_ts = start_ts
        self.speed = speed
        self.noise = noise
        self.missing_rate = missing_rate
        self.clock = clock
        self.sleep = sleep
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

    def _segment_classes(self, rng: np.random.Generator, upto: int, seq: list[int]) -> None:
        K = len(self.class_names)
        while len(seq) <= upto:
            prev = seq[-1] if seq else -1
            c = int(rng.integers(K))
            if c == prev and K > 1:
                c = (c + 1) % K
            seq.append(c)

    def __iter__(self) -> Iterator[ReadingChunk]:
        D, C = len(self.devices), len(self.channels)
        rngs_cls = [np.random.default_rng([self.seed, 1, d]) for d in range(D)]
        rngs_noise = [np.random.default_rng([self.seed, 2, d]) for d in range(D)]
        seqs: list[list[int]] = [[] for _ in range(D)]
        dev_codes = np.arange(D, dtype=np.int32)
        names_arr = np.array(self.class_names)
        k = 0  # samples emitted per device
        t0_clock = None
        seg_len = max(1, int(round(self.segment_s * self.rate_hz)))
        while not self.stop_event.is_set():
            n = self.chunk_rows if self.limit is None else min(self.chunk_rows, self.limit - k)
            if n <= 0:
                return
            idx = np.arange(k, k + n)
            t = idx / self.rate_hz
            ts = self.start_ts + t
            vals = np.empty((n, D, C), dtype=np.float64)
            cls = np.empty((n, D), dtype=np.int64)
            for d in range(D):
                seg = idx // seg_len
                self._segment_classes(rngs_cls[d], int(seg[-1]), seqs[d])
                c = np.asarray(seqs[d])[seg]
                cls[:, d] = c
                v = self._offset[c] + self._amp[c] * np.sin(
                    2 * np.pi * self._freq[c] * t[:, None] + self._phase[d]
                )
                v += rngs_noise[d].normal(0.0, self.noise, (n, C))
                if self.missing_rate > 0:
                    v[rngs_noise[d].random((n, C)) < self.missing_rate] = np.nan
                vals[:, d, :] = v
            k += n
            chunk = ReadingChunk(
                ts=np.repeat(ts, D),
                device_codes=np.tile(dev_codes, n),
                device_names=self.devices,
                values=vals.reshape(n * D, C).astype(np.float32),
                channels=self.channels,
                labels=names_arr[cls.reshape(-1)] if self.has_labels else None,
                source=self.source,
                first_line=0,
                lines=None,
            )
            if self.speed > 0 and not math.isinf(self.speed):
                if t0_clock is None:
                    t0_clock = self.clock() - float(t[0]) / self.speed
                # a chunk is available once its last sample was taken
                due = t0_clock + float(t[-1]) / self.speed
                delay = due - self.clock()
                if delay > 0:
                    self.sleep(delay)
            if self.stop_event.is_set():
                return
            yield chunk


# --------------------------------------------------------------------------- streams


class _Incremental:
    """Feeds arbitrary byte pieces, parses complete lines, keeps partial ones."""

    def __init__(
        self,
        source: str,
        fmt: str,
        on_error: str,
        chunk_rows: int,
        channels: Sequence[str] | None = None,
        has_labels: bool | None = None,
    ):
        self.source = source
        self.format = fmt
        self.on_error = on_error
        self.chunk_rows = chunk_rows
        self.stats = ReadStats()
        self._buf = b""
        self._line = 1
        self._engine: _Engine | None = None
        self._fmt: _CsvFormat | _JsonFormat | None = None
        self._channels = tuple(channels) if channels is not None else None
        self._has_labels = has_labels

    @property
    def channels(self) -> tuple[str, ...] | None:
        return self._engine.channels if self._engine is not None else self._channels

    @property
    def has_labels(self) -> bool | None:
        return self._engine.has_labels if self._engine is not None else self._has_labels

    def _init(self) -> bool:
        """Set up the schema from the buffer; False if more data is needed."""
        buf = self._buf
        if self.format == "csv":
            i = buf.find(b"\n")
            if i < 0:
                return False
            names, its, idev, ichan, ilab = _CsvFormat.parse_header(self.source, buf[: i + 1])
            self._engine = _Engine(
                self.source, [names[j] for j in ichan], ilab is not None, self.on_error, self.stats
            )
            self._fmt = _CsvFormat(self._engine, len(names), its, idev, ichan, ilab, names)
            self._buf = buf[i + 1 :]
            self._line = 2
            self.stats.lines = 1
            return True
        if self._channels is not None:
            # explicit channels: "label" is accepted (and optional) unless has_labels=False
            hl = self._has_labels is not False
            self._engine = _Engine(self.source, self._channels, hl, self.on_error, self.stats)
            self._fmt = _JsonFormat(self._engine)
            return True
        start = 0
        lineno = self._line
        while True:
            i = buf.find(b"\n", start)
            if i < 0:
                return False
            ln = buf[start:i]
            if ln.strip():
                chans, hl = _JsonFormat.schema(self.source, ln, lineno)
                self._engine = _Engine(self.source, chans, hl, self.on_error, self.stats)
                self._fmt = _JsonFormat(self._engine)
                return True
            start = i + 1
            lineno += 1

    def prime(self, data: bytes) -> None:
        """Buffer data and set up the schema if possible (parses no rows)."""
        if data:
            self._buf = self._buf + data if self._buf else data
        if self._fmt is None:
            self._init()

    def feed(self, data: bytes, final: bool = False) -> Iterator[ReadingChunk]:
        if data:
            self._buf = self._buf + data if self._buf else data
        if final and self._buf and not self._buf.endswith(b"\n"):
            self._buf += b"\n"
        if self._fmt is None and not self._init():
            return
        buf = self._buf
        end = buf.rfind(b"\n") + 1
        if end == 0:
            return
        self._buf = buf[end:]
        complete = [buf[:end]]

        def read(_n: int) -> bytes:
            return complete.pop() if complete else b""

        yield from _chunks_from_parts(_iter_parts(read, self.chunk_rows), self._parse, lambda: self._engine)

    def _parse(self, blk: bytes, n: int) -> ReadingChunk | None:
        assert self._fmt is not None and self._engine is not None
        p = self._fmt.parse(blk, self._line, n)
        self._line += n
        self.stats.lines += n
        return self._engine.finish(p)

    @property
    def partial(self) -> bytes:
        return self._buf

    def skip_complete_lines(self) -> None:
        """Drop the buffered complete lines (they are counted in stats.lines)."""
        end = self._buf.rfind(b"\n") + 1
        if end:
            n = self._buf.count(b"\n", 0, end)
            self._line += n
            self.stats.lines += n
            self._buf = self._buf[end:]

    def record_skip(self, err: LogError) -> None:
        if self._engine is not None:
            self._engine._record_skip(err)
            return
        st = self.stats
        st.rows_skipped += 1
        st.skipped_by_reason[err.kind] = st.skipped_by_reason.get(err.kind, 0) + 1
        if len(st.first_errors) < MAX_ERRORS_KEPT:
            st.first_errors.append(err)


class JsonLinesStream:
    """JSON lines from a live stream (text or binary file object, e.g. stdin):
    ``{"ts":..., "device_id":..., "<channel>":..., "label":...}``.

    Channels come from the first record unless given.  Errors are
    :class:`LogError` naming ``name:line``.  With a binary buffer (``read1``)
    the lines available so far are batched into one chunk (up to
    ``chunk_rows``); otherwise lines are read up to ``chunk_rows`` at a time.
    """

    def __init__(
        self,
        file_obj: TextIO | BinaryIO,
        *,
        name: str | None = None,
        channels: Sequence[str] | None = None,
        has_labels: bool | None = None,
        chunk_rows: int = 1024,
        on_error: str = "raise",
        format: str = "jsonl",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.file = file_obj
        self.name = name or getattr(file_obj, "name", None) or "<stream>"
        if not isinstance(self.name, str):
            self.name = "<stream>"
        self._inc = _Incremental(self.name, format, on_error, chunk_rows, channels, has_labels)
        self.stats = self._inc.stats

    @property
    def channels(self):
        return self._inc.channels

    @property
    def has_labels(self):
        return self._inc.has_labels

    def _reader(self) -> Callable[[], bytes]:
        f = self.file
        raw = getattr(f, "buffer", None)
        if raw is not None and hasattr(raw, "read1") and isinstance(f, io.TextIOWrapper):
            return lambda: raw.read1(1 << 16)
        if hasattr(f, "read1") and not isinstance(f, io.TextIOBase):
            return lambda: f.read1(1 << 16)
        rows = self._inc.chunk_rows

        def read_lines() -> bytes:
            parts = []
            for _ in range(rows):
                ln = f.readline()
                if not ln:
                    break
                parts.append(ln.encode("utf-8", "surrogateescape") if isinstance(ln, str) else ln)
                if not (ln.endswith("\n") if isinstance(ln, str) else ln.endswith(b"\n")):
                    break
            return b"".join(parts)

        return read_lines

    def __iter__(self) -> Iterator[ReadingChunk]:
        read = self._reader()
        while True:
            data = read()
            if not data:
                yield from self._inc.feed(b"", final=True)
                return
            yield from self._inc.feed(data)


def StdinSource(**kwargs) -> JsonLinesStream:
    """JSON lines from standard input (errors name ``<stdin>:line``)."""
    kwargs.setdefault("name", "<stdin>")
    return JsonLinesStream(sys.stdin, **kwargs)


class FollowFile:
    """Follow a CSV / JSONL log as it grows (like ``tail -f``).

    The schema (CSV header / first JSON record) is read at construction when
    the file already exists, so ``channels`` is known at once (else ``None``
    until it appears).  Complete lines are parsed as they appear; a partial
    last line waits for its newline.  ``from_end=True`` skips the lines
    already in the file.  Iteration ends when :meth:`stop` is called (or the
    ``stop_event`` is set), after the data already written is consumed; a
    partial line left then is not parsed but counted as skipped
    (``"partial line at stop"``).  ``sleep`` (default: wait on the stop event,
    so stopping is immediate) is injectable.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        poll_s: float = 0.2,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_error: str = "raise",
        format: str | None = None,
        from_end: bool = False,
        stop_event: threading.Event | None = None,
        sleep: Callable[[float], Any] | None = None,
    ):
        self.path = str(path)
        fmt, gz = log_format(path) if format is None else (format, False)
        if gz:
            raise ValueError("cannot follow a gzip file")
        self.poll_s = poll_s
        self.from_end = from_end
        self.stop_event = stop_event or threading.Event()
        self._sleep = sleep or self.stop_event.wait
        self._inc = _Incremental(self.path, fmt, on_error, chunk_rows)
        self.stats = self._inc.stats
        self._f: BinaryIO | None = None
        self._pos = 0
        self._open()

    @property
    def channels(self) -> tuple[str, ...] | None:
        return self._inc.channels

    @property
    def has_labels(self) -> bool | None:
        return self._inc.has_labels

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __del__(self) -> None:
        f = self.__dict__.get("_f")
        if f is not None:
            f.close()

    def _open(self) -> bool:
        """Open the file if it exists and read its schema (and skip old lines)."""
        if self._f is not None:
            return True
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            return False
        self._f = f
        while self._inc._fmt is None:
            data = f.read(1 << 16)
            if not data:
                break
            self._pos += len(data)
            self._inc.prime(data)
        if self.from_end and self._inc._fmt is not None:
            while True:
                self._inc.skip_complete_lines()
                data = f.read(1 << 20)
                if not data:
                    break
                self._pos += len(data)
                self._inc.prime(data)
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
                f = self._f
                assert f is not None
                yield from self._inc.feed(b"")  # lines buffered while reading the schema
                got = False
                while True:
                    try:
                        size = os.fstat(f.fileno()).st_size
                    except OSError:
                        size = self._pos
                    if size < self._pos:
                        raise LogError(
                            self.path, self._inc._line, "file truncated while following", "truncated"
                        )
                    data = f.read(1 << 20)
                    if not data:
                        break
                    got = True
                    self._pos += len(data)
                    yield from self._inc.feed(data)
                if stopping:
                    if self._inc.partial.strip():
                        err = LogError(
                            self.path,
                            self._inc._line,
                            "partial line at stop (no newline)",
                            "partial line at stop",
                        )
                        self._inc.record_skip(err)
                    return
                if not got:
                    self._sleep(self.poll_s)
        finally:
            self.close()
