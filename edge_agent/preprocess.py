"""Shared sensor preprocessing: windowing, missing-data policy and features.

This module is used unchanged by the edge device agent (streaming, one
device's readings arrive in small chunks) and by the cloud hub trainer
(batch, whole recordings), so the model sees exactly the same windows and
features at training and at serving time (no train/serve skew).

Everything here is pure numpy: no I/O, no clocks, no global state, and no
Python loop per reading (there is at most a loop per contiguous segment or per
pushed chunk).

Pipeline
--------
1. ``Windower.push`` / ``make_windows`` cut the stream of readings into
   fixed-size windows that never span a gap, and apply the missing-data
   policy.  Windows hold the *raw* channel values (float32, NaNs filled in);
   they are **not** normalized.
2. ``extract_features`` normalizes every channel with the statistics shipped
   in :class:`PreprocessParams` (``norm_mean`` / ``norm_std``, fitted once at
   training time with :func:`fit_normalization`) and computes the feature
   vector of each window.

Windowing rules
---------------
* ``size = round(window_s * sample_rate_hz)`` samples,
  ``hop = round(hop_s * sample_rate_hz)`` samples.
* A *gap* is a jump between consecutive timestamps larger than
  ``1.5 / sample_rate_hz`` seconds.  A timestamp that does not increase
  (repeated or going backwards, e.g. a device clock reset) also breaks the
  stream.  The stream is thereby cut into contiguous *segments*.
* Within each segment windows start at the segment's first sample and every
  ``hop`` samples after it; a window is emitted only when all its ``size``
  samples have arrived.  No window spans a gap.
* A window's ``start`` is the timestamp of its first sample, ``end`` the
  timestamp of its last sample.

Missing-data policy (``PreprocessParams.missing``)
---------------------------------------------------
A reading is *missing* in a channel when its value is NaN (or +-inf).

* ``"interpolate"`` (default): a window is **dropped** (and counted in
  ``WindowBatch.dropped``) when, in any channel, more than
  ``max_missing_frac * size`` of its samples are missing (so a channel that is
  entirely missing always drops the window).  In every kept window each
  missing value is filled by linear interpolation (over the sample index)
  between the nearest valid samples of that channel *inside the same window*;
  missing values before the first / after the last valid sample are set to
  that nearest valid value.  Samples outside the window are never used, so
  the result does not depend on how the stream was chunked.
* ``"drop"``: any window that has a missing value is dropped and counted.

Window labels
-------------
When labels are given (one per reading), each window gets one label:

* float labels (regression targets): the mean over the window's readings;
* any other labels (text, int, bool, object): the majority label of the
  window's readings; ties go to the tied label seen most recently.  Labels
  are compared by value (object arrays mixing types, e.g. str and None, are
  compared by their ``str``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "FEATURE_SETS",
    "MISSING_POLICIES",
    "PreprocessParams",
    "WindowBatch",
    "Windower",
    "make_windows",
    "extract_features",
    "feature_names",
    "fit_normalization",
]

MISSING_POLICIES = ("interpolate", "drop")

#: Supported feature sets.  The name is versioned: changing what a feature set
#: computes requires a new name, because trained models depend on it.
FEATURE_SETS = ("stats-fft-v1", "stats-v1")

# Percentiles used by the time-domain statistics.
_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)
_STAT_NAMES = (
    "mean",
    "std",
    "min",
    "max",
    *(f"p{int(p)}" for p in _PERCENTILES),
    "rms",
    "mad_diff",  # mean absolute first difference (jerkiness)
    "skew",
    "kurt",
    "zcr",  # zero (mean) crossing rate, crossings per sample
)
_SPEC_NAMES = ("dom_freq", "centroid", "entropy", "log_energy")


@dataclass(frozen=True)
class PreprocessParams:
    """Everything needed to turn raw readings into model inputs.

    The instance travels as JSON (``to_dict`` / ``from_dict``) inside the
    model manifest, so a device preprocesses exactly as the trainer did.

    Attributes:
        sample_rate_hz: nominal sampling rate of the readings.
        window_s: window length in seconds (``round(window_s*rate)`` samples).
        hop_s: step between window starts in seconds (``round(hop_s*rate)``
            samples).
        channels: names of the value columns, in order.
        missing: missing-data policy, ``"interpolate"`` or ``"drop"`` (see the
            module docstring).
        max_missing_frac: with ``"interpolate"``, windows in which any channel
            has more than this fraction of missing samples are dropped.
        norm_mean, norm_std: per-channel normalization statistics fitted on
            the training data (:func:`fit_normalization`); empty tuples mean
            "not fitted yet" (windowing works, feature extraction refuses).
        features: name/version of the feature set (one of ``FEATURE_SETS``):
            ``"stats-fft-v1"`` (default: time-domain statistics, channel
            correlations and spectral features) or ``"stats-v1"`` (without the
            spectral part: better on the watch exercise data, see
            :func:`extract_features`).
        fft_max_hz: highest frequency of the rFFT magnitude bins kept per
            channel by ``"stats-fft-v1"`` (``None`` = up to Nyquist).
    """

    sample_rate_hz: float
    window_s: float
    hop_s: float
    channels: tuple[str, ...]
    missing: str = "interpolate"
    max_missing_frac: float = 0.2
    norm_mean: tuple[float, ...] = ()
    norm_std: tuple[float, ...] = ()
    features: str = "stats-fft-v1"
    fft_max_hz: float | None = None

    def __post_init__(self) -> None:
        # Normalize sequence fields to tuples so that equality and hashing
        # work after a JSON round trip (JSON has lists only).
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        object.__setattr__(self, "norm_mean", tuple(float(v) for v in self.norm_mean))
        object.__setattr__(self, "norm_std", tuple(float(v) for v in self.norm_std))
        errors = []
        if not (_finite(self.sample_rate_hz) and self.sample_rate_hz > 0):
            errors.append(f"sample_rate_hz must be > 0, got {self.sample_rate_hz!r}")
        else:
            if not (_finite(self.window_s) and round(self.window_s * self.sample_rate_hz) >= 2):
                errors.append(f"window_s={self.window_s!r} gives fewer than 2 samples per window")
            if not (_finite(self.hop_s) and round(self.hop_s * self.sample_rate_hz) >= 1):
                errors.append(f"hop_s={self.hop_s!r} gives a hop of less than 1 sample")
        if not self.channels:
            errors.append("channels must not be empty")
        elif len(set(self.channels)) != len(self.channels):
            errors.append(f"channels must be unique, got {list(self.channels)}")
        if self.missing not in MISSING_POLICIES:
            errors.append(f"missing must be one of {MISSING_POLICIES}, got {self.missing!r}")
        if not (_finite(self.max_missing_frac) and 0.0 <= self.max_missing_frac < 1.0):
            errors.append(f"max_missing_frac must be in [0, 1), got {self.max_missing_frac!r}")
        if self.features not in FEATURE_SETS:
            errors.append(f"features must be one of {FEATURE_SETS}, got {self.features!r}")
        if self.fft_max_hz is not None and not (_finite(self.fft_max_hz) and self.fft_max_hz > 0):
            errors.append(f"fft_max_hz must be > 0 or None, got {self.fft_max_hz!r}")
        if len(self.norm_mean) != len(self.norm_std):
            errors.append("norm_mean and norm_std must have the same length")
        elif self.norm_mean and len(self.norm_mean) != len(self.channels):
            errors.append(
                f"norm_mean/norm_std have {len(self.norm_mean)} values "
                f"but there are {len(self.channels)} channels"
            )
        if not all(_finite(v) for v in self.norm_mean):
            errors.append("norm_mean must be finite")
        if not all(_finite(v) and v > 0 for v in self.norm_std):
            errors.append("norm_std must be finite and > 0")
        if errors:
            raise ValueError("invalid PreprocessParams: " + "; ".join(errors))

    # -- derived sizes -----------------------------------------------------
    @property
    def window_size(self) -> int:
        """Window length in samples."""
        return int(round(self.window_s * self.sample_rate_hz))

    @property
    def hop_size(self) -> int:
        """Hop between window starts in samples."""
        return int(round(self.hop_s * self.sample_rate_hz))

    @property
    def gap_s(self) -> float:
        """Timestamp jumps larger than this (seconds) are gaps."""
        return 1.5 / self.sample_rate_hz

    @property
    def is_fitted(self) -> bool:
        """True when normalization statistics are present."""
        return len(self.norm_mean) == len(self.channels)

    @property
    def n_features(self) -> int:
        """Length of the feature vector produced by :func:`extract_features`."""
        return len(feature_names(self))

    def with_normalization(self, mean: Sequence[float], std: Sequence[float]) -> PreprocessParams:
        """Copy of these params with the given normalization statistics."""
        return dataclasses.replace(self, norm_mean=tuple(mean), norm_std=tuple(std))

    # -- JSON --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k in ("channels", "norm_mean", "norm_std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessParams:
        """Strict inverse of :meth:`to_dict`.

        Raises ValueError on unknown keys, missing required keys, wrong
        types or invalid values (with a message naming the culprit).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"PreprocessParams.from_dict expects a mapping, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in d]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise ValueError(
                "invalid PreprocessParams dict: " + ", ".join(parts) + f" (expected keys: {sorted(fields)})"
            )
        kw: dict[str, Any] = {}
        for name, value in d.items():
            if name in ("sample_rate_hz", "window_s", "hop_s", "max_missing_frac"):
                kw[name] = _as_float(name, value)
            elif name == "fft_max_hz":
                kw[name] = None if value is None else _as_float(name, value)
            elif name in ("missing", "features"):
                if not isinstance(value, str):
                    raise ValueError(f"invalid PreprocessParams dict: {name} must be a string, got {value!r}")
                kw[name] = value
            elif name == "channels":
                if (
                    isinstance(value, str)
                    or not isinstance(value, (list, tuple))
                    or not all(isinstance(v, str) for v in value)
                ):
                    raise ValueError(
                        f"invalid PreprocessParams dict: channels must be a list of strings, got {value!r}"
                    )
                kw[name] = tuple(value)
            else:  # norm_mean / norm_std
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ValueError(
                        f"invalid PreprocessParams dict: {name} must be a list of numbers, got {value!r}"
                    )
                kw[name] = tuple(_as_float(name, v) for v in value)
        return cls(**kw)


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid PreprocessParams dict: {name} must be a number, got {value!r}")
    return float(value)


