"""Lean rounds on the device (issue #26 §5): a round trains with one BLAS thread, and its fine-tune holds
a few copies of the model, not one per layer and chunk of windows."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest
from threadpoolctl import OpenBLASController, threadpool_info, threadpool_limits

from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.device import learn
from edge_agent.device.learner import Learner
from edge_agent.device.shuffle import Shuffler


def _blas_threads() -> list[int]:
    return [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]


def _model(widths: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {"scaler_mean": np.zeros(widths[0], np.float32), "scaler_scale": np.ones(widths[0], np.float32)}
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        t[f"coef_{i}"] = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
        t[f"intercept_{i}"] = np.zeros(b, np.float32)
    return t


def test_a_round_trains_and_evaluates_with_one_blas_thread(tmp_path, monkeypatch) -> None:
    """The learner's background thread caps the BLAS library at one thread for the round (numpy's default
    is a thread per core: many times slower on a round's small products), and gives the count back."""
    assert _blas_threads(), "numpy's BLAS is not one threadpoolctl can see: the cap would do nothing"
    seen: dict[str, list[list[int]]] = {"fine_tune": [], "score": []}
    for name in seen:
        real = getattr(learn, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name].append(_blas_threads())
            return _real(*args, **kwargs)

        monkeypatch.setattr(learn, name, spy)
    sent: list[bytes] = []
    running = type("B", (), {"manifest": type("M", (), {"version": 1, "sha256": "a" * 64, "labels": ("x", "y")})})
    learner = Learner(device_id="me", state_dir=tmp_path, model_name="default", capacity=100, trusted_key=None,
                      allow_unsigned=True, running=lambda: running,  # type: ignore[arg-type,return-value]
                      publish=lambda t, p, _e=None: sent.append(p), topic="t")
    X = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    learner.on_windows("L", X, ["x" if v > 0 else "y" for v in X[:, 0]], np.arange(40) * 15.0)
    weights = _model((4, 8, 2))
    plan = dict(round_id=1, model="default", base_version=1, base_sha256="a" * 64, task="classification",
                participants=("me",), deadline=time.time() + 60, min_windows=10)
    two = threadpool_limits(limits=2, user_api="blas")  # a two-core device's default, on any machine
    # threadpoolctl lets one thread at a time set OpenBLAS's process-wide count (the first to set it, until it
    # lets go): as in the agent, where nothing else sets it, this thread lets go and the learner's takes it
    OpenBLASController.clear_controlling_thread()
    try:
        for kind, trainable in (("train", tuple(learn.trainable_names(weights))), ("evaluate", ())):
            learner.offer(cr.announcement(cr.RoundPlan(**plan, kind=kind, trainable=trainable), weights).encode())
            learner.tick()
            learner.close()
        assert _blas_threads() == [2] * len(_blas_threads()), "the count is given back after the round"
    finally:
        two.restore_original_limits()
        OpenBLASController.clear_controlling_thread()
    assert [cu.decode_update(p, "me").kind for p in sent] == ["train", "evaluate"]
    assert len(seen["fine_tune"]) == 1 and len(seen["score"]) == 4  # train: before/after; evaluate: base/candidate
    assert all(set(counts) == {1} for calls in seen.values() for counts in calls), seen


@pytest.mark.parametrize("task,mu", [("classification", 0.0), ("regression", 0.0), ("classification", 0.1)])
def test_a_fine_tune_holds_a_few_copies_of_the_model(task, mu) -> None:
    """The default model's size (99 -> 512 -> 512 -> 7) on 1,000 windows: the fine-tune's peak allocation
    is under 3.4 times the model's weights, with FedProx too, scoring's under 2 and the activation ranges' under 1.5
    (they were 11.5, 6.2 and 7.5: a copy of the weights for each, and two arrays a layer for each forward pass
    over 1,024 windows; then 4.25, and 6.1 with FedProx: weight decay's and FedProx's terms a temporary the size of
    the layer beside its gradient, and a copy of the start for FedProx; then 3.6: the whole gradient of the 512x512
    layer, now made a block of rows at a time). The agent's peak RSS in a round follows them."""
    weights = _model((99, 512, 512, 7))
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1000, 99)).astype(np.float32)
    if task == "regression":
        weights["coef_2"], weights["intercept_2"] = weights["coef_2"][:, :2], weights["intercept_2"][:2]
        weights |= {"target_mu": np.zeros(2, np.float32), "target_sd": np.ones(2, np.float32)}
        y = rng.normal(size=(1000, 2)).astype(np.float32)
    else:
        y = rng.integers(0, 7, 1000)
    size = sum(v.nbytes for v in weights.values())
    with threadpool_limits(limits=1, user_api="blas"):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            r = learn.fine_tune(weights, task, X, y, epochs=1, lr=0.03, alpha=1e-4, mu=mu, clip=10.0)
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            learn.score(r.tensors, task, X, y)
            scored = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            learn.activation_ranges(r.tensors, X)
            ranged = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert peak < 3.4 * size, f"fine_tune's peak: {peak / size:.1f} x the weights ({size:,} B)"
    assert scored < 2 * size, f"score's peak: {scored / size:.1f} x the weights"
    assert ranged < 1.5 * size, f"activation_ranges' peak: {ranged / size:.1f} x the weights"


