"""Model lifecycle: train (logs or fleet features) → FP32 ONNX → INT8 → evaluate → gate → register.

Everything a device needs to preprocess exactly like the trainer travels in the manifest
(:class:`edge_agent.preprocess.PreprocessParams`), so agent and hub cannot disagree.

Held-out evaluation is always on devices the model never trained on, nor any version it started
from (``training.shaped_by`` records every device whose data shaped a version). Default hold-out when
none is named: the last ⌈20 %⌉ of the device ids in sorted order (at least one, and never all of
them), among those that did not shape the version it starts from; a single-device data set is
instead split in time (its last 20 % of windows).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.aggregate import describe_score, shaped_by
from cloud_hub.data.store import ModelRow, Store
from cloud_hub.errors import HubError
from cloud_hub.models import quantize, training, weights
from cloud_hub.models.forecast import Persistence, add_back_of, persistence_check
from edge_agent import exits
from edge_agent.contract import Bundle, Manifest, decode_bundle, manifest_from_obj
from edge_agent.drift import feature_bins
from edge_agent.preprocess import (
    DeviceWindowers,
    PreprocessParams,
    extract_features,
    fit_normalization,
    last_readings,
)
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


@dataclass
class Outcome:
    """What one training run produced; ``to_obj`` is what ``train --json`` prints."""

    name: str
    version: int
    state: str
    fp32: dict[str, Any]
    int8: dict[str, Any]
    holdout_devices: list[str]
    train_windows: int
    holdout_windows: int
    baseline: dict[str, Any] | None = None  # the running version on the same hold-out (retrain)
    gate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": self.state, "fp32": self.fp32,
                "int8": self.int8, "holdout_devices": self.holdout_devices, "train_windows": self.train_windows,
                "holdout_windows": self.holdout_windows, "baseline": self.baseline, "gate": self.gate, **self.extra}


# ----------------------------------------------------------------------------- data


def _labels_array(labels: list[str]) -> np.ndarray:
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
    y = np.concatenate(targets) if numeric else _labels_array(labels)
    return np.concatenate(data), y, np.asarray(devices, dtype=str), np.concatenate(starts)


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
        raise LifecycleError(f"{path}: {exc} (the log has {rate:g} readings a second)") from None


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


# ----------------------------------------------------------------------------- model building


def build(train: Dataset, test: Dataset, *, name: str, version: int, warm_from: Any = None,
          seed: int = 0, config: training.TrainConfig | None = None, summary: dict[str, Any] | None = None,
          shaped: Collection[str] = ()) -> tuple[Bundle, dict[str, Any], dict[str, Any], bytes]:
    """Train, export FP32, quantize INT8 (calibrated on training windows), evaluate both on ``test``.
    ``shaped``: the devices that shaped ``warm_from``; with the training devices, the new version's ``shaped_by``."""
    t0 = time.monotonic()
    log.info("training on %d windows of %d devices (%d features)%s", len(train.y), len(set(train.devices.tolist())),
             train.X.shape[1], ", warm-started" if warm_from is not None else "")
    add_back, offset = _forecast_offset(train)
    model = training.train(train.X, train.y if add_back is None else train.y - offset, warm_from=warm_from,
                           seed=seed, config=config, ignore=() if add_back is None else (add_back[0],))
    n_features = train.X.shape[1]
    log.info("trained in %.1f s; exporting FP32 ONNX and quantizing to INT8 (calibrated on training windows)",
             time.monotonic() - t0)
    fp32 = training.export_onnx(model, n_features, add_back)
    int8 = quantize.quantize_int8(fp32, train.X, seed=seed)
    log.info("evaluating FP32 and INT8 on %d hold-out windows", len(test.y))
    m_fp32 = quantize.evaluate(fp32, test.X, test.y)
    m_int8 = quantize.evaluate(int8, test.X, test.y)
    recorded = train.recorded()  # classic baselines learn from the recordings, not our augmented copies
    base = training.baselines(recorded.X, recorded.y, test.X, test.y, persistence=_persistence(recorded, test))
    task = training.model_task(model)
    manifest = Manifest(
        name=name, version=version, sha256=hashlib.sha256(int8).hexdigest(), task=task,
        labels=training.model_labels(model), n_features=n_features, input_name=training.INPUT_NAME,
        preprocess=train.params.to_dict(), created=time.time(),
        metrics={"int8": m_int8, "fp32": m_fp32, "baselines": base},
        training={"train_windows": len(train.y), "holdout_windows": len(test.y),
                  "train_devices": sorted(set(train.devices.tolist())),
                  "holdout_devices": sorted(set(test.devices.tolist())),
                  "shaped_by": sorted(set(train.devices.tolist()) | set(shaped)),
                  "warm_start": warm_from is not None, **(summary or {}),
                  "feature_bins": feature_bins(recorded.X)},  # the devices measure their drift against it
    )
    return Bundle(manifest, int8), m_fp32, m_int8, weights.to_bytes(model, fp32)  # its graph: federated rounds'


