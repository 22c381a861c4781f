"""Tests of edge_agent.preprocess: windowing, streaming, missing data, params, features."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.preprocess import (
    DeviceWindowers,
    PreprocessParams,
    WindowBatch,
    Windower,
    extract_features,
    feature_names,
    fit_normalization,
    make_windows,
)
from edge_agent.preprocess.params import PERCENTILES, fft_bins

RATE = 50.0
DT = 1.0 / RATE


def params(window_s: float = 0.2, hop_s: float = 0.1, c: int = 2, **kw) -> PreprocessParams:
    return PreprocessParams(RATE, window_s, hop_s, tuple(f"ch{i}" for i in range(c)), **kw)


# --------------------------------------------------------------------------- reference


def reference_windows(ts, values, labels, p: PreprocessParams):
    """Slow, obvious implementation of the documented rules (loops per sample)."""
    size, hop = p.window_size, p.hop_size
    segments, cur = [], [0]
    for i in range(1, len(ts)):
        d = ts[i] - ts[i - 1]
        if d <= 0 or d > 1.5 / p.sample_rate_hz:
            segments.append(cur)
            cur = []
        cur.append(i)
    if len(ts):
        segments.append(cur)
    out, dropped = [], 0
    for n, seg in enumerate(segments):
        if n < len(segments) - 1 and len(seg) < size:  # a gap ended it before one window: readings, no window
            dropped += 1
        for s in range(0, len(seg) - size + 1, hop):
            idx = seg[s : s + size]
            w = values[idx].astype(np.float64)
            bad = ~np.isfinite(w)
            limit = 0 if p.missing == "drop" else p.max_missing_frac * size
            if any(bad[:, j].sum() > limit or bad[:, j].all() for j in range(w.shape[1])):
                dropped += 1
                continue
            for j in range(w.shape[1]):
                if bad[:, j].any():
                    good = np.flatnonzero(~bad[:, j])
                    w[:, j] = np.interp(np.arange(size), good, w[good, j])
            lab = None
            if labels is not None:
                ls = list(labels[idx])
                if labels.dtype.kind == "f":
                    lab = float(np.mean(ls))
                else:
                    counts = Counter(ls)
                    best = max(counts.values())
                    lab = next(v for v in reversed(ls) if counts[v] == best)
            if size > 1 and p.features != "mean-v1" and ts[idx[-1]] - ts[idx[0]] < 0.75 * (size - 1) / p.sample_rate_hz:
                dropped += 1  # faster than the model's rate
                continue
            out.append((ts[idx[0]], ts[idx[-1]], w.astype(np.float32), lab))
    return out, dropped


def reference_features(windows: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The features as computed before the block statistics: every statistic on every window
    separately, in float32 (kept verbatim as the reference of the fast path)."""
    w = np.asarray(windows, dtype=np.float32)
    size, c = params.window_size, len(params.channels)
    k = w.shape[0]
    mean = np.asarray(params.norm_mean, np.float32)
    inv = np.float32(1.0) / np.asarray(params.norm_std, np.float32)
    x = np.ascontiguousarray(((w - mean) * inv).transpose(0, 2, 1))
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    eps = np.float32(1e-6)
    n = np.float32(size)
    mu = x.sum(axis=2) / n  # (k, c)
    xc = x - mu[:, :, None]
    sd = np.sqrt(np.einsum("kcs,kcs->kc", xc, xc) / n)
    xs = np.sort(x, axis=2)
    pos = np.asarray(PERCENTILES, np.float64) / 100.0 * (size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(np.float32)
    pct = xs[:, :, lo] + (xs[:, :, hi] - xs[:, :, lo]) * frac  # (k, c, p)
    rms = np.sqrt(np.einsum("kcs,kcs->kc", x, x) / n)
    mad = np.abs(np.diff(x, axis=2)).sum(axis=2) / np.float32(size - 1)
    z = xc / (sd[:, :, None] + eps)
    z2 = z * z
    skew = np.einsum("kcs,kcs->kc", z2, z) / n
    kurt = np.einsum("kcs,kcs->kc", z2, z2) / n - np.float32(3.0)
    sign = xc >= 0
    zcr = np.count_nonzero(sign[:, :, 1:] != sign[:, :, :-1], axis=2).astype(np.float32) / np.float32(size - 1)
    feats = [mu, sd, xs[:, :, 0], xs[:, :, -1], *pct.transpose(2, 0, 1), rms, mad, skew, kurt, zcr]
    iu, ju = np.triu_indices(c, k=1)
    if iu.size:
        cov = np.matmul(z, z.transpose(0, 2, 1)) / n  # (k, c, c)
        feats.append(np.clip(cov[:, iu, ju], -1.0, 1.0))
    if params.features == "stats-fft-v1":
        taper = np.hanning(size).astype(np.float32)
        mag = np.abs(np.fft.rfft(xc * taper, axis=2)).astype(np.float32) / size  # (k, c, nf)
        freqs = np.fft.rfftfreq(size, d=1.0 / params.sample_rate_hz).astype(np.float32)
        ac = mag[:, :, 1:]
        power = ac * ac
        ptot = power.sum(axis=2) + eps
        dom = freqs[1:][np.argmax(ac, axis=2)]
        centroid = (power * freqs[1:]).sum(axis=2) / ptot
        p = power / ptot[:, :, None]
        ent = -(p * np.log(p + 1e-12)).sum(axis=2) / np.float32(math.log(max(ac.shape[2], 2)))
        feats += [dom, centroid, ent, np.log(ptot)]
        nb = fft_bins(params)
        feats.append(np.log1p(ac[:, :, :nb] * 10.0).reshape(k, c * nb))
    out = np.concatenate([f.reshape(k, -1) if f.ndim == 2 else f for f in feats], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def assert_same(a: WindowBatch, b: WindowBatch) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.start, b.start)
    np.testing.assert_array_equal(a.end, b.end)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.dropped == b.dropped
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        np.testing.assert_array_equal(a.labels, b.labels)


# --------------------------------------------------------------------------- strategies


@st.composite
def streams(draw, with_nan: bool = True):
    n = draw(st.integers(0, 160))
    c = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    steps = np.full(n, DT)
    gap_p = draw(st.sampled_from([0.0, 0.02, 0.1]))
    gaps = rng.random(n) < gap_p
    steps[gaps] = DT * rng.uniform(1.6, 6.0, gaps.sum())
    fast_p = draw(st.sampled_from([0.0, 0.0, 0.2, 0.7]))  # a sensor faster than the model's rate, now and then
    fast = ~gaps & (rng.random(n) < fast_p)
    steps[fast] = DT * rng.uniform(0.05, 1.0, fast.sum())
    ts = 1000.0 + np.cumsum(steps)
    values = rng.normal(size=(n, c)).astype(np.float32)
    if with_nan and n:
        nan_p = draw(st.sampled_from([0.0, 0.05, 0.3]))
        values[rng.random((n, c)) < nan_p] = np.nan
    kind = draw(st.sampled_from(["none", "text", "float"]))
    labels = None
    if kind == "text":
        labels = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    elif kind == "float":
        labels = rng.normal(size=n)
    size = draw(st.integers(2, 12))
    hop = draw(st.integers(1, 15))
    missing = draw(st.sampled_from(["interpolate", "drop"]))
    p = PreprocessParams(RATE, size / RATE, hop / RATE, tuple(f"ch{i}" for i in range(c)), missing=missing)
    return ts, values, labels, p


@st.composite
def chunkings(draw, n: int):
    cuts = draw(st.lists(st.integers(0, n), max_size=12))
    return sorted(set(cuts))


# --------------------------------------------------------------------------- windowing


def test_window_and_hop_sizes():
    p = PreprocessParams(50.0, 2.56, 0.5, ("x",))
    assert (p.window_size, p.hop_size) == (128, 25)


def test_feature_counts():
    six = tuple("abcdef")
    assert PreprocessParams(50.0, 2.5, 0.5, six, features="stats-v1").n_features == 14 * 6 + 15
    p = PreprocessParams(50.0, 2.0, 0.5, six, features="stats-fft-v1", fft_max_hz=10.0)
    assert p.n_features == 14 * 6 + 15 + 4 * 6 + 20 * 6  # bins of 0.5 Hz up to 10 Hz


def test_basic_windows_and_gap():
    p = params(window_s=0.1, hop_s=0.06, c=1)  # 5 samples, hop 3
    ts = np.r_[np.arange(11) * DT, 1.0 + np.arange(6) * DT]
    vals = np.arange(17, dtype=np.float32).reshape(-1, 1)
    b = make_windows(ts, vals, None, p)
    # segment 1 (11 samples): starts 0, 3, 6; segment 2 (6 samples): start 0 only
    assert len(b) == 4
    np.testing.assert_array_equal(b.data[:, 0, 0], [0, 3, 6, 11])
    np.testing.assert_allclose(b.start, [0, 3 * DT, 6 * DT, 1.0])
    np.testing.assert_allclose(b.end, [4 * DT, 7 * DT, 10 * DT, 1.0 + 4 * DT])
    assert b.labels is None and b.dropped == 0  # a segment's last readings, too few for a window: not counted
    assert b.data.dtype == np.float32 and b.start.dtype == np.float64


def test_a_sensor_that_pauses_more_often_than_a_window_lasts_counts_its_windows_dropped():
    """A hostile sensor's finding: runs of 40 readings at the model's rate, a pause after each, windows of 50:
    readings and no windows, and dropped_windows said 0 (the agent's warning, which names gaps, never came). Each
    run a pause ends now counts one window dropped, whichever way the stream is cut into pushes."""
    p = params(window_s=1.0, hop_s=0.5, c=1)  # 50 samples, hop 25
    runs = [k * 10.0 + np.arange(40) * DT for k in range(6)]
    ts = np.concatenate(runs)
    vals = np.ones((ts.size, 1), np.float32)
    whole = make_windows(ts, vals, None, p)
    assert len(whole) == 0 and whole.dropped == 5  # one for each run a pause ended (the last may go on)
    for cuts in ([40, 80], [1, 39, 41, 200], list(range(7, 240, 13))):
        w = Windower(p)
        pieces = [w.push(ts[a:b], vals[a:b]) for a, b in zip([0, *cuts], [*cuts, ts.size], strict=True)]
        assert sum(b.dropped for b in pieces) == whole.dropped, cuts


def test_non_increasing_timestamp_breaks_the_stream():
    p = params(window_s=0.1, hop_s=0.1, c=1)
    ts = np.r_[np.arange(7) * DT, np.arange(7) * DT]  # clock reset
    vals = np.ones((14, 1), np.float32)
    b = make_windows(ts, vals, None, p)
    np.testing.assert_allclose(b.start, [0.0, 0.0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_batch_matches_reference(stream):
    ts, values, labels, p = stream
    b = make_windows(ts, values, labels, p)
    ref, dropped = reference_windows(ts, values, labels, p)
    assert len(b) == len(ref)
    assert b.dropped == dropped
    for i, (s, e, w, lab) in enumerate(ref):
        assert b.start[i] == s and b.end[i] == e
        np.testing.assert_allclose(b.data[i], w, rtol=1e-5, atol=1e-5)
        if labels is not None:
            if labels.dtype.kind == "f":
                assert b.labels[i] == pytest.approx(lab)
            else:
                assert b.labels[i] == lab


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_streaming_equals_batch_for_any_chunking(data):
    ts, values, labels, p = data.draw(streams())
    cuts = data.draw(chunkings(len(ts)))
    batch = make_windows(ts, values, labels, p)
    w = Windower(p)
    parts = []
    bounds = [0, *cuts, len(ts)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        parts.append(w.push(ts[a:b], values[a:b], None if labels is None else labels[a:b]))
        assert w.buffered < p.window_size  # bounded memory
    assert_same(WindowBatch.concat(parts), batch)


@settings(max_examples=100, deadline=None)
@given(streams(with_nan=False))
def test_no_window_spans_a_gap(stream):
    ts, values, labels, p = stream
    b = make_windows(ts, values, labels, p)
    assert not np.isnan(b.data).any()
    index = {t: i for i, t in enumerate(ts)}
    for s, e in zip(b.start, b.end, strict=True):
        i, j = index[s], index[e]
        assert j - i == p.window_size - 1
        assert np.all(np.diff(ts[i : j + 1]) <= p.gap_s)


def test_one_sample_at_a_time():
    p = params(window_s=0.2, hop_s=0.14, c=2)
    rng = np.random.default_rng(1)
    n = 300
    ts = np.cumsum(np.where(rng.random(n) < 0.03, 0.5, DT))
    vals = rng.normal(size=(n, 2)).astype(np.float32)
    labs = np.array(["x", "y"])[rng.integers(0, 2, n)]
    w = Windower(p)
    parts = [w.push(ts[i : i + 1], vals[i : i + 1], labs[i : i + 1]) for i in range(n)]
    assert_same(WindowBatch.concat(parts), make_windows(ts, vals, labs, p))


def test_hop_larger_than_window_across_chunks():
    p = params(window_s=0.06, hop_s=0.2, c=1)  # 3 samples, hop 10
    ts = np.arange(40) * DT
    vals = np.arange(40, dtype=np.float32).reshape(-1, 1)
    w = Windower(p)
    got = WindowBatch.concat([w.push(ts[i : i + 4], vals[i : i + 4]) for i in range(0, 40, 4)])
    np.testing.assert_array_equal(got.data[:, 0, 0], [0, 10, 20, 30])


def test_labels_must_be_consistent_across_pushes():
    w = Windower(params())
    w.push(np.array([0.0]), np.zeros((1, 2), np.float32), np.array(["a"]))
    with pytest.raises(ValueError):
        w.push(np.array([DT]), np.zeros((1, 2), np.float32), None)


def test_shape_errors():
    w = Windower(params(c=2))
    with pytest.raises(ValueError):
        w.push(np.zeros(3), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        w.push(np.array([0.0, np.nan]), np.zeros((2, 2), np.float32))


def test_majority_label_ties_go_to_most_recent():
    p = params(window_s=0.08, hop_s=0.08, c=1)  # 4 samples
    ts = np.arange(8) * DT
    vals = np.zeros((8, 1), np.float32)
    labs = np.array(["b", "a", "a", "b", "a", "a", "a", "b"])
    b = make_windows(ts, vals, labs, p)
    assert list(b.labels) == ["b", "a"]


def test_object_labels_with_none():
    p = params(window_s=0.08, hop_s=0.08, c=1)
    labs = np.array(["x", None, None, None, "y", "y", None, "y"], dtype=object)
    b = make_windows(np.arange(8) * DT, np.zeros((8, 1), np.float32), labs, p)
    assert b.labels.tolist() == [None, "y"]


def test_float_labels_are_averaged():
    p = params(window_s=0.08, hop_s=0.08, c=1)
    b = make_windows(np.arange(4) * DT, np.zeros((4, 1), np.float32), np.array([1.0, 2.0, 3.0, 6.0]), p)
    assert b.labels.tolist() == [3.0]


# --------------------------------------------------------------------------- missing data


def test_interpolation_inside_window():
    p = params(window_s=0.2, hop_s=0.2, c=2)  # 10 samples, max 2 missing per channel
    ts = np.arange(10) * DT
    vals = np.stack([np.arange(10.0), 10 * np.arange(10.0)], axis=1).astype(np.float32)
    vals[3, 0] = vals[4, 0] = np.nan  # interior: linear
    vals[0, 1] = np.nan  # edge: nearest valid value
    b = make_windows(ts, vals, None, p)
    assert len(b) == 1 and b.dropped == 0
    np.testing.assert_allclose(b.data[0, :, 0], np.arange(10.0))
    np.testing.assert_allclose(b.data[0, :, 1], [10, 10, 20, 30, 40, 50, 60, 70, 80, 90])


def test_too_many_missing_drops_and_counts():
    p = params(window_s=0.2, hop_s=0.2, c=2)
    ts = np.arange(30) * DT
    vals = np.ones((30, 2), np.float32)
    vals[12:15, 1] = np.nan  # 3 > 0.2 * 10 in window 2
    vals[20:30, 0] = np.nan  # whole channel missing in window 3
    b = make_windows(ts, vals, None, p)
    assert len(b) == 1 and b.dropped == 2
    assert b.start[0] == 0.0


def test_drop_policy_drops_any_missing():
    p = params(window_s=0.2, hop_s=0.2, c=1, missing="drop")
    vals = np.ones((20, 1), np.float32)
    vals[15, 0] = np.inf
    b = make_windows(np.arange(20) * DT, vals, None, p)
    assert len(b) == 1 and b.dropped == 1


def test_dropped_count_is_chunking_independent():
    p = params(window_s=0.2, hop_s=0.1, c=1)
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(200, 1)).astype(np.float32)
    vals[rng.random(200) < 0.25] = np.nan
    ts = np.arange(200) * DT
    whole = make_windows(ts, vals, None, p)
    w = Windower(p)
    parts = [w.push(ts[i : i + 7], vals[i : i + 7]) for i in range(0, 200, 7)]
    assert whole.dropped > 0
    assert sum(x.dropped for x in parts) == whole.dropped


# --------------------------------------------------------------------------- params


def test_params_dict_round_trip_through_json():
    p = params(c=3, features="stats-v1", fft_max_hz=10.0).with_normalization([1.0, 2.0, 3.0], [0.5, 1.0, 2.0])
    d = json.loads(json.dumps(p.to_dict()))
    assert PreprocessParams.from_dict(d) == p
    assert PreprocessParams.from_dict(params().to_dict()) == params()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
        (lambda d: d.pop("window_s"), "missing keys ['window_s']"),
        (lambda d: d.update(window_s="2"), "window_s must be a number"),
        (lambda d: d.update(channels="ax"), "channels must be a list of strings"),
        (lambda d: d.update(norm_mean=[1.0]), "norm_mean and norm_std must have the same length"),
        (lambda d: d.update(norm_mean=[1.0], norm_std=[1.0]), "norm_mean/norm_std have 1 values"),
        (lambda d: d.update(norm_std=[1.0, 0.0]), "norm_std must be finite and > 0"),
        (lambda d: d.update(missing="zero"), "missing must be one of"),
        (lambda d: d.update(features="nope-v9"), "features must be one of"),
        (lambda d: d.update(sample_rate_hz=-1), "sample_rate_hz must be > 0"),
        (lambda d: d.update(hop_s=0.001), "hop of less than 1 sample"),
        (lambda d: d.update(max_missing_frac=True), "max_missing_frac must be a number"),
    ],
)
def test_params_from_dict_is_strict(change, needle):
    d = params().with_normalization([0.0, 0.0], [1.0, 1.0]).to_dict()
    change(d)
    with pytest.raises(ValueError) as err:
        PreprocessParams.from_dict(d)
    assert needle in str(err.value)


def test_params_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError):
        PreprocessParams.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- features


def test_fit_normalization_ignores_nan_and_constant_channels():
    v = np.array([[1.0, 5.0], [3.0, 5.0], [np.nan, 5.0]], np.float32)
    mean, std = fit_normalization(v)
    assert mean == pytest.approx((2.0, 5.0))
    assert std == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError):
        fit_normalization(np.full((3, 1), np.nan))


