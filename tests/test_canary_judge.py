"""The canary judge: its statistics (pure), and `canary.judge` on a real SQLite database.

The error rates on clustered fleets are the bench's (bench/canary_judge.py); these tests pin the
properties each rate rests on: the interval holds at every check, a device is its own baseline, a
regressor's error counts against it, and the limits and the signing key are said where they bite.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, sessions
from cloud_hub.data.store import Batch, ResultRow, Store
from cloud_hub.rollout import canary
from cloud_hub.rollout import canary_judge as cj
from cloud_hub.settings import HubSettings
from edge_agent import contract as c

runner = CliRunner()


def stretches(rng: np.random.Generator, n: int, base_err: float, hard_err: float = 0.5, run: int = 40
              ) -> np.ndarray:
    """Hits (1) and misses (0) of ``n`` results with a hard stretch of ``run`` results every 10 runs."""
    hard = (np.arange(n) // run) % 10 == rng.integers(0, 10)
    return (rng.random(n) >= np.where(hard, hard_err, base_err)).astype(np.float64)


def series(per_device: dict[str, np.ndarray]) -> cj.Series:
    return cj.Series.of([d for d, x in per_device.items() for _ in x], np.concatenate(list(per_device.values())))


def test_the_design_effect_is_one_for_independent_results_and_grows_with_hard_stretches() -> None:
    rng = np.random.default_rng(0)
    independent = [(rng.random(4000) > 0.1).astype(float) for _ in range(4)]
    clustered = [stretches(rng, 4000, 0.02) for _ in range(4)]
    assert cj.design_effect(independent, 200) < 1.6
    assert cj.design_effect(clustered, 200) > 5
    assert cj.design_effect([np.ones(10)], 200) == 1.0  # too little to tell


def test_the_interval_holds_at_every_check_where_a_fixed_one_does_not() -> None:
    """400 null paths (the truth is 0), 200 checks each: the always-valid lower bound excludes the truth
    on at most alpha of the paths; a fixed 95 % bound looked at as often does so far more often."""
    rng = np.random.default_rng(1)
    alpha, looks, paths = 0.05, 200, 400
    steps = rng.normal(size=(paths, looks * 10))
    n = np.arange(1, looks + 1) * 10
    means = np.cumsum(steps, axis=1)[:, n - 1] / n
    se = 1 / np.sqrt(n)
    rhos = cj._rhos(cj.Rules(tolerance=0.05))
    always = np.array([cj.radius(s, alpha, rhos) for s in se])
    crossed = np.mean(np.any(means - always > 0, axis=1))
    fixed = np.mean(np.any(means - 1.645 * se > 0, axis=1))
    assert crossed <= alpha, crossed
    assert fixed > 2 * alpha, fixed  # what checking every canary_check_s did to the old comparison


def test_a_hard_device_is_compared_with_itself_not_with_the_fleet() -> None:
    """A cohort device that is hard all the time (70 %) runs a canary as good as the previous version:
    against its own history it is not worse; against the fleet (70-98 %, 88 % on average) it would look
    18 points worse."""
    rng = np.random.default_rng(2)
    rules = cj.Rules(tolerance=0.05, min_results=50)
    history = series({"hard": (rng.random(3000) > 0.3).astype(float)})
    cohort = series({"hard": (rng.random(3000) > 0.3).astype(float)})
    control = series({f"c{i}": (rng.random(3000) > e).astype(float) for i, e in enumerate((0.02, 0.3, 0.1, 0.2, 0.02))})
    paired = cj.estimate(cohort, history, control, rules)
    assert paired is not None and paired.paired == 1 and paired.unpaired == 0
    assert abs(paired.delta) < 0.03
    assert cj.decide(paired, rules, elapsed_s=60, metric="accuracy").action == "promote"
    unpaired = cj.estimate(cohort, cj.Series.of([], []), control, rules)
    assert unpaired is not None and unpaired.unpaired == 1 and unpaired.delta < -0.15
    # its uncertainty carries the spread between devices: not a confident rollback of a good model
    assert cj.decide(unpaired, rules, elapsed_s=60, metric="accuracy").action != "roll_back"


def test_decisions_wait_for_evidence_and_the_limit_applies_the_policy() -> None:
    rng = np.random.default_rng(3)
    history = series({d: stretches(rng, 4000, 0.03) for d in ("a", "b")})
    empty = cj.Series.of([], [])
    worse = series({d: stretches(rng, 2000, 0.33) for d in ("a", "b")})
    rules = cj.Rules(tolerance=0.02, min_results=50)
    est = cj.estimate(worse, history, empty, rules)
    assert est is not None and est.high < -rules.tolerance
    verdict = cj.decide(est, rules, elapsed_s=100, metric="accuracy")
    assert verdict.action == "roll_back" and verdict.reason.startswith("worse")
    few = series({"a": np.ones(20)})
    assert cj.decide(cj.estimate(few, history, empty, rules), rules, elapsed_s=5, metric="accuracy").action == "wait"
    close = series({d: stretches(rng, 150, 0.05) for d in ("a", "b")})  # 2 points worse: a close call
    est = cj.estimate(close, history, empty, rules)
    assert est is not None and est.low < -rules.tolerance < est.high
    waiting = cj.decide(est, rules, elapsed_s=60, metric="accuracy")
    assert waiting.action == "wait" and "more results" in waiting.deciding or "limit" in waiting.deciding
    for policy, action in (("rollback", "roll_back"), ("promote", "promote"), ("hold", "hold")):
        limited = cj.Rules(tolerance=0.02, min_results=50, max_results=300, on_undecided=policy)
        got = cj.decide(est, limited, elapsed_s=60, metric="accuracy")
        assert got.action == action and got.reason.startswith(f"undecided at the limit (on_undecided={policy})")
        by_time = cj.Rules(tolerance=0.02, min_results=50, max_s=30, on_undecided=policy)
        assert cj.decide(est, by_time, elapsed_s=31, metric="accuracy").action == action


def test_a_canary_worse_than_the_tolerance_is_not_promoted_at_the_limit_on_a_short_history() -> None:
    """A new user's canary, 20 points worse, on two devices with 278 results of history each: the history's
    own uncertainty kept the interval [-45, +5] points however many cohort results came, `rollout status`
    promised a decision "in about 170 more results", and at the limit on_undecided=promote shipped it. Now the
    judge says more cohort results cannot decide it, and at the limit rolls it back."""
    rng = np.random.default_rng(7)
    history = series({d: stretches(rng, 278, 0.10) for d in ("d1", "d2")})
    floors, widths = [], []
    for n in (500, 5000):  # the references' part of the width stays; the cohort's shrinks
        cohort = series({d: stretches(rng, n, 0.30) for d in ("d1", "d2")})
        est = cj.estimate(cohort, history, cj.Series.of([], []), cj.Rules(tolerance=0.02))
        assert est is not None and 0 < est.floor < (est.high - est.low) / 2
        floors.append(est.floor)
        widths.append((est.high - est.low) / 2)
    assert floors[1] == pytest.approx(floors[0], rel=0.5) and widths[1] - floors[1] < (widths[0] - floors[0]) / 2
    est = cj.Estimate(-0.205, -0.45, 0.04, 3540, 556, 2, 0, 40.0, floor=0.24, se=0.09)  # the user's, as shown
    waiting = cj.decide(est, cj.Rules(tolerance=0.02, max_results=40_000, on_undecided="promote"), elapsed_s=60,
                        metric="accuracy")
    assert waiting.action == "wait" and "more cohort results cannot decide it" in waiting.deciding, waiting
    assert "the previous version's 556 results on the cohort's devices leave it ±24.0 pts wide" in waiting.deciding
    assert "roll back: worse than the tolerance by a last fixed-sample test" in waiting.deciding, waiting
    rules = cj.Rules(tolerance=0.02, max_results=3500, on_undecided="promote")
    at_limit = cj.decide(est, rules, elapsed_s=3600, metric="accuracy")
    assert at_limit.action == "roll_back" and "rolled back, not promoted" in at_limit.reason, at_limit
    for policy, action in (("rollback", "roll_back"), ("hold", "hold")):  # the other policies as they were
        other = cj.decide(est, cj.Rules(tolerance=0.02, max_results=3500, on_undecided=policy), elapsed_s=1,
                          metric="accuracy")
        assert other.action == action and other.reason.startswith(f"undecided at the limit (on_undecided={policy})")
    near = cj.Estimate(-0.05, -0.3, 0.2, 3540, 556, 2, 0, 40.0, floor=0.15, se=0.09)  # worse, but not shown so
    assert cj.decide(near, rules, elapsed_s=3600, metric="accuracy").action == "promote"


def test_hits_in_a_row_on_both_versions_do_not_make_a_zero_width_interval() -> None:
    """Both versions at 100 %: the variance was 0, the interval [+0.0, +0.0] after 48 results, and the
    canary promoted at once; 48 hits bound its error rate only below about 6 %."""
    history = series({d: np.ones(300) for d in ("a", "b")})
    cohort = series({d: np.ones(25) for d in ("a", "b")})
    rules = cj.Rules(tolerance=0.02, min_results=50 - 2)
    est = cj.estimate(cohort, history, cj.Series.of([], []), rules)
    assert est is not None and est.high - est.low > 2 * rules.tolerance, est
    assert cj.decide(est, rules, elapsed_s=30, metric="accuracy").action == "wait"
    many = series({d: np.ones(3000) for d in ("a", "b")})
    long_history = series({d: np.ones(20_000) for d in ("a", "b")})
    est = cj.estimate(many, long_history, cj.Series.of([], []), rules)
    assert est is not None and cj.decide(est, rules, elapsed_s=600, metric="accuracy").action == "promote"


def test_an_accuracy_interval_is_shown_within_the_metrics_range() -> None:
    """An accuracy difference lies in [-100, +100] points: "-90.0 pts [-125.7 pts, -54.3 pts]" was shown."""
    est = cj.Estimate(-0.9, -1.257, -0.543, 60, 300, 2, 0, 3.0)
    reason = cj.decide(est, cj.Rules(tolerance=0.02), elapsed_s=10, metric="accuracy").reason
    assert "-90.0 pts [-100.0 pts, -54.3 pts]" in reason, reason


@pytest.mark.parametrize(("factor", "action"), [(1.5, "roll_back"), (0.6, "promote")])
def test_a_regressor_with_more_error_is_worse_and_with_less_is_not(factor: float, action: str) -> None:
    rng = np.random.default_rng(4)
    scale = {"a": 1.0, "b": 5.0}  # devices of very different error: each is its own unit
    history = series({d: np.abs(rng.normal(size=3000)) * s for d, s in scale.items()})
    cohort = series({d: np.abs(rng.normal(size=3000)) * s * factor for d, s in scale.items()})
    c, b, k = cj.relative_errors(cohort, history, cj.Series.of([], []))
    rules = cj.Rules(tolerance=0.1, min_results=50)
    est = cj.estimate(c, b, k, rules)
    assert est is not None and est.delta == pytest.approx(1 - factor, abs=0.05)
    assert cj.decide(est, rules, elapsed_s=60, metric="error").action == action


def test_histogram_shift() -> None:
    assert cj.histogram_shift(["a", "b"], ["a", "b"]) == 0
    assert cj.histogram_shift(["a", "a"], ["b", "b"]) == 1
    assert cj.histogram_shift(["a", "a", "a", "b"], ["a", "b"]) == pytest.approx(0.25)
    assert cj.histogram_shift([], ["a"]) is None


# ----------------------------------------------------------------------------- on a real database


def _store(tmp_path: Path) -> tuple[str, object]:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    return url, db.make_engine(url)


def _write(engine, rows: list[tuple]) -> None:
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.write(conn, Batch(rows=rows))


def _result(device: str, seq: int, version: int, at: float, *, hit: bool | None = None,
            error: float | None = None) -> ResultRow:
    """A stored result row: a classifier's hit/miss or a regressor's error."""
    if error is not None:
        value, truth, label = orjson.dumps([error]).decode(), "0", None
    else:
        value, truth, label = None, "walk", "walk" if hit else "run"
    return ResultRow(device, seq, at, at + 1, version, label, 0.9, value, truth, 5.0, None, at)


@pytest.mark.parametrize("regressor", [False, True])
def test_judge_on_stored_results_rolls_back_the_worse_version(tmp_path: Path, regressor: bool) -> None:
    """Two cohort devices with history on v1; on v2 one makes more mistakes (or 50 % more error): the
    stored results are read in each device's order and the verdict is a rollback by that metric."""
    url, engine = _store(tmp_path)
    rng = np.random.default_rng(5)
    rows, seq = [], {}
    for version, start, n in ((1, 1000.0, 1500), (2, 5000.0, 800)):
        for dev in ("a", "b", "c"):
            v = version if dev != "c" else 1  # c is the control
            for i in range(n):
                seq[dev] = seq.get(dev, 0) + 1
                if regressor:
                    err = abs(rng.normal()) * (1.5 if v == 2 else 1.0)
                    rows.append(_result(dev, seq[dev], v, start + i, error=err))
                else:
                    rows.append(_result(dev, seq[dev], v, start + i, hit=bool(rng.random() > (0.4 if v == 2 else 0.05))))
    _write(engine, rows)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.add_rollout(conn, name="default", version=2, previous=1, cohort=["a", "b"], min_results=50,
                          tolerance=0.02, at=5000.0)
        rollout = store.rollouts(conn, "default", state="canary")[0]
    verdict = canary.judge(engine, rollout, HubSettings(db=url), now=6000.0)
    assert verdict.metric == ("error" if regressor else "accuracy")
    assert verdict.action == "roll_back", verdict.reason
    assert verdict.estimate is not None and verdict.estimate.paired == 2 and verdict.cohort_n == 1600
    assert verdict.estimate.delta == pytest.approx(-0.5 if regressor else -0.35, abs=0.08)
    obj = verdict.to_obj()
    assert obj["estimate"]["low"] < obj["estimate"]["delta"] < obj["estimate"]["high"]
    engine.dispose()


