"""Each version's weights carry its FP32 ONNX graph: federated rounds refill it instead of exporting with scikit-learn.

``models.weights`` (an npz of arrays, ``cloud_hub.models.weights``) gains the array ``fp32_onnx``: the version's
FP32 graph as ``training.export_onnx`` made it. ``cloud-hub federate`` aggregates on the arrays and writes the new
version's layers into its base's graph (``weights.fill_graph``), so a round loads neither scikit-learn nor skl2onnx
(its peak memory: issue 26 §5). Versions registered from now on are stored with it; this revision adds it to the
others: each is exported once more here, the same graph up to its name (skl2onnx names every graph afresh).

Not filled: a forecast (``preprocess.forecast``; federated rounds do not train forecasts) and a blob that does not
load (left as it was, with a warning; a round from it exports with scikit-learn as before). The export is a copy,
frozen at this revision (a migration must do what it did when it was written, whatever the code becomes, and the
data layer does not import the model layer); a test compares it with ``training.export_onnx``.

Revision ID: 0006_fp32_graph
Revises: 0005_secure_rounds
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0006_fp32_graph"
down_revision = "0005_secure_rounds"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)

GRAPH = "fp32_onnx"
_PARAMS = ("alpha", "learning_rate_init", "batch_size", "tol", "n_iter_no_change", "max_iter")
_models = sa.table("models", sa.column("id", sa.Integer), sa.column("name", sa.String),
                   sa.column("version", sa.BigInteger), sa.column("manifest", sa.Text),
                   sa.column("weights", sa.LargeBinary))


def _arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _save(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _pipeline(a: dict[str, np.ndarray]) -> Any:
    """The scikit-learn pipeline of the arrays (``weights.from_bytes`` as of this revision)."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import LabelBinarizer, StandardScaler

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
    mlp.n_layers_, mlp.n_outputs_ = n + 1, int(mlp.coefs_[-1].shape[1])
    mlp.out_activation_ = str(a["out_activation"])
    mlp.n_features_in_ = int(mlp.coefs_[0].shape[0])
    if cls is MLPClassifier:
        mlp.classes_ = a["classes"]
        mlp._label_binarizer = LabelBinarizer().fit(a["classes"])
    return Pipeline([("scaler", scaler), ("mlp", mlp)])


def _export(a: dict[str, np.ndarray]) -> bytes:
    """The FP32 ONNX graph (``training.export_onnx`` as of this revision, without a forecast's add-back)."""
    from onnx import helper, numpy_helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = _pipeline(a)
    mlp = model.steps[-1][1]
    options = {id(mlp): {"zipmap": False}} if str(a["task"]) == "classification" else None
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, mlp.n_features_in_]))],
                          options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    graph = onx.graph
    nodes = []
    for node in graph.node:  # ai.onnx.ml.Scaler -> Sub + Mul (training._replace_scaler)
        if node.op_type != "Scaler" or node.domain != "ai.onnx.ml":
            nodes.append(node)
            continue
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        tag = f"stdscaler{len(nodes)}"
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(attrs.get("offset", [0.0]), np.float32), f"{tag}_offset"),
            numpy_helper.from_array(np.asarray(attrs.get("scale", [1.0]), np.float32), f"{tag}_factor")])
        nodes.append(helper.make_node("Sub", [node.input[0], f"{tag}_offset"], [f"{tag}_centered"], name=f"{tag}_sub"))
        nodes.append(helper.make_node("Mul", [f"{tag}_centered", f"{tag}_factor"], [node.output[0]], name=f"{tag}_mul"))
    del graph.node[:]
    graph.node.extend(nodes)
    adds = {i for n in graph.node if n.op_type == "Add" for i in n.input}  # [1, N] biases as [N] (_flatten_biases)
    for k, init in enumerate(graph.initializer):
        if init.name in adds and len(init.dims) == 2 and init.dims[0] == 1:
            flat = numpy_helper.to_array(init).reshape(-1)
            graph.initializer[k].CopyFrom(numpy_helper.from_array(flat, init.name))
    onx.producer_name = "edgeml-cloud-hub"
    return bytes(onx.SerializeToString())


def _rows(conn: sa.Connection) -> list[int]:
    return [i for (i,) in conn.execute(sa.select(_models.c.id).where(_models.c.weights.is_not(None))
                                       .order_by(_models.c.id))]


def upgrade() -> None:
    conn = op.get_bind()
    for row_id in _rows(conn):  # one blob in memory at a time
        name, version, manifest, blob = conn.execute(
            sa.select(_models.c.name, _models.c.version, _models.c.manifest, _models.c.weights)
            .where(_models.c.id == row_id)).one()
        try:
            if (json.loads(manifest).get("preprocess") or {}).get("forecast"):
                continue
            a = _arrays(bytes(blob))
            if GRAPH in a:
                continue
            a[GRAPH] = np.frombuffer(_export(a), np.uint8)
        # Whatever a stored blob or manifest does wrong (an empty blob: EOFError; a cut npz: BadZipFile; a bad
        # member: zlib.error; not JSON): that version stays as it was and the upgrade goes on (an upgrade that
        # stopped here would leave the hub refusing its database).
        except Exception as exc:
            log.warning("model %s v%s: its weights do not load (%s: %s): stored without an FP32 graph", name, version,
                        type(exc).__name__, exc)
            continue
        conn.execute(_models.update().where(_models.c.id == row_id).values(weights=_save(a)))


def downgrade() -> None:
    conn = op.get_bind()
    for row_id in _rows(conn):
        (blob,) = conn.execute(sa.select(_models.c.weights).where(_models.c.id == row_id)).one()
        try:
            a = _arrays(bytes(blob))
        except Exception:  # left as it was by the upgrade, whatever was wrong with it
            continue
        if a.pop(GRAPH, None) is not None:
            conn.execute(_models.update().where(_models.c.id == row_id).values(weights=_save(a)))
