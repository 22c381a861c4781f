"""Forecasts against persistence: trend-v1 features, a forecast's window targets, the change learned and
added back by the graph, the persistence baseline and the gates that say when a model loses to it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, sessions
from cloud_hub.data.store import Store
from cloud_hub.models import datasets, forecast, lifecycle, training
from cloud_hub.models.quantize import quantize_int8
from edge_agent.preprocess import (
    PreprocessParams,
    extract_features,
    feature_names,
    fit_normalization,
    last_readings,
    make_windows,
)
from tests.helpers import SMALL, model_params

HOUR = 3600.0


def make_series_log(path: Path, *, hours: int = 24 * 30, levels=(("s1", 0.0), ("s2", 4.0), ("s3", 20.0)),
                    seed: int = 0) -> Path:
    """Hourly readings of devices whose ``temp`` has a trend, a daily cycle and noise, each at its own
    level (the last device's above any other's); each reading's label is the next hour's reading."""
    rng = np.random.default_rng(seed)
    rows = ["ts,device_id,temp,label"]
    for dev, level in levels:
        t = np.arange(hours + 1, dtype=np.float64)
        v = level + 0.01 * t + 5.0 * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6)) + rng.normal(0, 0.1, t.size)
        rows += [f"{t[i] * HOUR:.0f},{dev},{v[i]:.3f},{v[i + 1]:.3f}" for i in range(hours)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_series_log(tmp_path_factory.mktemp("forecast") / "series.csv")


def _params(**kw) -> PreprocessParams:
    base = dict(sample_rate_hz=1.0, window_s=6.0, hop_s=2.0, channels=("a", "b"), features="trend-v1")
    return PreprocessParams(**{**base, **kw})


# --------------------------------------------------------------------------- preprocessing contract


def test_trend_features_match_a_reference_loop() -> None:
    rng = np.random.default_rng(1)
    ts = np.concatenate([np.arange(30.0), 40.0 + np.arange(17.0)])  # a gap: windows never span it
    values = (rng.normal(size=(ts.size, 2)) * [1.0, 50.0] + [0.0, 300.0]).astype(np.float32)
    p = _params()
    p = p.with_normalization(*fit_normalization(values))
    batch = make_windows(ts, values, None, p)
    got = extract_features(batch, p)
    assert np.array_equal(got, extract_features(batch.data, p))  # a batch and its windows agree
    names = feature_names(p)
    assert names[:2] == ["a_last", "b_last"] and names[-2:] == ["a_mean_rel", "b_mean_rel"] and len(names) == 12
    for row, win in zip(got, batch.data, strict=True):
        x = (win.astype(np.float64) - p.norm_mean) / p.norm_std
        want = {}
        for j, ch in enumerate(p.channels):
            want[f"{ch}_last"] = x[-1, j]
            for lag in range(1, 4):
                want[f"{ch}_lag{lag}"] = x[-1 - lag, j] - x[-1, j]
            want[f"{ch}_slope"] = np.polyfit(np.arange(len(x)), x[:, j], 1)[0]
            want[f"{ch}_mean_rel"] = x[:, j].mean() - x[-1, j]
        np.testing.assert_allclose(row, [want[n] for n in names], rtol=1e-4, atol=1e-5)
    last = last_readings(got, p)
    assert last is not None
    np.testing.assert_allclose(last, batch.data[:, -1, :], rtol=1e-6, atol=1e-4)  # read back in their units


def test_forecast_params_travel_in_the_manifest_and_older_ones_read_as_before() -> None:
    p = _params(forecast="a").with_normalization((0.0, 1.0), (1.0, 2.0))
    d = p.to_dict()
    assert d["forecast"] == "a" and PreprocessParams.from_dict(d) == p
    plain = _params(features="stats-v1").to_dict()
    assert "forecast" not in plain  # manifests without a forecast read as they did for older agents
    assert PreprocessParams.from_dict(plain).forecast is None
    with pytest.raises(ValueError, match="forecast must name one of the channels"):
        _params(forecast="nope")
    with pytest.raises(ValueError, match="go with features 'trend-v1'"):
        _params(features="stats-v1", forecast="a")
    with pytest.raises(ValueError, match="forecast must be a string"):
        PreprocessParams.from_dict({**d, "forecast": 3})
    assert _params(window_s=3.0).n_features == 2 * (1 + 2 + 2)  # fewer readings, fewer lags


def test_a_forecast_window_is_labelled_by_its_last_reading() -> None:
    ts = np.arange(12.0)
    values = np.stack([ts, -ts], axis=1).astype(np.float32)
    labels = ts + 1.0  # the next reading
    forecast = make_windows(ts, values, labels, _params(forecast="a"))
    summary = make_windows(ts, values, labels, _params())
    assert np.array_equal(forecast.labels, labels[forecast.offsets + 5])  # its last reading's label
    assert np.allclose(summary.labels, labels[summary.offsets] + 2.5)  # the mean of its readings' labels


# --------------------------------------------------------------------------- the model and its graph


def test_the_graph_adds_the_last_reading_back_in_float_and_ignores_the_level() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 5)).astype(np.float32)
    change = X[:, 1] - 0.5 * X[:, 2]
    mean, std = 300.0, 20.0
    y = X[:, 0] * std + mean + change
    model = training.train(X, y - (X[:, 0] * std + mean), seed=0, config=SMALL, ignore=(0,))
    assert np.all(model.steps[-1][1].coefs_[0][0] == 0.0)  # the level reaches the network nowhere
    fp32 = training.export_onnx(model, 5, (0, mean, std))
    int8 = quantize_int8(fp32, X)
    Xt = rng.normal(size=(50, 5)).astype(np.float32)
    Xt[:, 0] *= 4.0  # levels far outside the training range
    truth = Xt[:, 0] * std + mean + Xt[:, 1] - 0.5 * Xt[:, 2]
    for blob in (fp32, int8):
        (out,) = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(["variable"], {"input": Xt})
        np.testing.assert_allclose(out[:, 0], model.predict(Xt) + Xt[:, 0] * std + mean, atol=0.3)
        assert np.mean(np.abs(out[:, 0] - truth)) < 0.3  # the level does not leak into the change
    nodes = {n.name: n for n in onnx.load_from_string(int8).graph.node}
    assert nodes["forecast_add"].op_type == "Add" and nodes["forecast_gather"].input[0] == "input"  # not quantized
    with pytest.raises(ValueError, match="one output"):
        training.export_onnx(training.train(X, np.stack([y, y], 1), config=SMALL), 5, (0, mean, std))


def test_persistence_baseline_uses_the_named_channel_or_the_one_that_fits_training() -> None:
    rng = np.random.default_rng(3)
    y_train, y_test = rng.normal(size=40), rng.normal(size=10)
    last_train = np.stack([y_train + 5.0, y_train + 0.1], 1)
    last_test = np.stack([y_test + 5.0, y_test + 0.1], 1)
    found = forecast.persistence_baseline(forecast.Persistence(last_train, last_test, ("a", "b")), y_train, y_test)
    assert found is not None and found["channel"] == "b" and found["mae"] == pytest.approx(0.1)
    named = forecast.persistence_baseline(forecast.Persistence(last_train, last_test, ("a", "b"), "a"), y_train, y_test)
    assert named is not None and named["channel"] == "a" and named["mae"] == pytest.approx(5.0)
    several = np.stack([y_test, y_test], 1)
    assert forecast.persistence_baseline(forecast.Persistence(last_train, last_test, ("a", "b")), y_train,
                                         several) is None


# --------------------------------------------------------------------------- end to end


def test_int8_forecast_beats_persistence_on_a_series_with_trend_and_daily_cycle(series, tmp_path) -> None:
    dburl = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(dburl)
    out = lifecycle.train_from_logs(engine, [str(series)], window_s=24 * HOUR, hop_s=HOUR, forecast="temp",
                                    config=SMALL)
    assert out.holdout_devices == ["s3"]  # the device at a level no training window reached
    persistence = out.extra["baselines"]["persistence"]
    assert persistence["channel"] == "temp" and persistence["n"] == out.holdout_windows
    assert out.int8["mae"] < 0.6 * persistence["mae"], (out.int8, persistence)
    assert out.gate is not None and "beats persistence" in out.gate
    with engine.connect() as conn:
        manifest = Store(engine).get_model(conn, "default").manifest
    assert manifest["preprocess"]["forecast"] == "temp" and manifest["preprocess"]["features"] == "trend-v1"
    assert manifest["metrics"]["gate"] == out.gate


def test_train_json_prints_persistence_and_says_when_the_model_loses_to_it(series, tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(hub_app, ["train", str(series), "--db", f"sqlite:///{tmp_path / 'h.sqlite'}", "--json",
                                  "--window", str(24 * HOUR), "--hop", str(HOUR), "--features", "trend-v1"])
    assert res.exit_code == 0, res.output
    out = orjson.loads(res.stdout)
    assert {"mean", "knn3", "persistence"} <= out["baselines"].keys()
    # the value, not the change, of a device above every training level: repeating the last reading wins
    assert out["int8"]["mae"] > out["baselines"]["persistence"]["mae"]
    assert "loses to persistence (the last temp reading)" in out["gate"] and out["state"] == "publishable"
    bad = runner.invoke(hub_app, ["train", str(series), "--db", f"sqlite:///{tmp_path / 'h2.sqlite'}",
                                  "--window", str(24 * HOUR), "--hop", str(HOUR), "--forecast", "humidity"])
    assert bad.exit_code == 4 and "forecast must name one of the channels ['temp']" in bad.output


def _report(engine, log: Path, params: PreprocessParams, first_seq: int) -> None:
    """The log's windows as agents report them: features and ground truth."""
    ds = datasets.dataset_from_logs([str(log)], window_s=None, hop_s=None, holdout=[], params=params)
    rows = [(dev, first_seq + i, float(i), float(i) + 2, 1, str(y), None, None, str(y), 0.1,
             sessions.pack_features(x), time.time()) for i, (x, y, dev) in enumerate(zip(ds.X, ds.y, ds.devices,
                                                                                      strict=True))]
    with sessions.transaction(engine) as conn:
        Store(engine).insert_results(conn, rows)