@pytest.mark.parametrize("features", ["stats-fft-v1", "stats-v1", "trend-v1"])
def test_extract_features_shape_and_vectorization(features):
    p = params(window_s=2.0, hop_s=0.5, c=3, features=features, fft_max_hz=10.0)
    rng = np.random.default_rng(0)
    raw = rng.normal(3.0, 2.0, size=(7, p.window_size, 3)).astype(np.float32)
    p = p.with_normalization(*fit_normalization(raw))
    f = extract_features(raw, p)
    assert f.shape == (7, p.n_features) == (7, len(feature_names(p)))
    assert f.dtype == np.float32 and np.all(np.isfinite(f))
    single = np.concatenate([extract_features(raw[i : i + 1], p) for i in range(7)])
    np.testing.assert_allclose(single, f, rtol=1e-5, atol=1e-5)


def test_features_use_shipped_normalization():
    p = params(window_s=1.0, hop_s=1.0, c=2)
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(4, p.window_size, 2)).astype(np.float32)
    p1 = p.with_normalization([0.0, 0.0], [1.0, 1.0])
    p2 = p.with_normalization([10.0, -3.0], [2.0, 0.5])
    shifted = raw * np.array([2.0, 0.5], np.float32) + np.array([10.0, -3.0], np.float32)
    np.testing.assert_allclose(extract_features(shifted, p2), extract_features(raw, p1), rtol=1e-3, atol=1e-3)