def test_the_control_is_this_models_devices_not_another_models_at_the_same_version(tmp_path: Path) -> None:
    """Version numbers are each model's own. A hub whose fleet also runs another model (a positioning regressor
    at its own v1) took that model's v1 results as the control of a classifier's canary against v1: the judge
    saw errors and truths, judged the classifier as a regressor against positioning errors, and the control
    counted devices that never ran it."""
    url, engine = _store(tmp_path)
    rng = np.random.default_rng(3)
    rows, seq = [], {}
    for version, start, n in ((1, 1000.0, 600), (2, 5000.0, 400)):
        for dev in ("a", "b", "c", "pos-1", "pos-2"):
            v = 1 if dev in ("c", "pos-1", "pos-2") else version
            for i in range(n):
                seq[dev] = seq.get(dev, 0) + 1
                if dev.startswith("pos"):  # the other model: a regressor's results, metres off
                    rows.append(_result(dev, seq[dev], v, start + i, error=abs(rng.normal()) * 3.0))
                else:
                    rows.append(_result(dev, seq[dev], v, start + i, hit=bool(rng.random() > 0.05)))
    _write(engine, rows)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.apply_statuses(conn, {d: (c.Status(d, c.ONLINE, 6000.0, name, 1, "a" * 64, 0), 6000.0) for d, name in
                                    (("a", "default"), ("b", "default"), ("c", "default"), ("pos-1", "positioning"),
                                     ("pos-2", "positioning"))})
        store.add_rollout(conn, name="default", version=2, previous=1, cohort=["a", "b"], min_results=50,
                          tolerance=0.02, at=5000.0)
        rollout = store.rollouts(conn, "default", state="canary")[0]
    verdict = canary.judge(engine, rollout, HubSettings(db=url), now=6000.0)
    assert verdict.metric == "accuracy", verdict
    assert verdict.control_n == 400, verdict  # c's results on v1 only
    assert verdict.control == pytest.approx(0.95, abs=0.04)
    assert verdict.action != "roll_back", verdict.reason
    engine.dispose()