@dataclass
class WindowBatch:
    """Windows emitted by :class:`Windower` / :func:`make_windows`.

    Attributes:
        start: float64[k], timestamp of each window's first sample.
        end: float64[k], timestamp of each window's last sample.
        data: float32[k, size, c], the **raw** (not normalized) channel values,
            missing values filled according to the missing-data policy.
        labels: array[k] of window labels (see module docstring), or None when
            no labels were given.
        dropped: number of windows dropped because of missing data.
    """

    start: np.ndarray
    end: np.ndarray
    data: np.ndarray
    labels: np.ndarray | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @classmethod
    def empty(cls, size: int, n_channels: int, labels_dtype: Any = None) -> WindowBatch:
        return cls(
            start=np.empty(0, np.float64),
            end=np.empty(0, np.float64),
            data=np.empty((0, size, n_channels), np.float32),
            labels=None if labels_dtype is None else np.empty(0, labels_dtype),
            dropped=0,
        )

    @classmethod
    def concat(cls, batches: Iterable[WindowBatch]) -> WindowBatch:
        """Concatenate batches (all with labels or all without)."""
        batches = list(batches)
        if not batches:
            raise ValueError("WindowBatch.concat needs at least one batch")
        with_labels = {b.labels is not None for b in batches}
        if len(with_labels) != 1:
            raise ValueError("cannot concatenate labelled and unlabelled WindowBatches")
        return cls(
            start=np.concatenate([b.start for b in batches]),
            end=np.concatenate([b.end for b in batches]),
            data=np.concatenate([b.data for b in batches]),
            labels=np.concatenate([b.labels for b in batches]) if with_labels == {True} else None,
            dropped=int(sum(b.dropped for b in batches)),
        )


