"""Training data from recorded logs: windows, features and labels (:class:`Dataset`), the defaults they are
made with, and the split into training and held-out devices.

Held-out evaluation is always on devices the model never trained on, nor any version it started
from (``training.shaped_by`` records every device whose data shaped a version). Default hold-out when
none is named: the last ⌈20 %⌉ of the device ids in sorted order (at least one, and never all of
them), among those that did not shape the version it starts from; a single-device data set is
instead split in time (its last 20 % of windows).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from cloud_hub.errors import HubError
from cloud_hub.models import training
from edge_agent import exits
from edge_agent.preprocess import (
    DeviceWindowers,
    InvalidParams,
    PreprocessParams,
    extract_features,
    fit_normalization,
)
from edge_agent.preprocess.features import MAX_NORMALIZED, computed_rows
from edge_agent.sources import read_log

log = logging.getLogger(__name__)

# Defaults measured on the watch recordings (bench/train_watch.py, subjects s09 and s10 held out):
# time-domain statistics generalize to unseen people better than spectra, which capture each
# person's pace (stats-fft-v1 loses ~5 points there).
DEFAULT_WINDOW_S = 2.5
DEFAULT_HOP_S = 0.5
DEFAULT_FEATURES = "stats-v1"
# Signal-strength scans (channels named as in UJIIndoorLoc: WAP001, ...; see cloud_hub/tools/positioning.py):
# a window of three scans, a hop of one, the window mean of each access point, and +100 ("not heard")
# standing for -110 dBm; training adds copies of each window with a random offset per window (phones
# of other makes hear every access point a few dB stronger or weaker) and a tenth of the access points
# heard dropped (scans miss beacons), and uses a lighter L2 penalty. Measured with
# bench/positioning.py (16 phones, 4 folds of held-out phones): 3 scans beat 1 and 2; the copies take
# the median error from 1.34 to 1.31 m and the mean from 1.77 to 1.70 m (k-NN: 1.35 / 1.84 m);
# 60 epochs or a 20 % drop do worse.
SCAN_WINDOW, SCAN_HOP = 3, 1  # in scans
SCAN_FEATURES = "mean-v1"
SCAN_ABSENT = (100.0, -110.0)
SCAN_OFFSET_COPIES, SCAN_OFFSET_DB, SCAN_DROP = 2, 6.0, 0.1
SCAN_CONFIG = training.TrainConfig(alpha=1e-3)
# A forecast (--forecast CHANNEL): "trend-v1" features, the change from the last reading learned, the
# network blind to the level of the forecast channel (its graph adds the last reading back). Measured
# with bench/forecast.py on Mauna Loa's weekly CO2 (statsmodels' co2, the last 20 % in time held out,
# INT8 MAE over persistence's): see docs/benchmarks.md, "Forecasts against persistence".
FORECAST_FEATURES = "trend-v1"
_SCAN_CHANNEL = re.compile(r"WAP\d+")


def is_scan_log(channels: Sequence[str]) -> bool:
    """Whether a log's channels are access points' signal strengths (UJIIndoorLoc's ``WAPnnn``)."""
    return bool(channels) and all(_SCAN_CHANNEL.fullmatch(c) for c in channels)


class LifecycleError(HubError, RuntimeError):
    """Not enough data, an incompatible model, nothing to publish..."""

    exit_code = exits.MODEL


@dataclass
class Dataset:
    X: np.ndarray  # float32[n, f]
    y: np.ndarray  # labels (str) or targets (float)
    devices: np.ndarray  # str[n]
    params: PreprocessParams
    order: np.ndarray | None = None  # time order within the set (window start), for time splits
    augmented: np.ndarray | None = None  # bool[n]: made by augmentation (not recorded); None = none is
    last: np.ndarray | None = None  # float[n, channels]: each window's last readings (persistence); None = unknown

    def subset(self, mask: np.ndarray) -> Dataset:
        return Dataset(self.X[mask], self.y[mask], self.devices[mask], self.params,
                       None if self.order is None else self.order[mask],
                       None if self.augmented is None else self.augmented[mask],
                       None if self.last is None else self.last[mask])

    def recorded(self) -> Dataset:
        """The windows as recorded, without augmented copies."""
        return self if self.augmented is None else self.subset(~self.augmented)





def labels_array(labels: list[str]) -> np.ndarray:
    """Text labels train a classifier; a column whose every label is a number trains a regressor,
    and labels of several numbers separated by ``;`` (as many in each) one with several outputs."""
    try:
        rows = [[float(x) for x in label.split(";")] for label in labels]
        values = np.array(rows, dtype=np.float64)
    except ValueError:  # not numbers, or not as many in each
        return np.asarray(labels, dtype=str)
    if values.ndim != 2 or not np.all(np.isfinite(values)):
        return np.asarray(labels, dtype=str)
    return values[:, 0] if values.shape[1] == 1 else values


def require_labels(paths: Sequence[str], on_error: str = "raise") -> None:
    """Every log has a label column, from its header alone: said before any log is read through."""
    for path in paths:
        with read_log(path, on_error=on_error) as reader:
            if not reader.has_labels:
                raise LifecycleError(f"{path}: no label column, cannot train from it")


def windows_from_logs(paths: Sequence[str], params: PreprocessParams, *,
                      on_error: str = "raise") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw windows of labelled logs with the agent's own windowing: (data, labels, devices, starts).

    A label column whose labels are numbers holds regression targets: it is read as numbers, and a
    window's target is the mean of its readings' (a window with an unknown target is left out).
    Labels of several numbers (``x;y``) are targets of several outputs: ``[n, outputs]``.
    """
    require_labels(paths, on_error)
    data, labels, devices, starts = [], [], [], []
    targets: list[np.ndarray] = []
    numeric: bool | None = None
    for path in paths:
        reader = read_log(path, on_error=on_error)
        this = reader.labels_are_numbers()
        if numeric is not None and this != numeric:
            raise LifecycleError(f"{path}: its labels are {'numbers' if this else 'text'}, those of {paths[0]} are "
                                 f"{'numbers' if numeric else 'text'}: one model learns one kind of label")
        numeric = this
        if numeric:
            reader.labels_as_numbers()
        missing = [c for c in params.channels if c not in reader.channels]
        if missing:
            raise LifecycleError(f"{path}: channels {missing} missing (log has {list(reader.channels)})")
        cols = np.array([reader.channels.index(c) for c in params.channels])
        windowers = DeviceWindowers(params)
        for chunk in reader:
            for device, batch in windowers.push(chunk.by_device(), cols):
                if len(batch) and batch.labels is not None:
                    keep = (np.isfinite(batch.labels.reshape(len(batch), -1)).all(axis=1) if numeric else
                            np.array([x != "" for x in batch.labels.tolist()], dtype=np.bool_))
                    data.append(batch.data[keep])
                    if numeric:
                        targets.append(batch.labels[keep])
                    else:
                        labels += [str(x) for x in batch.labels[keep].tolist()]
                    devices += [device] * int(keep.sum())
                    starts.append(batch.start[keep])
    if not data:
        raise LifecycleError("the logs hold no complete labelled window")
    if numeric and len({t.shape[1:] for t in targets}) > 1:
        raise LifecycleError(f"the logs' labels hold different numbers of targets: {sorted({t.shape[1:] for t in targets})}")
    y = np.concatenate(targets) if numeric else labels_array(labels)
    return np.concatenate(data), y, np.asarray(devices, dtype=str), np.concatenate(starts)


def computed(X: np.ndarray, what: str) -> np.ndarray:
    """The rows of ``extract_features``'s ``X`` it could compute (a row of NaN: a window that covers a reading out
    of range, further than ``MAX_NORMALIZED`` standard deviations from the training mean); says how many were not."""
    ok = computed_rows(X)
    if not ok.all():
        log.warning("%s: %d of %d windows left out: each covers a reading further than %g standard deviations from "
                    "the training readings' mean (a dead register, a rail)", what, int((~ok).sum()), len(ok),
                    MAX_NORMALIZED)
    return ok


def default_params(path: str, *, window_s: float | None = None, hop_s: float | None = None,
                   features: str | None = None, absent: tuple[float, float] | None = None,
                   on_error: str = "raise", forecast: str | None = None) -> PreprocessParams:
    """Preprocessing for a log, before normalization: what is given, else the defaults of its kind
    (sensor readings: 2.5 s windows every 0.5 s, ``stats-v1``, a forecast ``trend-v1``; signal-strength
    scans: windows of ``SCAN_WINDOW`` (3) scans every scan, ``mean-v1``, +100 = not heard)."""
    first = read_log(path, on_error=on_error)
    first.close()
    rate = _rate_hint(path)
    scans = is_scan_log(first.channels)
    window_s = (SCAN_WINDOW / rate if scans else DEFAULT_WINDOW_S) if window_s is None else window_s
    hop_s = (SCAN_HOP / rate if scans else DEFAULT_HOP_S) if hop_s is None else hop_s
    if features is None:
        features = SCAN_FEATURES if scans else FORECAST_FEATURES if forecast is not None else DEFAULT_FEATURES
    absent = (SCAN_ABSENT if scans else None) if absent is None else absent
    absent_value, absent_as = absent if absent else (None, None)
    try:
        return PreprocessParams(sample_rate_hz=rate, window_s=window_s, hop_s=hop_s, channels=first.channels,
                                features=features, absent_value=absent_value, absent_as=absent_as,
                                forecast=forecast)
    except ValueError as exc:
        why = "; ".join(exc.problems) if isinstance(exc, InvalidParams) else str(exc)
        hint = (f"; windows of {window_s:g} s every {hop_s:g} s are the defaults, made for 50 readings a second: set "
                "--window and --hop (a few readings a window at least)") if rate < 10 else ""
        raise LifecycleError(f"{path}: the windows do not fit this log: {why} (the log has {rate:g} readings a "
                             f"second{hint})") from None


def default_config(params: PreprocessParams) -> training.TrainConfig:
    """The training defaults for data preprocessed with ``params``."""
    return SCAN_CONFIG if params.features == SCAN_FEATURES else training.TrainConfig()


def dataset_from_logs(paths: Sequence[str], *, window_s: float | None, hop_s: float | None, holdout: Sequence[str],
                      params: PreprocessParams | None = None, on_error: str = "raise",
                      features: str | None = None, mirror: Sequence[str] = (),
                      absent: tuple[float, float] | None = None, offset_copies: int | None = None,
                      seed: int = 0, forecast: str | None = None) -> Dataset:
    """Features of labelled logs; normalization statistics are fitted on the training devices only.

    ``mirror`` names channels to negate in an extra, mirrored copy of every training window (data
    augmentation for sensors worn on either side of the body: the watch recordings' two arms are
    mirror images with ``ax, wy, wz`` negated). ``offset_copies`` extra copies of every training
    window get a random offset (normal, ``SCAN_OFFSET_DB``) on every reading that is not absent
    (scans: other phones hear every access point a few dB stronger or weaker) and lose each channel
    that is not absent with probability ``SCAN_DROP`` (scans miss beacons); by default 2 for
    ``mean-v1`` scans, else none. Hold-out windows are never augmented.
    """
    if params is None:
        params = default_params(paths[0], window_s=window_s, hop_s=hop_s, features=features, absent=absent,
                                on_error=on_error, forecast=forecast)
    data, y, devices, starts = windows_from_logs(paths, params, on_error=on_error)
    last = data[:, -1, :].astype(np.float64)
    # the windows :func:`split` will train on: the other devices', or without hold-out devices the first 80 %
    # in time (the hold-out's statistics must not shape the normalization, nor its windows be augmented)
    train_mask = ~np.isin(devices, list(holdout)) if holdout else ~time_holdout(starts)
    if not params.is_fitted:
        mean, std = fit_normalization(data[train_mask].reshape(-1, data.shape[2]), params)
        params = params.with_normalization(mean, std)
    X = extract_features(data, params)
    if not (ok := computed(X, ", ".join(paths))).all():
        X, data, y, devices, starts, last, train_mask = (a[ok] for a in (X, data, y, devices, starts, last, train_mask))
    extra: list[np.ndarray] = []  # feature rows of augmented copies of the training windows
    copies = (SCAN_OFFSET_COPIES if params.features == SCAN_FEATURES else 0) if offset_copies is None else offset_copies
    if copies:
        extra += _offset_copies(data[train_mask], params, copies, seed)
    if mirror:
        unknown = sorted(set(mirror) - set(params.channels))
        if unknown:
            raise LifecycleError(f"cannot mirror unknown channels {unknown} (channels: {list(params.channels)})")
        sign = np.array([-1.0 if ch in mirror else 1.0 for ch in params.channels], dtype=np.float32)
        extra.append(extract_features(data[train_mask] * sign, params))
    if extra:
        n = len(extra)
        X = np.vstack([X, *extra])
        y = np.concatenate([y, *[y[train_mask]] * n])
        devices = np.concatenate([devices, *[devices[train_mask]] * n])
        starts = np.concatenate([starts, *[starts[train_mask]] * n])
        last = np.vstack([last, np.full((n * int(train_mask.sum()), last.shape[1]), np.nan)])  # not recorded
    augmented = np.zeros(len(y), bool)
    augmented[len(y) - len(extra) * int(train_mask.sum()):] = True
    return Dataset(X, y, devices, params, starts, augmented, last)


def _offset_copies(data: np.ndarray, params: PreprocessParams, copies: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    heard = np.isfinite(data) if params.absent_value is None else (data != np.float32(params.absent_value))
    out = []
    absent = np.float32(np.nan if params.absent_value is None else params.absent_value)
    for _ in range(copies):
        offset = rng.normal(0.0, SCAN_OFFSET_DB, (data.shape[0], 1, 1)).astype(np.float32)
        lost = heard & (rng.random((data.shape[0], 1, data.shape[2])) < SCAN_DROP)
        out.append(extract_features(np.where(lost, absent, np.where(heard, data + offset, data)), params))
    return out


def _rate_hint(path: str) -> float:
    """The sampling rate of a log: the median step between a device's first readings."""
    reader = read_log(path)
    try:
        chunk = next(iter(reader))
    finally:
        reader.close()
    steps = []
    for ts, _v, _l in chunk.by_device().values():
        d = np.diff(ts)
        if d.size:
            steps.append(np.median(d))
    if not steps:
        raise LifecycleError(f"{path}: cannot infer the sampling rate (too few readings)")
    return float(f"{1.0 / float(np.median(steps)):.6g}")  # significant digits: a weekly log is 1.65e-06 Hz


