"""Summaries of results: the pure math under :mod:`cloud_hub.data.aggregate` (no SQL here).

:class:`Counts` are mergeable partial aggregates (count, class histogram, sums for the mean confidence
and the accuracy) that SQL computes with grouped queries, and :func:`finish` turns them plus the
latencies of the same rows into a :class:`Summary`. Latency percentiles need the values themselves
(SQLite has no percentile function), so :func:`group_quantiles` computes them with numpy from one column
fetch. Also the one spelling of a score (:func:`describe_score`) and of a UTC time (:func:`utc_text`)
that the commands and the pages show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

QUANTILES = (50.0, 95.0)


@dataclass(slots=True)
class Counts:
    """A mergeable partial aggregate of a group of results."""

    results: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    conf_sum: float = 0.0
    conf_n: int = 0
    labelled: int = 0  # results that came with ground truth (not a regressor's: see Errors)
    correct: int = 0  # ... whose predicted label equals it
    last_seen: float | None = None  # hub clock

    def merge(self, other: Counts) -> Counts:
        classes = dict(self.classes)
        for label, n in other.classes.items():
            classes[label] = classes.get(label, 0) + n
        seen = [t for t in (self.last_seen, other.last_seen) if t is not None]
        return Counts(self.results + other.results, classes, self.conf_sum + other.conf_sum,
                      self.conf_n + other.conf_n, self.labelled + other.labelled, self.correct + other.correct,
                      max(seen) if seen else None)


@dataclass(frozen=True, slots=True)
class Errors:
    """A regressor's errors over the results with ground truth: each result's Euclidean distance
    between its value and its truth (the absolute error for one output; metres for a position)."""

    n: int
    mean: float
    median: float
    p90: float

    @classmethod
    def of(cls, errors: np.ndarray) -> Errors | None:
        if errors.size == 0:
            return None
        median, p90 = np.percentile(errors, (50.0, 90.0))
        top = float(errors.max())
        mean = float(errors.mean()) if top < 1e300 else float(np.mean(errors / top)) * top  # no overflow to inf
        return cls(int(errors.size), mean, float(median), float(p90))

    def to_obj(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "median": self.median, "p90": self.p90}


@dataclass(frozen=True, slots=True)
class Summary:
    results: int
    classes: dict[str, int]
    mean_confidence: float | None
    accuracy: float | None  # over the results with ground truth; None when there were none
    labelled: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    last_seen: float | None
    error: Errors | None = None  # regressors' results with ground truth

    def to_obj(self) -> dict[str, Any]:
        return {
            "results": self.results, "classes": dict(sorted(self.classes.items())),
            "mean_confidence": self.mean_confidence, "accuracy": self.accuracy, "labelled": self.labelled,
            "latency_ms": {"p50": self.latency_p50_ms, "p95": self.latency_p95_ms}, "last_seen": self.last_seen,
            "error": None if self.error is None else self.error.to_obj(),
        }


def bucket_floor(start: np.ndarray | Sequence[float], width: float) -> np.ndarray:
    """The start of the bucket of each window start (floor to a multiple of ``width`` seconds)."""
    return np.floor(np.asarray(start, dtype=np.float64) / width) * width


def quantiles(latency_ms: np.ndarray | Sequence[float]) -> tuple[float | None, float | None]:
    """p50 and p95 (linear interpolation), or (None, None) for no values."""
    values = np.asarray(latency_ms, dtype=np.float64)
    if values.size == 0:
        return None, None
    p50, p95 = np.percentile(values, QUANTILES)
    return float(p50), float(p95)


def group_quantiles(keys: Sequence[Any], latency_ms: np.ndarray | Sequence[float]) -> dict[Any, tuple[float | None, float | None]]:
    """p50/p95 of ``latency_ms`` per distinct key (one sort, then one slice per group)."""
    values = np.asarray(latency_ms, dtype=np.float64)
    if values.size == 0:
        return {}
    uniques, codes = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return {uniques[i]: quantiles(values[order[bounds[i]:bounds[i + 1]]]) for i in range(len(uniques))}


def counts_of(labels: Sequence[str | None], confidence: Sequence[float | None], truth: Sequence[str | None],
              received_at: Sequence[float] | None = None) -> Counts:
    """Counts of raw rows (what the SQL query computes, for a handful of rows or a test)."""
    lab = np.asarray(labels, dtype=object)
    tru = np.asarray(truth, dtype=object)
    conf = np.asarray([np.nan if c is None else c for c in confidence], dtype=np.float64)
    names, n = np.unique(lab[lab != None], return_counts=True)  # noqa: E711 - elementwise on objects
    has_truth = tru != None  # noqa: E711
    seen = np.asarray(received_at if received_at is not None else [], dtype=np.float64)
    return Counts(
        results=len(lab), classes={str(k): int(v) for k, v in zip(names, n, strict=True)},
        conf_sum=float(np.nansum(conf)), conf_n=int(np.count_nonzero(~np.isnan(conf))),
        labelled=int(has_truth.sum()), correct=int((lab[has_truth] == tru[has_truth]).sum()),
        last_seen=float(seen.max()) if seen.size else None,
    )


def finish(counts: Counts, latency: tuple[float | None, float | None] = (None, None)) -> Summary:
    """The summary of a group from its counts and latency percentiles."""
    return Summary(
        results=counts.results, classes=dict(counts.classes),
        mean_confidence=counts.conf_sum / counts.conf_n if counts.conf_n else None,
        accuracy=counts.correct / counts.labelled if counts.labelled else None, labelled=counts.labelled,
        latency_p50_ms=latency[0], latency_p95_ms=latency[1], last_seen=counts.last_seen,
    )


def describe_error(metrics: Mapping[str, Any]) -> str:
    """A regressor's hold-out error (``quantize.evaluate``'s metrics) in a few words: the MAE of one
    output, the mean / median / p90 error of several."""
    if metrics.get("outputs", 1) == 1 or "median_error" not in metrics:
        return f"MAE {metrics['mae']:.4g}"
    return (f"error mean {metrics['mean_error']:.3g} / median {metrics['median_error']:.3g} / "
            f"p90 {metrics['p90_error']:.3g}")


def utc_text(t: float | None, suffix: str = "") -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS`` in UTC (``-`` for none), the commands' and the pages' one spelling.
    A device's clock, or its lie, may lie past year 9999: said, not crashed on."""
    if t is None:
        return "-"
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") + suffix
    except (OverflowError, OSError, ValueError):
        return f"{t:.6g} s (out of range)"


