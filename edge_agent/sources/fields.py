"""Readings of real sensors: a JSON object or a CSV line in, a log record out, judged by the log's rules.

A sensor's reading is shaped by its firmware (Zigbee2MQTT ``{"temperature":21.5,...}``, Tasmota
``{"Time":...,"BME280":{"Temperature":21.3}}``, a board printing ``21.3,40.2``). :class:`FieldMap`
picks the channels, the time and the label out of it (the settings' paths); :class:`SensorFeed`
writes each as a JSON Lines record and feeds it to a :class:`LineParser`, so a reading passes the
same rules as a line of a recorded log (numbers, float32 range, per-device increasing ts). A reading
that fails is counted by reason and named in the log with where it came from (a topic, a port's
line), never raised: one bad payload must not stop a device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from edge_agent.settings.agent import AgentSettings, channel_specs, field_path
from edge_agent.sources.chunk import (
    BAD_JSON,
    BAD_NUMBER,
    BAD_VALUE,
    MISSING_COLUMN,
    LogError,
    NotedStats,
    ReadingChunk,
    bad_json_reason,
)
from edge_agent.sources.lines import LineParser

log = logging.getLogger(__name__)

_MISSING = object()


class Rejected(Exception):
    """A reading that cannot become a record: ``kind`` (the counter), ``reason`` (said in the log)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def lookup(obj: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` (keys of objects, numbers of list items), or ``_MISSING``."""
    for key in path:
        if isinstance(obj, dict):
            obj = obj.get(key, _MISSING)
        elif isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        else:
            return _MISSING
        if obj is _MISSING:
            return obj
    return obj


def timestamp(value: Any, unit: str) -> float:
    """A reading's time in seconds: a number (in ``unit``), or ISO 8601 text (without an offset it is
    this machine's local time, as Tasmota's ``Time`` is the device's)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / (1000.0 if unit == "ms" else 1.0)
    if isinstance(value, str):
        try:
            return float(value) / (1000.0 if unit == "ms" else 1.0)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(value.strip()).timestamp()
        except ValueError:
            pass
    raise Rejected(BAD_VALUE, f"time {orjson.dumps(value).decode()[:40]} is neither a number nor ISO 8601")


def _cell(text: str) -> Any:
    """A CSV field as JSON would carry it: empty is missing, a number is a number; other text stays
    text, for the rules to name."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


class FieldMap:
    """Which fields of a reading are its channels, its time and its label (settings ``sensor_*``)."""

    def __init__(self, channels: Sequence[tuple[str, tuple[str, ...]]], *, ts: tuple[str, ...] | None = None,
                 ts_unit: str = "s", label: tuple[str, ...] | None = None, csv: bool = False) -> None:
        self.channels = tuple(name for name, _ in channels)
        self.paths = tuple(path for _, path in channels)
        self.ts, self.ts_unit, self.label, self.csv = ts, ts_unit, label, csv

    @classmethod
    def of(cls, s: AgentSettings, *, csv: bool = False) -> FieldMap:
        return cls(channel_specs(s.sensor_channels, columns=csv),
                   ts=None if s.sensor_ts is None else field_path("sensor_ts", s.sensor_ts, columns=csv),
                   ts_unit=s.sensor_ts_unit, csv=csv,
                   label=None if s.sensor_label is None else field_path("sensor_label", s.sensor_label, columns=csv))

    def parse(self, raw: bytes) -> Any:
        """A payload or a line: a JSON object, or (CSV) the list of its fields."""
        if self.csv:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected("bad encoding", "invalid UTF-8") from None
            return [_cell(x) for x in text.split(",")]
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Rejected(BAD_JSON, bad_json_reason(exc, raw)) from None
        if not isinstance(obj, dict):
            raise Rejected(BAD_JSON, f"expected a JSON object, got {raw[:40]!r}")
        return obj

    def is_header(self, obj: Any) -> bool:
        """A CSV header line (the channel names), as boards print one after a reset: not a reading."""
        return self.csv and isinstance(obj, list) and all(isinstance(x, str) for x in obj) and \
            set(self.channels) <= set(obj)

    def record(self, obj: Any, device: str, arrival: float) -> dict[str, Any]:
        """The log record of one reading; a channel the reading lacks is a missing value (NaN), a
        reading with none of them is rejected."""
        values = [lookup(obj, p) for p in self.paths]
        if all(v is _MISSING for v in values):
            where = "column" if self.csv else "field"
            raise Rejected(MISSING_COLUMN, f"no channel {where} ({', '.join('.'.join(p) for p in self.paths)})")
        rec: dict[str, Any] = {"ts": arrival, "device_id": device}
        if self.ts is not None:
            value = lookup(obj, self.ts)
            if value is _MISSING:
                raise Rejected(MISSING_COLUMN, f"no time field {'.'.join(self.ts)!r}")
            rec["ts"] = timestamp(value, self.ts_unit)
        for name, v in zip(self.channels, values, strict=True):
            rec[name] = None if v is _MISSING else v
        if self.label is not None:
            label = lookup(obj, self.label)
            rec["label"] = None if label is _MISSING else label
        return rec


class _Named(NotedStats):
    """The parser's counters, where a line the rules refuse is named after where its reading came from."""

    def __init__(self, feed: SensorFeed) -> None:
        super().__init__(feed.name)
        self.feed = feed

    def record(self, err: LogError) -> None:  # the parser's, for a refused line
        self.note(self.feed.origins.get(err.line, f"line {err.line}"), err.kind, err.reason)


class SensorFeed:
    """Records in, chunks out, through a :class:`LineParser`; every rejected reading counted and named."""

    def __init__(self, name: str, fields: FieldMap) -> None:
        self.name, self.fields = name, fields
        self.parser = LineParser(name, "jsonl", channels=fields.channels, has_labels=fields.label is not None,
                                 on_error="skip")
        self.stats = _Named(self)
        self.parser.live(self.stats)
        self.parser.keys = True
        self._line = 1  # the parser's line of the next record
        self.origins: dict[int, str] = {}  # parser line -> where the record came from, until it is judged
        self._arrived: dict[str, float] = {}  # device -> the arrival time of its last reading

    @property
    def channels(self) -> tuple[str, ...]:
        return self.fields.channels

    @property
    def has_labels(self) -> bool:
        return self.fields.label is not None

    def reject(self, origin: str, kind: str, reason: str) -> None:
        """Count a reading that is not one, and say so (:class:`NotedStats`: the first few, then a count a minute)."""
        self.stats.note(origin, kind, reason)

    def take(self, origin: str, raw: bytes, device: str, arrival: float) -> bytes:
        """One reading as a record's JSON line (b"" when it is rejected, or a CSV header)."""
        if self.fields.ts is None:  # readings that arrive together (one read of a port) keep their order
            arrival = max(arrival, self._arrived.get(device, -math.inf) + 1e-6)
            self._arrived[device] = arrival
        try:
            obj = self.fields.parse(raw)
            if self.fields.is_header(obj):
                return b""
            rec = self.fields.record(obj, device, arrival)
            line = orjson.dumps(rec)
        except Rejected as exc:
            self.reject(origin, exc.kind, exc.reason)
            return b""
        except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. an integer beyond 64 bits
            self.reject(origin, BAD_NUMBER, str(exc))
            return b""
        if not math.isfinite(rec["ts"]):
            self.reject(origin, BAD_VALUE, f"time {rec['ts']!r} is not finite")
            return b""
        self.origins[self._line] = origin
        self._line += 1
        return line + b"\n"

    def chunks(self, lines: bytes) -> Iterator[ReadingChunk]:
        """The chunks of records made by :meth:`take`; a record the rules refuse is rejected, the rest go on."""
        yield from self.parser.feed(lines)
        self.origins.clear()
