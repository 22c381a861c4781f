"""Windowing: readings -> fixed-size windows that never span a gap, with the missing-data policy
and window labels (rules in the package docstring)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_agent.preprocess.params import PreprocessParams

MIN_SPAN = 0.75
"""A window whose readings span less than this share of its nominal length, ``(size - 1) / sample_rate_hz``, is
dropped and counted: its sensor reports faster than the model's rate (a hostile sensor's finding: 1 kHz readings
made "2 s" windows of 0.1 s, inferred and stored as any other). Gaps over 1.5 periods already break the stream,
so a kept window spans 0.75 to 1.5 times its nominal length. Not for ``"mean-v1"`` (the means of Wi-Fi scans, which
come when they come: a real log's scans of one second are a millisecond apart)."""


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
    def empty(cls, size: int, n_channels: int, labels_dtype: Any = None, outputs: tuple[int, ...] = ()
              ) -> WindowBatch:
        """No windows; with ``labels_dtype``, labels of shape ``(0, *outputs)``."""
        return cls(
            start=np.empty(0, np.float64),
            end=np.empty(0, np.float64),
            values=np.empty((0, n_channels), np.float32),
            offsets=np.empty(0, np.intp),
            size=size,
            labels=None if labels_dtype is None else np.empty((0, *outputs), labels_dtype),
            dropped=0,
        )

    def take(self, keep: np.ndarray) -> WindowBatch:
        """The windows where ``keep`` (bool[k]) is True, cut from the same readings."""
        return WindowBatch(start=self.start[keep], end=self.end[keep], values=self.values, offsets=self.offsets[keep],
                           size=self.size, labels=None if self.labels is None else self.labels[keep],
                           dropped=self.dropped)

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
        self._seg_windowed = False  # whether the current segment has completed a window
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
            labels: array[n] of per-reading labels (float ``[n, outputs]`` for
                several regression targets), or None.  Either every push of a
                Windower has labels or none has.
        """
        ts, values, labels = self._checked(ts, values, labels)
        n = ts.shape[0]
        if n == 0:
            return WindowBatch.empty(self._size, self._c, None if labels is None else _window_label_dtype(labels),
                                     () if labels is None else labels.shape[1:])
        bounds, continues = self._segment_bounds(ts)
        out: list[WindowBatch] = []
        # a gap since the last push, after a run of readings too short for one window
        cut = int(not continues and self._last_ts is not None and not self._seg_windowed)
        for s in range(len(bounds) - 1):
            a, b = bounds[s], bounds[s + 1]
            seg_ts, seg_v, seg_l, skip = self._segment(
                ts[a:b], values[a:b], labels[a:b] if labels is not None else None, continues and s == 0)
            batch, next_start = _window_segment(seg_ts, seg_v, seg_l, self.params)
            out.append(batch)
            windowed = next_start > 0 or (continues and s == 0 and self._seg_windowed)  # the segment has a window
            if s == len(bounds) - 2:  # keep the tail of the last segment only
                self._keep_tail(seg_ts, seg_v, seg_l, skip, next_start)
                self._seg_windowed = windowed
            elif not windowed:  # a gap follows a run too short for one window: readings, and no window
                cut += 1
        self._last_ts = float(ts[-1])
        batch = out[0] if len(out) == 1 else WindowBatch.concat(out)
        batch.dropped += cut
        return batch

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
            if labels.shape[:1] != (n,) or (labels.ndim != 1 and not (labels.ndim == 2 and labels.dtype.kind == "f")):
                raise ValueError(f"labels must have shape ({n},) (or ({n}, outputs) of floats), got {labels.shape}")
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
        return WindowBatch.empty(size, c, labels_dtype, () if labels is None else labels.shape[1:]), 0
    k = (m - size) // hop + 1
    starts = np.arange(k, dtype=np.intp) * hop
    region = vals[: (k - 1) * hop + size]  # the readings the windows cover
    offsets, dropped = starts, 0
    bad = ~np.isfinite(region)
    if bad.any():
        starts, offsets, region = _apply_missing_policy(region, bad, starts, params)
        dropped = k - starts.shape[0]
    ends = starts + size - 1
    if size > 1 and params.features != "mean-v1":  # a model of window means (scans) takes readings at any pace
        short = ts[ends] - ts[starts] < MIN_SPAN * (size - 1) / params.sample_rate_hz
        if short.any():
            starts, offsets, ends = starts[~short], offsets[~short], ends[~short]
            dropped += int(short.sum())
    win_labels = None
    if labels is not None and params.forecast is not None and labels.dtype.kind == "f":
        win_labels = labels[ends].astype(np.float64)  # a forecast's target: what its last reading's label says
    elif labels is not None:
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
        return np.empty((0, *labels.shape[1:]), _window_label_dtype(labels))
    if labels.dtype.kind == "f":
        # Direct per-window mean (not a cumulative sum) so the result does not
        # depend on where the stream was chunked, to the last bit; per output.
        size = int(ends[0] - starts[0] + 1)
        return sliding_window_view(labels.astype(np.float64), size, axis=0)[starts].mean(axis=-1)
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
