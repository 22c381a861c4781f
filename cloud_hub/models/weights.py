"""Trained models as plain arrays (npz, ``allow_pickle=False``), never pickles.

The registry keeps each version's ``StandardScaler -> MLP`` weights this way so that the next
retraining can warm-start from them in another process. A pickle would run arbitrary code when
loaded; arrays cannot.
"""

from __future__ import annotations

import io

import numpy as np
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelBinarizer, StandardScaler

_PARAMS = ("alpha", "learning_rate_init", "batch_size", "tol", "n_iter_no_change", "max_iter")


def to_bytes(model: Pipeline) -> bytes:
    scaler, mlp = model.steps[0][1], model.steps[-1][1]
    arrays: dict[str, np.ndarray] = {
        "scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_, "scaler_var": scaler.var_,
        "task": np.array("classification" if isinstance(mlp, MLPClassifier) else "regression"),
        "hidden": np.asarray(mlp.hidden_layer_sizes, dtype=np.int64),
        "activation": np.array(mlp.activation),
        "out_activation": np.array(mlp.out_activation_),
        "n_layers": np.array(len(mlp.coefs_), dtype=np.int64),
        "target_scale": np.asarray(getattr(mlp, "target_scale_", (0.0, 1.0)), dtype=np.float64),
    }
    for name in _PARAMS:
        value = mlp.get_params()[name]
        arrays[f"param_{name}"] = np.array(value if value != "auto" else -1)
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_, strict=True)):
        arrays[f"coef_{i}"], arrays[f"intercept_{i}"] = w, b
    if isinstance(mlp, MLPClassifier):
        arrays["classes"] = np.asarray(mlp.classes_).astype(str)
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def from_bytes(blob: bytes) -> Pipeline:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = a["scaler_mean"], a["scaler_scale"], a["scaler_var"]
    scaler.n_features_in_ = int(a["scaler_mean"].shape[0])
    scaler.n_samples_seen_ = 1
    params = {name: a[f"param_{name}"].item() for name in _PARAMS}
    if params["batch_size"] == -1:
        params["batch_size"] = "auto"
    cls = MLPClassifier if str(a["task"]) == "classification" else MLPRegressor
    mlp = cls(hidden_layer_sizes=tuple(int(h) for h in a["hidden"]), activation=str(a["activation"]), **params)
    n = int(a["n_layers"])
    mlp.coefs_ = [a[f"coef_{i}"] for i in range(n)]
    mlp.intercepts_ = [a[f"intercept_{i}"] for i in range(n)]
    mlp.n_layers_ = n + 1
    mlp.n_outputs_ = int(mlp.coefs_[-1].shape[1])
    mlp.out_activation_ = str(a["out_activation"])
    mlp.n_features_in_ = int(mlp.coefs_[0].shape[0])
    mlp.n_iter_, mlp.t_ = 0, 0
    mlp.loss_curve_, mlp.best_loss_, mlp._no_improvement_count = [], np.inf, 0
    mlp.validation_scores_, mlp.best_validation_score_ = None, None
    if cls is MLPClassifier:
        mlp.classes_ = a["classes"]
        mlp._label_binarizer = LabelBinarizer().fit(a["classes"])
    else:
        scale = a["target_scale"]  # [mu, sd], or [[mu...], [sd...]] for several outputs
        mlp.target_scale_ = (scale[0], scale[1]) if scale.ndim == 2 else tuple(float(x) for x in scale)
    return Pipeline([("scaler", scaler), ("mlp", mlp)])