def test_a_lying_devices_huge_errors_are_judged_not_a_division_by_zero(tmp_path: Path) -> None:
    """A hostile peer's finding: a cohort device sending errors of 1e150 against a control of 1e-10 made the
    scores' variance inf, and the judge divided by zero at every check (`rollout status` a traceback, the live
    page a 503, serve never judged the canary). Scores are capped at RELATIVE_ERROR_CAP: rolled back."""
    url, engine = _store(tmp_path)
    rows = [_result("c", i + 1, 1, 4600.0 + i, error=1e-10) for i in range(5)]
    rows += [_result("a", i + 1, 2, 5000.0 + i, error=1e150 if i % 2 else 0.0) for i in range(50)]
    rows += [_result("b", i + 1, 2, 5000.0 + i, error=1e150) for i in range(50)]
    _write(engine, rows)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        for cohort, at in ((["a"], 4500.0), (["b"], 4500.0)):
            store.add_rollout(conn, name="default", version=2, previous=1, cohort=cohort, min_results=50,
                              tolerance=0.02, at=at)
        a_rollout, b_rollout = sorted(store.rollouts(conn, "default", state="canary"), key=lambda r: r.cohort)
    verdict = canary.judge(engine, a_rollout, HubSettings(db=url), now=6000.0)  # raised ZeroDivisionError
    assert verdict.metric == "error" and verdict.cohort_n == 50 and verdict.estimate is not None
    assert verdict.estimate.delta < -100 and verdict.action == "wait", verdict.reason  # half 0, half 1e150
    verdict = canary.judge(engine, b_rollout, HubSettings(db=url), now=6000.0)
    assert verdict.action == "roll_back", verdict.reason  # every result 1e150 off: worse, and said so
    engine.dispose()
    # a spread no score can have: an interval without bounds, not a division by zero (or an OverflowError)
    assert cj.radius(math.inf, 0.05, (400.0,)) == cj.radius(1e200, 0.05, (400.0,)) == math.inf
    assert cj.radius(math.nan, 0.05, (400.0,)) == math.inf
    assert 0 < cj.radius(1e-162, 0.05, (1.0,)) < 1e-90  # a hair's spread: a hair's width, not 1/0 (the review)


