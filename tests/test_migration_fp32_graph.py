"""Each version's weights carry its FP32 ONNX graph (revision 0006_fp32_graph), so federated rounds refill it
without scikit-learn (issue 26 §5: `cloud-hub federate`'s memory) and make the models they made before."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import db, tables
from cloud_hub.data import revisions as schema
from cloud_hub.data.store import Store
from cloud_hub.models import datasets, lifecycle, training, weights
from cloud_hub.rounds import fedavg
from edge_agent.contract import round_updates as cu
from tests.helpers import SMALL, make_log
from tests.test_federated import _closed_round
from tests.test_schema import raw, url  # noqa: F401 - url: the SQLite file / PostgreSQL database fixture

BEFORE = "0005_secure_rounds"
migration = importlib.import_module("cloud_hub.data.migrations.versions.0006_fp32_graph")


def named(model: bytes, name: str = "g") -> bytes:
    """``model`` with its graph renamed: skl2onnx names each graph it exports afresh (a uuid), the rest is the same."""
    m = onnx.load_from_string(model)
    m.graph.name = name
    return m.SerializeToString()


def _labels(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    return {"binary": lambda: np.array(["walk", "run"])[rng.integers(0, 2, n)],
            "classes": lambda: np.array(["walk", "run", "sit"])[rng.integers(0, 3, n)],
            "regression": lambda: rng.normal(size=n),
            "outputs": lambda: rng.normal(size=(n, 2))}[kind]()


@pytest.fixture(scope="module", params=["binary", "classes", "regression", "outputs"])
def model(request: pytest.FixtureRequest) -> tuple[object, int]:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 5)).astype(np.float32)
    return training.train(X, _labels(request.param, 120, rng), config=SMALL), X.shape[1]


def test_the_migration_exports_the_graph_training_exports(model) -> None:
    pipeline, n = model
    frozen = migration._export(weights.arrays(weights.to_bytes(pipeline)))
    assert named(frozen) == named(training.export_onnx(pipeline, n))


def test_a_refilled_graph_is_the_export_of_the_new_weights(model) -> None:
    """What federate does without scikit-learn (tensors, refill, new blob) is what it did with it."""
    pipeline, n = model
    blob = weights.to_bytes(pipeline, training.export_onnx(pipeline, n))
    t = weights.tensors(blob)
    loaded = weights.from_bytes(blob)
    assert {k: v.tolist() for k, v in t.items()} == {k: v.tolist() for k, v in fedavg.mlp_tensors(loaded).items()}
    rng = np.random.default_rng(2)
    new = {k: (v + rng.normal(0, 0.05, v.shape).astype(np.float32) if k[:4] in ("coef", "inte") else v)
           for k, v in t.items()}
    before = fedavg.with_tensors(loaded, new)  # the scikit-learn path
    fp32 = weights.fill_graph(weights.graph(blob), new)
    assert named(fp32) == named(training.export_onnx(before, n))
    now, then = weights.arrays(weights.with_tensors(blob, new, fp32)), weights.arrays(weights.to_bytes(before, fp32))
    assert sorted(now) == sorted(then)
    for k in now:
        assert now[k].dtype == then[k].dtype and np.array_equal(now[k], then[k]), k
    with pytest.raises(ValueError, match="coef_0 has shape"):
        weights.fill_graph(fp32, {**new, "coef_0": new["coef_0"][:, :2]})
    with pytest.raises(KeyError, match="intercept_1"):
        weights.with_tensors(blob, {k: v for k, v in new.items() if k != "intercept_1"})
    alpha, batch = weights.penalty(blob)
    mlp = loaded.steps[-1][1]
    assert (alpha, batch) == (mlp.alpha, mlp.batch_size if isinstance(mlp.batch_size, int) else None)


def _insert(engine: sa.Engine, version: int, weights_blob: bytes | None, manifest: dict) -> None:
    values = {"name": "default", "version": version, "created": 1.0, "sha256": "a" * 64,
              "manifest": orjson.dumps({**manifest, "version": version}).decode(), "bundle": None,
              "weights": weights_blob, "metrics": "{}", "state": "publishable"}
    with engine.begin() as conn:
        conn.execute(sa.table("models", *(sa.column(k) for k in values)).insert().values(values))


def _blobs(engine: sa.Engine) -> dict[int, bytes | None]:
    m = tables.models.c
    with engine.connect() as conn:
        return {v: None if w is None else bytes(w) for v, w in conn.execute(sa.select(m.version, m.weights))}


def test_an_upgrade_from_0005_stores_each_versions_graph_and_a_downgrade_takes_it_off(url: str, tmp_path: Path) -> None:  # noqa: F811
    engine = raw(url)
    schema.upgrade(engine, target=BEFORE, backup=False)
    log = make_log(tmp_path / "train.csv", devices=("dev-a", "dev-b"), seconds=30)
    ds = datasets.dataset_from_logs([str(log)], window_s=2.0, hop_s=1.0, holdout=["dev-b"])
    train, test = datasets.split(ds, ["dev-b"])
    bundle, _, _, blob = lifecycle.build(train, test, name="default", version=1, config=SMALL)
    assert weights.graph(blob) is not None, "a version trained now is stored with its graph"
    old = weights.with_tensors(blob, weights.tensors(blob))  # as a build before this revision stored it
    manifest = bundle.manifest.to_obj()
    forecast = {**manifest, "preprocess": {**manifest["preprocess"], "forecast": "x"}}
    _insert(engine, 1, old, manifest)
    _insert(engine, 2, old, forecast)  # a forecast: federated rounds do not train it, left alone
    _insert(engine, 3, b"not an npz file", manifest)  # does not load: left as it was
    _insert(engine, 4, None, manifest)
    # blobs that fail in other ways (an empty one: EOFError; a cut npz: BadZipFile; an .npy: TypeError) are
    # left as they were too, and neither the upgrade nor the downgrade stops on them
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    odd = {5: b"", 6: old[: len(old) // 2], 7: npy.getvalue()}
    for version, odd_blob in odd.items():
        _insert(engine, version, odd_blob, manifest)
    assert schema.upgrade(engine, backup=False).after == schema.HEAD
    after = _blobs(engine)
    assert after[2] == old and after[3] == b"not an npz file" and after[4] is None
    assert all(after[v] == b for v, b in odd.items())
    assert named(weights.graph(after[1])) == named(weights.graph(blob))
    a, b = weights.arrays(after[1]), weights.arrays(old)
    assert sorted(a) == sorted([*b, weights.GRAPH])
    assert all(np.array_equal(a[k], b[k]) for k in b)
    assert schema.upgrade(engine, backup=False).after == schema.HEAD  # again: nothing to do
    assert schema.downgrade(engine, BEFORE) == BEFORE
    down = _blobs(engine)
    assert weights.graph(down[1]) is None and sorted(weights.arrays(down[1])) == sorted(b)
    assert down[2] == old and down[3] == b"not an npz file" and all(down[v] == b for v, b in odd.items())
    engine.dispose()


def _updates(tensors: dict[str, np.ndarray]) -> list[tuple[str, int, bytes]]:
    rng = np.random.default_rng(3)
    out = []
    for i, device in enumerate(("a", "b")):
        delta = {k: rng.normal(0, 0.02, tensors[k].shape).astype(np.float32) for k in ("coef_1", "intercept_1")}
        specs, arrays = cu.encode_update_delta(delta, "int8")
        out.append((device, 0, cu.Update(1, device, "default", 1, 20 + i, 1.0, 1.0, 0.5, 0.5, 0.0, 1, 0.1,
                                         ((-3.0, 3.0, -2.0, 4.0), (0.0, 4.0, -5.0, 5.0)), "int8", specs,
                                         arrays).encode()))
    return out


def test_a_round_on_the_stored_graph_makes_the_model_the_scikit_learn_path_made(tmp_path: Path) -> None:
    from cloud_hub.rounds import finish

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    r, tensors = _closed_round(engine, ("a", "b"), tolerance=-1.0)
    store = Store(engine)
    with engine.connect() as conn:
        blob, base, rows = (store.get_weights(conn, "default", 1), store.get_model(conn, "default", 1),
                            store.list_models(conn, "default"))
    updates = [(cu.decode_update(p), s) for _, s, p in _updates(tensors)]
    now = finish._aggregate(r, updates, blob, base.manifest, rows)
    then = finish._aggregate(r, updates, weights.with_tensors(blob, weights.tensors(blob)), base.manifest, rows)
    assert sorted(now.tensors) == sorted(then.tensors)
    assert all(np.array_equal(now.tensors[k], then.tensors[k]) for k in now.tensors)
    assert named(now.fp32) == named(then.fp32) and named(now.int8) == named(then.int8)
    assert weights.graph(now.weights) == now.fp32 and weights.graph(then.weights) == then.fp32
    engine.dispose()


def test_finishing_a_round_loads_neither_scikit_learn_nor_skl2onnx_nor_onnxruntime(tmp_path: Path) -> None:
    """`cloud-hub federate`'s modules and a whole finish (aggregate, FP32, INT8, register) in a fresh process; v1
    is quantized per layer (quantize_int8's choice on this log), so its INT8 graph is the new one's template."""
    hub = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(hub)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    r, tensors = _closed_round(engine, ("a", "b"), tolerance=-1.0)
    (tmp_path / "counted.json").write_bytes(orjson.dumps([(d, s, p.hex()) for d, s, p in _updates(tensors)]))
    engine.dispose()
    script = textwrap.dedent(f"""
        import sys, orjson
        import cloud_hub.cli.app, cloud_hub.cli.rounds, cloud_hub.rounds.coordinator, cloud_hub.rounds.opening
        from cloud_hub.data import db
        from cloud_hub.rounds.finish import finish
        from cloud_hub.rounds.store import RoundStore
        engine = db.make_engine({hub!r})
        with engine.connect() as conn:
            r = RoundStore().get_round(conn, 1)
        counted = [(d, s, bytes.fromhex(p)) for d, s, p in orjson.loads(open({str(tmp_path / 'counted.json')!r}, 'rb').read())]
        state, version, outcome, reason = finish(engine, None, r, counted, signing_key=None, allow_unsigned=True,
                                                 evaluate=lambda *_: None)
        print(state, version, ' '.join(m for m in ('sklearn', 'skl2onnx', 'scipy', 'onnxruntime') if m in sys.modules) or 'none')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["rejected", "2", "none"], out.stdout  # no device evaluated it: registered, rejected
    engine = db.make_engine(hub)
    with engine.connect() as conn:
        v2 = Store(engine).get_weights(conn, "default", 2)
    assert weights.graph(v2) is not None, "the new version is stored with its graph: the next round refills it"
    engine.dispose()
