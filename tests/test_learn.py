"""On-device fine-tuning (edge_agent/device/learn.py) and the hub's federated math (cloud_hub/rounds/fedavg.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_hub.models import weights
from cloud_hub.models.quantize import quantize_int8, session
from cloud_hub.models.training import TrainConfig, export_onnx, train
from cloud_hub.rounds import fedavg
from edge_agent import contract as c
from edge_agent.contract import round_updates as cu
from edge_agent.device import learn

SMALL = TrainConfig(hidden=(24, 16), max_iter=20, min_updates=100, batch_size=64)


def _data(n: int = 400, f: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, f)) * np.linspace(0.5, 3.0, f) + np.arange(f)).astype(np.float32)
    X[:, 5] = 2.0  # a constant feature (scale 0 -> 1)
    z = (X - np.arange(f)) / np.linspace(0.5, 3.0, f)
    cls = (z[:, 0] > 0).astype(int) + (z[:, 1] + 0.5 * z[:, 2] > 0.3).astype(int)
    target = np.stack([3.0 * z[:, 0] - z[:, 3] + 10.0, 0.5 * z[:, 1] * z[:, 2] - 4.0], axis=1)
    return X, cls, target


@pytest.fixture(scope="module")
def classifier() -> tuple:
    X, cls, _ = _data()
    labels = np.array(["lo", "mid", "hi"])[cls]
    model = train(X, labels, config=SMALL)
    return model, X, cls


@pytest.fixture(scope="module")
def binary() -> tuple:
    """Two classes: scikit-learn gives the MLP one logistic output (the second class's log-odds)."""
    X, cls, _ = _data(seed=2)
    yb = (cls > 0).astype(int)
    model = train(X, np.array(["no", "yes"])[yb], config=SMALL)
    assert model[-1].coefs_[-1].shape[1] == 1
    return model, X, yb


@pytest.fixture(scope="module")
def regressor() -> tuple:
    X, _, target = _data(seed=1)
    model = train(X, target, config=SMALL)
    return model, X, target


def _onnx_out(model, X: np.ndarray) -> np.ndarray:
    sess = session(export_onnx(model, X.shape[1]))
    outs = [o.name for o in sess.get_outputs()]
    name = "probabilities" if "probabilities" in outs else outs[0]
    return sess.run([name], {"input": X})[0].reshape(len(X), -1)  # a regressor's is [n * outputs, 1]


def test_predict_matches_the_fp32_onnx(classifier, regressor) -> None:
    for model, X, _ in (classifier, regressor):
        t = fedavg.mlp_tensors(model)
        task = "classification" if "target_mu" not in t else "regression"
        got = learn.predict(t, task, X)
        ref = _onnx_out(model, X)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # the class columns of a classifier are the model's classes order
    model, X, cls = classifier
    classes = list(model[-1].classes_)
    names = np.array(["lo", "mid", "hi"])[cls]
    acc = np.mean(np.array(classes)[learn.predict(fedavg.mlp_tensors(model), "classification", X).argmax(1)] == names)
    assert acc > 0.65  # columns in the classes order (chance is below 0.5)


def test_mlp_tensors_round_trip_through_the_weights_blob(classifier, regressor) -> None:
    for model, X, _ in (classifier, regressor):
        loaded = weights.from_bytes(weights.to_bytes(model))
        t = fedavg.mlp_tensors(loaded)
        assert all(v.dtype == np.float32 for v in t.values())
        assert t["coef_0"].shape == (X.shape[1], 24) and t["coef_2"].shape[0] == 16
        moved = {k: (v + 0.01 if k.startswith(("coef", "intercept")) else v) for k, v in t.items()}
        again = weights.from_bytes(weights.to_bytes(fedavg.with_tensors(loaded, moved)))
        t2 = fedavg.mlp_tensors(again)
        assert set(t2) == set(t)
        for k in t:
            np.testing.assert_allclose(t2[k], moved[k], rtol=1e-6, atol=1e-6)
        # the source pipeline is untouched, and the new one exports
        np.testing.assert_array_equal(fedavg.mlp_tensors(loaded)["coef_1"], t["coef_1"])
        assert len(export_onnx(fedavg.with_tensors(loaded, moved), X.shape[1])) > 0
    model, X, target = regressor
    t = fedavg.mlp_tensors(model)
    assert t["target_mu"].shape == (2,) and t["target_sd"].shape == (2,)
    np.testing.assert_allclose(t["target_mu"], target.mean(0), rtol=1e-5)
    with pytest.raises(ValueError):
        fedavg.with_tensors(model, {**t, "coef_0": t["coef_0"][:, :3]})


def _f64(t: dict) -> dict:
    return {k: v.astype(np.float64) for k, v in t.items()}


@pytest.mark.parametrize("kind", ["classification", "regression", "binary"])
def test_gradient_matches_finite_differences(classifier, regressor, binary, kind) -> None:
    model, X, y = {"classification": classifier, "regression": regressor, "binary": binary}[kind]
    kind = "regression" if kind == "regression" else "classification"
    t = _f64(fedavg.mlp_tensors(model))
    X, y = X[:40].astype(np.float64), y[:40]
    rng = np.random.default_rng(3)
    start = {k: v + (rng.normal(0, 0.05, v.shape) if k.startswith(("coef", "intercept")) else 0) for k, v in t.items()}
    for layers in (None, 1):
        f = lambda tt, k=layers: learn.loss_and_grad(tt, kind, X, y, alpha=0.7, mu=0.3, start=start, train_layers=k)  # noqa: E731
        loss, grad = f(t)
        assert set(grad) == set(learn.trainable_names(t, layers))
        for name, g in grad.items():
            for _ in range(4):
                idx = tuple(int(rng.integers(s)) for s in g.shape)
                eps = 1e-6
                plus, minus = _f64(t), _f64(t)
                plus[name][idx] += eps
                minus[name][idx] -= eps
                num = (f(plus)[0] - f(minus)[0]) / (2 * eps)
                assert abs(num - g[idx]) <= 1e-5 * max(1.0, abs(num)), (name, idx, num, g[idx])
    # the penalties are the documented ones
    plain = learn.loss_and_grad(t, kind, X, y)[0]
    l2 = sum(float(np.sum(t[f"coef_{i}"] ** 2)) for i in range(3))
    if kind == "regression":  # alpha applies to the unfolded (standardized-target) last layer
        l2 += float(np.sum((t["coef_2"] / t["target_sd"]) ** 2)) - float(np.sum(t["coef_2"] ** 2))
    assert learn.loss_and_grad(t, kind, X, y, alpha=0.7)[0] == pytest.approx(plain + 0.5 * 0.7 / 40 * l2, rel=1e-9)


def test_a_two_class_model_predicts_as_its_onnx_and_fine_tunes(binary) -> None:
    """Federated rounds of a two-class model (issue #28's trial found them failing: one output, not two)."""
    model, X, yb = binary
    t = fedavg.mlp_tensors(model)
    got = learn.predict(t, "classification", X)
    np.testing.assert_allclose(got, _onnx_out(model, X), atol=1e-4, rtol=1e-4)
    assert got.shape == (len(X), 2)
    idx = {c: i for i, c in enumerate(model[-1].classes_)}
    y = np.array([idx[c] for c in np.array(["no", "yes"])[yb]])
    Xd = X + np.float32(0.8)
    r = learn.fine_tune(t, "classification", Xd, y, epochs=10, lr=1e-3, optimizer="adam")
    assert r.loss_after < r.loss_before and r.metric_after >= r.metric_before
    assert r.metric_after == pytest.approx(np.mean(learn.predict(r.tensors, "classification", Xd).argmax(1) == y))
    with pytest.raises(ValueError, match=r"class indices must be in 0\.\.1"):
        learn.fine_tune(t, "classification", X, np.full(len(X), 2), epochs=1, lr=1e-3)


def test_no_device_outweighs_a_round_by_the_examples_it_claims() -> None:
    assert fedavg.capped_examples([100, 120, 10**12]) == [100, 120, 360]  # 3x the median
    assert fedavg.capped_examples([80, 90]) == [80, 90] and fedavg.capped_examples([]) == []
    # an uneven honest fleet keeps its weights (the review's catch: a lower median had flattened them)
    assert fedavg.capped_examples([10, 10, 100, 100]) == [10, 10, 100, 100]


def test_of_two_devices_a_hostile_one_cannot_push_a_candidate_through_the_gate() -> None:
    """A hostile device's finding: in a round of two, the hostile one scored the candidate 0 % → 100 % on 2**40
    windows, the honest one 90 % → 10 % on 20, and a model that predicts one class was published and signed. With
    fewer than three devices scoring it, each must pass on its own: a hostile device can hold a round back, not push
    it through. Three or more: the capped weights decide, as before."""
    from types import SimpleNamespace

    from cloud_hub.rounds.finish import _evaluation_gate

    r = SimpleNamespace(plan={"task": "classification", "tolerance": 0.0}, base_version=1)

    def answer(n: int, before: float, after: float) -> tuple[int, dict[str, float]]:
        return n, {"metric_before": before, "metric_after": after, "int8_before": before, "int8_after": after}

    hostile = {"honest": answer(20, 0.9, 0.1), "hostile": answer(2**40, 0.0, 1.0)}
    ok, gate, _, _ = _evaluation_gate(r, 2, fedavg.evaluation(hostile), b"fp32", b"int8")
    assert not ok and "each must pass: honest INT8 10.0% vs 90.0%" in gate and gate.endswith("fail"), gate
    ok, gate, _, _ = _evaluation_gate(r, 2, fedavg.evaluation({"a": answer(20, 0.8, 0.85), "b": answer(30, 0.7, 0.75)}),
                                      b"fp32", b"int8")
    assert ok and gate.endswith("pass"), gate
    three = {"a": answer(20, 0.8, 0.9), "b": answer(20, 0.8, 0.9), "c": answer(20, 0.8, 0.75)}  # one worse, weighed
    ok, gate, _, _ = _evaluation_gate(r, 2, fedavg.evaluation(three), b"fp32", b"int8")
    assert ok and "each must pass" not in gate, gate


def test_score_is_the_metric_fine_tune_reports_and_that_of_the_predictions(classifier, regressor) -> None:
    model, X, cls = classifier
    t = fedavg.mlp_tensors(model)
    idx = {c: i for i, c in enumerate(model[-1].classes_)}
    y = np.array([idx[c] for c in np.array(["lo", "mid", "hi"])[cls]])
    assert learn.score(t, "classification", X, y) == pytest.approx(
        np.mean(learn.predict(t, "classification", X).argmax(1) == y))
    r = learn.fine_tune(t, "classification", X, y, epochs=1, lr=1e-3)
    assert learn.score(t, "classification", X, y) == pytest.approx(r.metric_before)
    model, X, target = regressor
    t = fedavg.mlp_tensors(model)
    err = np.mean(np.linalg.norm(learn.predict(t, "regression", X) - target, axis=1))
    assert learn.score(t, "regression", X, target) == pytest.approx(err, rel=1e-5)
    r = learn.fine_tune(t, "regression", X, target, epochs=1, lr=1e-3)
    assert learn.score(r.tensors, "regression", X, target) == pytest.approx(r.metric_after, rel=1e-6)


def test_fine_tune_learns_and_reports(classifier, regressor) -> None:
    model, X, cls = classifier
    t = fedavg.mlp_tensors(model)
    idx = {c: i for i, c in enumerate(model[-1].classes_)}
    y = np.array([idx[c] for c in np.array(["lo", "mid", "hi"])[cls]])
    # a shifted device: its features are offset, the pretrained model is worse there
    Xd = X + np.float32(0.8)
    r = learn.fine_tune(t, "classification", Xd, y, epochs=10, lr=1e-3, optimizer="adam", alpha=1e-4)
    assert r.n == len(Xd) and r.epochs == 10
    assert r.loss_after < 0.8 * r.loss_before and r.metric_after > r.metric_before
    assert r.metric_after == pytest.approx(np.mean(learn.predict(r.tensors, "classification", Xd).argmax(1) == y))
    assert set(r.delta) == set(learn.trainable_names(t))
    for k, d in r.delta.items():
        np.testing.assert_allclose(t[k] + d, r.tensors[k], atol=1e-6)
    assert r.norm == pytest.approx(fedavg.delta_norm(r.delta), rel=1e-5)
    assert r.ranges == learn.activation_ranges(r.tensors, Xd) and len(r.ranges) == 3
    assert r.ranges[1][0] >= 0.0 and all(lo <= hi for lo, hi, _, _ in r.ranges)
    np.testing.assert_array_equal(t["coef_0"], fedavg.mlp_tensors(model)["coef_0"])  # input untouched

    model, X, target = regressor
    t = fedavg.mlp_tensors(model)
    yd = target + np.array([1.5, -1.0])  # the device's targets are offset
    r = learn.fine_tune(t, "regression", X, yd, epochs=10, lr=1e-2, optimizer="adam")
    err = lambda tt: float(np.mean(np.linalg.norm(learn.predict(tt, "regression", X) - yd, axis=1)))  # noqa: E731
    assert r.metric_before == pytest.approx(err(t), rel=1e-4)
    assert r.metric_after == pytest.approx(err(r.tensors), rel=1e-4) and r.metric_after < 0.7 * r.metric_before
    assert r.loss_after < r.loss_before
    np.testing.assert_array_equal(r.tensors["target_sd"], t["target_sd"])


def test_train_layers_mu_clip_and_budget(classifier) -> None:
    model, X, cls = classifier
    t = fedavg.mlp_tensors(model)
    Xd = X + np.float32(0.8)
    r = learn.fine_tune(t, "classification", Xd, cls, epochs=3, lr=1e-3, optimizer="adam", train_layers=1)
    assert set(r.delta) == {"coef_2", "intercept_2"}
    for k in ("coef_0", "intercept_0", "coef_1", "intercept_1", "scaler_mean", "scaler_scale"):
        np.testing.assert_array_equal(r.tensors[k], t[k])
    assert np.abs(r.delta["coef_2"]).max() > 0

    free = learn.fine_tune(t, "classification", Xd, cls, epochs=5, lr=3e-3, optimizer="adam")
    prox = learn.fine_tune(t, "classification", Xd, cls, epochs=5, lr=3e-3, optimizer="adam", mu=2.0)
    assert prox.norm < 0.8 * free.norm

    clipped = learn.fine_tune(t, "classification", Xd, cls, epochs=5, lr=3e-3, optimizer="adam", clip=0.1)
    assert clipped.norm == pytest.approx(free.norm, rel=1e-5)  # the norm is reported before clipping
    assert fedavg.delta_norm(clipped.delta) == pytest.approx(0.1, rel=1e-4)
    assert fedavg.delta_norm(fedavg.clip(free.delta, 0.1)) == pytest.approx(0.1, rel=1e-4)
    assert fedavg.clip(free.delta, 1e9)["coef_0"] == pytest.approx(free.delta["coef_0"])

    quick = learn.fine_tune(t, "classification", Xd, cls, epochs=1000, lr=1e-3, optimizer="adam", budget_s=0.2)
    assert 0 < quick.epochs < 1000 and quick.seconds < 2.0
    sgd = learn.fine_tune(t, "classification", Xd, cls, epochs=5, lr=0.1)  # the default: SGD, momentum 0.9
    assert sgd.loss_after < 0.8 * sgd.loss_before and sgd.metric_after > sgd.metric_before


def test_int8_delta_round_trip_on_the_wire() -> None:
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(0, 1e-3, (50, 30)).astype(np.float32), "b": np.zeros(7, np.float32),
             "c": np.array([-2.0, 0.5, 1.0], np.float32)}
    specs, arrays = cu.encode_update_delta(delta, "int8")
    assert arrays["a"].dtype == np.int8 and {t.name: t.scale for t in specs}["b"] == 0.0
    assert arrays["c"].tolist() == [-127, 32, 64]
    update = cu.Update(1, "d", "m", 1, 5, 1.0, 1.0, 0.5, 0.5, 0.1, 1, 0.1, (), "int8", specs, arrays)
    deq = cu.decode_update(update.encode(), "d").dequantized()
    for t in specs:
        assert np.all(np.abs(deq[t.name] - delta[t.name]) <= (t.scale or 0) / 2 * (1 + 1e-5) + 1e-12), t.name
    np.testing.assert_array_equal(deq["b"], 0)
    with pytest.raises(c.ContractError, match="NaN or inf"):
        cu.encode_update_delta({"a": np.array([1.0, np.nan], np.float32)}, "int8")