def test_a_float16_announcement_halves_the_bytes_and_devices_read_the_rounded_weights() -> None:
    """The announcement's weights go down as float16 (federate's default): a device reads them as sent (float16
    views, which it computes with as float32, exactly), and the announcement the hub keeps says what the devices
    read, not its FP32 master."""
    master = _model((99, 512, 512, 7))
    now = time.time()
    plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", ("d1",), now + 60, created=now,
                        trainable=tuple(k for k in master if k.startswith(("coef", "intercept"))))
    fp32 = cr.announcement(plan, master).encode()
    ann = cr.announcement(dataclasses.replace(plan, weights_dtype="float16"), master)
    fp16 = ann.encode()
    assert len(fp16) < 0.51 * len(fp32)
    got = cr.decode_announcement(fp16)
    assert got.plan.weights_dtype == "float16"
    for k, v in master.items():
        assert got.weights[k].dtype == np.float16
        read = got.weights[k].astype(np.float32)
        np.testing.assert_array_equal(read, v.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(read, ann.weights[k])
        assert np.abs(read - v).max() <= 1e-3 * max(1.0, float(np.abs(v).max()))
    big = dict(master, coef_0=master["coef_0"] * np.float32(1e6))  # past float16's 65,504
    with pytest.raises(cr.ContractError, match="past the range of float16"):
        cr.announcement(dataclasses.replace(plan, weights_dtype="float16"), big)


def test_announced_weights_are_read_only_views_of_the_payload_and_train_as_copies_would() -> None:
    """A device decodes the float32 weights as views of the announcement it holds anyway (a copy put 1.3 MB more
    on an agent's peak in a round): read-only, so nothing can write into the retained message; the fine-tune
    makes its own copies, and its delta is the same bit for bit as from writable copies."""
    master = _model((20, 16, 16, 3))
    now = time.time()
    trainable = tuple(k for k in master if k.startswith(("coef", "intercept")))
    plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", ("d1",), now + 60, created=now, trainable=trainable)
    payload = cr.announcement(plan, master).encode()
    ann = cr.decode_announcement(payload)
    raw = np.frombuffer(payload, np.uint8)
    for k, v in ann.weights.items():
        assert np.shares_memory(v, raw), f"{k} is a copy"
        assert not v.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            v[...] = 0
    fp16 = cr.decode_announcement(cr.announcement(dataclasses.replace(plan, weights_dtype="float16"), master).encode())
    assert all(v.dtype == np.float16 and not v.flags.writeable for v in fp16.weights.values())  # views as sent
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(200, 20)).astype(np.float32), rng.integers(0, 3, 200)
    kw: dict[str, Any] = {"epochs": 2, "lr": 0.05, "batch": 32, "mu": 0.01, "alpha": 1e-4, "clip": 0.5, "seed": 1}
    got = learn.fine_tune(dict(ann.weights), "classification", X, y, **kw)
    want = learn.fine_tune({k: v.copy() for k, v in ann.weights.items()}, "classification", X, y, **kw)
    assert all(got.delta[k].tobytes() == want.delta[k].tobytes() for k in trainable)
    assert all(got.tensors[k].flags.writeable for k in got.tensors)  # the trained model is the device's own


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_penalties_are_added_a_block_at_a_time_bit_for_bit(dtype) -> None:
    """Weight decay's ``(alpha / n) * W`` and FedProx's ``mu * (W - W0)`` are added to the gradient a block of
    rows at a time (no temporary the size of the layer): the same numbers, bit for bit, as the whole-array
    expressions they replace, and the fine-tune's objective still counts them."""
    rng = np.random.default_rng(5)
    for shape in ((512, 512), (99, 512), (512, 7), (512,), (3,)):
        g, W, W0 = (rng.normal(size=shape).astype(dtype) for _ in range(3))
        for scale, start in ((1e-4 / 64, None), (0.1, W0)):
            want = g + scale * (W if start is None else W - start)
            got = g.copy()
            learn._add_scaled(got, scale, W, start)
            assert got.dtype == dtype and got.tobytes() == want.tobytes(), (shape, scale)
    weights = _model((6, 5, 3))
    X, y = rng.normal(size=(30, 6)), rng.integers(0, 3, 30)
    moved = {k: v + np.float32(0.01) for k, v in weights.items()}
    plain = learn.loss_and_grad(moved, "classification", X, y, start=weights)[0]
    both = learn.loss_and_grad(moved, "classification", X, y, alpha=0.5, mu=0.3, start=weights)[0]
    assert both > plain