class Windower:
    """Streaming windower for ONE device's readings.

    ``push`` chunks of readings in time order; each call returns the windows
    completed by that chunk.  Between calls it keeps only the tail of the
    current segment that a future window can still use (fewer than
    ``window_size`` samples) plus a few scalars, so memory is bounded.

    For any split of a stream into chunks, the concatenation of the returned
    batches equals ``make_windows`` on the whole stream.
    """

    def __init__(self, params: PreprocessParams):
        self.params = params
        self._size = params.window_size
        self._hop = params.hop_size
        self._c = len(params.channels)
        self._last_ts: float | None = None
        self._skip = 0  # samples of the current segment to skip before the next window start
        self._buf_ts = np.empty(0, np.float64)
        self._buf_vals = np.empty((0, self._c), np.float32)
        self._buf_labels: np.ndarray | None = None
        self._labels_mode: bool | None = None  # fixed by the first push

    @property
    def buffered(self) -> int:
        """Number of readings currently held for future windows."""
        return int(self._buf_ts.shape[0])

    def reset(self) -> None:
        """Forget all state (as if newly created)."""
        self.__init__(self.params)  # type: ignore[misc]

    def push(self, ts: np.ndarray, values: np.ndarray, labels: np.ndarray | None = None) -> WindowBatch:
        """Add readings and return the windows they complete.

        Args:
            ts: float64[n], timestamps in seconds (finite).
            values: float32[n, c], channel values in ``params.channels`` order;
                NaN / inf mark missing readings.
            labels: array[n] of per-reading labels, or None.  Either every push
                of a Windower has labels or none has.
        """
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        values = np.asarray(values, dtype=np.float32)
        n = ts.shape[0]
        if values.ndim == 1 and self._c == 1:
            values = values.reshape(-1, 1)
        if values.ndim != 2 or values.shape != (n, self._c):
            raise ValueError(f"values must have shape ({n}, {self._c}), got {values.shape}")
        if not np.all(np.isfinite(ts)):
            raise ValueError("ts must be finite")
        has_labels = labels is not None
        if self._labels_mode is None:
            self._labels_mode = has_labels
        elif self._labels_mode != has_labels:
            raise ValueError("either every push has labels or none has")
        if has_labels:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
            if self._buf_labels is None:
                self._buf_labels = labels[:0]
        if n == 0:
            return WindowBatch.empty(self._size, self._c, labels.dtype if labels is not None else None)

        # Segment boundaries inside this chunk (index i = a segment starts at i).
        prev = np.empty(n, np.float64)
        prev[0] = np.nan if self._last_ts is None else self._last_ts
        prev[1:] = ts[:-1]
        d = ts - prev
        brk = ~((d > 0) & (d <= self.params.gap_s))  # NaN (first ever) -> break
        cuts = np.flatnonzero(brk)
        bounds = np.unique(np.concatenate([[0], cuts, [n]]))
        continues = not brk[0]

        out: list[WindowBatch] = []
        n_seg = bounds.shape[0] - 1
        for s in range(n_seg):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if s == 0 and continues:
                seg_ts = np.concatenate([self._buf_ts, ts[a:b]])
                seg_v = np.concatenate([self._buf_vals, values[a:b]])
                seg_l = None
                if labels is not None and self._buf_labels is not None:
                    seg_l = np.concatenate([self._buf_labels, labels[a:b]])
                skip = self._skip
            else:
                seg_ts, seg_v = ts[a:b], values[a:b]
                seg_l = labels[a:b] if labels is not None else None
                skip = 0
            m = seg_ts.shape[0]
            if skip >= m:
                skip -= m
                seg_ts, seg_v = seg_ts[:0], seg_v[:0]
                seg_l = seg_l[:0] if seg_l is not None else None
            elif skip:
                seg_ts, seg_v = seg_ts[skip:], seg_v[skip:]
                seg_l = seg_l[skip:] if seg_l is not None else None
                skip = 0
            batch, next_start = _window_segment(seg_ts, seg_v, seg_l, self.params)
            out.append(batch)
            m = seg_ts.shape[0]
            if s == n_seg - 1:  # keep the tail of the last segment only
                if next_start <= m:
                    self._buf_ts = seg_ts[next_start:].copy()
                    self._buf_vals = seg_v[next_start:].copy()
                    self._buf_labels = seg_l[next_start:].copy() if seg_l is not None else None
                    self._skip = skip
                else:
                    self._buf_ts = seg_ts[:0].copy()
                    self._buf_vals = seg_v[:0].copy()
                    self._buf_labels = seg_l[:0].copy() if seg_l is not None else None
                    self._skip = skip + next_start - m
        self._last_ts = float(ts[-1])
        if len(out) == 1:
            return out[0]
        return WindowBatch.concat(out)