def test_aggregate_is_the_weighted_mean_of_the_updates() -> None:
    master = {"coef_0": np.ones((2, 3), np.float32), "intercept_0": np.zeros(3, np.float32),
              "coef_1": np.ones((3, 1), np.float32)}
    d1 = {"coef_0": np.full((2, 3), 1.0, np.float32), "intercept_0": np.full(3, 2.0, np.float32)}
    d2 = {"coef_0": np.full((2, 3), -1.0, np.float32), "intercept_0": np.full(3, 0.0, np.float32)}
    new = fedavg.aggregate(master, [fedavg.Contribution(d1, 300), fedavg.Contribution(d2, 100)])
    np.testing.assert_allclose(new["coef_0"], 1 + (300 * 1 - 100) / 400)
    np.testing.assert_allclose(new["intercept_0"], 300 * 2 / 400)
    np.testing.assert_array_equal(new["coef_1"], master["coef_1"])  # no update holds it
    np.testing.assert_array_equal(master["coef_0"], 1)  # master untouched
    # staleness down-weights: the same n, the stale one counts 1/sqrt(1+3) = 1/2
    stale = fedavg.aggregate(master, [fedavg.Contribution(d1, 100), fedavg.Contribution(d2, 100, staleness=3)])
    np.testing.assert_allclose(stale["coef_0"], 1 + (1 - 0.5) / 1.5, rtol=1e-6)
    assert fedavg.staleness_weight(0) == 1.0 and fedavg.staleness_weight(3) == 0.5
    # server learning rate and clipping (each update clipped before averaging)
    half = fedavg.aggregate(master, [fedavg.Contribution(d1, 1)], server_lr=0.5)
    np.testing.assert_allclose(half["intercept_0"], 1.0)
    small = fedavg.aggregate(master, [fedavg.Contribution(d1, 1)], clip=0.1)
    assert fedavg.delta_norm({k: small[k] - master[k] for k in d1}) == pytest.approx(0.1, rel=1e-5)
    # a device that trained only some tensors moves only those, and only with its peers' weight
    part = fedavg.aggregate(master, [fedavg.Contribution(d1, 100), fedavg.Contribution({"intercept_0": d2["intercept_0"]}, 300)])
    np.testing.assert_allclose(part["coef_0"], 2.0)
    np.testing.assert_allclose(part["intercept_0"], 0.5)
    with pytest.raises(ValueError):
        fedavg.aggregate(master, [fedavg.Contribution({"coef_0": np.ones((3, 2), np.float32)}, 1)])