def test_a_classifiers_canary_is_judged_by_accuracy_whatever_one_device_sends(tmp_path: Path) -> None:
    """A hostile peer's finding: ONE regression result (a value and a truth) from a device outside the cohort
    switched a classifier's judge to errors, where none of its results scored: "0 of 50 cohort results" for
    ever. The metric follows the model's task."""
    url, engine = _store(tmp_path)
    rng = np.random.default_rng(11)
    rows = [_result(d, i + 1, v, at + i, hit=bool(rng.random() > 0.05))
            for d, v, at in (("a", 1, 1000.0), ("b", 1, 1000.0), ("c", 1, 1000.0)) for i in range(300)]
    rows += [_result(d, 301 + i, 2, 5000.0 + i, hit=bool(rng.random() > 0.05)) for d in ("a", "b") for i in range(200)]
    rows += [_result("c", 301 + i, 1, 5000.0 + i, hit=bool(rng.random() > 0.05)) for i in range(200)]
    rows.append(_result("liar", 1, 1, 5500.0, error=1.0))
    _write(engine, rows)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        for version in (1, 2):
            store.add_model(conn, name="default", version=version, sha256=f"{version}" * 64, created=1.0,
                            manifest={"name": "default", "version": version, "task": "classification"})
        store.add_rollout(conn, name="default", version=2, previous=1, cohort=["a", "b"], min_results=50,
                          tolerance=0.05, at=5000.0)
        rollout = store.rollouts(conn, "default", state="canary")[0]
    verdict = canary.judge(engine, rollout, HubSettings(db=url), now=6000.0)
    assert verdict.metric == "accuracy" and verdict.cohort_n == 400, verdict
    assert verdict.control_n == 200, verdict  # the liar's regression result scores nothing as a hit
    engine.dispose()


