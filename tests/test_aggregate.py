"""Aggregation: the pure functions, and the SQL edge agreeing with them on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub.data import aggregate as agg
from cloud_hub.data import summaries
from cloud_hub.data.sessions import transaction
from cloud_hub.data.store import Store
from edge_agent import contract as c
from tests.test_store import BACKENDS, backend_engine


def test_bucket_floor_uses_the_window_start() -> None:
    starts = np.array([0.0, 59.9, 60.0, 3599.0, 3600.0, 1_700_000_123.5])
    assert summaries.bucket_floor(starts, 60).tolist() == [0.0, 0.0, 60.0, 3540.0, 3600.0, 1_700_000_100.0]
    assert summaries.bucket_floor(starts, 3600).tolist() == [0.0, 0.0, 0.0, 0.0, 3600.0, 1_699_999_200.0]


def test_quantiles() -> None:
    assert summaries.quantiles([]) == (None, None)
    assert summaries.quantiles([4.0]) == (4.0, 4.0)
    p50, p95 = summaries.quantiles(np.arange(1, 101, dtype=float))
    assert p50 == pytest.approx(50.5) and p95 == pytest.approx(95.05)
    q = summaries.group_quantiles(["b", "a", "b", "a", "b"], [1.0, 10.0, 3.0, 20.0, 2.0])
    assert q == {"a": (15.0, 19.5), "b": (2.0, pytest.approx(2.9))}
    assert summaries.group_quantiles([], []) == {}


def test_summary_of_rows() -> None:
    s = summaries.summarize(labels=["walk", "run", "walk", None], confidence=[0.5, 1.0, 0.75, None],
                      truth=["walk", "walk", None, "run"], latency_ms=[1.0, 2.0, 3.0, 4.0],
                      received_at=[10.0, 12.0, 11.0, 9.0])
    assert s.results == 4 and s.classes == {"walk": 2, "run": 1}
    assert s.mean_confidence == pytest.approx(0.75)
    assert (s.labelled, s.accuracy) == (3, pytest.approx(1 / 3))  # a missing prediction counts as wrong
    assert (s.latency_p50_ms, s.latency_p95_ms) == (2.5, pytest.approx(3.85))
    assert s.last_seen == 12.0
    empty = summaries.summarize([], [], [], [])
    assert (empty.results, empty.accuracy, empty.mean_confidence, empty.latency_p50_ms) == (0, None, None, None)
    assert summaries.summarize(["a"], [0.2], [None], [1.0]).accuracy is None  # no ground truth: no accuracy


rows_strategy = st.lists(st.tuples(st.sampled_from(["a", "b", None]), st.one_of(st.none(), st.floats(0, 1)),
                                   st.sampled_from(["a", "b", None]), st.floats(0, 1e6)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(rows_strategy, st.integers(0, 40))
def test_counts_merge_like_the_rows_they_come_from(rows: list[tuple], cut: int) -> None:
    def counts(part: list[tuple]) -> summaries.Counts:
        return summaries.counts_of([r[0] for r in part], [r[1] for r in part], [r[2] for r in part],
                             [r[3] for r in part])

    whole, merged = counts(rows), counts(rows[:cut]).merge(counts(rows[cut:]))
    assert (merged.results, merged.classes, merged.labelled, merged.correct, merged.conf_n, merged.last_seen) == (
        whole.results, whole.classes, whole.labelled, whole.correct, whole.conf_n, whole.last_seen)
    assert math.isclose(merged.conf_sum, whole.conf_sum, abs_tol=1e-9)


def test_parse_since() -> None:
    assert summaries.parse_since("1700000000") == 1_700_000_000.0
    assert summaries.parse_since("1700000000.5") == 1_700_000_000.5
    assert summaries.parse_since("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert summaries.parse_since("2023-11-14T22:13:20") == 1_700_000_000.0  # no zone: UTC
    assert summaries.parse_since("2023-11-15T00:13:20+02:00") == 1_700_000_000.0
    with pytest.raises(ValueError, match="neither epoch seconds nor an ISO-8601"):
        summaries.parse_since("yesterday")


def make_rows(seed: int = 0, n: int = 400) -> list[tuple]:
    """Rows in store order; windows spread over 3 hours, some late (stored after newer ones)."""
    rng = np.random.default_rng(seed)
    labels = ["walk", "run", "sit"]
    out = []
    for i in range(n):
        device = f"dev-{i % 3}"
        start = 1_700_000_000.0 + float(rng.integers(0, 3 * 3600))
        label = labels[int(rng.integers(0, 3))]
        truth = labels[int(rng.integers(0, 3))] if rng.random() < 0.6 else None
        conf = None if rng.random() < 0.1 else float(rng.random())
        out.append((device, i, start, start + 2.0, 1 + i // 200, label, conf, None, truth,
                    float(rng.gamma(2.0, 1.5)), None, 2_000_000_000.0 + i))
    return out


def expected(rows: list[tuple]) -> summaries.Summary:
    return summaries.summarize([r[5] for r in rows], [r[6] for r in rows], [r[8] for r in rows], [r[9] for r in rows],
                         [r[11] for r in rows])


def assert_same(got: summaries.Summary, want: summaries.Summary) -> None:
    assert (got.results, got.classes, got.labelled, got.last_seen) == (
        want.results, want.classes, want.labelled, want.last_seen)
    for name in ("mean_confidence", "accuracy", "latency_p50_ms", "latency_p95_ms"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None and w is None) or g == pytest.approx(w), name


@pytest.mark.parametrize("kind", BACKENDS)
def test_sql_aggregation_agrees_with_the_pure_functions(kind: str, tmp_path: Path) -> None:
    rows = make_rows()
    with backend_engine(kind, tmp_path) as engine:
        store = Store(engine)
        with transaction(engine) as conn:
            store.insert_results(conn, rows)
            store.touch_devices(conn, {"dev-0": 5.0, "dev-1": 6.0, "dev-2": 7.0, "idle": 8.0})
            store.apply_statuses(conn, {"dev-1": (c.Status("dev-1", c.OFFLINE, 1.0, model_version=9), 6.0)})
        with transaction(engine, write=False) as conn:
            stats = agg.fleet_stats(conn, bucket="hour")
            since = 1_700_000_000.0 + 3600
            late = agg.fleet_stats(conn, device="dev-2", since=since, bucket="minute")

    assert_same(stats.fleet, expected(rows))
    assert set(stats.devices) == {"dev-0", "dev-1", "dev-2", "idle"}
    for d in ("dev-0", "dev-1", "dev-2"):
        mine = [r for r in rows if r[0] == d]
        assert_same(stats.devices[d].summary, expected(mine))
        assert stats.devices[d].model_version == max(mine, key=lambda r: r[1])[4]  # of the latest result
    assert stats.devices["idle"].summary.results == 0 and stats.devices["idle"].model_version is None
    assert stats.devices["dev-1"].state == "offline" and stats.devices["dev-2"].last_seen == 7.0
    assert stats.dead_letters == 0

    buckets = summaries.bucket_floor([r[2] for r in rows], 3600)
    assert sorted(stats.buckets) == sorted(set(buckets.tolist()))
    for b, (fleet, per_device) in stats.buckets.items():
        assert_same(fleet, expected([r for r, rb in zip(rows, buckets, strict=True) if rb == b]))
        for d, s in per_device.items():
            assert_same(s, expected([r for r, rb in zip(rows, buckets, strict=True) if rb == b and r[0] == d]))
    assert sum(f.results for f, _ in stats.buckets.values()) == len(rows)

    mine = [r for r in rows if r[0] == "dev-2" and r[2] >= since]
    assert_same(late.fleet, expected(mine))
    assert set(late.devices) == {"dev-2"}
    minute = summaries.bucket_floor([r[2] for r in mine], 60)
    assert sorted(late.buckets) == sorted(set(minute.tolist()))
    obj = late.to_obj()
    assert obj["results"] == len(mine) and obj["bucket"] == "minute"
    assert [b["start"] for b in obj["buckets"]] == sorted(late.buckets)


def test_the_devices_that_shaped_a_version_include_its_rounds_and_its_parents() -> None:
    """Manifests written before ``shaped_by`` was recorded: a federated one copied its base's train_devices
    and kept only its own round's participants, so the rest comes through parent_version."""
    manifests = {
        ("m", 1): {"training": {"train_devices": ["a"], "holdout_devices": ["z"]}},
        ("m", 2): {"training": {"train_devices": ["a"], "devices": ["b"], "parent_version": 1}},  # round 1
        ("m", 3): {"training": {"train_devices": ["a"], "devices": ["c"], "parent_version": 2}},  # round 2
        ("m", 4): {"training": {"train_devices": ["d"], "parent_version": 3}},  # a retrain, warm-started from v3
        ("m", 5): {"training": {"shaped_by": ["e"], "train_devices": ["a"], "parent_version": 4}},  # says it itself
        ("other", 2): {"training": {"train_devices": ["x"]}},  # another model's v2 is not m's parent
        ("m", 6): {},  # a model made elsewhere: the registry does not say
    }
    got = agg.shaped_by(manifests)
    assert got[("m", 2)] == {"a", "b"} and got[("m", 3)] == {"a", "b", "c"}
    assert got[("m", 4)] == {"a", "b", "c", "d"} and got[("m", 5)] == {"e"}
    assert got[("other", 2)] == {"x"} and got[("m", 6)] == frozenset()