def _fedavg_before_rules(master: dict, updates: list, *, clip: float | None = None, server_lr: float = 1.0) -> dict:
    """``fedavg.aggregate`` as it was before it had rules (commit f6c737d), verbatim but for the checks."""
    new = {k: np.array(v, np.float32) for k, v in master.items()}
    acc: dict = {}
    wsum: dict = {}
    for u in updates:
        if u.n_examples <= 0:
            continue
        w = float(u.n_examples) * fedavg.staleness_weight(u.staleness)
        for name, d in fedavg.clip(u.delta, clip).items():
            acc[name] = acc.get(name, np.zeros(d.shape, np.float64)) + w * d.astype(np.float64)
            wsum[name] = wsum.get(name, 0.0) + w
    for name, total in acc.items():
        new[name] = (new[name] + server_lr * total / wsum[name]).astype(np.float32)
    return new


def _round(rng: np.random.Generator, n: int) -> tuple[dict, list[fedavg.Contribution]]:
    """A master and ``n`` updates of random sizes, example counts (some 0) and lateness; some hold one tensor."""
    shapes = {"coef_0": (9, 5), "intercept_0": (5,), "coef_1": (5, 3), "intercept_1": (3,)}
    master = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    updates = []
    for i in range(n):
        names = list(shapes) if i % 4 else ["coef_1"]
        delta = {k: (rng.normal(size=shapes[k]) * rng.uniform(0.01, 3)).astype(np.float32) for k in names}
        updates.append(fedavg.Contribution(delta, int(rng.integers(0, 500)), float(rng.integers(0, 3))))
    return master, updates