def _forecast_offset(train: Dataset) -> tuple[tuple[int, float, float] | None, np.ndarray | None]:
    """A forecast learns the change from the last reading of its channel: (the column the graph adds
    back, with its normalization) and the training windows' last readings; else (None, None)."""
    add_back = add_back_of(train.params)
    last = last_readings(train.X, train.params)
    if add_back is None or last is None:
        return None, None
    return add_back, last[:, add_back[0]].astype(np.float64)


def _persistence(train: Dataset, test: Dataset) -> Persistence | None:
    """The windows' last readings for the persistence baseline: recorded (logs), else read back from
    features that keep them (a fleet's trend-v1 vectors); None when unknown."""
    def last(ds: Dataset) -> np.ndarray | None:
        return ds.last if ds.last is not None else last_readings(ds.X, ds.params)
    a, b = last(train), last(test)
    if a is None or b is None:
        return None
    return Persistence(a, b, train.params.channels, train.params.forecast)


def score(metrics: dict[str, Any]) -> float:
    """Higher is better: accuracy, or minus the mean error (the MAE of one output; for several,
    the mean Euclidean distance, e.g. metres for a position)."""
    if "accuracy" in metrics:
        return float(metrics["accuracy"])
    return -float(metrics["mean_error"] if "mean_error" in metrics else metrics["mae"])


def passes_gate(candidate: dict[str, Any], running: dict[str, Any], tolerance: float = 0.0) -> bool:
    """The gate: a candidate may replace the running version when it is not worse on the same hold-out
    than ``tolerance`` allows. An equal score passes (a retrain that changes nothing is not a regression).
    The one gate of every new version: a retrain's, a federated round's (hold-out logs or the devices' own
    evaluation, :mod:`cloud_hub.rounds.finish`)."""
    return score(candidate) >= score(running) - tolerance


def next_version(store: Store, conn: sa.Connection, name: str) -> int:
    latest = store.get_model(conn, name)
    return 1 if latest is None else latest.version + 1


def register(engine: sa.Engine, bundle: Bundle, weights_blob: bytes, state: str) -> None:
    store = Store(engine)
    m = bundle.manifest
    with sessions.transaction(engine) as conn:
        store.add_model(conn, name=m.name, version=m.version, sha256=m.sha256, manifest=m.to_obj(),
                        created=m.created, bundle=bundle.encode(), metrics=m.metrics, state=state,
                        weights=weights_blob)


def train_from_logs(engine: sa.Engine, logs: Sequence[str], *, name: str = "default",
                    holdout: Sequence[str] | None = None, window_s: float | None = None,
                    hop_s: float | None = None, seed: int = 0, on_error: str = "raise",
                    config: training.TrainConfig | None = None, features: str | None = None,
                    mirror: Sequence[str] = (), absent: tuple[float, float] | None = None,
                    forecast: str | None = None) -> Outcome:
    """``cloud-hub train``: a new version from labelled logs, registered as publishable. A regressor that
    loses to persistence is registered all the same (it was asked for), and its ``gate`` says so."""
    log.info("reading %d log(s): %s", len(logs), ", ".join(str(p) for p in logs))
    require_labels(logs, on_error)
    chosen = choose_holdout(_devices_of(logs, on_error), holdout)
    log.info("windowing and featurizing (hold-out devices: %s)", ", ".join(chosen) or "the last 20% in time")
    ds = dataset_from_logs(logs, window_s=window_s, hop_s=hop_s, holdout=chosen, on_error=on_error,
                           features=features, mirror=mirror, absent=absent, seed=seed, forecast=forecast)
    train, test = split(ds, chosen)
    config = config or default_config(ds.params)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        version = next_version(store, conn, name)
    bundle, m_fp32, m_int8, blob = build(train, test, name=name, version=version, seed=seed, config=config,
                                         summary={"source": "logs", "logs": [str(p) for p in logs],
                                                  "mirror": list(mirror)})
    _, verdict = persistence_check(m_int8, bundle.manifest.metrics["baselines"])
    if verdict is not None:
        log.info("%s", verdict)
        bundle = Bundle(replace(bundle.manifest, metrics={**bundle.manifest.metrics, "gate": verdict}), bundle.model)
    register(engine, bundle, blob, "publishable")
    return Outcome(name, version, "publishable", m_fp32, m_int8, chosen, len(train.y), len(test.y), gate=verdict,
                   extra={"baselines": bundle.manifest.metrics["baselines"]})


def _devices_of(logs: Sequence[str], on_error: str) -> list[str]:
    names: set[str] = set()
    for path in logs:
        with read_log(path, on_error=on_error) as reader:
            for chunk in reader:
                names.update(chunk.device_names)
    return sorted(names)


# ----------------------------------------------------------------------------- retraining from the fleet


def on_topic(rows: Sequence[ModelRow]) -> ModelRow | None:
    """The version on the model topic: the one published last (rows of one model name)."""
    published = [r for r in rows if r.state == "published"]
    return max(published, key=lambda r: (r.published_at or 0.0, r.version)) if published else None


