"""`federate --aggregate centered-clip`: centered clipping's math on small arrays (checked against a plain
reference on flattened vectors), what one hostile update can do to it, and that federate accepts the rule and
stores it in the round's plan."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_hub.rounds import fedavg, robust
from cloud_hub.rounds.config import FederateConfig
from tests.helpers import offline_coordinator

SHAPES = {"coef_0": (4, 3), "intercept_0": (3,)}


def _flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], np.float64).ravel() for k in sorted(d)])


def _reference(xs: np.ndarray, w: np.ndarray, start: np.ndarray, radius: float, iterations: int) -> np.ndarray:
    """Centered clipping on rows of a matrix, written out as the paper states it."""
    dist0 = np.linalg.norm(xs - start, axis=1)
    order = np.argsort(dist0)
    tau = radius * dist0[order][np.searchsorted(np.cumsum(w[order]), 0.5 * w.sum())]
    v = start.copy()
    for _ in range(iterations):
        steps = []
        for x in xs:
            gap = x - v
            norm = np.linalg.norm(gap)
            steps.append(gap * min(1.0, tau / norm) if norm > 0 else gap)
        v = v + np.average(steps, axis=0, weights=w)
    return v


def _deltas(rng: np.random.Generator, n: int, spread: float = 1.0) -> list[dict[str, np.ndarray]]:
    return [{k: rng.normal(0.1, spread, s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def test_centered_clip_matches_the_written_out_rule() -> None:
    rng = np.random.default_rng(0)
    for n, radius, iterations in ((8, 2.0, 3), (5, 1.0, 1), (3, 0.5, 6)):
        deltas = _deltas(rng, n)
        w = rng.uniform(0.5, 2.0, n)
        start = robust.coordinate_start(deltas)
        got = robust.centered_clip(deltas, list(w), start=start, radius=radius, iterations=iterations)
        want = _reference(np.stack([_flat(d) for d in deltas]), w, _flat(start), radius, iterations)
        np.testing.assert_allclose(_flat(got), want, rtol=1e-9, atol=1e-12)
    # from zero, one iteration: every delta bounded to radius x the median norm, then averaged
    deltas = [{"w": np.array([v, 0.0])} for v in (1.0, 2.0, 3.0, 40.0)]
    got = robust.centered_clip(deltas, [1.0] * 4, radius=1.0, iterations=1)
    np.testing.assert_allclose(got["w"], [(1 + 2 + 2 + 2) / 4, 0.0])


def test_one_huge_update_moves_centered_clipping_by_at_most_tau_over_n_per_iteration() -> None:
    rng = np.random.default_rng(1)
    honest = _deltas(rng, 7, spread=0.05)
    master = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    mean = robust.weighted_mean(honest, [1.0] * 7)
    direction = {k: -m / np.linalg.norm(_flat(mean)) for k, m in mean.items()}
    clean = fedavg.aggregate(master, [fedavg.Contribution(h, 100) for h in honest], rule="centered-clip")
    start = robust.coordinate_start(honest)
    tau = fedavg.CENTER_RADIUS * np.median(robust.distances(honest, start))
    for size in (10.0, 1e3, 1e6):
        hostile = {k: (size * x).astype(np.float32) for k, x in direction.items()}
        updates = [fedavg.Contribution(h, 100) for h in honest] + [fedavg.Contribution(hostile, 300)]
        avg = fedavg.aggregate(master, updates)
        got = fedavg.aggregate(master, updates, rule="centered-clip")
        # FedAvg goes the attacker's way by its share of the examples times its size
        assert np.linalg.norm(_flat(avg) - _flat(mean)) > 0.2 * size
        # centered clipping: within 3 iterations' bounded pull (tau of the 8 updates' round, at most twice the
        # honest median distance plus the attacker's shift of the trimmed mean) of the honest result
        assert np.linalg.norm(_flat(got) - _flat(clean)) < 3 * 2 * tau / 8 + 0.05, size


def test_identical_honest_updates_come_out_unchanged_whatever_one_other_sends() -> None:
    master = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    same = {k: np.full(s, 0.25, np.float32) for k, s in SHAPES.items()}
    alone = fedavg.aggregate(master, [fedavg.Contribution(same, 10) for _ in range(8)], rule="centered-clip")
    for k in SHAPES:
        np.testing.assert_allclose(alone[k], master[k] + 0.25, rtol=0, atol=1e-7)
    hostile = {k: np.full(s, -1e4, np.float32) for k, s in SHAPES.items()}
    updates = [fedavg.Contribution(same, 10) for _ in range(7)] + [fedavg.Contribution(hostile, 10**6)]
    got = fedavg.aggregate(master, updates, rule="centered-clip")
    for k in SHAPES:  # the trimmed mean starts it at the honest value; tau is 0: the outlier is pulled in to it
        np.testing.assert_allclose(got[k], master[k] + 0.25, rtol=0, atol=1e-7)


def test_the_centered_clip_rule_in_aggregate() -> None:
    master = {"w": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}

    def d(v: float) -> dict:
        return {"w": np.full(3, v, np.float32)}

    def cc(updates: list[fedavg.Contribution], **kw) -> np.ndarray:  # type: ignore[no-untyped-def]
        return fedavg.aggregate(master, updates, rule="centered-clip", **kw)["w"]

    # updates all within tau of the trimmed mean (1.267) and of their mean: the result is their plain mean, one
    # vote each whatever the example count; a device with none has no vote
    np.testing.assert_allclose(cc([fedavg.Contribution(d(v), k) for v, k in ((1.0, 1), (1.4, 10**6), (1.0, 1),
                                                                             (1.4, 1), (1.5, 1), (99.0, 0))]),
                               (1.0 + 1.4 + 1.0 + 1.4 + 1.5) / 5, rtol=1e-6)
    # a late update is shrunk by its staleness weight (1/2 three rounds late) first
    np.testing.assert_allclose(cc([fedavg.Contribution(d(1.0), 5), fedavg.Contribution(d(2.0), 5, staleness=3)]),
                               1.0, rtol=1e-6)
    # clipped to --clip first; the server learning rate scales the result; "b" is held by none
    new = fedavg.aggregate(master, [fedavg.Contribution(d(v), 5) for v in (4.0, 4.0, 4.0)], clip=np.sqrt(3) * 2,
                           rule="centered-clip", server_lr=0.5)
    np.testing.assert_allclose(new["w"], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(new["b"], master["b"])
    assert fedavg.aggregate(master, [], rule="centered-clip")["w"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="NaN"):
        cc([fedavg.Contribution(d(np.nan), 5)])


def test_a_round_opened_with_centered_clip_stores_it_in_its_plan(tmp_path, monkeypatch) -> None:
    """(``federate --aggregate centered-clip`` is accepted, and refused with ``--secure``: test_federate_aggregate.)"""
    coordinator, engine, _ = offline_coordinator(tmp_path, monkeypatch, FederateConfig(aggregate="centered-clip"),
                                                 ("a", "b", "c"))
    assert coordinator._open().plan["aggregate"] == "centered-clip"
    engine.dispose()



def test_norm_bounding_counts_a_scaled_update_no_more_than_a_median_one() -> None:
    rng = np.random.default_rng(2)
    honest = _deltas(rng, 7)
    scaled = {k: 50.0 * x for k, x in honest[0].items()}
    deltas = [*honest, scaled]
    norms = np.array([np.linalg.norm(_flat(d)) for d in deltas])
    median = np.sort(norms)[3]  # equal weights: the lower median of 8
    for multiple in (1.0, 1.5):
        got = robust.norm_bounded(deltas, [1.0] * 8, multiple)
        for d, norm, g in zip(deltas, norms, got, strict=True):  # each scaled to min(norm, bound), direction kept
            np.testing.assert_allclose(_flat(g), _flat(d) * min(1.0, multiple * median / norm), rtol=1e-6)
        # the scaled update counts no more than a (multiple of a) median honest one
        assert np.linalg.norm(_flat(got[-1])) == pytest.approx(multiple * median)
    # equal norms: nothing changes
    same = [{"w": np.array(v)} for v in ([3.0, 4.0], [0.0, 5.0], [-5.0, 0.0])]
    for a, b in zip(robust.norm_bounded(same, [1.0, 2.0, 1.0]), same, strict=True):
        np.testing.assert_array_equal(a["w"], b["w"])
    assert robust.norm_bounded([], []) == []


def test_centered_clip_with_a_norm_bound_counts_a_scaled_update_as_one_at_the_bound(monkeypatch) -> None:
    """``CENTER_NORM_BOUND`` (off in federate; ``bench/federated_poison.py --norm-bound``): the updates are bounded
    to that multiple of their median norm before the centered clipping."""
    rng = np.random.default_rng(3)
    honest = _deltas(rng, 7, spread=0.3)
    master = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    scaled = {k: 20.0 * x for k, x in honest[0].items()}
    updates = [fedavg.Contribution(h, 100) for h in honest] + [fedavg.Contribution(scaled, 100)]
    assert fedavg.CENTER_NORM_BOUND is None
    monkeypatch.setattr(fedavg, "CENTER_NORM_BOUND", 1.0)
    median = np.sort([np.linalg.norm(_flat(d)) for d in [*honest, scaled]])[3]
    at_bound = {k: x * np.float32(median / np.linalg.norm(_flat(honest[0]))) for k, x in honest[0].items()}
    bounded = robust.norm_bounded([*honest, at_bound], [1.0] * 8)
    want = robust.centered_clip(bounded, [1.0] * 8, start=robust.coordinate_start(bounded),
                                radius=fedavg.CENTER_RADIUS, iterations=fedavg.CENTER_ITERATIONS)
    got = fedavg.aggregate(master, updates, rule="centered-clip")
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)
    # whatever its scale, the attacker's update counts as the same one at the bound
    louder = fedavg.aggregate(master, [*updates[:7], fedavg.Contribution({k: 5 * x for k, x in scaled.items()}, 100)],
                              rule="centered-clip")
    np.testing.assert_allclose(_flat(louder), _flat(got), rtol=1e-5, atol=1e-6)


def test_norm_outliers_are_scaled_to_the_median_norm_and_the_rest_left_whole() -> None:
    rng = np.random.default_rng(4)
    honest = _deltas(rng, 7)
    big = {k: 3.0 * x for k, x in honest[1].items()}  # a large honest update, under the outlier multiple
    scaled = {k: 50.0 * x for k, x in honest[0].items()}
    deltas = [*honest[1:], big, scaled]
    norms = np.array([np.linalg.norm(_flat(d)) for d in deltas])
    median = np.sort(norms)[3]  # equal weights: the lower median of 8
    assert norms[-2] < 4 * median < norms[-1]
    for to in (1.0, 2.0):
        got = robust.norm_outliers_bounded(deltas, [1.0] * 8, 4.0, to)
        for d, g in zip(deltas[:-1], got[:-1], strict=True):  # within 4x the median: unchanged
            np.testing.assert_array_equal(_flat(g), _flat(d))
        np.testing.assert_allclose(_flat(got[-1]), _flat(scaled) * to * median / norms[-1], rtol=1e-6)
    assert robust.norm_outliers_bounded([], []) == []


def test_centered_clip_with_norm_outliers_counts_a_scaled_update_as_one_median_update(monkeypatch) -> None:
    """``CENTER_NORM_OUTLIER`` (federate's: 4; ``bench/federated_poison.py --norm-outlier``): an update over that
    multiple of the median norm is scaled to the median norm before the centered clipping, whatever its scale."""
    rng = np.random.default_rng(5)
    honest = _deltas(rng, 7, spread=0.3)
    master = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    assert (fedavg.CENTER_NORM_OUTLIER, fedavg.CENTER_OUTLIER_TO) == (4.0, 1.0)
    clean = fedavg.aggregate(master, [fedavg.Contribution(h, 100) for h in honest], rule="centered-clip")
    with monkeypatch.context() as m:  # no honest update is an outlier: the same as without the bound
        m.setattr(fedavg, "CENTER_NORM_OUTLIER", None)
        np.testing.assert_array_equal(_flat(clean), _flat(fedavg.aggregate(
            master, [fedavg.Contribution(h, 100) for h in honest], rule="centered-clip")))
    got = [fedavg.aggregate(master, [fedavg.Contribution(h, 100) for h in honest]
                            + [fedavg.Contribution({k: s * x for k, x in honest[0].items()}, 100)], rule="centered-clip")
           for s in (20.0, 1e3)]
    np.testing.assert_allclose(_flat(got[0]), _flat(got[1]), rtol=1e-5, atol=1e-6)