def test_a_retrain_that_loses_to_persistence_is_rejected_and_says_so(series, tmp_path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    v1 = lifecycle.train_from_logs(engine, [str(series)], window_s=24 * HOUR, hop_s=HOUR, features="trend-v1",
                                   config=SMALL)  # the value, not the change: s3 is above every training level
    assert v1.holdout_devices == ["s3"] and v1.gate is not None and "loses to persistence" in v1.gate
    _report(engine, series, model_params(engine), 0)
    out = lifecycle.retrain(engine, tolerance=1e9, config=SMALL)  # the running version sets no bar
    assert out.state == "rejected", out.gate
    assert out.gate is not None and "loses to persistence" in out.gate and out.gate.endswith(": fail")
    with engine.connect() as conn:
        assert Store(engine).get_model(conn, "default", 2).state == "rejected"


def test_a_device_replaying_the_series_reports_the_forecasts_the_hub_measured(procs, broker, prefix, series,
                                                                              tmp_path) -> None:
    """The agent's own windows, features and runner (a real replay, a real hub): each stored value is a
    forecast of the next reading (its truth), as good on the held-out device as the hub's INT8 score."""
    import sqlalchemy as sa

    from cloud_hub.data import tables
    from tests.helpers import run_agent
    from tests.test_hub_cli import ServeProcess

    engine = db.make_engine(f"sqlite:///{tmp_path / 'train.sqlite'}")
    out = lifecycle.train_from_logs(engine, [str(series)], window_s=24 * HOUR, hop_s=HOUR, forecast="temp",
                                    config=SMALL)
    with engine.connect() as conn:
        (tmp_path / "v1.emlb").write_bytes(Store(engine).get_model(conn, "default").bundle)
    engine.dispose()
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    res = run_agent("replay", str(series), "--broker", broker.url, "--model", str(tmp_path / "v1.emlb"),
                    "--prefix", prefix, "--state-dir", str(tmp_path / "state"), "--json")
    assert res.returncode == 0, res.stderr
    assert hub.signal(signal.SIGTERM) == 0  # the replay ended on the hub's receipts: every result stored
    hub_db = db.make_engine(url)
    with hub_db.connect() as conn:
        rows = conn.execute(sa.select(tables.results.c.device_id, tables.results.c.value, tables.results.c.truth)
                            .where(tables.results.c.device_id == "s3")).all()
    hub_db.dispose()
    assert len(rows) == out.holdout_windows and orjson.loads(res.stdout)["published"] > len(rows)
    values = np.array([orjson.loads(v)[0] for _, v, _ in rows])
    truths = np.array([float(t) for _, _, t in rows])
    mae = float(np.mean(np.abs(values - truths)))
    assert mae == pytest.approx(out.int8["mae"], rel=1e-3)  # the device forecasts as the hub evaluated
    assert mae < 0.6 * out.extra["baselines"]["persistence"]["mae"]


def test_federate_refuses_a_forecast_model(series, tmp_path) -> None:
    """Rounds would train levels, not changes, and export without the add-back: refused until they do."""
    from cloud_hub.rounds.config import FederateConfig, RoundError
    from cloud_hub.rounds.coordinator import Coordinator
    from cloud_hub.settings import HubSettings

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    lifecycle.train_from_logs(engine, [str(series)], window_s=24 * HOUR, hop_s=HOUR, forecast="temp", config=SMALL)
    coordinator = Coordinator(HubSettings(db=url, broker="mqtt://127.0.0.1:1"), engine, FederateConfig(),
                              signing_key=None, allow_unsigned=True)
    with pytest.raises(RoundError, match="federated rounds do not train forecasts yet"):
        coordinator._open()
    engine.dispose()


# --------------------------------------------------------------------------- one device: the time hold-out


def test_one_device_normalization_and_augmentation_see_only_the_first_80_percent(tmp_path) -> None:
    """Without hold-out devices the hold-out is the last 20 % in time: its readings must not shape the
    normalization (a rising series would otherwise tell the model where the hold-out's level lies), and no
    augmented copy of a hold-out window may train or be scored."""
    log = make_series_log(tmp_path / "one.csv", hours=24 * 20, levels=(("s1", 0.0),))
    ds = datasets.dataset_from_logs([str(log)], window_s=6 * HOUR, hop_s=HOUR, holdout=[], forecast="temp",
                                     mirror=["temp"])
    recorded = ds.recorded()
    early = recorded.order < np.quantile(recorded.order, 0.8)
    readings = np.loadtxt(log, delimiter=",", skiprows=1, usecols=(0, 2))
    window_end = recorded.order[early].max() + 6 * HOUR
    fitted = readings[readings[:, 0] < window_end, 1]
    assert ds.params.norm_mean[0] == pytest.approx(fitted.mean(), abs=0.05)
    assert ds.params.norm_mean[0] < readings[:, 1].mean() - 0.1  # the whole series' mean is higher: it rises
    train, test = datasets.split(ds, [])
    assert not test.augmented.any() and len(test.y) == int((~early).sum())
    assert train.order[train.augmented].max() < test.order.min()  # copies only of training windows


@pytest.mark.parametrize(("step_s", "rate"), [(7 * 86400, 1 / (7 * 86400)), (30 * 86400, 1 / (30 * 86400)),
                                              (365 * 86400, 1 / (365 * 86400))])
def test_weekly_monthly_and_yearly_logs_keep_their_rate(tmp_path, step_s: int, rate: float) -> None:
    """The rate is read with significant digits: rounded to micro-hertz, a weekly log read 2e-06 Hz (its
    windows came out 20 % longer than asked) and a monthly or yearly one 0 Hz (refused)."""
    log = tmp_path / "slow.csv"
    log.write_text("ts,device_id,temp,label\n" + "".join(f"{i * step_s},d1,{i % 7}.0,{(i + 1) % 7}.0\n"
                                                        for i in range(200)))
    params = datasets.default_params(str(log), window_s=26 * step_s, hop_s=step_s, forecast="temp")
    assert params.sample_rate_hz == pytest.approx(rate, rel=1e-5)
    assert params.window_size == 26