def test_a_canary_this_hub_cannot_sign_says_so_with_the_fix(tmp_path: Path, caplog) -> None:
    url, engine = _store(tmp_path)
    rows = [_result(d, i, 1, 100.0 + i, hit=True) for d in ("a", "b") for i in range(1, 200)]
    rows += [_result("a", i, 2, 1000.0 + i, hit=True) for i in range(200, 400)]
    _write(engine, rows)
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.add_rollout(conn, name="default", version=2, previous=1, cohort=["a"], min_results=50,
                          tolerance=0.1, at=1000.0)
    settings = HubSettings(db=url, broker="mqtt://127.0.0.1:1")
    with pytest.raises(canary.CanaryError, match=r"no signing key.*--signing-key PATH"):
        canary.check(engine, settings, "default", now=2000.0)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.rollout.canary"):
        canary.CanaryWatcher(HubSettings(db=url, canary_check_s=0), engine).start()
    assert any("cannot be promoted by this hub" in r.getMessage() for r in caplog.records)
    res = runner.invoke(hub_app, ["rollout", "status", "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    status = orjson.loads(res.stdout)
    # `rollout status` does not judge (serve does, with its own key): its own lack of a key said in red, at every
    # call, that a serve with one could not promote (a new operator's finding)
    assert status["cannot_promote"] is None
    assert status["verdict"]["action"] == "promote" and status["verdict"]["estimate"]["paired_devices"] == 1
    res = runner.invoke(hub_app, ["rollout", "status", "--db", url])
    assert res.exit_code == 0 and "to decide:" in res.stdout and "cannot be promoted" not in res.stdout
    # with a key the verdict's blocker is gone (the promotion itself needs a broker: the live tests)
    assert canary.unsigned_promotion(HubSettings(db=url, signing_key="k.pem"), store_rollout(engine)) is None
    engine.dispose()


def store_rollout(engine) -> object:
    with sessions.transaction(engine, write=False) as conn:
        return Store(engine).rollouts(conn, "default", state="canary")[0]


def test_the_judges_settings_are_validated() -> None:
    from edge_agent.settings.loader import SettingsError, load_settings

    for flags, field in (({"canary_on_undecided": "maybe"}, "canary_on_undecided"),
                         ({"canary_alpha": 0.7}, "canary_alpha"),
                         ({"canary_max_results": 10}, "canary_max_results")):
        with pytest.raises(SettingsError, match=field):
            load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags=flags)
    assert math.isclose(HubSettings().canary_alpha, 0.05)


def test_a_good_canary_that_meets_more_hard_stretches_than_usual_is_not_rolled_back() -> None:
    """Its two devices meet a hard stretch 30 % of the time instead of 10 % (bad luck, a few runs of 40):
    9 points worse than their history over 1,200 results, which the clustering explains. Counted as
    independent draws, the same results would roll it back."""
    rng = np.random.default_rng(6)
    history = series({d: stretches(rng, 4000, 0.03) for d in ("a", "b")})

    def unlucky(n: int) -> np.ndarray:
        hard = (np.arange(n) // 40) % 10 < 3
        return (rng.random(n) >= np.where(hard, 0.5, 0.03)).astype(np.float64)

    cohort = series({d: unlucky(600) for d in ("a", "b")})
    rules = cj.Rules(tolerance=0.02, min_results=50)
    est = cj.estimate(cohort, history, cj.Series.of([], []), rules)
    assert est is not None and est.delta < -0.06 and est.design_effect > 3
    assert cj.decide(est, rules, elapsed_s=300, metric="accuracy").action == "wait"
    naive = cj.Estimate(est.delta, est.delta - (est.delta - est.low) / math.sqrt(est.design_effect),
                        est.delta + (est.high - est.delta) / math.sqrt(est.design_effect), est.cohort_n,
                        est.baseline_n, est.paired, est.unpaired, 1.0)
    assert cj.decide(naive, rules, elapsed_s=300, metric="accuracy").action == "roll_back"


def test_a_regressor_without_history_is_compared_with_the_fleets_error() -> None:
    rng = np.random.default_rng(7)
    fleet = series({f"c{i}": np.abs(rng.normal(size=2000)) * (1 + 0.1 * i) for i in range(4)})
    cohort = series({"new": np.abs(rng.normal(size=2000)) * 3.0})  # three times the fleet's error
    c, b, k = cj.relative_errors(cohort, cj.Series.of([], []), fleet)
    rules = cj.Rules(tolerance=0.1, min_results=50)
    est = cj.estimate(c, b, k, rules)
    assert est is not None and est.unpaired == 1 and est.delta == pytest.approx(1 - 3.0 / 1.15, abs=0.2)
    assert cj.decide(est, rules, elapsed_s=60, metric="error").action == "roll_back"


def test_serve_says_a_blocked_promotion_once_while_its_figures_change(tmp_path: Path, caplog) -> None:
    url, engine = _store(tmp_path)
    _write(engine, [_result(d, i, 1, 100.0 + i, hit=True) for d in ("a", "b") for i in range(1, 200)])
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.add_rollout(conn, name="default", version=2, previous=1, cohort=["a"], min_results=50,
                          tolerance=0.1, at=1000.0)
    watcher = canary.CanaryWatcher(HubSettings(db=url, canary_check_s=0), engine)
    with caplog.at_level(logging.ERROR, logger="cloud_hub.rollout.canary"):
        for n in (300, 400):  # the verdict's figures change between checks
            _write(engine, [_result("a", i, 2, 1000.0 + i, hit=True) for i in range(n - 100, n)])
            watcher.check_once()
    said = [r.getMessage() for r in caplog.records if "cannot be promoted" in r.getMessage()]
    assert len(said) == 1, said
    engine.dispose()


def test_a_cohort_that_never_reports_is_rolled_back_at_the_time_limit_never_promoted() -> None:
    """A new operator's finding: a canary sent to an offline device said "0 of 50 cohort results" past
    canary_max_s, and blocked every publish and federate; the docs said the time limit applies."""
    for policy, action in (("promote", "roll_back"), ("rollback", "roll_back"), ("hold", "wait")):
        rules = cj.Rules(tolerance=0.02, min_results=50, max_s=150.0, on_undecided=policy)
        assert cj.decide(None, rules, elapsed_s=149.0, metric="accuracy").action == "wait"
        late = cj.decide(None, rules, elapsed_s=151.0, metric="accuracy")
        assert late.action == action, (policy, late)
        if policy != "hold":
            assert "only 0 of 50 cohort results in the time limit (150 s)" in late.reason, late
    no_limit = cj.Rules(tolerance=0.02, min_results=50, max_s=0.0)
    assert cj.decide(None, no_limit, elapsed_s=1e9, metric="accuracy").action == "wait"


def test_rollout_status_says_the_cohorts_pace_and_when_the_limit_comes() -> None:
    """A new operator's finding: a good canary on a young fleet was "undecided" until 40,000 results, about 2.8
    hours at its pace, and `rollout status` counted results but never gave a time."""
    from cloud_hub.cli.rollout import _pace

    assert _pace(0, 60.0, 40_000) == "the cohort has sent no scored result yet"
    assert _pace(240, 60.0, 40_000) == ("the cohort sends 240.0 scored results a minute: the limit of 40,000 results "
                                        "in about 2.8 h at this pace")
    assert _pace(1000, 60.0, 40_000).endswith("in about 39 min at this pace")