def current_model(rows: Sequence[ModelRow], name: str) -> ModelRow:
    """The version devices should be running: the one on the topic, else the newest publishable."""
    running = on_topic(rows)
    if running is not None:
        return running
    publishable = [r for r in rows if r.state == "publishable"]
    if publishable:
        return publishable[-1]
    raise LifecycleError(f"no model {name!r} to retrain from: run `cloud-hub train` first")


def fleet_dataset(engine: sa.Engine, params: PreprocessParams, n_features: int, *,
                  versions: Sequence[int] | None = None) -> Dataset:
    """Labelled feature vectors that agents reported, from results of ``versions`` (the versions
    whose preprocessing equals ``params``: features made otherwise do not mean the same thing)."""
    X, y, devices, starts = [], [], [], []
    with engine.connect() as conn:
        for device_id, truth, blob, start in Store(engine).labelled_features(conn, versions):
            vec = sessions.unpack_features(blob)
            if vec is None or vec.shape[0] != n_features:
                continue  # reported under other preprocessing parameters
            X.append(vec)
            y.append(truth)
            devices.append(device_id)
            starts.append(start)
    if not X:
        raise LifecycleError("no labelled feature vectors reported by the fleet yet "
                             "(agents send them with features = 'sampled' or 'all')")
    features = np.vstack(X).astype(np.float32)
    return Dataset(features, _labels_array(y), np.asarray(devices, dtype=str), params, np.asarray(starts),
                   last=last_readings(features, params))


def retrain(engine: sa.Engine, *, name: str = "default", holdout: Sequence[str] | None = None,
            tolerance: float = 0.0, logs: Sequence[str] = (), seed: int = 0, min_windows: int = 50,
            config: training.TrainConfig | None = None) -> Outcome:
    """``cloud-hub retrain``: the next version from fleet features, warm-started and gated."""
    store = Store(engine)
    with sessions.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, name)
        current = current_model(rows, name)
        version = next_version(store, conn, name)
        weights_blob = store.get_weights(conn, name, current.version)
    manifest = manifest_from_obj(current.manifest)
    params = PreprocessParams.from_dict(manifest.preprocess)
    config = config or default_config(params)
    same = [row.version for row in rows if row.manifest.get("preprocess") == manifest.preprocess]
    shaped = shaped_by({(r.name, r.version): r.manifest for r in rows}).get((name, current.version), frozenset())
    ds = fleet_dataset(engine, params, manifest.n_features, versions=same)
    n_fleet = len(ds.y)
    if logs:
        data, y, devices, starts = windows_from_logs(logs, params)
        extra = Dataset(extract_features(data, params), y, devices, params, starts)
        last = None if ds.last is None else np.vstack([ds.last, data[:, -1, :]])
        ds = Dataset(np.vstack([ds.X, extra.X]), np.concatenate([ds.y.astype(extra.y.dtype), extra.y]),
                     np.concatenate([ds.devices, extra.devices]), params, np.concatenate([ds.order, extra.order]),
                     last=last)
    if len(ds.y) < min_windows:
        raise LifecycleError(f"only {len(ds.y)} labelled windows (need {min_windows})")
    chosen = choose_holdout(ds.devices.tolist(), holdout, shaped, f"v{current.version}")
    train, test = split(ds, chosen)
    warm = weights.from_bytes(weights_blob) if weights_blob else None
    bundle, m_fp32, m_int8, blob = build(
        train, test, name=name, version=version, warm_from=warm, seed=seed, config=config,
        shaped=shaped if warm is not None else (),
        summary={"source": "fleet" + ("+logs" if logs else ""), "fleet_windows": n_fleet,
                 "parent_version": current.version})
    baseline = _evaluate_bundle(current, test)
    ok = passes_gate(m_int8, baseline, tolerance)
    beats, verdict = persistence_check(m_int8, bundle.manifest.metrics["baselines"])
    gate = (f"v{version} INT8 {describe_score(m_int8)} vs running v{current.version} INT8 {describe_score(baseline)}, both on "
            f"hold-out {', '.join(chosen) or 'windows'} ({len(test.y)} windows; tolerance {tolerance:g})"
            + (f"; {verdict}" if verdict else "") + f": {'pass' if ok and beats else 'fail'}")
    ok = ok and beats  # a regressor that loses to repeating the last reading is never published by a retrain
    state = "publishable" if ok else "rejected"
    bundle = Bundle(_with_gate(bundle.manifest, baseline, gate), bundle.model)
    register(engine, bundle, blob, state)
    log.info("%s", gate)
    return Outcome(name, version, state, m_fp32, m_int8, chosen, len(train.y), len(test.y), baseline, gate,
                   {"parent_version": current.version, "fleet_windows": n_fleet,
                    "baselines": bundle.manifest.metrics["baselines"]})




def _with_gate(m: Manifest, baseline: dict[str, Any], gate: str) -> Manifest:
    return replace(m, metrics={**m.metrics, "baseline_int8": baseline, "gate": gate})


def _evaluate_bundle(row: ModelRow, test: Dataset) -> dict[str, Any]:
    if row.bundle is None:
        raise LifecycleError(f"model {row.name} v{row.version} has no stored bundle")
    return quantize.evaluate(decode_bundle(row.bundle).model, test.X, test.y, latency_runs=50, warmup=5)
