"""Trained models as plain arrays (npz, ``allow_pickle=False``), never pickles.

The registry keeps each version's ``StandardScaler -> MLP`` weights this way so that the next
retraining can warm-start from them in another process. A pickle would run arbitrary code when
loaded; arrays cannot.

Beside the arrays, the blob holds the version's FP32 ONNX graph (``fp32_onnx``, as
``training.export_onnx`` made it; revision ``0006_fp32_graph`` added it to the versions registered
before). Federated rounds work on the blob alone, without scikit-learn or skl2onnx (``cloud-hub
federate``'s memory, issue 26 §5): :func:`tensors` reads the layers, :func:`with_tensors` writes a new
version's, and :func:`fill_graph` puts them into the base's FP32 graph, the same bytes as exporting the
new pipeline. :func:`from_bytes` and :func:`to_bytes` are the scikit-learn side (training, warm starts).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

_PARAMS = ("alpha", "learning_rate_init", "batch_size", "tol", "n_iter_no_change", "max_iter")
GRAPH = "fp32_onnx"  # the FP32 ONNX graph of the weights, as uint8


def to_bytes(model: Pipeline, fp32: bytes | None = None) -> bytes:
    """The arrays of ``model`` and, when given, its FP32 ONNX graph ``fp32`` (``training.export_onnx(model, ...)``)."""
    from sklearn.neural_network import MLPClassifier

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
    if fp32 is not None:
        arrays[GRAPH] = np.frombuffer(fp32, np.uint8)
    return _save(arrays)


def _save(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Every array of a weights blob, by name (no scikit-learn)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def from_bytes(blob: bytes) -> Pipeline:
    """The scikit-learn pipeline of a weights blob (its FP32 graph, if any, is left out)."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import LabelBinarizer, StandardScaler

    a = arrays(blob)
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


def graph(blob: bytes) -> bytes | None:
    """The FP32 ONNX graph stored with the weights, or None (a blob written without it)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return z[GRAPH].tobytes() if GRAPH in z.files else None


def with_graph(blob: bytes, fp32: bytes) -> bytes:
    """``blob`` with ``fp32`` as its FP32 ONNX graph (the arrays unchanged)."""
    return _save(arrays(blob) | {GRAPH: np.frombuffer(fp32, np.uint8)})


def n_layers(a: Mapping[str, np.ndarray]) -> int:
    return int(a["n_layers"])


def tensors(blob: bytes) -> dict[str, np.ndarray]:
    """The float32 tensors of the weights as the devices' trainer names them (``coef_i``, ``intercept_i``, the frozen
    ``scaler_mean``, ``scaler_scale`` and, for a regressor, ``target_mu``, ``target_sd``): the same as
    ``fedavg.mlp_tensors(from_bytes(blob))``, without scikit-learn."""
    a = arrays(blob)
    out = {"scaler_mean": np.asarray(a["scaler_mean"], np.float32),
           "scaler_scale": np.asarray(a["scaler_scale"], np.float32)}
    n = n_layers(a)
    for i in range(n):
        out[f"coef_{i}"] = np.asarray(a[f"coef_{i}"], np.float32)
        out[f"intercept_{i}"] = np.asarray(a[f"intercept_{i}"], np.float32)
    if str(a["task"]) != "classification":
        outputs = a[f"coef_{n - 1}"].shape[1]
        scale = a["target_scale"]  # [mu, sd], or [[mu...], [sd...]]
        out["target_mu"] = np.broadcast_to(np.asarray(scale[0], np.float32), (outputs,)).copy()
        out["target_sd"] = np.broadcast_to(np.asarray(scale[1], np.float32), (outputs,)).copy()
    return out


def with_tensors(blob: bytes, new: Mapping[str, np.ndarray], fp32: bytes | None = None) -> bytes:
    """``blob`` with its layers' coefs/intercepts replaced by ``new`` (each cast to the stored dtype) and its FP32
    graph by ``fp32`` (dropped when None): the arrays of ``to_bytes(fedavg.with_tensors(from_bytes(blob), new))``,
    without scikit-learn. The scaler is frozen: a ``scaler_*`` in ``new`` must equal the stored one."""
    a = arrays(blob)
    for name in ("scaler_mean", "scaler_scale"):
        if name in new and not np.allclose(np.asarray(new[name], np.float64), a[name], rtol=1e-6, atol=1e-6):
            raise ValueError(f"{name} differs from the pipeline's: the scaler is frozen")
    for i in range(n_layers(a)):
        for kind in ("coef", "intercept"):
            name = f"{kind}_{i}"
            if name not in new:
                raise KeyError(f"tensor {name} missing")
            value = np.asarray(new[name])
            if value.shape != a[name].shape:
                raise ValueError(f"{name} has shape {value.shape}, the model {a[name].shape}")
            a[name] = value.astype(a[name].dtype, copy=True)
    a.pop(GRAPH, None)
    if fp32 is not None:
        a[GRAPH] = np.frombuffer(fp32, np.uint8)
    return _save(a)


def penalty(blob: bytes) -> tuple[float, int | None]:
    """(the L2 penalty ``alpha``, the batch size it was trained with, None for scikit-learn's ``"auto"``)."""
    a = arrays(blob)
    batch = int(a["param_batch_size"].item())
    return float(a["param_alpha"].item()), None if batch == -1 else batch


def fill_graph(fp32: bytes, new: Mapping[str, np.ndarray]) -> bytes:
    """The FP32 ONNX graph ``fp32`` (``training.export_onnx``'s: ``MatMul`` then ``Add`` per layer) with each layer's
    weights and bias replaced by ``new``'s ``coef_i`` and ``intercept_i`` (layers in graph order), as float32. The
    rest (the frozen scaler, the labels, a forecast's add-back) is the graph's own. For a pipeline that differs from
    the graph's only in those tensors, the bytes ``export_onnx`` gives."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(fp32)
    g = model.graph
    index = {init.name: k for k, init in enumerate(g.initializer)}
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def put(name: str, tensor: str) -> None:
        if tensor not in new:
            raise KeyError(f"tensor {tensor} missing")
        value = np.asarray(new[tensor], np.float32)
        old = g.initializer[index[name]]
        if tuple(old.dims) != value.shape:
            raise ValueError(f"{tensor} has shape {value.shape}, the graph's {name} {tuple(old.dims)}")
        if old.raw_data or not old.float_data:
            g.initializer[index[name]].CopyFrom(numpy_helper.from_array(value, name))
        else:  # kept as the graph keeps it (skl2onnx writes its weights as float_data, not raw bytes)
            del old.float_data[:]
            old.float_data.extend(value.ravel().tolist())

    layers = [n for n in g.node if n.op_type == "MatMul"]
    if not layers or any(n.op_type == "Gemm" for n in g.node) or f"coef_{len(layers)}" in new:
        raise ValueError(f"the graph has {len(layers)} MatMul layers, not the model's")
    for i, node in enumerate(layers):
        adds = consumers.get(node.output[0], [])
        bias = [x for a in adds if a.op_type == "Add" for x in a.input if x in index]
        if node.input[1] not in index or len(bias) != 1:
            raise ValueError(f"layer {node.name!r} is not a MatMul of an initializer followed by one Add of a bias")
        put(node.input[1], f"coef_{i}")
        put(bias[0], f"intercept_{i}")
    return model.SerializeToString()