def choose_holdout(devices: Sequence[str], requested: Sequence[str] | None,
                   shaped: Collection[str] = (), parent: str = "the running version") -> list[str]:
    """The hold-out devices: ``requested``, else the last ⌈20 %⌉ of the device ids; never one in ``shaped``
    (the devices whose data shaped ``parent``, which a retrain starts from: scores on them are not held out)."""
    known = sorted(set(devices))
    if requested:
        unknown = sorted(set(requested) - set(known))
        if unknown:
            raise LifecycleError(f"hold-out devices {unknown} have no labelled windows (known: {known})")
        if set(requested) >= set(known):
            raise LifecycleError("every device is held out: nothing left to train on")
        used = sorted(set(requested) & set(shaped))
        if used:
            raise LifecycleError(f"hold-out devices {used} shaped {parent} (it learned from their windows): they "
                                 "cannot judge the new version; hold out devices it never learned from")
        return sorted(requested)
    if len(known) < 2:
        return []
    fresh = [d for d in known if d not in set(shaped)]
    if not fresh:
        raise LifecycleError(f"every device with labelled windows ({', '.join(known)}) shaped {parent}: none is "
                             "left to judge the new version on; add a device it never learned from, or a --log of one")
    return fresh[-min(len(fresh), max(1, math.ceil(0.2 * len(known)))):]


def time_holdout(starts: np.ndarray) -> np.ndarray:
    """The hold-out when no device is held out: the windows of the last 20 % in time."""
    return starts >= np.quantile(starts, 0.8)


def split(ds: Dataset, holdout: Sequence[str]) -> tuple[Dataset, Dataset]:
    if holdout:
        mask = np.isin(ds.devices, list(holdout))
    else:  # one device: hold out the last 20 % in time, of the recorded windows (augmented copies train)
        order = ds.order if ds.order is not None else np.arange(len(ds.y))
        recorded = np.ones(len(order), bool) if ds.augmented is None else ~ds.augmented
        mask = np.zeros(len(order), bool)
        mask[recorded] = time_holdout(order[recorded])
    train, test = ds.subset(~mask), ds.subset(mask)
    if len(train.y) == 0 or len(test.y) == 0:
        raise LifecycleError(f"split left {len(train.y)} training and {len(test.y)} hold-out windows")
    return train, test