def test_the_default_rule_is_byte_identical_to_fedavg_before_there_were_rules() -> None:
    rng = np.random.default_rng(26)
    for n in (1, 2, 5, 8):
        master, updates = _round(rng, n)
        for kw in ({}, {"clip": 1.5}, {"clip": 1.5, "server_lr": 0.7}):
            want = _fedavg_before_rules(master, updates, **kw)
            for got in (fedavg.aggregate(master, updates, **kw), fedavg.aggregate(master, updates, rule="fedavg", **kw)):
                assert got.keys() == want.keys()
                for k in want:
                    assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), (n, kw, k)


def test_one_update_scaled_to_the_clip_drags_fedavg_and_not_the_trimmed_mean() -> None:
    """8 devices, 7 honest (each about +0.01 per weight, norm ~0.1) and one that sends the opposite of
    theirs scaled to just under the clip (and claims 3x their examples, the most the hub lets it count)."""
    rng = np.random.default_rng(3)
    master = {"coef_0": np.zeros((10, 10), np.float32)}
    honest = [{"coef_0": (0.01 + rng.normal(0, 0.002, (10, 10))).astype(np.float32)} for _ in range(7)]
    mean = np.mean([h["coef_0"] for h in honest], axis=0)
    attack = {"coef_0": (-mean * (0.99 * 10 / np.linalg.norm(mean))).astype(np.float32)}
    updates = [fedavg.Contribution(h, 100) for h in honest] + [fedavg.Contribution(attack, 300)]
    avg = fedavg.aggregate(master, updates, clip=10.0)["coef_0"]
    robust = fedavg.aggregate(master, updates, clip=10.0, rule="trimmed-mean")["coef_0"]
    assert np.all(avg < -0.2), "FedAvg goes the attacker's way, over 20x the honest step"
    low, high = np.min([h["coef_0"] for h in honest], axis=0), np.max([h["coef_0"] for h in honest], axis=0)
    assert np.all((low <= robust) & (robust <= high)), "every weight stays within the honest devices' values"
    assert np.abs(robust - mean).max() < 0.003
    # the attacker gains nothing by sending more than the clip: the hub clips it first
    big = [*updates[:7], fedavg.Contribution({"coef_0": attack["coef_0"] * 30}, 300)]
    np.testing.assert_allclose(fedavg.aggregate(master, big, clip=10.0)["coef_0"], avg, rtol=0.02)
    np.testing.assert_array_equal(fedavg.aggregate(master, big, clip=10.0, rule="trimmed-mean")["coef_0"], robust)


