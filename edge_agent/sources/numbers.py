"""Vectorized field decoding for the log reader: decimal numbers and categorical codes.

A block of lines is one ``bytes`` object; a field is a ``[start, end)`` byte range of it.  Plain
decimals are parsed without per-row Python objects, exactly (see :func:`parse_numbers`); device ids
and labels of up to 8 bytes become ``uint64`` keys mapped to codes with ``searchsorted``.  Anything
unusual falls back to Python per field, so results never depend on where a block was cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PAD = 64  # bytes of b"\n" in front of every parse buffer (window gathers may reach back)
_FAST_MAX = 14  # longest numeric field handled by the vectorized parser
_POW10 = 10.0 ** np.arange(0, 23)

# Status of a parsed number.
OK, EMPTY, NAN, INF, BAD = 0, 1, 2, 3, 4


class Workspace:
    """Reusable scratch buffers for the largest parse temporaries (fresh large allocations are
    mmap'd by malloc and page-fault on every block: ~40% more CPU)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        size = math.prod(shape)
        key = (name, np.dtype(dtype).str)
        b = self._bufs.get(key)
        if b is None or b.shape[0] < size:
            b = self._bufs[key] = np.empty(max(size, 1024, int(b.shape[0] * 1.5) if b is not None else 0), dtype)
        return b[:size].reshape(shape)


def number(text: bytes) -> tuple[float, int]:
    """Python parse of one numeric field: ``(value, status)``; the rule the vectorized path follows."""
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
    return v, INF if v in (math.inf, -math.inf) else OK


def _windows(raw: bytes, width: int) -> np.ndarray:
    """Read-only ``(len - width + 1, width)`` uint8 view: row i = raw[i:i+width]."""
    return np.ndarray(shape=(len(raw) - width + 1, width), dtype=np.uint8, buffer=raw, strides=(1, 1))


def parse_numbers(raw: bytes, S: np.ndarray, E: np.ndarray, ws: Workspace | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Parse the numeric fields ``raw[S[i]:E[i]]``: (float64 values, int8 status) shaped like ``S``.

    Plain decimals (``[+-]digits[.digits]``, at most 14 chars) are parsed in vectorized form,
    grouped by length (:func:`_same_length`); other fields go through :func:`number`.
    """
    shape = S.shape
    S, E = S.ravel(), E.ravel()
    m = S.shape[0]
    vals = np.empty(m, dtype=np.float64)
    status = np.zeros(m, dtype=np.int8)
    if m == 0:
        return vals.reshape(shape), status.reshape(shape)
    ws = ws or Workspace()
    flen = E - S
    counts = np.bincount(flen)
    fallback: list[np.ndarray] = [np.flatnonzero(flen > _FAST_MAX)] if counts.shape[0] > _FAST_MAX + 1 else []
    if counts[0]:
        z = np.flatnonzero(flen == 0)
        vals[z], status[z] = math.nan, EMPTY
    for ell in (np.flatnonzero(counts[1 : _FAST_MAX + 1]) + 1).tolist():
        idx = None if counts[ell] == m else np.flatnonzero(flen == ell)
        v, badrow = _same_length(raw, S if idx is None else S[idx], ell, ws)
        if idx is None:
            vals[:] = v
        else:
            vals[idx] = v
        if badrow is not None and badrow.any():
            fallback.append(np.flatnonzero(badrow) if idx is None else idx[badrow])
    if fallback:
        fb = np.concatenate(fallback)
        for i, s, e in zip(fb.tolist(), S[fb].tolist(), E[fb].tolist(), strict=True):
            vals[i], status[i] = number(raw[s:e])
    return vals.reshape(shape), status.reshape(shape)


def _same_length(raw: bytes, starts: np.ndarray, ell: int, ws: Workspace) -> tuple[np.ndarray, np.ndarray | None]:
    """Values of the fields of ``ell`` bytes at ``starts``, and the rows that are not plain decimals.

    With the bytes ``d`` of a group (dot and sign kept as their byte codes), ``A = d @ 10**k`` and
    ``P = isdot @ 10**k`` are exact integers in float64, which give the mantissa; one correctly
    rounded division by ``10**fraction_digits`` then yields exactly what ``float()`` yields.
    Both are summed column by column (:func:`_place_values`), not as matrix products of a float64
    copy of ``d`` (8 bytes a character: 0.6 MB of a replay's peak, #27 §4).
    """
    k = starts.shape[0]
    d = _windows(raw, ell)[starts]  # (k, ell) uint8 copy
    d -= np.uint8(48)  # digits 0..9, '.' -> 254, '-' -> 253, '+' -> 251
    isdot = np.equal(d, 254, out=ws.get("isdot", (k, ell), bool))
    c0 = d[:, 0]
    sign = (c0 == 253) | (c0 == 251)
    n_sign, n_dot, n_notdig = np.count_nonzero(sign), np.count_nonzero(isdot), np.count_nonzero(d > 9)
    A = _place_values(d)  # digits (dot and sign included with their code values)
    P = None
    if n_dot:
        P = _place_values(isdot)  # 10**fraction_digits, 0 if no dot
        A -= 254.0 * P
    if n_sign:
        A -= np.where(sign, c0, 0).astype(np.float64) * _POW10[ell - 1]
    badrow = None
    if n_notdig != n_dot + n_sign:  # some other character somewhere
        bad = (d > 9) & ~isdot
        bad[:, 0] &= ~sign
        badrow = bad.any(axis=1)
    if P is not None and n_dot != np.count_nonzero(P):  # a row with 2+ dots
        badrow = _or(badrow, isdot.sum(axis=1) > 1)
    if ell <= 2:  # "-", ".", "-." ... have no digit
        badrow = _or(badrow, (d <= 9).sum(axis=1) == 0)
    if P is None:
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
    return v, badrow


def _place_values(d: np.ndarray) -> np.ndarray:
    """``d @ 10**k`` (``d`` of ``ell`` <= 14 columns of byte values or booleans) in float64 by Horner's rule:
    every partial sum is an integer below 2**53 (at most 254 * 10**14 / 9), so each step is exact and the
    result is the matrix product's, bit for bit, without a float64 copy of ``d``."""
    A = d[:, 0].astype(np.float64)
    for j in range(1, d.shape[1]):
        A *= 10.0
        A += d[:, j]
    return A


def _or(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    return b if a is None else a | b


class Codes:
    """Incremental string -> code table of a categorical column (device id, label).

    Codes are given in order of first appearance, so they do not depend on chunking.  A code is
    *invalid* when its bytes are not UTF-8, or blank where ``allow_empty`` is false: the rows holding
    it are checked one by one, where the reason is written.
    """

    def __init__(self, allow_empty: bool, longest: int | None = None):
        self.allow_empty = allow_empty
        self.names: list[str] = []
        self.longest = longest  # a longer name is never a valid value: its rows are refused
        self.invalid: set[int] = set()
        self.by_bytes: dict[bytes, int] = {}
        self.by_str: dict[Any, int] = {}
        self._keys = np.empty(0, dtype=np.uint64)
        self._keycodes = np.empty(0, dtype=np.int32)
        self._new_keys: list[tuple[int, int]] = []
        self._names_t: tuple[str, ...] = ()
        self._names_arr = np.array([], dtype=str)
        self._invalid_arr = np.empty(0, dtype=np.int32)

    def _add(self, b: bytes) -> int:
        code = len(self.names)
        try:
            name = b.decode("utf-8")
        except UnicodeDecodeError:
            name = b.decode("utf-8", "replace")
            self.invalid.add(code)
        if not self.allow_empty and not name.strip():
            self.invalid.add(code)
        self.names.append(name)
        self.by_bytes[b] = code
        self.by_str.setdefault(name, code)
        if len(b) <= 8 and b"\0" not in b:
            self._new_keys.append((int.from_bytes(b, "little"), code))
        if code in self.invalid:
            self._invalid_arr = np.array(sorted(self.invalid), dtype=np.int32)
        return code

    def _flush_keys(self) -> None:
        """Merge the keys added since the last flush into the sorted key table."""
        if self._new_keys:
            keys = np.concatenate([self._keys, np.array([k for k, _ in self._new_keys], dtype=np.uint64)])
            codes = np.concatenate([self._keycodes, np.array([c for _, c in self._new_keys], dtype=np.int32)])
            self._new_keys = []
            order = np.argsort(keys, kind="stable")
            self._keys, self._keycodes = keys[order], codes[order]

    @property
    def names_tuple(self) -> tuple[str, ...]:
        if len(self._names_t) != len(self.names):
            self._names_t = tuple(self.names)
        return self._names_t

    @property
    def names_array(self) -> np.ndarray:
        if len(self._names_arr) != len(self.names):
            # numpy sizes every cell to the longest name: one refused 1 MiB label made each later chunk of
            # labels rows x 4 MiB (gigabytes). A name past ``longest`` indexes no row (its rows are refused).
            longest = self.longest
            names = self.names if longest is None else [n if len(n) <= longest else "" for n in self.names]
            self._names_arr = np.array(names, dtype=str)
        return self._names_arr

    def encode_fields(self, raw: bytes, S: np.ndarray, E: np.ndarray, has_nul: bool) -> np.ndarray:
        """Codes of the fields ``raw[S[i]:E[i]]``."""
        n = S.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.int32)
        flen = E - S
        if not has_nul and int(flen.max()) <= 8:
            word = _windows(raw, 8)[E - 8].view("<u8").ravel()  # the field right-aligned in 8 bytes
            shift = (64 - 8 * flen).astype(np.uint64)
            empty = flen == 0
            shift[empty] = 0
            keys = np.where(empty, np.uint64(0), word >> shift) if empty.any() else word >> shift
            return self._encode_keys(keys, raw, S, E)
        fields = [raw[s:e] for s, e in zip(S.tolist(), E.tolist(), strict=True)]
        return self._encode(fields, self.by_bytes, n, self._add)

    def _encode_keys(self, keys: np.ndarray, raw: bytes, S: np.ndarray, E: np.ndarray) -> np.ndarray:
        self._flush_keys()
        K = self._keys
        if K.size:
            pos = np.minimum(np.searchsorted(K, keys), K.size - 1)
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
        return self._keycodes[np.searchsorted(self._keys, keys)]

    def encode_values(self, col: Sequence[str | None]) -> np.ndarray:
        """Codes of a column of Python strings (None is read as "")."""
        return self._encode(col, self.by_str, len(col), self._add_str)

    def _add_str(self, s: str | None) -> int:
        b = (s or "").encode("utf-8", "surrogatepass")
        code = self.by_bytes.get(b)
        if code is None:
            code = self._add(b)
        self.by_str[s] = code
        return code

    @staticmethod
    def _encode(items: Any, table: dict, n: int, add: Any) -> np.ndarray:
        items = list(items)
        if not table.keys() >= set(items):
            for v in dict.fromkeys(items):
                if v not in table:
                    add(v)
        return np.fromiter(map(table.__getitem__, items), dtype=np.int32, count=n)

    def invalid_mask(self, codes: np.ndarray) -> np.ndarray | None:
        """Rows holding an invalid code, or None when there is none."""
        if not self.invalid:
            return None
        m = np.isin(codes, self._invalid_arr)
        return m if m.any() else None
