"""The two line formats of a log, and the rules every row must pass.

One set of rules judges a row (:class:`Rules`); the fast paths only decide whether a row needs
judging.  A CSV block is scanned as a ``uint8`` array: separator positions give every field's
byte range, numbers and codes are decoded in bulk (``numbers.py``), and only the rows whose fields
are not plain go through the rules.  A JSON Lines block is decoded with one ``orjson`` call when
every record has the expected keys and types; otherwise line by line, through the rules.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from edge_agent.contract.wire import MAX_LABEL_CHARS, fits_label
from edge_agent.sources.chunk import (
    BAD_ENCODING,
    BAD_HEADER,
    BAD_JSON,
    BAD_NUMBER,
    BAD_QUOTING,
    BAD_VALUE,
    EMPTY_FIELD,
    EXTRA_COLUMN,
    MISSING_COLUMN,
    NON_FINITE_TS,
    NON_FINITE_VALUE,
    TS_MAX,
    LogError,
    bad_json_reason,
    ts_in_range,
    ts_range_reason,
)
from edge_agent.sources.numbers import BAD, EMPTY, INF, OK, PAD, Codes, Workspace, number, parse_numbers

_NUM = frozenset((int, float))
Problem = tuple[int, str, str]  # (line, kind, reason)


def shorten(b: bytes | str, limit: int = 40) -> str:
    s = b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _show(v: Any) -> str:
    """A field as written: CSV text in quotes, JSON values as JSON (numbers as Python shows them)."""
    if isinstance(v, bytes):
        return f"'{shorten(v)}'"
    return shorten(repr(v) if type(v) in _NUM else orjson.dumps(v))


def _number(v: Any) -> tuple[float, int]:
    if isinstance(v, bytes):
        return number(v)
    if v is None:
        return math.nan, EMPTY
    if type(v) not in _NUM:
        return math.nan, BAD
    try:
        x = float(v)
    except OverflowError:
        return math.inf, INF
    return x, INF if math.isinf(x) else OK


def _text(v: Any, column: str) -> tuple[str, tuple[str, str] | None]:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8"), None
        except UnicodeDecodeError:
            return "", (BAD_ENCODING, f"invalid UTF-8 in column '{column}'")
    if v is None or type(v) is str:
        return v or "", None
    if type(v) is bool:
        return "true" if v else "false", None
    if type(v) in _NUM:
        return str(v), None
    return "", (BAD_VALUE, f"bad {column} {_show(v)}")


class Rules:
    """Every rule a row must pass, in one place: CSV fields (bytes) and JSON values alike.

    ``ts`` a finite number; ``device_id`` non-blank text; each channel a number, empty/null/NaN
    meaning a missing reading, within float32 range; ``label`` text (numbers and booleans are
    written out).  Per device, ``ts`` strictly increases (:meth:`LineParser._times`).
    """

    def __init__(self, channels: Sequence[str], has_labels: bool):
        self.channels, self.has_labels = tuple(channels), has_labels

    def row(self, ts: Any, dev: Any, values: Sequence[Any], label: Any
            ) -> tuple[tuple[float, str, list[float], str] | None, tuple[str, str] | None]:
        """``(typed row, None)`` or ``(None, (kind, reason))``."""
        t, st = _number(ts)
        if st != OK:
            return None, ((EMPTY_FIELD, "empty field 'ts'") if st == EMPTY else
                          (BAD_NUMBER, f"bad number {_show(ts)} in column 'ts'") if st == BAD else
                          (NON_FINITE_TS, f"non-finite ts {_show(ts)}"))
        if not -TS_MAX <= t <= TS_MAX:
            return None, ts_range_reason(_show(ts))
        device, err = _text(dev, "device_id")
        if err or not device.strip():
            return None, err or (EMPTY_FIELD, "empty field 'device_id'")
        vals = []
        for name, v in zip(self.channels, values, strict=True):
            x, st = _number(v)
            if st == BAD:
                return None, (BAD_NUMBER, f"bad number {_show(v)} in column '{name}'")
            if st == INF:
                return None, (NON_FINITE_VALUE, f"non-finite value {_show(v)} in column '{name}'")
            if st == OK and abs(x) >= 3.4028235677973366e38:  # rounds to inf as float32
                return None, (NON_FINITE_VALUE, f"value {_show(v)} out of float32 range in column '{name}'")
            vals.append(x)
        if self.has_labels and type(label) is list and label and set(map(type, label)) <= _NUM:
            label = ";".join(map(repr, label))  # JSON Lines: several targets as a list of numbers
        label, err = _text(label, "label") if self.has_labels else ("", None)
        return (None, err) if err else ((t, device, vals, label), None)

    @staticmethod
    def label_numbers(label: str) -> tuple[tuple[float, ...] | None, tuple[str, str] | None]:
        """A label of a numeric label column (regression targets): finite numbers separated by ``;``
        (one per output, e.g. ``x;y`` of a position), or empty for unknown (``None``)."""
        if not label.strip():
            return None, None
        out = []
        for part in label.split(";"):
            x, st = number(part.encode("utf-8", "surrogatepass"))
            if st in (BAD, EMPTY):
                return None, (BAD_NUMBER, f"bad number {_show(label.encode())} in column 'label' (the labels are numbers)")
            if st != OK:
                return None, (NON_FINITE_VALUE, f"non-finite value {_show(label.encode())} in column 'label'")
            out.append(x)
        return tuple(out), None


class Block:
    """The valid rows of one block of lines, and the lines that gave none."""

    def __init__(self, ts, dev, vals, lab, lines, problems: list[Problem], blank: int):
        self.ts, self.dev, self.vals, self.lab, self.lines = ts, dev, vals, lab, lines
        self.problems, self.blank = problems, blank

    def keep(self, mask: np.ndarray) -> None:
        self.ts, self.dev, self.vals, self.lines = self.ts[mask], self.dev[mask], self.vals[mask], self.lines[mask]
        self.lab = self.lab[mask] if self.lab is not None else None


class Csv:
    """Blocks of CSV lines; the header fixes the columns."""

    def __init__(self, p: Decoder, header: bytes):
        try:
            text = header.removeprefix(b"\xef\xbb\xbf").decode("utf-8").rstrip("\r\n")
            names = [c.strip() for c in next(csv.reader([text], strict=True))] if text.strip() else []
        except UnicodeDecodeError:
            raise LogError(p.source, 1, "invalid UTF-8 in header", BAD_HEADER) from None
        except csv.Error as exc:
            raise LogError(p.source, 1, f"bad header: {exc}", BAD_HEADER) from None
        problem = ("empty header line" if not names else "empty column name in header" if "" in names
                   else next((f"duplicate column '{c}' in header" for i, c in enumerate(names) if c in names[:i]),
                             next((f"missing header column '{c}'" for c in ("ts", "device_id") if c not in names),
                                  None)))
        self.ichan = [i for i, c in enumerate(names) if c not in ("ts", "device_id", "label")]
        if problem or not self.ichan:
            raise LogError(p.source, 1, problem or "no channel columns in header", BAD_HEADER)
        self.p, self.ncols = p, len(names)
        p.rules = Rules(tuple(names[i] for i in self.ichan), "label" in names)
        self.its, self.idev = names.index("ts"), names.index("device_id")
        self.ilab = names.index("label") if "label" in names else None
        self.numcols = np.array([self.its, *self.ichan], dtype=np.intp)

    def parse(self, block: bytes, first_line: int, nlines: int) -> Block:
        block = block.replace(b"\r\n", b"\n") if b"\r" in block else block
        if b'"' not in block and b"\0" not in block:
            a = np.frombuffer(block, dtype=np.uint8)
            flat = np.flatnonzero((a == 44) | (a == 10))
            if flat.shape[0] == nlines * self.ncols:
                E = flat.reshape(nlines, self.ncols)
                if (a[E[:, -1]] == 10).all():  # every row ends on a newline: the others are commas
                    E = E + PAD
                    S = np.empty_like(E)
                    S[:, 1:] = E[:, :-1] + 1
                    S[1:, 0] = E[:-1, -1] + 1
                    S[0, 0] = PAD
                    lines = np.arange(first_line, first_line + nlines, dtype=np.int64)
                    return self._columns(b"\n" * PAD + block, S, E, lines, [], 0, False)
        return self._by_line(block, first_line)

    def _by_line(self, block: bytes, first_line: int) -> Block:
        """Structure line by line (quotes, blank lines, column counts); fields still decode in bulk."""
        rows: list[list[bytes]] = []
        lines: list[int] = []
        problems: list[Problem] = []
        blank = 0
        for lineno, ln in enumerate(block.split(b"\n")[:-1], first_line):
            if not ln.strip():
                blank += 1
                continue
            fields = ln.split(b",")
            if b'"' in ln:
                try:
                    fields = [f.encode("utf-8") for f in next(csv.reader([ln.decode("utf-8")], strict=True))]
                except UnicodeDecodeError:
                    problems.append((lineno, BAD_ENCODING, "invalid UTF-8"))
                    continue
                except csv.Error as exc:
                    problems.append((lineno, BAD_QUOTING, f"bad quoting: {exc}"))
                    continue
            if len(fields) != self.ncols:
                k, nc = len(fields), self.ncols
                problems.append((lineno, MISSING_COLUMN if k < nc else EXTRA_COLUMN,
                                 f"{'missing' if k < nc else 'extra'} column(s): expected {nc} fields, got {k}"))
                continue
            rows.append(fields)
            lines.append(lineno)
        flat = [f for r in rows for f in r]
        lens = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat)).reshape(len(rows), self.ncols)
        E = np.cumsum(lens).reshape(lens.shape) + PAD
        raw = b"\n" * PAD + b"".join(flat)
        return self._columns(raw, E - lens, E, np.array(lines, dtype=np.int64), problems, blank, b"\0" in raw)

    def _columns(self, raw: bytes, S, E, lines, problems: list[Problem], blank: int, has_nul: bool) -> Block:
        p = self.p
        num, st = parse_numbers(raw, S[:, self.numcols], E[:, self.numcols], p.ws)
        dev = p.devices.encode_fields(raw, S[:, self.idev], E[:, self.idev], has_nul)
        lab = None if self.ilab is None else p.labels.encode_fields(raw, S[:, self.ilab], E[:, self.ilab], has_nul)
        with np.errstate(over="ignore"):
            vals = num[:, 1:].astype(np.float32)
        suspect = (st[:, 0] != OK) | ~ts_in_range(num[:, 0]) | (st[:, 1:] >= INF).any(axis=1) | np.isinf(vals).any(axis=1)
        # The times copied out: a view of num's first column would keep all of num (float64, every numeric
        # column) alive with the block until its chunk is complete: 0.4 MB of a replay's peak (#27 §4).
        b = Block(num[:, 0].copy(), dev, vals, lab, lines, problems, blank)

        def fields(r: int) -> tuple[Any, Any, list[Any], Any]:
            f = [raw[s:e] for s, e in zip(S[r].tolist(), E[r].tolist(), strict=True)]
            return f[self.its], f[self.idev], [f[i] for i in self.ichan], None if self.ilab is None else f[self.ilab]

        p.judge(b, suspect, fields)
        return b


class Jsonl:
    """Blocks of JSON Lines; the first record (or the caller) fixes the channels."""

    def __init__(self, p: Decoder):
        self.p, self.rules = p, p.rules
        has_labels = p.rules.has_labels
        self.keys = ("ts", "device_id", *p.rules.channels, *(("label",) if has_labels else ()))
        self.keyset = frozenset(self.keys)
        self.get = itemgetter(*self.keys)
        self.get_unlabelled = itemgetter(*self.keys[:-1]) if has_labels else None

    @staticmethod
    def schema(source: str, line: bytes, lineno: int) -> tuple[tuple[str, ...], bool]:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise LogError(source, lineno, bad_json_reason(exc, line), BAD_JSON) from None
        if type(rec) is not dict:
            raise LogError(source, lineno, "expected a JSON object", BAD_JSON)
        missing = [k for k in ("ts", "device_id") if k not in rec]
        chans = tuple(k for k in rec if k not in ("ts", "device_id", "label"))
        if missing or not chans:
            why = f"missing key '{missing[0]}' in first record" if missing else "no channel keys in first record"
            raise LogError(source, lineno, why, BAD_HEADER)
        return chans, "label" in rec

    def parse(self, block: bytes, first_line: int, nlines: int) -> Block:
        lines_b = block.split(b"\n")[:-1]
        try:
            recs = orjson.loads(b"[" + b",".join(lines_b) + b"]")
        except orjson.JSONDecodeError:
            recs = None
        cols = self._columns(recs) if recs is not None and len(recs) == nlines else None
        if cols is not None:
            lines = np.arange(first_line, first_line + nlines, dtype=np.int64)
            try:
                b = self.p.block(cols[0], cols[1], cols[2:-1], cols[-1], lines, [], 0)
            except (OverflowError, ValueError, TypeError):
                pass  # e.g. an integer too big for a double: the rules name it
            else:
                self.p.judge(b, ~ts_in_range(b.ts) | np.isinf(b.vals).any(axis=1),
                              lambda r: (cols[0][r], cols[1][r], [c[r] for c in cols[2:-1]], cols[-1][r]))
                return b
        return self._by_line(lines_b, first_line)

    def _columns(self, recs: list[Any]) -> list[tuple] | None:
        """Columns of records that all have the expected keys and plain types, else None."""
        if set(map(type, recs)) != {dict}:
            return None
        lens, n, nk = set(map(len, recs)), len(recs), len(self.keys)
        try:
            if lens == {nk}:
                cols = list(zip(*map(self.get, recs), strict=True))
            elif lens == {nk - 1} and self.get_unlabelled is not None:  # no record has a label
                cols = [*zip(*map(self.get_unlabelled, recs), strict=True), (None,) * n]
            else:
                return None
        except KeyError:
            return None
        if self.get_unlabelled is None:
            cols.append((None,) * n)
        ok = (set(map(type, cols[0])) <= _NUM and set(map(type, cols[1])) == {str}
              and all(set(map(type, c)) <= _NUM | {type(None)} for c in cols[2:-1])
              and set(map(type, cols[-1])) <= {str, type(None)})
        return cols if ok or n == 0 else None

    def _by_line(self, lines_b: list[bytes], first_line: int) -> Block:
        rows: list[tuple[float, str, list[float], str]] = []
        lines: list[int] = []
        problems: list[Problem] = []
        blank = 0
        for lineno, ln in enumerate(lines_b, first_line):
            if not ln.strip():
                blank += 1
                continue
            row, err = self._row(ln)
            if err:
                problems.append((lineno, *err))
            else:
                rows.append(row)
                lines.append(lineno)
        cols = list(zip(*rows, strict=True)) or [()] * 4
        vals = np.array(cols[2], dtype=np.float64).reshape(len(rows), len(self.rules.channels))
        return self.p.block(cols[0], cols[1], vals.T, cols[3], np.array(lines, dtype=np.int64), problems, blank)

    def _row(self, ln: bytes) -> tuple[Any, tuple[str, str] | None]:
        try:
            rec = orjson.loads(ln)
        except orjson.JSONDecodeError as exc:
            return None, (BAD_JSON, bad_json_reason(exc, ln))
        if type(rec) is not dict:
            return None, (BAD_JSON, "expected a JSON object")
        missing = [k for k in self.keys if k not in rec and k != "label"]
        extra = [k for k in rec if k not in self.keyset]
        if missing or extra:
            return None, ((MISSING_COLUMN, f"missing key '{missing[0]}'") if missing else
                          (EXTRA_COLUMN, f"unexpected key '{shorten(extra[0])}'"))
        return self.rules.row(rec["ts"], rec["device_id"], [rec[c] for c in self.rules.channels], rec.get("label"))

class Decoder:
    """What the blocks of one source share: the code tables of device ids and labels, scratch
    buffers, and the rules (known once the header or first record is read)."""

    def __init__(self, source: str):
        self.source = source
        self.ws = Workspace()
        self.devices, self.labels = Codes(allow_empty=False), Codes(allow_empty=True, longest=MAX_LABEL_CHARS)
        self.rules = Rules((), False)
        self._label_list: list[tuple[float, ...] | None] = []  # per label code, for a numeric label column
        self._label_values = np.empty((0, 1))
        self._label_errors: dict[int, tuple[str, str]] = {}
        self._texts_checked = 0  # text labels judged so far (check_label_text)
        self.outputs: int | None = None  # numbers per label: fixed by the first label that has any

    def forget_devices(self) -> None:
        """Start the device code table afresh (see :meth:`LineParser._forget_devices`, the one caller)."""
        self.devices = Codes(allow_empty=False)

    def forget_labels(self) -> None:
        """Start the label code table afresh (the column's count of numbers stays). Labels leave the parser as
        text or numbers, never as codes, so nothing downstream sees this; it bounds a source whose labels
        differ at every reading (a regression target, a position): else its table grows for as long as it
        runs (~300 bytes a label)."""
        self.labels = Codes(allow_empty=True, longest=MAX_LABEL_CHARS)
        self._label_list = []
        self._label_values = np.empty((0, self.outputs or 1))
        self._label_errors = {}
        self._texts_checked = 0

    def check_label_numbers(self, b: Block) -> None:
        """A numeric label column: rows whose label is not a number (or empty), or holds another
        count of numbers than the column's first, become problems."""
        assert b.lab is not None
        known = len(self._label_list)
        if known < len(self.labels.names):  # labels first met in this block, each judged once
            for i, name in enumerate(self.labels.names[known:], known):
                numbers, err = Rules.label_numbers(name)
                if numbers is not None and self.outputs is None:
                    self.outputs = len(numbers)
                if numbers is not None and len(numbers) != self.outputs:
                    err = (BAD_VALUE, f"label {_show(name.encode())} holds {len(numbers)} numbers, "
                                      f"the column's first label {self.outputs}")
                    numbers = None
                self._label_list.append(numbers)
                if err:
                    self._label_errors[i] = err
            k = self.outputs or 1
            if self._label_values.shape[1] != k:  # the first numbers came after unknown labels only
                self._label_values = np.full((self._label_values.shape[0], k), math.nan)
            new = np.array([x if x is not None else (math.nan,) * k for x in self._label_list[known:]],
                           dtype=np.float64).reshape(-1, k)
            self._label_values = np.concatenate([self._label_values, new])
        self._drop_bad_labels(b)

    def check_label_text(self, b: Block) -> None:
        """A text label column: a label a result cannot carry (over 256 characters, or holding a NUL) makes its
        rows problems. Sent as a result's truth, the hub would refuse every batch holding it, and the device
        would keep those results for good."""
        assert b.lab is not None
        names = self.labels.names
        if self._texts_checked < len(names):  # labels first met in this block, each judged once
            for i in range(self._texts_checked, len(names)):
                name = names[i]
                if not fits_label(name):
                    why = "holds a NUL" if "\x00" in name else f"is longer than {MAX_LABEL_CHARS} characters"
                    self._label_errors[i] = (BAD_VALUE, f"label {_show(name)} {why}")
            self._texts_checked = len(names)
        self._drop_bad_labels(b)

    def _drop_bad_labels(self, b: Block) -> None:
        if self._label_errors:
            assert b.lab is not None
            bad = np.isin(b.lab, np.fromiter(self._label_errors, dtype=np.int64))
            if bad.any():
                for r in np.flatnonzero(bad).tolist():
                    b.problems.append((int(b.lines[r]), *self._label_errors[int(b.lab[r])]))
                b.keep(~bad)

    def label_numbers(self, codes: np.ndarray) -> np.ndarray:
        """Labels as float64 (NaN = unknown), after :meth:`check_label_numbers`: ``[n]`` for one
        number per label, ``[n, outputs]`` for several."""
        values = self._label_values[codes]
        return values[:, 0] if values.shape[1] == 1 else values

    def block(self, ts: Sequence[Any], dev: Sequence[Any], chans: Any, labels: Sequence[Any],
              lines: np.ndarray, problems: list[Problem], blank: int) -> Block:
        """A block from Python columns (JSON values)."""
        n = lines.shape[0]
        vals = np.empty((n, len(self.rules.channels)), dtype=np.float32)
        with np.errstate(over="ignore"):
            for k, col in enumerate(chans):
                vals[:, k] = np.array(col, dtype=np.float64)
        lab = self.labels.encode_values(labels) if self.rules.has_labels else None
        return Block(np.array(ts, dtype=np.float64).reshape(n), self.devices.encode_values(dev), vals, lab,
                      lines, problems, blank)

    def judge(self, b: Block, suspect: np.ndarray, fields: Any) -> None:
        """Put the rows the fast path doubts through the rules; drop the ones that fail."""
        for mask in (self.devices.invalid_mask(b.dev), None if b.lab is None else self.labels.invalid_mask(b.lab)):
            if mask is not None:
                suspect = suspect | mask
        if not suspect.any():
            return
        bad = np.zeros(b.ts.shape[0], dtype=bool)
        for r in np.flatnonzero(suspect).tolist():
            _, err = self.rules.row(*fields(r))
            if err:
                bad[r] = True
                b.problems.append((int(b.lines[r]), *err))
        b.keep(~bad)
