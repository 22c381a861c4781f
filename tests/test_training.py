"""Training, FP32 export, INT8 quantization and evaluation on a small synthetic dataset."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cloud_hub.models.quantize import INTEGER_OPS, evaluate, op_counts, quantize_int8
from cloud_hub.models.training import (
    INPUT_NAME,
    TrainConfig,
    export_onnx,
    model_labels,
    model_task,
    task_of,
    train,
)
from edge_agent.preprocess import (
    PreprocessParams,
    WindowBatch,
    extract_features,
    fit_normalization,
    make_windows,
)

RATE = 50.0
SMALL = TrainConfig(hidden=(64, 64), max_iter=30, warm_epochs=5, min_updates=200)
CLASSES = ("circle", "lift", "rest")


def synthetic_recordings(seed: int, n_per_class: int = 5, seconds: float = 12.0):
    """Streams of a 3-axis sensor: one recording per (class, repetition)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    out: list[tuple[np.ndarray, np.ndarray, str]] = []
    for k, label in enumerate(CLASSES):
        for _ in range(n_per_class):
            amp = rng.uniform(0.5, 2.0)
            phase = rng.uniform(0, 2 * np.pi)
            v = rng.normal(0, 0.3, size=(t.size, 3))
            if label == "circle":
                f = rng.uniform(0.8, 1.2)
                v[:, 0] += amp * np.sin(2 * np.pi * f * t + phase)
                v[:, 1] += amp * np.cos(2 * np.pi * f * t + phase)
            elif label == "lift":
                f = rng.uniform(2.5, 3.5)
                v[:, 2] += amp * np.abs(np.sin(2 * np.pi * f * t + phase)) + 0.5
            else:
                v[:, :] += rng.normal(0, 0.2, size=3)
            ts = 100.0 * k + 20.0 * len(out) + t
            out.append((ts, v.astype(np.float32), label))
    return out


def windows_of(recs, p: PreprocessParams) -> WindowBatch:
    return WindowBatch.concat([make_windows(ts, v, np.full(ts.size, label), p) for ts, v, label in recs])


@pytest.fixture(scope="module")
def data():
    p = PreprocessParams(RATE, 2.0, 0.5, ("x", "y", "z"), fft_max_hz=10.0)
    train_recs, test_recs = synthetic_recordings(0), synthetic_recordings(1, n_per_class=2)
    p = p.with_normalization(*fit_normalization(np.concatenate([v for _, v, _ in train_recs])))
    btr = windows_of(train_recs, p)
    bte = windows_of(test_recs, p)
    return {
        "params": p,
        "Xtr": extract_features(btr.data, p),
        "ytr": btr.labels,
        # A numeric target far from N(0, 1): the spread of the x channel.
        "rtr": 100.0 * btr.data[:, :, 0].std(axis=1) + 50.0,
        "Xte": extract_features(bte.data, p),
        "yte": bte.labels,
        "rte": 100.0 * bte.data[:, :, 0].std(axis=1) + 50.0,
    }


@pytest.fixture(scope="module")
def classifier(data):
    model = train(data["Xtr"], data["ytr"], seed=0, config=SMALL)
    fp32 = export_onnx(model, data["Xtr"].shape[1])
    int8 = quantize_int8(fp32, data["Xtr"])
    return model, fp32, int8


def test_task_of():
    assert task_of(np.array(["a", "b"])) == "classification"
    assert task_of(np.array(["a", "b"], dtype=object)) == "classification"
    assert task_of(np.array([1.5, 2.0])) == "regression"
    assert task_of(np.array([1, 2])) == "regression"
    with pytest.raises(ValueError):
        task_of(np.array(["a", 1.0], dtype=object))
    with pytest.raises(ValueError):
        task_of(np.array([]))


