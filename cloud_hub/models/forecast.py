"""Forecasts of a series: the persistence baseline, the verdict against it, and the graph that adds
a forecast's last reading back to the change its network predicts.

Persistence ("the next reading is the last one") is what a forecast must beat: a regressor that
summarizes a window can lose to it by far (summary statistics keep neither the last reading nor the
trend). ``cloud-hub train --forecast CHANNEL`` learns the change from the window's last reading of
``CHANNEL`` (``PreprocessParams.forecast``, features ``trend-v1``); :func:`add_back` makes the exported
model output the forecast itself, so every runner (the agent's, a third party's, the hub's evaluation)
reads forecasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_hub.data.summaries import describe_score
from edge_agent.preprocess import PreprocessParams, feature_names


@dataclass(frozen=True)
class Persistence:
    """The windows' last readings, for the persistence baseline: float[n, channels] of the training
    and the hold-out windows (NaN where unknown), the channel names, and the channel a forecast
    names (``PreprocessParams.forecast``; None: the one whose last reading follows the training
    targets best)."""

    train: np.ndarray
    test: np.ndarray
    channels: tuple[str, ...]
    channel: str | None = None


def persistence_baseline(last: Persistence, y_train: np.ndarray, y_test: np.ndarray) -> dict[str, Any] | None:
    """Persistence: each window's target predicted by its last reading of one channel (for a series,
    "the next hour is as this hour"). Without a named channel, the channel whose last reading has the
    lowest error on the *training* windows is used (never chosen on the hold-out). None for a
    regressor of several outputs or when the last readings are not known."""
    from cloud_hub.models.quantize import error_metrics

    y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    if y_test.ndim != 1 or last.test.shape != (len(y_test), len(last.channels)) or not len(y_test):
        return None
    if last.channel is not None:
        col = last.channels.index(last.channel)
    else:
        if last.train.shape != (len(y_train), len(last.channels)) or not len(y_train):
            return None
        with np.errstate(invalid="ignore"):
            err = np.nanmean(np.abs(last.train - y_train[:, None]), axis=0)
        if not np.isfinite(err).any():
            return None
        col = int(np.nanargmin(err))
    pred = last.test[:, col].astype(np.float64)
    if not np.all(np.isfinite(pred)):
        return None
    return {"task": "regression", "n": len(y_test), "channel": last.channels[col],
            **error_metrics(pred[:, None], y_test[:, None])}


def persistence_check(int8: dict[str, Any], baselines: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether the INT8 model beats persistence on the same hold-out, and the sentence that says so
    (``(True, None)`` when there is no persistence baseline: a classifier, several outputs, or last
    readings not known)."""
    p = baselines.get("persistence")
    if p is None or "mae" not in int8:
        return True, None
    ok = int8["mae"] < p["mae"]  # one output: the MAE is the score
    ratio = int8["mae"] / p["mae"] if p["mae"] > 0 else math.inf
    return ok, (f"INT8 {describe_score(int8)} {'beats' if ok else 'loses to'} persistence (the last {p['channel']} "
                f"reading) {describe_score(p)}: {ratio:.2f}x its error on the same hold-out")


def add_back_of(params: PreprocessParams) -> tuple[int, float, float] | None:
    """What :func:`add_back` needs for a model preprocessed with ``params``: (the feature column of the
    forecast channel's last reading, its normalization mean and std); None when it is not a forecast.
    Every export of a forecast's network needs it (a retrain's, a federated round's), else the model
    would output changes under a manifest that promises forecasts."""
    if params.forecast is None:
        return None
    col = params.channels.index(params.forecast)
    if feature_names(params)[col] != f"{params.forecast}_last":
        raise ValueError(f"a forecast of {params.forecast!r} needs features that keep its last reading (trend-v1)")
    return col, params.norm_mean[col], params.norm_std[col]


def add_back(onx: Any, column: int, mean: float, std: float) -> None:
    """Rename the output ``variable`` to ``change`` and add ``input[:, column] * std + mean`` to it."""
    from onnx import helper, numpy_helper

    graph = onx.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["forecast_change" if o == out else o for o in node.output]
    graph.initializer.extend([numpy_helper.from_array(np.array([column], np.int64), "forecast_column"),
                              numpy_helper.from_array(np.array(std, np.float32), "forecast_std"),
                              numpy_helper.from_array(np.array(mean, np.float32), "forecast_mean")])
    graph.node.extend([
        helper.make_node("Gather", [graph.input[0].name, "forecast_column"], ["forecast_last_n"], axis=1, name="forecast_gather"),
        helper.make_node("Mul", ["forecast_last_n", "forecast_std"], ["forecast_last_s"], name="forecast_mul"),
        helper.make_node("Add", ["forecast_last_s", "forecast_mean"], ["forecast_last"], name="forecast_unnorm"),
        helper.make_node("Add", ["forecast_change", "forecast_last"], [out], name="forecast_add"),
    ])