def test_the_trimmed_mean_rule() -> None:
    assert [fedavg.trimmed(n) for n in (0, 1, 2, 3, 4, 7, 8, 15, 16, 24)] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 3]
    assert fedavg.trimmed(8, 0.5) == 3 and fedavg.trimmed(9, 0.5) == 4 and fedavg.trimmed(8, 0.0) == 0
    with pytest.raises(ValueError):
        fedavg.trimmed(8, 0.6)
    stack = np.array([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [5.0, 3.0], [6.0, 4.0], [7.0, 5.0],
                      [100.0, -100.0]])
    np.testing.assert_allclose(fedavg.trimmed_mean(stack), [27 / 6, 5 / 6])  # per column: its top and bottom dropped
    for n in (3, 4, 7, 8):
        data = np.random.default_rng(n).normal(size=(n, 6))
        np.testing.assert_allclose(fedavg.trimmed_mean(data, 0.5), np.median(data, axis=0))
    np.testing.assert_allclose(fedavg.trimmed_mean(stack[:2]), stack[:2].mean(axis=0))  # 2 values: their mean

    master = {"w": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}

    def d(v: float) -> dict:
        return {"w": np.full(3, v, np.float32)}

    def robust(updates: list[fedavg.Contribution]) -> np.ndarray:
        return fedavg.aggregate(master, updates, rule="trimmed-mean")["w"]

    # one vote each, whatever the example count; a device with none does not vote
    np.testing.assert_allclose(robust([fedavg.Contribution(d(1), 1), fedavg.Contribution(d(2), 10**6),
                                       fedavg.Contribution(d(3), 1), fedavg.Contribution(d(99), 0)]), 2.0)
    # a late update is shrunk by its staleness weight (1/2 three rounds late) before the trimming
    np.testing.assert_allclose(robust([fedavg.Contribution(d(1), 5), fedavg.Contribution(d(8), 5, staleness=3),
                                       fedavg.Contribution(d(3), 5)]), 3.0)
    # clipped first, then trimmed; the server learning rate scales the result; "b" is held by none
    new = fedavg.aggregate(master, [fedavg.Contribution(d(v), 5) for v in (1, 2, 3)], clip=np.sqrt(3) * 1.5,
                           rule="trimmed-mean", server_lr=0.5)
    np.testing.assert_allclose(new["w"], 0.75, rtol=1e-6)
    np.testing.assert_array_equal(new["b"], master["b"])
    with pytest.raises(ValueError, match="NaN"):
        robust([fedavg.Contribution(d(np.nan), 5)])
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        fedavg.aggregate(master, [], rule="median")


