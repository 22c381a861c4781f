"""Training from feature arrays, and FP32 ONNX export.

The model is a scikit-learn ``Pipeline(StandardScaler -> MLP)``:

* text labels  -> ``MLPClassifier`` (task ``"classification"``),
* numeric labels -> ``MLPRegressor`` (task ``"regression"``).

MLPs are used (not tree ensembles) because their MatMul layers quantize to
INT8 (see :mod:`cloud_hub.models.quantize`), and with hidden layers of a few hundred
units the INT8 model is both ~4x smaller and faster than FP32 on a CPU.

The regressor is trained on a standardized target; the target scale is then
folded into the last layer, so the exported model predicts in the original
units with no extra ONNX node.

Warm start: ``train(X, y, warm_from=previous_model)`` continues training a
copy of the previous network (more Adam epochs from its weights) and keeps
the previous feature scaler, when the previous model is compatible (same task,
same number of features, and for a classifier no label it has never seen).
Otherwise it trains from scratch (logged).  The previous model is never
modified.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from cloud_hub.models import forecast

if TYPE_CHECKING:  # scikit-learn is imported by what trains or exports, not by importing this module
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline

__all__ = [
    "INPUT_NAME",
    "TrainConfig",
    "export_onnx",
    "model_labels",
    "model_task",
    "task_of",
    "train",
]

log = logging.getLogger(__name__)

#: Name of the ONNX input tensor (float32[N, n_features]).
INPUT_NAME = "input"
#: ONNX opsets used for export (QDQ per-channel quantization needs >= 13).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


@dataclass(frozen=True)
class TrainConfig:
    """MLP hyper-parameters.

    The defaults are tuned on the watch shoulder-exercise data
    (``bench/train_watch.py``, leave-subject-out): two hidden layers of 512
    units give INT8 enough compute to run ~1.8x faster than FP32 on a CPU
    while the INT8 model stays ~330 KB; 30 epochs with a strong L2 penalty
    generalize better to unseen subjects than longer training.
    """

    hidden: tuple[int, ...] = (512, 512)
    alpha: float = 0.1  # L2 penalty
    learning_rate_init: float = 1e-3
    batch_size: int = 256
    max_iter: int = 30  # epochs for a fresh model
    warm_epochs: int = 10  # epochs when warm-starting
    # Small data sets get more epochs so that training makes at least this many
    # Adam updates (a few hundred windows are only 1-2 batches per epoch).
    min_updates: int = 1000
    tol: float = 1e-4
    n_iter_no_change: int = 10
    # BLAS threads while training.  Mini-batch GEMMs of this size gain little
    # from a second thread and lose a lot when the CPU is shared (measured
    # 10x slower on a busy 2-core machine), so one thread is the default.
    blas_threads: int | None = 1


def task_of(y: np.ndarray) -> str:
    """``"classification"`` for text labels, ``"regression"`` for numeric ones (``[n]``, or
    ``[n, outputs]`` for several targets, e.g. the x, y of a position)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[0] and y.shape[1] and y.dtype.kind in "iuf":
        return "regression"
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError("y must be a non-empty 1-D array (or [n, outputs] of numbers)")
    if y.dtype.kind in "iuf":
        return "regression"
    if y.dtype.kind in "US":
        return "classification"
    if y.dtype.kind == "O":
        if all(isinstance(v, str) for v in y):
            return "classification"
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in y):
            return "regression"
    raise ValueError(f"labels must be all text (classifier) or all numbers (regressor), got dtype {y.dtype}")


def model_task(model: Pipeline) -> str:
    """Task of a model returned by :func:`train`."""
    from sklearn.neural_network import MLPClassifier

    return "classification" if isinstance(_mlp(model), MLPClassifier) else "regression"


def model_labels(model: Pipeline) -> tuple[str, ...]:
    """Class labels of a classifier in probability-column order (empty for a regressor)."""
    from sklearn.neural_network import MLPClassifier

    mlp = _mlp(model)
    return tuple(str(c) for c in mlp.classes_) if isinstance(mlp, MLPClassifier) else ()