def make_windows(
    ts: np.ndarray, values: np.ndarray, labels: np.ndarray | None, params: PreprocessParams
) -> WindowBatch:
    """Batch windowing of ONE device's readings (see module docstring)."""
    return Windower(params).push(ts, values, labels)


def _window_segment(
    ts: np.ndarray, vals: np.ndarray, labels: np.ndarray | None, params: PreprocessParams
) -> tuple[WindowBatch, int]:
    """Windows of one contiguous run of samples whose index 0 is a window start.

    Returns the batch and the index of the next (incomplete) window start.
    """
    size, hop = params.window_size, params.hop_size
    m, c = vals.shape
    labels_dtype = None if labels is None else _window_label_dtype(labels)
    if m < size:
        return WindowBatch.empty(size, c, labels_dtype), 0
    k = (m - size) // hop + 1
    starts = np.arange(k) * hop
    data = sliding_window_view(vals, size, axis=0)[starts]  # (k, c, size)
    data = np.ascontiguousarray(data.transpose(0, 2, 1))  # (k, size, c)

    bad = ~np.isfinite(data)
    dropped = 0
    keep = None
    if bad.any():
        n_bad = bad.sum(axis=1)  # (k, c)
        limit = 0 if params.missing == "drop" else params.max_missing_frac * size
        keep = ~np.any((n_bad > limit) | (n_bad >= size), axis=1)
        dropped = int(k - keep.sum())
        data, bad, starts = data[keep], bad[keep], starts[keep]
        if bad.any():
            data = _interpolate_windows(data, bad)

    ends = starts + size - 1
    win_labels = None
    if labels is not None:
        win_labels = _window_labels(labels, starts, ends)
    batch = WindowBatch(start=ts[starts], end=ts[ends], data=data, labels=win_labels, dropped=dropped)
    return batch, int(k * hop)