def test_the_window_store_is_read_only_so_a_round_reads_it_without_a_copy(tmp_path) -> None:
    """The labelled windows a round trains on are the store's arrays as they are when the round is taken: the
    store replaces them as windows come and never writes them (read-only, also once loaded from disk), so the
    round's thread holds no copy of them."""
    from edge_agent.device.learner import WindowStore

    store = WindowStore(tmp_path / "w.npz", capacity=50)
    rng = np.random.default_rng(0)
    store.add("L", rng.normal(size=(30, 4)).astype(np.float32), ["a"] * 30, np.arange(30.0))
    taken = store.X
    store.add("L", rng.normal(size=(30, 4)).astype(np.float32), ["b"] * 30, np.arange(30.0, 60.0))
    assert taken.shape == (30, 4) and store.X.shape == (50, 4) and not np.shares_memory(taken, store.X)
    store.save()
    again = WindowStore(tmp_path / "w.npz", capacity=50)
    for a in (taken, store.X, store.t, again.X, again.t):
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
    np.testing.assert_array_equal(again.X, store.X)


def test_the_int8_delta_is_the_former_encoding_bit_for_bit() -> None:
    """The update's INT8 delta is rounded and clipped in one float32 temporary: the same bytes as before."""
    rng = np.random.default_rng(4)
    delta = {"coef_1": (rng.normal(size=(512, 512)) * 0.03).astype(np.float32),
             "intercept_1": rng.normal(size=512).astype(np.float32), "zero": np.zeros(3, np.float32)}
    specs, arrays = cu.encode_update_delta(delta, "int8")
    for s in specs:
        d = delta[s.name]
        scale = float(np.max(np.abs(d))) / 127.0
        want = np.zeros(d.shape, np.int8) if scale == 0 else np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
        assert s.scale == scale and arrays[s.name].tobytes() == want.tobytes()