def test_merge_ranges() -> None:
    a = [[-1.0, 2.0, -3.0, 4.0], [0.0, 5.0, -1.0, 1.0]]
    b = [[-2.0, 1.0, -1.0, 6.0], [0.0, 4.0, -2.0, 0.5]]
    assert fedavg.merge_ranges([a, b]) == [[-2.0, 2.0, -3.0, 6.0], [0.0, 5.0, -2.0, 1.0]]
    # one device reporting an absurd range does not stretch the merged one
    wild = [[-1e30, 1e30, -1e30, 1e30], [0.0, 1e30, -1e30, 1e30]]
    merged = fedavg.merge_ranges([a, a, b, wild])
    assert all(abs(x) < 100 for layer in merged for x in layer), merged
    # an honest narrow device does not cut another's range, and disjoint ranges are not inverted (the review's catch)
    assert fedavg.merge_ranges([[[-3.0, 3.0, -5.0, 6.0]], [[0.5, 0.6, 1.0, 1.2]]]) == [[-3.0, 3.0, -5.0, 6.0]]
    assert fedavg.merge_ranges([[[0.0, 1.0, 0.0, 2.0]], [[5.0, 6.0, 8.0, 9.0]]]) == [[0.0, 6.0, 0.0, 9.0]]
    with pytest.raises(ValueError):
        fedavg.merge_ranges([a, a[:1]])