def test_dominant_frequency_feature():
    p = params(window_s=2.0, hop_s=2.0, c=1, features="stats-fft-v1").with_normalization([0.0], [1.0])
    t = np.arange(p.window_size) / RATE
    w = np.sin(2 * np.pi * 5.0 * t).astype(np.float32).reshape(1, -1, 1)
    f = extract_features(w, p)
    names = feature_names(p)
    assert f[0, names.index("ch0_dom_freq")] == pytest.approx(5.0)
    bins = [i for i, n in enumerate(names) if "_fft_" in n]
    assert names[bins[int(np.argmax(f[0, bins]))]] == "ch0_fft_5.00Hz"


def test_extract_features_requires_fitted_params():
    p = params()
    with pytest.raises(ValueError, match="normalization"):
        extract_features(np.zeros((1, p.window_size, 2), np.float32), p)
    with pytest.raises(ValueError):
        extract_features(np.zeros((1, 3, 2), np.float32), p.with_normalization([0, 0], [1, 1]))


def test_train_and_serve_paths_agree():
    """Features of windows cut by the streaming agent equal those of the batch trainer."""
    p = params(window_s=1.0, hop_s=0.5, c=2)
    rng = np.random.default_rng(5)
    ts = np.arange(500) * DT
    vals = rng.normal(size=(500, 2)).astype(np.float32)
    p = dataclasses.replace(p).with_normalization(*fit_normalization(vals))
    batch = make_windows(ts, vals, None, p)
    w = Windower(p)
    stream = WindowBatch.concat([w.push(ts[i : i + 13], vals[i : i + 13]) for i in range(0, 500, 13)])
    np.testing.assert_array_equal(extract_features(stream.data, p), extract_features(batch.data, p))
    # The agent featurizes the batch itself (its windows share their readings' block statistics).
    np.testing.assert_allclose(extract_features(stream, p), extract_features(batch.data, p), rtol=1e-6, atol=1e-6)


