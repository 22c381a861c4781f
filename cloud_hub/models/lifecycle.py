"""Model lifecycle: train (logs or fleet features) → FP32 ONNX → INT8 → evaluate → gate → register.

Everything a device needs to preprocess exactly like the trainer travels in the manifest
(:class:`edge_agent.preprocess.PreprocessParams`), so agent and hub cannot disagree.

The data it trains on, the defaults it is made with and the hold-out rule (always devices the model never
trained on) are in :mod:`cloud_hub.models.datasets`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.aggregate import shaped_by
from cloud_hub.data.store import ModelRow, Store
from cloud_hub.data.summaries import describe_score
from cloud_hub.models import baselines, quantize, training, weights
from cloud_hub.models.datasets import (
    Dataset,
    LifecycleError,
    choose_holdout,
    computed,
    dataset_from_logs,
    default_config,
    labels_array,
    require_labels,
    split,
    windows_from_logs,
)
from cloud_hub.models.forecast import Persistence, add_back_of, persistence_check
from edge_agent.contract import Bundle, Manifest, decode_bundle, fits_label, manifest_from_obj
from edge_agent.drift import feature_bins
from edge_agent.preprocess import (
    PreprocessParams,
    extract_features,
    last_readings,
)
from edge_agent.sources import read_log

log = logging.getLogger(__name__)


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
    base = baselines.baselines(recorded.X, recorded.y, test.X, test.y, persistence=_persistence(recorded, test))
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
    loses to persistence is registered all the same (it was asked for), and its ``gate`` says so; a model that
    does no better than the constant (the majority class, the training mean) is registered rejected, its
    ``gate`` saying why (``publish --version N --force`` still takes it)."""
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
    constant = baselines.constant_check(m_int8, bundle.manifest.metrics["baselines"])
    if constant is not None:  # registered rejected: publish passes it over, and takes it only by --version --force
        verdict = constant if verdict is None else f"{constant}; {verdict}"
    if verdict is not None:
        log.info("%s", verdict)
        bundle = Bundle(replace(bundle.manifest, metrics={**bundle.manifest.metrics, "gate": verdict}), bundle.model)
    state = "publishable" if constant is None else "rejected"
    register(engine, bundle, blob, state)
    return Outcome(name, version, state, m_fp32, m_int8, chosen, len(train.y), len(test.y), gate=verdict,
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
                  versions: Sequence[int] | None = None, name: str | None = None) -> Dataset:
    """Labelled feature vectors that agents reported, from results of ``versions`` (the versions
    whose preprocessing equals ``params``: features made otherwise do not mean the same thing) of model
    ``name`` when given: a version number is a model's own, so the results of devices whose last status names
    another model are another model's data (its labels, its windows), left out."""
    X, y, devices, starts = [], [], [], []
    other: dict[str, int] = {}  # device -> results whose features are not n_features numbers
    store = Store(engine)
    with engine.connect() as conn:
        others = set() if name is None else store.running_other_models(conn, name)
        for device_id, truth, blob, start in store.labelled_features(conn, versions):
            if device_id in others:
                continue
            vec = sessions.unpack_features(blob)
            if vec is None or vec.shape[0] != n_features or not fits_label(truth):
                other[device_id] = other.get(device_id, 0) + 1  # (a truth stored before the contract refused it)
                continue
            X.append(vec)
            y.append(truth)
            devices.append(device_id)
            starts.append(start)
    if other:  # said, not silently dropped: a device sending something else, or a bug
        log.warning("left out %d labelled results whose features are not %d numbers or whose truth no label can "
                    "be (%s)", sum(other.values()),
                    n_features, ", ".join(f"{d}: {n}" for d, n in sorted(other.items(), key=lambda kv: -kv[1])[:5])
                    + (f" and {len(other) - 5} more devices" if len(other) > 5 else ""))
    if not X:
        raise LifecycleError("no labelled feature vectors reported by the fleet yet "
                             "(agents send them with features = 'sampled' or 'all')")
    features = np.vstack(X).astype(np.float32)
    return Dataset(features, labels_array(y), np.asarray(devices, dtype=str), params, np.asarray(starts),
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
    ds = fleet_dataset(engine, params, manifest.n_features, versions=same, name=name)
    n_fleet = len(ds.y)
    if logs:
        data, y, devices, starts = windows_from_logs(logs, params)
        X = extract_features(data, params)
        kept = computed(X, ", ".join(logs))
        data, y, devices, starts = data[kept], y[kept], devices[kept], starts[kept]
        extra = Dataset(X[kept], y, devices, params, starts)
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
