"""What a model must beat, on the same windows: the constant predictor, k-nearest neighbours, persistence.

``cloud-hub train`` and ``retrain`` put these figures next to the model's in its manifest
(``metrics.baselines``), and the persistence gate (:func:`cloud_hub.models.forecast.persistence_check`) reads
them. Apart from :mod:`cloud_hub.models.training` because they are the yardstick, not the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from cloud_hub.data.summaries import describe_score
from cloud_hub.models import forecast
from cloud_hub.models.training import task_of

#: k-NN baselines are skipped beyond this many train x test distance computations (seconds of CPU).
KNN_MAX_PAIRS = 400_000_000


def baselines(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
              k: int = 3, *, persistence: forecast.Persistence | None = None) -> dict[str, dict[str, Any]]:
    """What a model must beat, on the same windows and inputs: the constant predictor (the training
    mean, or the most frequent class), k-nearest neighbours on the standardized features (for
    positioning, classic k-NN fingerprinting) and, for a regressor of one output given the windows'
    last readings, persistence (:func:`cloud_hub.models.forecast.persistence_baseline`). Metrics as
    :func:`cloud_hub.models.quantize.evaluate` gives."""
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from cloud_hub.models.quantize import error_metrics

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    task = task_of(y_train)

    def score(pred: np.ndarray) -> dict[str, Any]:
        if task == "classification":
            return {"task": task, "n": len(y_test), "accuracy": float(np.mean(pred.astype(str) == y_test.astype(str)))}
        return {"task": task, "n": len(y_test), **error_metrics(pred, y_test)}

    if task == "classification":
        names, counts = np.unique(y_train.astype(str), return_counts=True)
        out = {"majority": score(np.full(len(y_test), names[np.argmax(counts)]))}
    else:
        out = {"mean": score(np.tile(np.mean(y_train.astype(np.float64), axis=0), (len(y_test), 1)))}
    if len(X_train) * len(X_test) <= KNN_MAX_PAIRS:
        scaler = StandardScaler().fit(X_train)
        knn = (KNeighborsClassifier if task == "classification" else KNeighborsRegressor)(n_neighbors=min(k, len(X_train)))
        with threadpool_limits(limits=1, user_api="blas"):
            knn.fit(scaler.transform(X_train), y_train)
            out[f"knn{k}"] = score(knn.predict(scaler.transform(X_test)))
    if task == "regression" and persistence is not None:
        found = forecast.persistence_baseline(persistence, y_train, y_test)
        if found is not None:
            out["persistence"] = found
    return out


def constant_check(int8: dict[str, Any], found: dict[str, Any]) -> str | None:
    """The sentence that says the INT8 model does no better on the hold-out than the constant predictor (the
    training's majority class, or its mean) of :func:`baselines`; None when it does better (or both are perfect),
    or without one. A model trained on shuffled labels was registered publishable and shipped by a plain
    ``publish``; ``train`` now registers such a model rejected."""
    if "accuracy" in int8 and "majority" in found:  # equal is no better, unless both are perfect
        const, what = found["majority"], "the majority class"
        a, b = int8["accuracy"], const["accuracy"]
        worse = a < b or (a == b and b < 1.0)
    elif "mean_error" in int8 and "mean_error" in found.get("mean", {}):
        const, what = found["mean"], "the training mean"
        a, b = int8["mean_error"], const["mean_error"]
        worse = a > b or (a == b and b > 0.0)
    else:
        return None
    if not worse:
        return None
    return (f"INT8 {describe_score(int8)} does no better than {what} ({describe_score(const)}) on the same "
            "hold-out: it has learned nothing a constant does not say")