def describe_score(metrics: Mapping[str, Any], *, named: bool = True) -> str:
    """A model's hold-out score in a few words, the one spelling every command and log line uses: a
    classifier's accuracy ("accuracy 91.2%", or "91.2%" unnamed), a regressor's :func:`describe_error`."""
    if "accuracy" in metrics:
        return f"{'accuracy ' if named else ''}{100 * metrics['accuracy']:.1f}%"
    return describe_error(metrics)


def result_errors(values: Sequence[str | None], truths: Sequence[str | None]) -> np.ndarray:
    """Per result, the Euclidean distance between its value (the JSON list the hub stores) and its
    truth (numbers separated by ``;``); NaN where either is missing, not finite numbers, or of other lengths,
    and where the distance is past a float's range (a truth "inf" made every figure of the fleet inf and
    stopped the live page)."""
    out = np.full(len(values), np.nan)
    for i, (value, truth) in enumerate(zip(values, truths, strict=True)):
        if value is None or truth is None:
            continue
        try:
            v = np.asarray(orjson.loads(value), dtype=np.float64).reshape(-1)
            t = np.array([float(x) for x in truth.split(";")])
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue
        if v.shape == t.shape:
            with np.errstate(over="ignore", invalid="ignore"):
                d = float(np.sqrt(np.sum((v - t) ** 2)))
            if np.isfinite(d):
                out[i] = d
    return out


def summarize(labels: Sequence[str | None], confidence: Sequence[float | None], truth: Sequence[str | None],
              latency_ms: Sequence[float], received_at: Sequence[float] | None = None) -> Summary:
    """The summary of raw rows."""
    return finish(counts_of(labels, confidence, truth, received_at), quantiles(latency_ms))


def parse_since(text: str) -> float:
    """Epoch seconds from ``text``: a number of seconds, or ISO-8601 (without a zone: UTC)."""
    try:
        when_s = float(text)
    except ValueError:
        pass
    else:
        if not abs(when_s) < 1e13:  # nan, inf ("1e400"), or past any date a result can have: no time
            raise ValueError(f"{text!r} is no time (epoch seconds within ±1e13, or ISO-8601)")
        return when_s
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither epoch seconds nor an ISO-8601 time") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# C0 and C1 controls, and Unicode's bidirectional controls (a right-to-left override makes "gol.exe" of
# "exe.log": the text shown is not the text stored)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """Text a device chose (a label, a model name, an error), as it may be printed or shown on a page: its control characters
    (an escape sequence would drive the operator's terminal; a NUL, a newline; a bidirectional override)
    written as ``\\xNN`` or ``\\uNNNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)