def _mlp(model: Pipeline) -> MLPClassifier | MLPRegressor:
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline

    if not isinstance(model, Pipeline) or not isinstance(model.steps[-1][1], (MLPClassifier, MLPRegressor)):
        raise TypeError("expected a Pipeline produced by cloud_hub.models.training.train")
    return model.steps[-1][1]


def _check_X(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or inf")
    return X


def train(
    X: np.ndarray,
    y: np.ndarray,
    *,
    warm_from: Pipeline | None = None,
    seed: int = 0,
    config: TrainConfig | None = None,
    ignore: Sequence[int] = (),
) -> Pipeline:
    """Fit a ``StandardScaler -> MLP`` pipeline on features ``X`` and labels ``y``.

    Args:
        X: float32[n, f] window features (``edge_agent.preprocess.extract_features``).
        y: [n] labels: text -> classifier, numbers -> regressor ([n, outputs]: one
            regressor with several outputs).
        warm_from: a previous model of :func:`train` to continue from, if compatible.
        seed: random seed (initialization and shuffling); same inputs + seed give
            the same model.
        config: hyper-parameters (default :class:`TrainConfig`).
        ignore: feature columns the network must not use (it learns with them held at the scaler's
            mean, then their first-layer weights are zeroed): a forecast's last reading, which its
            graph adds back (level-free inputs extrapolate past the training range, see
            ``datasets.FORECAST_FEATURES``) but which must stay an input for that.
    """
    cfg = config or TrainConfig()
    cols = list(ignore)
    if cols:
        X = np.array(X, dtype=np.float32)  # a copy: the caller's features are left alone
        held = (warm_from.steps[0][1].mean_[cols] if warm_from is not None and hasattr(warm_from, "steps")
                and getattr(warm_from.steps[0][1], "n_features_in_", None) == X.shape[1] else X[:, cols].mean(axis=0))
        X[:, cols] = held
    if cfg.blas_threads is None:
        model = _train(X, y, warm_from, seed, cfg)
    else:
        with threadpool_limits(limits=cfg.blas_threads, user_api="blas"):
            model = _train(X, y, warm_from, seed, cfg)
    if cols:
        _mlp(model).coefs_[0][cols, :] = 0.0
    return model


def _train(X: np.ndarray, y: np.ndarray, warm_from: Pipeline | None, seed: int, cfg: TrainConfig) -> Pipeline:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X = _check_X(X)
    y = np.asarray(y)
    if y.shape[:1] != (X.shape[0],) or y.ndim > 2:
        raise ValueError(f"y must have shape ({X.shape[0]},) or ({X.shape[0]}, outputs), got {y.shape}")
    task = task_of(y)
    if task == "classification":
        y = y.astype(str)
        if np.unique(y).shape[0] < 2:
            raise ValueError("a classifier needs at least 2 distinct labels")
    else:
        y = y.astype(np.float64)
        if not np.all(np.isfinite(y)):
            raise ValueError("regression targets contain NaN or inf")

    if warm_from is not None:
        reason = _warm_incompatibility(warm_from, X, y, task)
        if reason is None:
            return _continue(warm_from, X, y, task, cfg, seed)
        log.info("warm start not possible (%s): training from scratch", reason)

    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X).astype(np.float32)
    batch = min(cfg.batch_size, X.shape[0])
    kw: dict[str, Any] = dict(
        hidden_layer_sizes=tuple(cfg.hidden),
        alpha=cfg.alpha,
        learning_rate_init=cfg.learning_rate_init,
        batch_size=batch,
        max_iter=_epochs(cfg.max_iter, cfg.min_updates, X.shape[0], batch),
        tol=cfg.tol,
        n_iter_no_change=cfg.n_iter_no_change,
        early_stopping=False,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if task == "classification":
            mlp: MLPClassifier | MLPRegressor = MLPClassifier(**kw).fit(Xs, y)
        else:
            mu, sd = _target_stats(y)
            mlp = MLPRegressor(**kw).fit(Xs, (y - mu) / sd)
            _fold_target(mlp, mu, sd)
    return Pipeline([("scaler", scaler), ("mlp", mlp)])


def _epochs(epochs: int, min_updates: int, n: int, batch: int) -> int:
    per_epoch = -(-n // batch)
    return max(epochs, -(-min_updates // per_epoch))


def _target_stats(y: np.ndarray) -> tuple[Any, Any]:
    """Mean and spread of the targets: floats for one output, arrays for several."""
    mu, sd = np.mean(y, axis=0), np.std(y, axis=0)
    sd = np.where(sd > 1e-12 * np.maximum(1.0, np.abs(mu)), sd, 1.0)
    return (float(mu), float(sd)) if y.ndim == 1 else (mu, sd)


def _fold_target(mlp: MLPRegressor, mu: Any, sd: Any) -> None:
    """Make the last layer predict ``y`` instead of ``(y - mu) / sd``."""
    mlp.coefs_[-1] = mlp.coefs_[-1] * sd
    mlp.intercepts_[-1] = mlp.intercepts_[-1] * sd + mu
    mlp.target_scale_ = (mu, sd)  # remembered for warm starts


def _unfold_target(mlp: MLPRegressor) -> tuple[Any, Any]:
    mu, sd = getattr(mlp, "target_scale_", (0.0, 1.0))
    mlp.coefs_[-1] = mlp.coefs_[-1] / sd
    mlp.intercepts_[-1] = (mlp.intercepts_[-1] - mu) / sd
    return mu, sd


def _warm_incompatibility(prev: Any, X: np.ndarray, y: np.ndarray, task: str) -> str | None:
    try:
        mlp = _mlp(prev)
    except TypeError as exc:
        return str(exc)
    if model_task(prev) != task:
        return f"previous model is a {model_task(prev)} model"
    if getattr(mlp, "n_features_in_", None) != X.shape[1]:
        return f"previous model has {getattr(mlp, 'n_features_in_', None)} features, data has {X.shape[1]}"
    if task == "classification":
        new = sorted(set(np.unique(y)) - set(mlp.classes_))
        if new:
            return f"labels {new} unknown to the previous model"
    elif mlp.coefs_[-1].shape[1] != (1 if y.ndim == 1 else y.shape[1]):
        return f"previous model has {mlp.coefs_[-1].shape[1]} outputs, the targets {1 if y.ndim == 1 else y.shape[1]}"
    return None


def _continue(
    prev: Pipeline, X: np.ndarray, y: np.ndarray, task: str, cfg: TrainConfig, seed: int
) -> Pipeline:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import Pipeline

    scaler = copy.deepcopy(prev.steps[0][1])
    mlp = copy.deepcopy(_mlp(prev))
    Xs = scaler.transform(X).astype(np.float32)
    batch = min(cfg.batch_size, X.shape[0])
    epochs = _epochs(cfg.warm_epochs, cfg.min_updates // 4, X.shape[0], batch)
    same_classes = task == "regression" or set(np.unique(y)) == set(mlp.classes_)
    mlp.set_params(
        # fit() with warm_start when the label set is unchanged (one call);
        # partial_fit epochs when y has only a subset of the known classes
        # (fit() refuses that, partial_fit accepts it).
        warm_start=same_classes,
        max_iter=epochs,
        early_stopping=False,
        tol=cfg.tol,  # this fit's config, not the previous model's
        n_iter_no_change=cfg.n_iter_no_change,
        batch_size=batch,
        # A RandomState instance (not an int) so that each partial_fit epoch
        # shuffles differently, deterministically for a given seed.
        random_state=np.random.RandomState(seed),
    )
    # warm_start keeps the previous fit's no-improvement counter and best loss: after a fit that
    # stopped early the counter is already past n_iter_no_change, and the continued fit would stop
    # after one epoch. Each continued fit starts its own count (scikit-learn has no public reset).
    mlp._no_improvement_count = 0
    mlp.best_loss_ = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if task == "regression":
            mu, sd = _unfold_target(mlp)
            mlp.fit(Xs, (y - mu) / sd)
            _fold_target(mlp, mu, sd)
        elif same_classes:
            mlp.fit(Xs, y)
        else:
            for _ in range(epochs):
                mlp.partial_fit(Xs, y)
    return Pipeline([("scaler", scaler), ("mlp", mlp)])


def export_onnx(model: Pipeline, n_features: int, add_back: tuple[int, float, float] | None = None) -> bytes:
    """Serialize a model of :func:`train` to FP32 ONNX bytes.

    Input: ``"input"`` float32[N, n_features].  Outputs:

    * classifier: ``"label"`` string[N] and ``"probabilities"`` float32[N, n_classes]
      (columns in :func:`model_labels` order; no ZipMap);
    * regressor: ``"variable"`` float32[N, outputs].

    ``add_back = (column, mean, std)``: a one-output regressor trained on the change from a reading
    (a forecast, ``PreprocessParams.forecast``) outputs that reading plus its change: the graph adds
    ``input[:, column] * std + mean`` (the normalized last reading back in its units). These nodes
    stay float in the INT8 model (the quantizer touches MatMul, Gemm and Relu only), so the 8-bit
    output grid spans the changes, not the series' whole range.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    mlp = _mlp(model)
    if getattr(mlp, "n_features_in_", n_features) != n_features:
        raise ValueError(f"model expects {mlp.n_features_in_} features, not {n_features}")
    options = {id(mlp): {"zipmap": False}} if isinstance(mlp, MLPClassifier) else None
    onx = convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, int(n_features)]))],
        options=options,
        target_opset=TARGET_OPSET,
    )
    _replace_scaler(onx)
    _flatten_biases(onx)
    if add_back is not None:
        if isinstance(mlp, MLPClassifier) or mlp.coefs_[-1].shape[1] != 1:
            raise ValueError("only a regressor of one output forecasts the change from a reading")
        forecast.add_back(onx, *add_back)
    onx.producer_name = "edgeml-cloud-hub"
    return onx.SerializeToString()


def _flatten_biases(onx: Any) -> None:
    """Store ``[1, N]`` bias initializers of ``Add`` nodes as ``[N]`` (same broadcast result).

    onnxruntime's optimizer fuses ``MatMul + Add`` into ``Gemm``; the QDQ
    quantizer expects a 1-D Gemm bias (a 2-D one breaks its per-channel int32
    bias handling).
    """
    from onnx import numpy_helper

    adds = {i for n in onx.graph.node if n.op_type == "Add" for i in n.input}
    for k, init in enumerate(onx.graph.initializer):
        if init.name in adds and len(init.dims) == 2 and init.dims[0] == 1:
            arr = numpy_helper.to_array(init).reshape(-1)
            onx.graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, init.name))


def _replace_scaler(onx: Any) -> None:
    """Rewrite ``ai.onnx.ml.Scaler`` nodes as standard ``Sub`` + ``Mul``.

    ONNX shape inference does not type the Scaler's output, and without
    types onnxruntime's quantizer silently skips the activations (leaving a
    weight-only model that runs float kernels).  Standard ops also keep the
    numeric path runnable by any ONNX runtime.
    """
    from onnx import helper, numpy_helper

    graph = onx.graph
    nodes = list(graph.node)
    new_nodes = []
    for node in nodes:
        if node.op_type != "Scaler" or node.domain != "ai.onnx.ml":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        offset = np.asarray(attrs.get("offset", [0.0]), dtype=np.float32)
        scale = np.asarray(attrs.get("scale", [1.0]), dtype=np.float32)
        # Initializer names must not end in "_scale"/"_zero_point": the QDQ
        # quantizer names its own "<tensor>_scale" initializers and a clash
        # silently corrupts the quantization parameters.
        tag = f"stdscaler{len(new_nodes)}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(offset, f"{tag}_offset"),
                numpy_helper.from_array(scale, f"{tag}_factor"),
            ]
        )
        new_nodes.append(
            helper.make_node("Sub", [node.input[0], f"{tag}_offset"], [f"{tag}_centered"], name=f"{tag}_sub")
        )
        new_nodes.append(
            helper.make_node("Mul", [f"{tag}_centered", f"{tag}_factor"], [node.output[0]], name=f"{tag}_mul")
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