def _interpolate_windows(data: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Linear interpolation over the sample axis of (k, size, c) windows.

    Every (window, channel) has at least one valid value.  Values before the
    first / after the last valid one take that valid value.
    """
    k, size, c = data.shape
    idx = np.arange(size).reshape(1, size, 1)
    prev = np.where(bad, -1, idx)
    np.maximum.accumulate(prev, axis=1, out=prev)
    nxt = np.where(bad, size, idx)
    nxt = np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1]
    # Edges: copy the nearest valid index.
    prev_f = np.where(prev < 0, nxt, prev)
    nxt_f = np.where(nxt >= size, prev_f, nxt)
    kk = np.arange(k).reshape(k, 1, 1)
    cc = np.arange(c).reshape(1, 1, c)
    v0 = data[kk, prev_f, cc]
    v1 = data[kk, nxt_f, cc]
    span = (nxt_f - prev_f).astype(np.float32)
    w = np.where(span > 0, (idx - prev_f) / np.where(span > 0, span, 1), 0).astype(np.float32)
    filled = v0 + (v1 - v0) * w
    return np.where(bad, filled, data).astype(np.float32, copy=False)


def _window_label_dtype(labels: np.ndarray) -> Any:
    return np.float64 if labels.dtype.kind == "f" else labels.dtype


def _window_labels(labels: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per-window label: mean for float labels, else majority (ties -> most recent)."""
    if starts.shape[0] == 0:
        return np.empty(0, _window_label_dtype(labels))
    if labels.dtype.kind == "f":
        # Direct per-window mean (not a cumulative sum) so the result does not
        # depend on where the stream was chunked, to the last bit.
        size = int(ends[0] - starts[0] + 1)
        return sliding_window_view(labels.astype(np.float64), size)[starts].mean(axis=1)
    # Restrict to the samples covered by the windows.
    lo, hi = int(starts[0]), int(ends[-1]) + 1
    covered = labels[lo:hi]
    try:
        _, codes = np.unique(covered, return_inverse=True)
    except TypeError:  # object labels of mixed types (e.g. str and None)
        _, codes = np.unique(covered.astype(str), return_inverse=True)
    codes = codes.reshape(-1)
    u = int(codes.max()) + 1
    s, e = starts - lo, ends - lo
    if u == 1:
        return labels[starts]
    n = codes.shape[0]
    onehot = np.zeros((n + 1, u), np.int32)
    onehot[np.arange(1, n + 1), codes] = 1
    counts_cum = np.cumsum(onehot, axis=0)
    counts = counts_cum[e + 1] - counts_cum[s]  # (k, u)
    # Index of the most recent occurrence of each label up to each sample.
    last_seen = np.where(onehot[1:] == 1, np.arange(n).reshape(-1, 1), -1)
    np.maximum.accumulate(last_seen, axis=0, out=last_seen)
    recency = last_seen[e]  # (k, u)
    tied = counts == counts.max(axis=1, keepdims=True)
    pick = np.argmax(np.where(tied, recency, -2), axis=1)
    # The original label objects (keeps dtype and values, e.g. None), taken
    # at the picked label's most recent reading in the window.
    return covered[recency[np.arange(recency.shape[0]), pick]]


# ---------------------------------------------------------------------------
# Normalization and features
# ---------------------------------------------------------------------------


def fit_normalization(values: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of training values, ignoring NaN/inf.

    ``values`` is ``[n, c]`` readings or ``[k, size, c]`` windows.  A channel
    with (near) zero spread gets std 1.0.  Returns tuples ready for
    ``PreprocessParams.with_normalization``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2:
        raise ValueError("values must be [n, c] or [k, size, c]")
    v = v.reshape(-1, v.shape[-1])
    v = np.where(np.isfinite(v), v, np.nan)
    if v.shape[0] == 0 or np.all(np.isnan(v), axis=0).any():
        raise ValueError("every channel needs at least one finite value")
    mean = np.nanmean(v, axis=0)
    std = np.nanstd(v, axis=0)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def _fft_bins(params: PreprocessParams) -> int:
    """Number of rFFT magnitude bins kept per channel (DC excluded)."""
    size = params.window_size
    n_rfft = size // 2 + 1
    if params.fft_max_hz is None:
        return n_rfft - 1
    df = params.sample_rate_hz / size
    return int(min(n_rfft - 1, max(1, math.floor(params.fft_max_hz / df + 1e-9))))


def feature_names(params: PreprocessParams) -> list[str]:
    """Names of the features, in the column order of :func:`extract_features`."""
    ch = params.channels
    names = [f"{c}_{s}" for s in _STAT_NAMES for c in ch]
    names += [f"corr_{ch[i]}_{ch[j]}" for i in range(len(ch)) for j in range(i + 1, len(ch))]
    if params.features == "stats-fft-v1":
        names += [f"{c}_{s}" for s in _SPEC_NAMES for c in ch]
        df = params.sample_rate_hz / params.window_size
        names += [f"{c}_fft_{(b + 1) * df:.2f}Hz" for c in ch for b in range(_fft_bins(params))]
    return names


def extract_features(windows: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Feature vectors of windows, vectorized over windows.

    Args:
        windows: float32[k, size, c] raw windows (``WindowBatch.data``).
        params: fitted params (``norm_mean``/``norm_std`` set).

    Returns:
        float32[k, params.n_features].  Each channel is first normalized with
        the shipped statistics, then (column order = :func:`feature_names`):

        * per channel: mean, std, min, max, 10/25/50/75/90th percentiles,
          RMS, mean absolute first difference, skewness, kurtosis (excess),
          mean-crossing rate;
        * Pearson correlation of every channel pair;
        * ``"stats-fft-v1"`` only, per channel, from the rFFT of the
          mean-removed, Hann-tapered window: dominant frequency (Hz),
          spectral centroid (Hz), normalized spectral entropy, log energy;
          then ``log(1 + 10 |X_f| / size)`` for every rFFT bin ``f`` from
          ``df = rate / size`` up to ``fft_max_hz`` (DC excluded).

        ``"stats-v1"`` is the first two groups only (time domain); on the
        watch exercise data it generalizes better to unseen subjects (the
        spectrum mostly encodes each person's repetition tempo).
    """
    if not params.is_fitted:
        raise ValueError("params have no normalization statistics: use fit_normalization() first")
    w = np.asarray(windows, dtype=np.float32)
    size, c = params.window_size, len(params.channels)
    if w.ndim != 3 or w.shape[1:] != (size, c):
        raise ValueError(f"windows must have shape (k, {size}, {c}), got {w.shape}")
    k = w.shape[0]
    mean = np.asarray(params.norm_mean, np.float32)
    inv = np.float32(1.0) / np.asarray(params.norm_std, np.float32)
    # Layout (k, c, size): every statistic reduces the last, contiguous axis (3x faster than
    # reducing the middle axis of (k, size, c); this runs on the device for every window).
    x = np.ascontiguousarray(((w - mean) * inv).transpose(0, 2, 1))
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    eps = np.float32(1e-6)
    n = np.float32(size)
    mu = x.sum(axis=2) / n  # (k, c)
    xc = x - mu[:, :, None]
    sd = np.sqrt(np.einsum("kcs,kcs->kc", xc, xc) / n)
    xs = np.sort(x, axis=2)
    # Percentiles with numpy's default "linear" method, from the sorted values.
    pos = np.asarray(_PERCENTILES, np.float64) / 100.0 * (size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(np.float32)
    pct = xs[:, :, lo] + (xs[:, :, hi] - xs[:, :, lo]) * frac  # (k, c, p)
    rms = np.sqrt(np.einsum("kcs,kcs->kc", x, x) / n)
    mad = np.abs(np.diff(x, axis=2)).sum(axis=2) / np.float32(size - 1)
    z = xc / (sd[:, :, None] + eps)
    z2 = z * z
    skew = np.einsum("kcs,kcs->kc", z2, z) / n
    kurt = np.einsum("kcs,kcs->kc", z2, z2) / n - np.float32(3.0)
    sign = xc >= 0
    zcr = np.count_nonzero(sign[:, :, 1:] != sign[:, :, :-1], axis=2).astype(np.float32) / np.float32(size - 1)
    feats = [mu, sd, xs[:, :, 0], xs[:, :, -1], *pct.transpose(2, 0, 1), rms, mad, skew, kurt, zcr]

    # Pairwise correlations.
    iu, ju = np.triu_indices(c, k=1)
    if iu.size:
        cov = np.matmul(z, z.transpose(0, 2, 1)) / n  # (k, c, c)
        feats.append(np.clip(cov[:, iu, ju], -1.0, 1.0))

    if params.features == "stats-fft-v1":
        taper = np.hanning(size).astype(np.float32)
        mag = np.abs(np.fft.rfft(xc * taper, axis=2)).astype(np.float32) / size  # (k, c, nf)
        freqs = np.fft.rfftfreq(size, d=1.0 / params.sample_rate_hz).astype(np.float32)
        ac = mag[:, :, 1:]  # drop DC
        power = ac * ac
        ptot = power.sum(axis=2) + eps
        dom = freqs[1:][np.argmax(ac, axis=2)]
        centroid = (power * freqs[1:]).sum(axis=2) / ptot
        p = power / ptot[:, :, None]
        ent = -(p * np.log(p + 1e-12)).sum(axis=2) / np.float32(math.log(max(ac.shape[2], 2)))
        feats += [dom, centroid, ent, np.log(ptot)]
        nb = _fft_bins(params)
        feats.append(np.log1p(ac[:, :, :nb] * 10.0).reshape(k, c * nb))
    out = np.concatenate([f.reshape(k, -1) if f.ndim == 2 else f for f in feats], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)
