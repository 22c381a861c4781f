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
   they are **not** normalized.  A :class:`WindowBatch` keeps its windows as
   offsets into the readings they share (``DeviceWindowers`` does this per
   device for the agent and the trainer alike).
2. ``extract_features`` normalizes every channel with the statistics shipped
   in :class:`PreprocessParams` (``norm_mean`` / ``norm_std``, fitted once at
   training time with :func:`fit_normalization`) and computes the feature
   vector of each window; sums over blocks of readings are computed once and
   shared by the overlapping windows.

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
import functools
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
    "DeviceWindowers",
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

    A batch holds its windows as slices of the readings they were cut from: window ``i`` is
    ``values[offsets[i] : offsets[i] + size]``. Overlapping windows share their readings, so a batch
    costs about one copy of its readings instead of ``size / hop`` copies, and
    :func:`extract_features` computes most statistics once per reading instead of once per window.
    ``data`` materializes the windows (the trainer's view).

    Attributes:
        start: float64[k], timestamp of each window's first sample.
        end: float64[k], timestamp of each window's last sample.
        values: float32[m, c], the **raw** (not normalized) readings the windows are cut from, in
            ``params.channels`` order. Every reading a window covers is finite: a window with
            interpolated values covers its own filled-in copy, appended to the readings.
        offsets: intp[k], the row of ``values`` where each window begins.
        size: samples per window.
        labels: array[k] of window labels (see module docstring), or None when
            no labels were given.
        dropped: number of windows dropped because of missing data.
    """

    start: np.ndarray
    end: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    size: int
    labels: np.ndarray | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @functools.cached_property
    def data(self) -> np.ndarray:
        """float32[k, size, c]: the windows themselves (a copy, made on first use)."""
        if len(self) == 0:
            return np.empty((0, self.size, self.values.shape[1]), np.float32)
        windows = sliding_window_view(self.values, self.size, axis=0)[self.offsets]  # (k, c, size)
        return np.ascontiguousarray(windows.transpose(0, 2, 1))

    @classmethod
    def of_windows(cls, start: np.ndarray, end: np.ndarray, data: np.ndarray,
                   labels: np.ndarray | None = None, dropped: int = 0) -> WindowBatch:
        """A batch of windows given as one float32[k, size, c] array."""
        data = np.asarray(data, dtype=np.float32)
        k, size, c = data.shape
        return cls(start=start, end=end, values=data.reshape(k * size, c),
                   offsets=np.arange(k, dtype=np.intp) * size, size=size, labels=labels, dropped=dropped)

    @classmethod
    def empty(cls, size: int, n_channels: int, labels_dtype: Any = None) -> WindowBatch:
        return cls(
            start=np.empty(0, np.float64),
            end=np.empty(0, np.float64),
            values=np.empty((0, n_channels), np.float32),
            offsets=np.empty(0, np.intp),
            size=size,
            labels=None if labels_dtype is None else np.empty(0, labels_dtype),
            dropped=0,
        )

    @classmethod
    def concat(cls, batches: Iterable[WindowBatch]) -> WindowBatch:
        """Concatenate batches (all with labels or all without, all of one window size)."""
        batches = list(batches)
        if not batches:
            raise ValueError("WindowBatch.concat needs at least one batch")
        with_labels = {b.labels is not None for b in batches}
        if len(with_labels) != 1:
            raise ValueError("cannot concatenate labelled and unlabelled WindowBatches")
        if len({b.size for b in batches}) != 1:
            raise ValueError("cannot concatenate WindowBatches of different window sizes")
        rows = np.cumsum([0] + [b.values.shape[0] for b in batches[:-1]])
        return cls(
            start=np.concatenate([b.start for b in batches]),
            end=np.concatenate([b.end for b in batches]),
            values=np.concatenate([b.values for b in batches]),
            offsets=np.concatenate([b.offsets + r for b, r in zip(batches, rows.tolist(), strict=True)]),
            size=batches[0].size,
            labels=np.concatenate([b.labels for b in batches]) if with_labels == {True} else None,  # type: ignore[misc]
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
        ts, values, labels = self._checked(ts, values, labels)
        n = ts.shape[0]
        if n == 0:
            return WindowBatch.empty(self._size, self._c, labels.dtype if labels is not None else None)
        bounds, continues = self._segment_bounds(ts)
        out: list[WindowBatch] = []
        for s in range(len(bounds) - 1):
            a, b = bounds[s], bounds[s + 1]
            seg_ts, seg_v, seg_l, skip = self._segment(
                ts[a:b], values[a:b], labels[a:b] if labels is not None else None, continues and s == 0)
            batch, next_start = _window_segment(seg_ts, seg_v, seg_l, self.params)
            out.append(batch)
            if s == len(bounds) - 2:  # keep the tail of the last segment only
                self._keep_tail(seg_ts, seg_v, seg_l, skip, next_start)
        self._last_ts = float(ts[-1])
        return out[0] if len(out) == 1 else WindowBatch.concat(out)

    def _checked(self, ts: np.ndarray, values: np.ndarray,
                 labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
            if self._buf_labels is None:
                self._buf_labels = labels[:0]
        return ts, values, labels

    def _segment_bounds(self, ts: np.ndarray) -> tuple[list[int], bool]:
        """Where contiguous segments start in this chunk (plus its end), and whether the first one
        continues the segment of the previous chunk."""
        n = ts.shape[0]
        prev = np.empty(n, np.float64)
        prev[0] = np.nan if self._last_ts is None else self._last_ts
        prev[1:] = ts[:-1]
        d = ts - prev
        brk = ~((d > 0) & (d <= self.params.gap_s))  # NaN (first ever) -> break
        cuts = np.flatnonzero(brk[1:]) + 1
        return [0, *cuts.tolist(), n], not bool(brk[0])

    def _segment(self, ts: np.ndarray, vals: np.ndarray, labels: np.ndarray | None, continues: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """One segment's readings from its next window start on (the buffered tail of the previous
        chunk first, if it continues), and how many samples are still to skip after them."""
        skip = 0
        if continues:
            ts = np.concatenate([self._buf_ts, ts])
            vals = np.concatenate([self._buf_vals, vals])
            if labels is not None and self._buf_labels is not None:
                labels = np.concatenate([self._buf_labels, labels])
            skip = self._skip
        cut = min(skip, ts.shape[0])
        return ts[cut:], vals[cut:], labels[cut:] if labels is not None else None, skip - cut

    def _keep_tail(self, ts: np.ndarray, vals: np.ndarray, labels: np.ndarray | None, skip: int,
                   next_start: int) -> None:
        """Keep what a future window of this segment can use: from ``next_start`` on."""
        m = ts.shape[0]
        keep = min(next_start, m)
        self._buf_ts = ts[keep:].copy()
        self._buf_vals = vals[keep:].copy()
        self._buf_labels = labels[keep:].copy() if labels is not None else None
        self._skip = skip + max(next_start - m, 0)


class DeviceWindowers:
    """One :class:`Windower` per device, made on the device's first readings.

    The one windowing loop of the agent (serving) and the hub (training): both push readings grouped
    by device, ``{device: (ts, values[n, channels], labels | None)}`` (``ReadingChunk.by_device()``).
    """

    def __init__(self, params: PreprocessParams) -> None:
        self.params = params
        self._windowers: dict[str, Windower] = {}

    def push(self, per_device: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
             columns: np.ndarray | None = None) -> list[tuple[str, WindowBatch]]:
        """Push each device's readings; returns ``(device, windows)`` for every device pushed, in
        order, including batches with no window (they may count dropped windows).

        ``columns`` picks and orders the value columns as ``params.channels`` (None: already so).
        """
        out = []
        for device, (ts, values, labels) in per_device.items():
            windower = self._windowers.get(device)
            if windower is None:
                windower = self._windowers[device] = Windower(self.params)
            out.append((device, windower.push(ts, values if columns is None else values[:, columns], labels)))
        return out

    def clear(self) -> None:
        """Forget every device's windows in progress."""
        self._windowers.clear()


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
    starts = np.arange(k, dtype=np.intp) * hop
    region = vals[: (k - 1) * hop + size]  # the readings the windows cover
    offsets, dropped = starts, 0
    bad = ~np.isfinite(region)
    if bad.any():
        starts, offsets, region = _apply_missing_policy(region, bad, starts, params)
        dropped = k - starts.shape[0]
    ends = starts + size - 1
    win_labels = None
    if labels is not None:
        win_labels = _window_labels(labels, starts, ends)
    batch = WindowBatch(start=ts[starts], end=ts[ends], values=region, offsets=offsets, size=size,
                        labels=win_labels, dropped=dropped)
    return batch, int(k * hop)