def _labels(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    sess = session(onnx_bytes)
    outs = [o.name for o in sess.get_outputs()]
    out = sess.run([outs[0]], {"input": X})[0]
    return out if "label" in outs else out.reshape(len(X), -1)


def test_quantize_from_ranges_agrees_with_calibrated_int8(classifier, regressor) -> None:
    model, X, _ = classifier
    fp32 = export_onnx(model, X.shape[1])
    t = fedavg.mlp_tensors(model)
    # two "devices" observe halves of the rows; the merged ranges are those of all the rows
    ranges = fedavg.merge_ranges([learn.activation_ranges(t, X[:200]), learn.activation_ranges(t, X[200:])])
    np.testing.assert_allclose(ranges, learn.activation_ranges(t, X), rtol=1e-6)
    int8 = fedavg.quantize_from_ranges(fp32, ranges)
    ref = quantize_int8(fp32, X, per_channel=False)
    agree = np.mean(_labels(int8, X).reshape(-1) == _labels(ref, X).reshape(-1))
    assert agree >= 0.98
    # the same activation scales as calibration on the rows
    acts = fedavg.quantized_activations(int8)
    assert sorted(acts) == sorted(fedavg.quantized_activations(ref)) and len(acts) == 4
    scales = lambda b: {i.name: float(np.asarray(__import__("onnx").numpy_helper.to_array(i)))  # noqa: E731
                        for i in __import__("onnx").load_from_string(b).graph.initializer
                        if i.name.endswith("_scale") and any(i.name.startswith(a) for a in acts)}
    s_ours, s_ref = scales(int8), scales(ref)
    assert s_ours.keys() == s_ref.keys()
    for k in s_ours:
        assert s_ours[k] == pytest.approx(s_ref[k], rel=1e-4), k
    # a too-narrow range changes the model: the ranges really are used
    narrow = [[lo / 4, hi / 4, a / 4, b / 4] for lo, hi, a, b in ranges]
    assert not np.array_equal(_labels(fedavg.quantize_from_ranges(fp32, narrow), X), _labels(int8, X))
    with pytest.raises(ValueError):
        fedavg.quantize_from_ranges(fp32, ranges[:2])

    model, X, _ = regressor
    fp32 = export_onnx(model, X.shape[1])
    t = fedavg.mlp_tensors(model)
    int8 = fedavg.quantize_from_ranges(fp32, learn.activation_ranges(t, X))
    ref = quantize_int8(fp32, X, per_channel=False)
    a, b, f = _labels(int8, X), _labels(ref, X), learn.predict(t, "regression", X)
    assert np.mean(np.abs(a - b)) <= 0.02 * np.std(f)
    assert np.mean(np.abs(a - f)) <= 0.05 * np.std(f)


def test_quantize_from_ranges_refuses_an_activation_without_a_range(classifier, monkeypatch) -> None:
    model, X, _ = classifier
    fp32 = export_onnx(model, X.shape[1])
    ranges = learn.activation_ranges(fedavg.mlp_tensors(model), X)
    real = fedavg._overrides

    def drop_first(m, r):
        out = real(m, r)
        out.pop(next(iter(out)))
        return out

    monkeypatch.setattr(fedavg, "_overrides", drop_first)
    with pytest.raises(ValueError, match="without a range"):
        fedavg.quantize_from_ranges(fp32, ranges)


def test_learn_imports_only_numpy() -> None:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(learn.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # numpy, the standard library, the contract's names of the trained tensors and the minibatch shuffle (numpy's
    # own, without numpy.random): no new dependency
    assert mods <= {"numpy", "time", "dataclasses", "collections", "__future__", "edge_agent"}, mods
    assert {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
            and n.module.startswith("edge_agent")} <= {"edge_agent.contract", "edge_agent.device.shuffle"}