def test_the_shuffler_is_numpys_permutation_bit_for_bit() -> None:
    """The fine-tune's minibatch orders come from ``shuffle.Shuffler``, numpy's ``default_rng(seed).permutation``
    call after call (SeedSequence, PCG64, its 32-bit draws two to a 64-bit output), without loading
    ``numpy.random``: its nine extension modules were ~3.4 MB of an agent's RSS in a round (#26 §5)."""
    for seed in (*range(12), 2**32 + 5, 2**70 + 3, 123456789012345678901234567890):
        want, got = np.random.default_rng(seed), Shuffler(seed)
        for n in (0, 1, 2, 3, 7, 64, 816, 5000, 816):
            a, b = want.permutation(n), got.permutation(n)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (seed, n)
    assert Shuffler(np.int64(5)).permutation(9).tobytes() == np.random.default_rng(5).permutation(9).tobytes()
    with pytest.raises(ValueError, match="seed must be >= 0"):  # numpy refuses it too (this one looped forever)
        Shuffler(-1)
    code = ("import sys, numpy as np; from edge_agent.device import learn; "
            "t = {'scaler_mean': np.zeros(3, np.float32), 'scaler_scale': np.ones(3, np.float32), "
            "'coef_0': np.ones((3, 2), np.float32), 'intercept_0': np.zeros(2, np.float32)}; "
            "learn.fine_tune(t, 'classification', np.ones((8, 3), np.float32), np.arange(8) % 2, epochs=2, lr=0.1); "
            "print('numpy.random' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "a round's fine-tune loads numpy.random"


@pytest.mark.parametrize("optimizer,task,dtype", [("sgd", "classification", np.float32), ("adam", "regression", np.float32),
                                                  ("sgd", "regression", np.float64), ("adam", "classification", np.float64)])
def test_the_gradient_a_block_of_rows_at_a_time_trains_as_the_whole_one(monkeypatch, optimizer, task, dtype) -> None:
    """A round's descent makes a layer's gradient a block of rows at a time (``learn._GRAD_BLOCK`` elements) and
    updates those rows (64 at least): the same trained tensors and delta as with the whole gradient at once (a
    block larger than any layer, the former computation), with weight decay, FedProx, Adam, a last short batch
    and one trained layer. The same up to rounding, not bit for bit: OpenBLAS may sum a block's products in
    another order than the whole matrix's (on an AVX-512 machine with 2 threads, 2-3 ulps of a float32 gradient;
    bit for bit on others), and two epochs carry that to ~1e-5 of the delta. A wrong block is off by far more."""
    rng = np.random.default_rng(6)
    weights = {k: v.astype(dtype) for k, v in _model((20, 300, 200, 3), seed=4).items()}
    X = rng.normal(size=(203, 20)).astype(np.float32)
    y: np.ndarray
    if task == "regression":
        weights |= {"target_mu": np.full(3, 0.5, dtype), "target_sd": np.full(3, 2.0, dtype)}
        y = rng.normal(size=(203, 3)).astype(np.float32)
    else:
        y = rng.integers(0, 3, 203)
    rel = 2e-4 if dtype == np.float32 else 1e-9

    def same(got: np.ndarray, want: np.ndarray) -> bool:
        scale = max(float(np.max(np.abs(want))), 1e-30)
        return got.shape == want.shape and bool(np.all(np.abs(got - want) <= rel * scale))

    for layers in (None, 1):
        kw: dict[str, Any] = {"epochs": 2, "lr": 0.02, "batch": 37, "mu": 0.05, "alpha": 1e-3, "clip": 0.5, "seed": 3,
              "optimizer": optimizer, "train_layers": layers}
        monkeypatch.setattr(learn, "_GRAD_BLOCK", 1 << 40)
        want = learn.fine_tune(weights, task, X, y, **kw)
        assert any(np.any(want.delta[k]) for k in want.delta)
        for block in (1, 100 * 200, 150 * 200):  # 64 rows at a time (the fewest), 100 and 150: a remainder
            monkeypatch.setattr(learn, "_GRAD_BLOCK", block)
            got = learn.fine_tune(weights, task, X, y, **kw)
            assert got.delta.keys() == want.delta.keys() and got.tensors.keys() == want.tensors.keys()
            assert all(same(got.delta[k], want.delta[k]) for k in want.delta), (block, layers)
            assert all(same(got.tensors[k], want.tensors[k]) for k in want.tensors), (block, layers)
            assert same(np.asarray(got.ranges, float), np.asarray(want.ranges, float)), (block, layers)
            assert (got.loss_after, got.metric_after, got.norm) == pytest.approx(
                (want.loss_after, want.metric_after, want.norm), rel=rel), (block, layers)


def test_a_float16_announcement_is_read_as_views_of_the_payload_and_trains_as_float32_copies_would() -> None:
    """A device keeps a float16 announcement's weights (federate's default) as read-only views of the payload it
    holds anyway, not float32 copies (1.3 MB of the default model): the fine-tune and the scores convert where they
    use them (exact), so the delta, the trained tensors (float32), the activation ranges and the scores are the
    same bit for bit as from float32 copies; an evaluation's INT8 model after the weights is no matter."""
    master = _model((20, 16, 16, 3))
    now = time.time()
    trainable = tuple(k for k in master if k.startswith(("coef", "intercept")))
    plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", ("d1",), now + 60, created=now, trainable=trainable,
                        weights_dtype="float16")
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(200, 20)).astype(np.float32), rng.integers(0, 3, 200)
    for kind, int8 in (("train", b""), ("evaluate", b"an INT8 model's bytes")):
        p = dataclasses.replace(plan, kind=kind, trainable=trainable if kind == "train" else ())
        payload = cr.announcement(p, master, int8).encode()
        ann = cr.decode_announcement(payload)
        as_float32 = {k: v.astype(np.float32) for k, v in ann.weights.items()}
        raw = np.frombuffer(payload, np.uint8)
        for k, v in ann.weights.items():
            assert v.dtype == np.float16 and np.shares_memory(v, raw) and not v.flags.writeable, k
        assert ann.int8 == int8
        assert learn.score(ann.weights, "classification", X, y) == learn.score(as_float32, "classification", X, y)
    kw: dict[str, Any] = {"epochs": 2, "lr": 0.05, "batch": 32, "mu": 0.01, "alpha": 1e-4, "clip": 0.5, "seed": 1}
    got = learn.fine_tune(dict(ann.weights), "classification", X, y, **kw)
    want = learn.fine_tune(as_float32, "classification", X, y, **kw)
    assert all(got.delta[k].tobytes() == want.delta[k].tobytes() for k in trainable)
    assert all(got.tensors[k].dtype == np.float32 and got.tensors[k].tobytes() == want.tensors[k].tobytes()
               for k in want.tensors)
    assert (got.ranges, got.norm, got.metric_after) == (want.ranges, want.norm, want.metric_after)