# Window and hop in samples at 50 Hz: blocks of gcd(window, hop) samples (5 x 25, 3 x 4, 10 x 1), windows
# laid out one after the other when a window would have more than 16 blocks (128 and 25), windows
# without overlap (20 and 20) and with gaps between them (6 and 9).
WINDOW_HOP = [(125, 25), (12, 8), (10, 1), (128, 25), (20, 20), (6, 9)]


def noisy_stream(n: int, c: int, seed: int, nan_frac: float = 0.03):
    """Readings at 50 Hz with gaps, offsets and spreads per channel, a few NaNs and an inf."""
    rng = np.random.default_rng(seed)
    steps = np.full(n, DT)
    gaps = rng.random(n) < 0.004
    steps[gaps] = DT * rng.uniform(2.0, 40.0, gaps.sum())
    ts = 1000.0 + np.cumsum(steps)
    base = rng.normal(0, 3, c) + np.sin(np.arange(n)[:, None] / rng.uniform(3, 30, c)) * rng.uniform(0.1, 4, c)
    values = (base + rng.normal(size=(n, c)) * rng.uniform(0.05, 2, c)).astype(np.float32)
    values[rng.random((n, c)) < nan_frac] = np.nan
    values[n // 2, 0] = np.inf
    values[n // 3 : n // 3 + 60, 1] = np.nan  # drops the windows over it
    return ts, values


@pytest.mark.parametrize("features", ["stats-v1", "stats-fft-v1"])
@pytest.mark.parametrize(("size", "hop"), WINDOW_HOP)
def test_batch_features_equal_the_per_window_reference(features, size, hop):
    """The features of a streamed WindowBatch (block statistics shared by overlapping windows) and of
    its materialized windows equal the per-window float32 reference, interpolated windows included."""
    p = PreprocessParams(RATE, size / RATE, hop / RATE, ("a", "b", "c"), features=features, fft_max_hz=8.0)
    ts, values = noisy_stream(3000, 3, seed=size * 100 + hop)
    p = p.with_normalization(*fit_normalization(values))
    w = Windower(p)
    batch = WindowBatch.concat([w.push(ts[i : i + 97], values[i : i + 97]) for i in range(0, len(ts), 97)])
    assert len(batch) > 20 and batch.dropped > 0
    interpolated = len(batch) - len(make_windows(ts, values, None, dataclasses.replace(p, missing="drop")))
    assert interpolated > 0 and np.isfinite(batch.data).all()
    expected = reference_features(batch.data, p)
    np.testing.assert_allclose(extract_features(batch, p), expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(extract_features(batch.data, p), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(("size", "hop"), WINDOW_HOP)
def test_streamed_trend_features_equal_the_per_window_reference(size, hop):
    """"trend-v1" of a streamed WindowBatch (interpolated windows included) and of its materialized
    windows: the last reading, the lags from it, the slope and the mean, computed per window in float64."""
    p = PreprocessParams(RATE, size / RATE, hop / RATE, ("a", "b", "c"), features="trend-v1", forecast="b")
    ts, values = noisy_stream(3000, 3, seed=size * 100 + hop)
    p = p.with_normalization(*fit_normalization(values))
    w = Windower(p)
    batch = WindowBatch.concat([w.push(ts[i : i + 97], values[i : i + 97]) for i in range(0, len(ts), 97)])
    assert len(batch) > 20 and batch.dropped > 0
    x = (batch.data.astype(np.float64) - p.norm_mean) / p.norm_std  # (k, size, c)
    last = x[:, -1, :]
    t = np.arange(size) - (size - 1) / 2
    lags = [x[:, -1 - j, :] - last for j in range(1, min(3, size - 1) + 1)]
    slope = np.einsum("ksc,s->kc", x, t) / (t @ t)
    expected = np.concatenate([last, *lags, slope, x.mean(axis=1) - last], axis=1)
    np.testing.assert_allclose(extract_features(batch, p), expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(extract_features(batch.data, p), expected, rtol=2e-4, atol=2e-5)


def test_moments_of_quiet_signals_far_from_zero_stay_exact():
    """Skewness and kurtosis of a signal that barely moves around a large value (a sensor at rest):
    power sums of the raw values would cancel; the block statistics match float64 arithmetic."""
    p = params(window_s=2.5, hop_s=0.5, c=2).with_normalization([0.0, 0.0], [1.0, 1.0])
    rng = np.random.default_rng(11)
    n = 2000
    values = np.stack([40.0 + 1e-3 * rng.standard_exponential(n), np.full(n, 7.25)], axis=1).astype(np.float32)
    batch = make_windows(np.arange(n) * DT, values, None, p)
    f = extract_features(batch, p)
    names = feature_names(p)
    x = batch.data.astype(np.float64)  # (k, size, c)
    xc = x - x.mean(axis=1, keepdims=True)
    sd = np.sqrt((xc**2).mean(axis=1))
    skew = (xc**3).mean(axis=1) / (sd + 1e-6) ** 3
    kurt = (xc**4).mean(axis=1) / (sd + 1e-6) ** 4 - 3.0
    np.testing.assert_allclose(f[:, names.index("ch0_skew")], skew[:, 0], rtol=1e-3)
    np.testing.assert_allclose(f[:, names.index("ch0_kurt")], kurt[:, 0], rtol=1e-3)
    assert skew[:, 0].min() > 0.5  # the test signal is skewed: the check above is not 0 == 0
    # A constant channel: no spread, no skew, kurtosis -3 (the excess of a point mass at eps spread).
    for stat, value in [("std", 0.0), ("skew", 0.0), ("kurt", -3.0), ("zcr", 0.0), ("mad_diff", 0.0)]:
        np.testing.assert_array_equal(f[:, names.index(f"ch1_{stat}")], value)


def test_device_windowers_window_each_device_as_make_windows():
    p = params(window_s=0.2, hop_s=0.1, c=2)
    streams_ = {d: noisy_stream(300, 3, seed=i) for i, d in enumerate(["dev-a", "dev-b", "dev-c"])}
    columns = np.array([2, 0])  # the source has 3 columns; the params' channels are its 3rd and 1st
    windowers = DeviceWindowers(p)
    got: dict[str, list[WindowBatch]] = {d: [] for d in streams_}
    for i in range(0, 300, 41):  # chunks holding every device, as ReadingChunk.by_device() gives them
        chunk = {d: (ts[i : i + 41], v[i : i + 41], None) for d, (ts, v) in streams_.items() if d != "dev-c" or i < 120}
        pushed = windowers.push(chunk, columns)
        assert [d for d, _ in pushed] == list(chunk)  # every device pushed, in order, even without a window
        for d, batch in pushed:
            got[d].append(batch)
    for d, (ts, v) in streams_.items():
        n = 300 if d != "dev-c" else 123
        assert_same(WindowBatch.concat(got[d]), make_windows(ts[:n], v[:n, columns], None, p))
    windowers.clear()
    ts, v = streams_["dev-a"]
    assert_same(windowers.push({"dev-a": (ts[:50], v[:50], None)}, columns)[0][1],
                make_windows(ts[:50], v[:50, columns], None, p))


def test_window_batch_of_windows_and_concat():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(4, 5, 2)).astype(np.float32)
    a = WindowBatch.of_windows(np.arange(4.0), np.arange(4.0) + 1, data)
    np.testing.assert_array_equal(a.data, data)
    b = make_windows(np.arange(12) * DT, rng.normal(size=(12, 2)).astype(np.float32), None,
                     params(window_s=0.1, hop_s=0.06))
    both = WindowBatch.concat([a, b, WindowBatch.empty(5, 2)])
    np.testing.assert_array_equal(both.data, np.concatenate([data, b.data]))
    with pytest.raises(ValueError, match="window sizes"):
        WindowBatch.concat([a, WindowBatch.empty(6, 2)])


@pytest.mark.parametrize("features", ["stats-v1", "stats-fft-v1", "mean-v1", "trend-v1"])
@pytest.mark.parametrize("reading", [4294967295.0, 1e30, 3.4028235e38, -3.4028235e38])
def test_a_window_covering_a_reading_out_of_range_is_a_row_of_nan_and_the_others_are_untouched(
        features: str, reading: float) -> None:
    """A hostile sensor's finding: a dead register's 4294967295 overflowed the kurtosis' fourth powers; the
    features came out inf/NaN (the contract refused them: the agent stopped, exit 5) or, at float32's largest,
    silently 0 (a confident result from nothing). Now each window that covers such a reading is a row of NaN,
    without a numpy warning, and every other window's features are those of the readings without it."""
    import warnings

    from edge_agent.preprocess.features import MAX_NORMALIZED

    p = params(window_s=1.0, hop_s=0.2, c=3, features=features)
    rng = np.random.default_rng(3)
    ts = np.arange(400) / RATE
    values = rng.normal(size=(400, 3)).astype(np.float32)
    p = p.with_normalization(*fit_normalization(values))
    clean = make_windows(ts, values, None, p)
    bad = values.copy()
    bad[200, 1] = reading
    hit = make_windows(ts, bad, None, p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail here
        got = extract_features(hit, p)
    want = extract_features(clean, p)
    covers = (hit.offsets <= 200) & (hit.offsets + p.window_size > 200)
    assert covers.sum() == p.window_size // p.hop_size
    assert np.isnan(got[covers]).all()
    np.testing.assert_allclose(got[~covers], want[~covers], rtol=1e-6, atol=1e-6)  # block sums: float32 rounding
    assert np.isfinite(got[~covers]).all()
    edge = values.copy()
    edge[200, 1] = p.norm_mean[1] + 0.9 * MAX_NORMALIZED * p.norm_std[1]  # just inside: computed, finite
    assert np.isfinite(extract_features(make_windows(ts, edge, None, p), p)).all()


def test_fit_normalization_leaves_out_only_absurd_readings() -> None:
    """A dead register's 4294967295 among readings of +-2 made a channel's std 2.9e8; it is now left out of the
    statistics. Ordinary data comes out the same to the last digit: rare events (a WAP heard 3 % or 0.5 % of the
    time, a door sensor open 30 % of the time) stay in."""
    rng = np.random.default_rng(5)
    n = 20_000
    ordinary = np.column_stack([rng.normal(size=n), np.where(rng.random(n) < 0.03, -70.0, -110.0),
                                np.where(rng.random(n) < 0.005, -60.0, -110.0), (rng.random(n) < 0.3) * 1.0,
                                1e9 + rng.normal(size=n) * 1e3])
    means, stds = fit_normalization(ordinary)
    np.testing.assert_array_equal(means, ordinary.mean(axis=0))
    np.testing.assert_array_equal(stds, ordinary.std(axis=0))
    dead = ordinary.copy()
    dead[100:110, 0] = 4294967295.0
    mean, std = fit_normalization(dead)
    assert abs(std[0] - np.delete(ordinary[:, 0], range(100, 110)).std()) < 1e-9 and std[1:] == stds[1:]
    # the review's catch: a vacuum chamber pumped down (2e-6 mbar) 92 % of the time and vented (1000 mbar) 8 %: real,
    # 1e9 spreads from the cluster, and not rare: kept
    vacuum = np.where(rng.random(n) < 0.92, 2e-6 + 2e-7 * rng.normal(size=n), 1000.0 + rng.normal(size=n)).reshape(-1, 1)
    assert fit_normalization(vacuum)[1][0] == vacuum.std()


def test_windows_of_readings_faster_than_the_models_rate_are_dropped_and_counted() -> None:
    """A hostile sensor's finding: 5,000 readings at 1 kHz between two stretches at the model's 50 Hz made "2 s"
    windows of 0.1 s, inferred and stored as any other. They are dropped and counted like windows of missing
    readings; the windows at the model's rate on either side are kept, whatever the chunks."""
    p = params(window_s=2.0, hop_s=1.0, c=1)
    ts = np.concatenate([np.arange(500) * DT, 10.0 + np.arange(1, 5001) * 0.001, 15.0 + np.arange(1, 501) * DT])
    values = np.sin(ts).astype(np.float32).reshape(-1, 1)
    batch = make_windows(ts, values, None, p)
    spans = batch.end - batch.start
    assert (spans >= 0.75 * (p.window_size - 1) / RATE).all()
    assert batch.dropped > 50 and len(batch) >= 16  # ~9 at 50 Hz on each side, the mixed ones dropped
    assert not ((batch.start > 10.05) & (batch.end < 15.0)).any(), "no window of the 1 kHz stretch"
    w = Windower(p)
    pieces = [w.push(ts[i:i + 333], values[i:i + 333]) for i in range(0, len(ts), 333)]
    assert sum(b.dropped for b in pieces) == batch.dropped
    np.testing.assert_array_equal(np.concatenate([b.start for b in pieces]), batch.start)
    means = dataclasses.replace(p, features="mean-v1")  # scans come when they come: every window kept
    assert make_windows(ts, values, None, means).dropped == 0