def test_classifier_fp32_onnx_matches_sklearn(data, classifier):
    model, fp32, _ = classifier
    assert model_task(model) == "classification"
    assert model_labels(model) == CLASSES
    sess = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    label, proba = sess.run(["label", "probabilities"], {INPUT_NAME: data["Xte"]})
    assert proba.shape == (len(data["Xte"]), len(CLASSES))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(proba, model.predict_proba(data["Xte"]), atol=1e-4)
    assert np.mean(label == model.predict(data["Xte"])) > 0.99
    assert np.all(np.array(CLASSES)[proba.argmax(axis=1)] == label)


def test_int8_is_quantized_and_runs_integer_kernels(classifier):
    _, fp32, int8 = classifier
    stored = op_counts(int8)
    assert stored.get("QuantizeLinear", 0) >= 1 and stored.get("DequantizeLinear", 0) >= 3
    # Every layer's weights are stored as int8 behind a DequantizeLinear.
    model = onnx.load_from_string(int8)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(layers) == 3
    for node in layers:
        for inp in node.input[:2]:
            dq = producers[inp]
            assert dq.op_type == "DequantizeLinear"
        w = inits[producers[node.input[1]].input[0]]
        assert w.data_type == onnx.TensorProto.INT8
    # onnxruntime fuses the QDQ groups into integer GEMMs.
    optimized = op_counts(int8, optimized=True)
    assert sum(v for k, v in optimized.items() if k in INTEGER_OPS) >= 3
    assert not {"Gemm", "MatMul", "MatMulNBits"} & set(optimized)
    assert len(int8) < 0.5 * len(fp32)


@pytest.mark.parametrize("per_channel", [True, False])
def test_explicit_weight_scale_modes(data, classifier, per_channel):
    _, fp32, _ = classifier
    int8 = quantize_int8(fp32, data["Xtr"], per_channel=per_channel)
    scales = [i for i in onnx.load_from_string(int8).graph.initializer if i.name.startswith("coefficient")]
    scales = [i for i in scales if i.name.endswith("_scale")]
    assert len(scales) == 3
    assert all((len(i.dims) == 1 and i.dims[0] > 1) == per_channel for i in scales)
    optimized = op_counts(int8, optimized=True)
    assert sum(v for k, v in optimized.items() if k in INTEGER_OPS) >= 3
    e = evaluate(int8, data["Xte"], data["yte"], latency_runs=5, warmup=1)
    assert e["accuracy"] >= 0.85


def test_int8_accuracy_close_to_fp32(data, classifier):
    _, fp32, int8 = classifier
    ef = evaluate(fp32, data["Xte"], data["yte"], latency_runs=50, warmup=5)
    eq = evaluate(int8, data["Xte"], data["yte"], latency_runs=50, warmup=5)
    for e, blob in ((ef, fp32), (eq, int8)):
        assert e["task"] == "classification"
        assert e["bytes"] == len(blob)
        assert e["n"] == len(data["Xte"])
        assert e["latency_ms"] > 0 and e["latency_p90_ms"] >= e["latency_ms"]
    assert ef["accuracy"] >= 0.9
    assert eq["accuracy"] >= ef["accuracy"] - 0.03


def test_training_is_deterministic(data):
    a = train(data["Xtr"], data["ytr"], seed=3, config=TrainConfig(hidden=(32,), max_iter=5))
    b = train(data["Xtr"], data["ytr"], seed=3, config=TrainConfig(hidden=(32,), max_iter=5))
    np.testing.assert_array_equal(a.predict_proba(data["Xte"]), b.predict_proba(data["Xte"]))


def test_warm_start_continues_and_leaves_previous_model_alone(data, classifier):
    model = classifier[0]
    before = [c.copy() for c in model[-1].coefs_]
    # New data with only two of the three known classes.
    keep = data["ytr"] != "rest"
    warm = train(data["Xtr"][keep], data["ytr"][keep], warm_from=model, seed=1, config=SMALL)
    assert warm is not model
    assert model_labels(warm) == CLASSES
    for b, c in zip(before, model[-1].coefs_, strict=True):
        np.testing.assert_array_equal(b, c)
    assert any(not np.array_equal(b, c) for b, c in zip(before, warm[-1].coefs_, strict=True))
    # The scaler is kept, so the warm-started network sees the inputs it was trained on.
    np.testing.assert_array_equal(warm[0].mean_, model[0].mean_)
    assert np.mean(warm.predict(data["Xte"]) == data["yte"]) >= 0.8