def _apply_missing_policy(region: np.ndarray, bad: np.ndarray, starts: np.ndarray, params: PreprocessParams
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the windows with too many missing values; give each kept window that has some its own
    interpolated copy, appended to the readings. Returns (starts, offsets, readings) of kept windows."""
    size, c = params.window_size, region.shape[1]
    counts = np.zeros((region.shape[0] + 1, c), np.int64)
    np.cumsum(bad, axis=0, out=counts[1:])
    n_bad = counts[starts + size] - counts[starts]  # (k, c) missing values per window and channel
    limit = 0 if params.missing == "drop" else params.max_missing_frac * size
    keep = ~np.any((n_bad > limit) | (n_bad >= size), axis=1)
    starts, n_bad = starts[keep], n_bad[keep]
    if starts.shape[0] == 0:
        return starts, starts, region[:0]
    offsets = starts.copy()
    fill = np.flatnonzero(n_bad.any(axis=1))
    if fill.size:
        windows = np.ascontiguousarray(sliding_window_view(region, size, axis=0)[starts[fill]].transpose(0, 2, 1))
        windows = _interpolate_windows(windows, ~np.isfinite(windows))
        offsets[fill] = region.shape[0] + np.arange(fill.size) * size
        region = np.concatenate([region, windows.reshape(-1, c)])
    return starts, offsets, region


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
    if bool(np.all(covered == covered[0])):  # the usual case: one label (no sorting of text)
        return labels[starts]
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


def extract_features(windows: np.ndarray | WindowBatch, params: PreprocessParams) -> np.ndarray:
    """Feature vectors of windows, vectorized over windows.

    Args:
        windows: a :class:`WindowBatch`, or float32[k, size, c] raw windows
            (``WindowBatch.data``).  Both give the same features; a batch is
            faster (its overlapping windows share their readings' statistics).
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
    size, c = params.window_size, len(params.channels)
    if isinstance(windows, WindowBatch):
        if windows.size != size or windows.values.ndim != 2 or windows.values.shape[1] != c:
            raise ValueError(f"windows of {windows.size} samples x {windows.values.shape[1:]} channels "
                             f"do not match params ({size} samples, {c} channels)")
        values, offsets = windows.values, windows.offsets
    else:
        w = np.asarray(windows, dtype=np.float32)
        if w.ndim != 3 or w.shape[1:] != (size, c):
            raise ValueError(f"windows must have shape (k, {size}, {c}), got {w.shape}")
        values, offsets = w.reshape(-1, c), np.arange(w.shape[0], dtype=np.intp) * size
    return _features(values, offsets, params)


# Windows are split into blocks of gcd(window, hop) samples (5 blocks for 2.5 s windows with a 0.5 s
# hop): the moments of each block are computed once, and a window's moments are combined from its
# blocks'. With more blocks than this per window (e.g. a hop of one sample) windows are one block.
_MAX_BLOCKS = 16
FEATURE_SLICE = 512  # windows per pass of the per-window statistics (bounds the temporaries)


def _block_size(params: PreprocessParams) -> int:
    size = params.window_size
    g = math.gcd(size, params.hop_size)
    return g if size // g <= _MAX_BLOCKS else size


def _features(values: np.ndarray, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Features of the windows ``values[o : o + size]`` (raw readings) for ``o`` in ``offsets``."""
    size, c = params.window_size, len(params.channels)
    k = offsets.shape[0]
    if k == 0:
        return np.empty((0, params.n_features), np.float32)
    mean = np.asarray(params.norm_mean, np.float32)[:, None]
    inv = np.float32(1.0) / np.asarray(params.norm_std, np.float32)[:, None]
    # Layout (c, m), C order: every statistic reduces the last, contiguous axis.
    x = np.empty((c, values.shape[0]), np.float32)
    np.subtract(values.T, mean, out=x)
    x *= inv
    if not np.isfinite(x).all():  # readings no window covers (dropped), or an overflow
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    g = _block_size(params)
    if np.any(offsets % g):  # windows not on block boundaries: lay the windows out one after the other
        x = sliding_window_view(x, size, axis=1)[:, offsets].reshape(c, k * size)
        offsets = np.arange(k, dtype=np.intp) * size
    blocks = _Blocks.of(x, g)
    out = np.empty((k, params.n_features), np.float32)
    for i in range(0, k, FEATURE_SLICE):
        out[i : i + FEATURE_SLICE] = _window_features(x, blocks, offsets[i : i + FEATURE_SLICE], params)
    return out


@dataclass(frozen=True)
class _Blocks:
    """Sums over consecutive blocks of ``g`` normalized readings (one row per block).

    Each block's deviations ``d = x - shift`` are taken from its own ``shift`` (its mean rounded to
    float32, so ``d`` is exact in float32): power sums of deviations from a nearby value keep the
    moments of a window exact even for a flat signal far from zero, where power sums of the raw
    values would cancel catastrophically. ``t1``..``t4`` = sums of ``d``, of the outer products
    ``d d^T`` (c x c), of ``d^3`` and of ``d^4``; ``adiff`` = sum of ``|x[i+1] - x[i]|`` over the
    block's readings ``i`` (the last one reaching into the next block) and ``edge`` that last term.
    """

    g: int
    shift: np.ndarray  # (nb, c)
    t1: np.ndarray  # (nb, c)
    t2: np.ndarray  # (nb, c, c)
    t3: np.ndarray  # (nb, c)
    t4: np.ndarray  # (nb, c)
    adiff: np.ndarray  # (nb, c)
    edge: np.ndarray  # (nb, c)

    @classmethod
    def of(cls, x: np.ndarray, g: int) -> _Blocks:
        """Blocks of the normalized readings ``x`` (c, m); a partial last block is left out.

        The sums are float32 like the readings (the precision of a float32 window statistic) and
        are combined in float64.
        """
        c, nb = x.shape[0], x.shape[1] // g
        x = x[:, : nb * g]
        xb = x.reshape(c, nb, g)
        shift = xb.mean(axis=2, dtype=np.float32)
        d = xb - shift[:, :, None]
        d2 = d * d
        dt = d.transpose(1, 0, 2)  # (nb, c, g)
        ad = np.zeros((c, nb * g), np.float32)
        np.abs(np.diff(x, axis=1), out=ad[:, :-1])
        f64 = np.float64
        return cls(
            g=g,
            shift=shift.T.astype(f64),
            t1=d.sum(axis=2, dtype=f64).T,
            t2=np.matmul(dt, dt.transpose(0, 2, 1)).astype(f64),
            t3=np.einsum("cbg,cbg->bc", d2, d).astype(f64),
            t4=np.einsum("cbg,cbg->bc", d2, d2).astype(f64),
            adiff=ad.reshape(c, nb, g).sum(axis=2).T.astype(f64),
            edge=ad[:, g - 1 :: g].T.astype(f64),
        )


def _window_features(x: np.ndarray, blocks: _Blocks, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Feature rows of the windows at ``offsets`` of the normalized readings ``x`` (c, m)."""
    size, c = params.window_size, len(params.channels)
    m = _window_moments(blocks, offsets, size)
    sd_eps = m.sd + 1e-6
    skew = m.m3 / sd_eps**3
    kurt = m.m4 / sd_eps**4 - 3.0
    # The readings of each window, (k, c, size) (a copy): crossing rate, order statistics, spectrum.
    win = sliding_window_view(x, size, axis=1)[:, offsets].transpose(1, 0, 2)
    mu32 = m.mean.astype(np.float32)[:, :, None]
    above = win >= mu32
    zcr = np.count_nonzero(above[:, :, 1:] != above[:, :, :-1], axis=2) / np.float32(size - 1)
    spectral = _spectral_features(win - mu32, params) if params.features == "stats-fft-v1" else []
    win.sort(axis=2)
    pos = np.asarray(_PERCENTILES, np.float64) / 100.0 * (size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(np.float32)
    pct = win[:, :, lo] + (win[:, :, hi] - win[:, :, lo]) * frac  # (k, c, p), numpy's "linear" method
    feats = [m.mean, m.sd, win[:, :, 0], win[:, :, -1], *pct.transpose(2, 0, 1), m.rms, m.mad, skew, kurt, zcr]
    iu, ju = np.triu_indices(c, k=1)
    if iu.size:
        feats.append(np.clip(m.cov[:, iu, ju] / (sd_eps[:, iu] * sd_eps[:, ju]), -1.0, 1.0))
    return np.concatenate(feats + spectral, axis=1, dtype=np.float32)


@dataclass(frozen=True)
class _Moments:
    mean: np.ndarray  # (k, c)
    sd: np.ndarray  # (k, c), population standard deviation
    cov: np.ndarray  # (k, c, c), population covariance
    m3: np.ndarray  # (k, c), third central moment
    m4: np.ndarray  # (k, c), fourth central moment
    rms: np.ndarray  # (k, c)
    mad: np.ndarray  # (k, c), mean absolute first difference


def _window_moments(blocks: _Blocks, offsets: np.ndarray, size: int) -> _Moments:
    """Moments of windows from the sums of their blocks, each moved from the block's shift to the
    window mean by the binomial expansion (as in the pairwise updates of Chan, Golub and LeVeque,
    and of Pébay for the third and fourth moments)."""
    g = blocks.g
    idx = (offsets // g)[None, :] + np.arange(size // g)[:, None]  # (K, k): each window's K blocks
    shift, t1 = blocks.shift[idx], blocks.t1[idx]  # (K, k, c)
    mean = (g * shift + t1).sum(axis=0) / size
    delta = shift - mean  # each block's shift from the window mean
    delta2 = delta * delta
    t2 = blocks.t2[idx]  # (K, k, c, c)
    t2d = np.diagonal(t2, axis1=2, axis2=3)  # (K, k, c)
    t3 = blocks.t3[idx]
    half = np.einsum("Kki,Kkj->kij", delta, t1 + 0.5 * g * delta)  # cov's terms in delta, half of them
    cov = t2.sum(axis=0) + half + half.transpose(0, 2, 1)
    m3 = (t3 + 3.0 * delta * t2d + 3.0 * delta2 * t1 + g * delta2 * delta).sum(axis=0)
    m4 = (blocks.t4[idx] + 4.0 * delta * t3 + 6.0 * delta2 * t2d + 4.0 * delta2 * delta * t1
          + g * delta2 * delta2).sum(axis=0)
    sq = (t2d + 2.0 * shift * t1 + g * shift * shift).sum(axis=0)
    mad = (blocks.adiff[idx].sum(axis=0) - blocks.edge[idx[-1]]) / (size - 1)
    cov /= size
    return _Moments(mean=mean, sd=np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0)), cov=cov,
                    m3=m3 / size, m4=m4 / size, rms=np.sqrt(np.maximum(sq, 0.0) / size), mad=mad)


def _spectral_features(xc: np.ndarray, params: PreprocessParams) -> list[np.ndarray]:
    """``"stats-fft-v1"``'s spectral features of mean-removed windows ``xc`` (k, c, size)."""
    size, k, c = params.window_size, xc.shape[0], xc.shape[1]
    eps = np.float32(1e-6)
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
    nb = _fft_bins(params)
    return [dom, centroid, ent, np.log(ptot), np.log1p(ac[:, :, :nb] * 10.0).reshape(k, c * nb)]