def test_incompatible_warm_start_trains_from_scratch(data, classifier):
    model = classifier[0]
    X = data["Xtr"][:, :10]
    fresh = train(X, data["ytr"], warm_from=model, config=TrainConfig(hidden=(16,), max_iter=5))
    assert fresh[-1].n_features_in_ == 10
    y = np.where(data["ytr"] == "rest", "sleep", data["ytr"])  # unknown label
    fresh = train(data["Xtr"], y, warm_from=model, config=TrainConfig(hidden=(16,), max_iter=5))
    assert "sleep" in model_labels(fresh)


def test_regressor_path(data):
    X, y = data["Xtr"], data["rtr"]
    model = train(X, y, seed=0, config=SMALL)
    assert model_task(model) == "regression" and model_labels(model) == ()
    fp32 = export_onnx(model, X.shape[1])
    sess = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
    (pred,) = sess.run(["variable"], {INPUT_NAME: data["Xte"]})
    np.testing.assert_allclose(pred.reshape(-1), model.predict(data["Xte"]), rtol=1e-4, atol=1e-2)
    yte = data["rte"]
    int8 = quantize_int8(fp32, X)
    ef = evaluate(fp32, data["Xte"], yte, latency_runs=20, warmup=2)
    eq = evaluate(int8, data["Xte"], yte, latency_runs=20, warmup=2)
    assert ef["task"] == eq["task"] == "regression"
    spread = np.mean(np.abs(yte - yte.mean()))
    # (a tiny, highly correlated training set: the MLP overfits, but clearly learns)
    assert ef["mae"] < 0.5 * spread
    assert eq["mae"] < ef["mae"] + 0.1 * spread
    warm = train(X, y, warm_from=model, seed=1, config=SMALL)
    assert np.mean(np.abs(warm.predict(data["Xte"]) - yte)) < 0.5 * spread


def test_bad_inputs(data, classifier):
    _, fp32, _ = classifier
    with pytest.raises(ValueError):
        train(data["Xtr"], data["ytr"][:-1])
    with pytest.raises(ValueError):
        train(data["Xtr"], np.full(len(data["Xtr"]), "one"))
    with pytest.raises(ValueError):
        quantize_int8(fp32, data["Xtr"][:, :5])
    with pytest.raises(ValueError):
        export_onnx(train(data["Xtr"], data["ytr"], config=TrainConfig(hidden=(8,), max_iter=2)), 5)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_warm_start_trains_its_epochs_even_when_the_previous_fit_stopped_early(data, task):
    """scikit-learn's warm_start keeps the early-stopping counter and best loss of the previous fit:
    after a fit that converged early, a continued fit stopped after one epoch. Each continued fit
    must run the epochs it is given."""
    y = data["ytr"] if task == "classification" else (data["Xtr"][:, 0] * 2.0 + 1.0).astype(np.float64)
    # tol=10: no epoch improves enough, so the first fit stops early, its counter past n_iter_no_change
    prev = train(data["Xtr"], y, seed=0, config=TrainConfig(hidden=(32,), max_iter=400, min_updates=0, tol=10.0))
    assert prev[-1].n_iter_ < 400, "the first fit must stop early for this test to mean anything"
    # New data the previous model fits worse than its best loss (another subject, say): the carried
    # counter went past n_iter_no_change at the first epoch without improvement.
    other = np.roll(y, 7) if task == "classification" else 5.0 - 3.0 * y
    cfg = TrainConfig(hidden=(32,), warm_epochs=6, min_updates=0)
    warm = train(data["Xtr"], other, warm_from=prev, seed=1, config=cfg)
    assert len(warm[-1].loss_curve_) - len(prev[-1].loss_curve_) == 6
