"""Model lifecycle: train → INT8 → registry → gate → sign → publish → verify → hot-swap on devices."""

from __future__ import annotations

import dataclasses
import os
import queue
import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, sessions, tables
from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import Store
from cloud_hub.models import datasets, lifecycle
from cloud_hub.models.signing import keygen, load_private_key, sign_bundle
from cloud_hub.rollout import publish as rollout
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent.device.bundle import BundleRejected, load_public_key, verify_bundle
from edge_agent.mqtt import Message, MqttLink
from edge_agent.preprocess import PreprocessParams
from edge_agent.settings.broker import BrokerURL
from edge_agent.settings.loader import load_settings
from tests.helpers import (
    LIVE_AGENT_ENV,
    SMALL,
    agent_cmd,
    expected_keys,
    live_agent_cmd,
    make_bundle,
    make_log,
    make_regression_log,
    model_params,
    publish_retained,
)
from tests.test_ingest import stored_keys, wait_for

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    priv, pub, _ = keygen(root / "hub.pem")
    other, _, _ = keygen(root / "intruder.pem")
    return priv, pub, other


@pytest.fixture(scope="module")
def train_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log(tmp_path_factory.mktemp("lc") / "train.csv", devices=("trn-1", "trn-2", "trn-3"), seconds=60)


def test_train_cli_registers_an_int8_model(tmp_path, train_log) -> None:
    dburl = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    res = runner.invoke(hub_app, ["train", str(train_log), "--db", dburl, "--holdout-devices", "trn-3", "--json",
                                  "--out", str(tmp_path / "v1.emlb")])
    assert res.exit_code == 0, res.output
    out = orjson.loads(res.stdout)
    assert out["version"] == 1 and out["holdout_devices"] == ["trn-3"]
    for kind in ("fp32", "int8"):
        assert 0.0 <= out[kind]["accuracy"] <= 1.0 and out[kind]["bytes"] > 0
    assert out["int8"]["bytes"] < out["fp32"]["bytes"]
    assert abs(out["int8"]["accuracy"] - out["fp32"]["accuracy"]) < 0.05
    bundle = c.decode_bundle((tmp_path / "v1.emlb").read_bytes())
    assert bundle.manifest.task == "classification" and set(bundle.manifest.labels) <= {"idle", "walk", "run", "lift"}
    assert bundle.manifest.training["holdout_devices"] == ["trn-3"]
    assert "trn-3" not in bundle.manifest.training["train_devices"]
    again = runner.invoke(hub_app, ["train", str(train_log), "--db", dburl, "--json"])
    assert orjson.loads(again.stdout)["version"] == 2
    listed = orjson.loads(runner.invoke(hub_app, ["models", "--db", dburl, "--json"]).stdout)["models"]
    assert [m["version"] for m in listed] == [1, 2] and all(m["state"] == "publishable" for m in listed)


def test_numeric_labels_train_a_regressor(tmp_path) -> None:
    log = make_regression_log(tmp_path / "reg.csv")
    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.sqlite'}")
    out = lifecycle.train_from_logs(engine, [str(log)], holdout=["r3"], config=SMALL)
    assert "mae" in out.int8 and "mae" in out.fp32 and out.int8["mae"] < 2.0
    with engine.connect() as conn:
        bundle = c.decode_bundle(Store(engine).get_model(conn, "default").bundle)
    _, model = verify_bundle(bundle.encode(), trusted_key=None, allow_unsigned=True)
    pred = model.predict(np.zeros((3, bundle.manifest.n_features), np.float32))
    assert pred.values is not None and pred.values.shape == (3, 1)


# --------------------------------------------------------------------------- verification


@pytest.fixture(scope="module")
def v1(train_log) -> c.Bundle:
    return make_bundle(train_log, holdout=("trn-3",))


def _refused(payload: bytes, pub: Path, match: str) -> None:
    with pytest.raises(BundleRejected, match=match):
        verify_bundle(payload, trusted_key=load_public_key(pub), allow_unsigned=False)


def test_bundle_checks(v1, keys) -> None:
    priv, pub, other = keys
    signed = sign_bundle(v1, load_private_key(priv))
    bundle, model = verify_bundle(signed.encode(), trusted_key=load_public_key(pub), allow_unsigned=False)
    assert bundle.manifest.version == 1 and model.version == 1
    _refused(v1.encode(), pub, "unsigned")
    _refused(sign_bundle(v1, load_private_key(other)).encode(), pub, "not the trusted key")
    tampered = c.Bundle(signed.manifest, signed.model[:-8] + b"\x00" * 8)
    _refused(tampered.encode(), pub, "sha256")
    forged = c.Bundle(dataclasses.replace(signed.manifest, version=99), signed.model)
    _refused(forged.encode(), pub, "bad signature")
    _refused(b"garbage", pub, "malformed bundle")
    mangled = c.Bundle(dataclasses.replace(signed.manifest, signature="not*base64!"), signed.model)
    _refused(mangled.encode(), pub, "not valid base64")


def _mismatched(train_log: Path, v1: c.Bundle) -> c.Bundle:
    """v1's ONNX under a manifest whose preprocessing (spectral features too) produces a different width."""
    v4 = make_bundle(train_log, holdout=("trn-3",), window_s=4.0, hop_s=2.0, features="stats-fft-v1")
    assert v4.manifest.n_features != v1.manifest.n_features
    return c.Bundle(dataclasses.replace(v4.manifest, version=3, sha256=v1.manifest.sha256), v1.model)


def test_input_shape_mismatch_is_refused(v1, keys, train_log) -> None:
    priv, pub, _ = keys
    bad = sign_bundle(_mismatched(train_log, v1), load_private_key(priv))
    _refused(bad.encode(), pub, "does not take")


# --------------------------------------------------------------------------- on a live agent


def _status_watch(broker_url: str, topics: c.Topics, name: str) -> tuple[MqttLink, queue.Queue[c.Status]]:
    got: queue.Queue[c.Status] = queue.Queue()
    link = MqttLink(BrokerURL.parse(broker_url), name, on_message=lambda m: got.put(c.decode_status(m.payload)),
                    subscriptions=[(topics.all_status, 1)])
    link.start()
    link.wait_connected(10)
    return link, got


def _until(statuses: queue.Queue[c.Status], pred, timeout: float = 60) -> c.Status:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = statuses.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if pred(s):
            return s
    raise AssertionError("no matching status")


def test_bad_bundles_are_refused_and_v1_keeps_serving(procs, shared_broker, prefix, tmp_path, keys, v1,
                                                      train_log) -> None:
    priv, pub, other = keys
    topics = c.Topics(prefix)
    good = sign_bundle(v1, load_private_key(priv))
    model_file = tmp_path / "v1.emlb"
    model_file.write_bytes(good.encode())
    watch, statuses = _status_watch(shared_broker.url, topics, f"{prefix}-watch")
    results: queue.Queue[Message] = queue.Queue()
    sub = MqttLink(BrokerURL.parse(shared_broker.url), f"{prefix}-res", on_message=results.put,
                   subscriptions=[(topics.all_results, 1)])
    sub.start()
    sub.wait_connected(10)
    agent = procs.popen(live_agent_cmd(shared_broker.url, prefix, tmp_path / "state", pub, "--model", str(model_file)),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, **LIVE_AGENT_ENV, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2"})
    try:
        _until(statuses, lambda s: s.state == c.ONLINE and s.model_version == 1)
        bad = {
            "unsigned": v1,
            "not the trusted key": sign_bundle(dataclasses.replace(v1, manifest=dataclasses.replace(
                v1.manifest, version=2)), load_private_key(other)),
            "sha256": c.Bundle(good.manifest, good.model[:-8] + b"\x00" * 8),
            "bad signature": c.Bundle(dataclasses.replace(good.manifest, version=7), good.model),
            "does not take": sign_bundle(_mismatched(train_log, v1), load_private_key(priv)),
        }
        for reason, bundle in bad.items():
            publish_retained(shared_broker.url, topics.model("default"), bundle.encode())
            status = _until(statuses, lambda s, r=reason: s.last_error is not None and r in s.last_error)
            assert status.model_version == 1 and status.state == c.ONLINE
        # Results keep coming, all from v1.
        for _ in range(3):
            batch = c.decode_results(results.get(timeout=30).payload)
            assert {r.model_version for r in batch.results} == {1}
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=30)
        watch.stop()
        sub.stop()
    assert agent.returncode == 0, err
    assert (tmp_path / "state" / "model-default.emlb").read_bytes() == good.encode(), "the persisted model is v1"


def test_retrain_from_fleet_and_rollout_switches_every_agent(procs, broker, prefix, tmp_path, keys,
                                                             train_log) -> None:
    priv, pub, _ = keys
    settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
        "broker": broker.url, "db": f"sqlite:///{tmp_path / 'hub.sqlite'}", "prefix": prefix,
        "client_id": f"{prefix}-hub", "signing_key": str(priv)})
    engine = db.make_engine(settings.db)
    hub = Hub(settings, engine=engine)
    hub.start()
    fleet = {dev: make_log(tmp_path / f"{dev}.csv", devices=(dev,), seconds=80, seed=0, start_ts=1000.0 * i)
             for i, dev in enumerate(("dev-a", "dev-b"), start=1)}
    try:
        v1 = lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL)
        assert v1.version == 1
        rollout.publish(engine, settings)
        agents = [procs.popen(
            agent_cmd("replay", str(path), "--broker", broker.url, "--prefix", prefix, "--trusted-key", str(pub),
                      "--state-dir", str(tmp_path / dev), "--speed", "4", "--features", "all", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2"}) for dev, path in fleet.items()]
        # Enough to retrain on: the training device (dev-a; dev-b is held out) has labelled windows of
        # two classes at least, and the hold-out some (under load the agents run at their own pace).
        def enough() -> bool:
            classes = _classes(engine)
            return classes.get("dev-a", 0) >= 2 and classes.get("dev-b", 0) >= 1 and len(stored_keys(settings.db)) >= 40

        wait_for(enough, timeout=120, what="40 results stored, two classes from dev-a")
        v2 = lifecycle.retrain(engine, holdout=["dev-b"], tolerance=1.0, min_windows=20, config=SMALL)
        assert (v2.version, v2.state, v2.extra["parent_version"]) == (2, "publishable", 1)
        assert v2.baseline is not None and "accuracy" in v2.baseline
        rollout.publish(engine, settings)
        outs = [p.communicate(timeout=180) for p in agents]
        assert all(p.returncode == 0 for p in agents), [e for _, e in outs]
        reports = [orjson.loads(o) for o, _ in outs]
        assert all(r["model_swaps"] == 1 and r["model_version"] == 2 for r in reports)
        expected = set().union(*(expected_keys(path, model_params(engine)) for path in fleet.values()))
        # The agents exit once the hub has receipted every result; their last status (offline, v2) follows.
        assert len(stored_keys(settings.db)) == len(expected)
        wait_for(lambda: _device_versions(engine) == {"dev-a": (2, c.OFFLINE), "dev-b": (2, c.OFFLINE)},
                 what="the agents' last status")
    finally:
        hub.stop()
    r = tables.results
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.device_id, r.c.seq, r.c.model_version).order_by(r.c.device_id, r.c.seq)).all()
    states = {d: v for d, (v, _) in _device_versions(engine).items()}
    assert {(d, s) for d, s, _ in rows} == expected and len(rows) == len(expected), "every window exactly once"
    for dev in fleet:
        versions = [v for d, _, v in rows if d == dev]
        assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), "v1 then v2, never back"
    assert states == {"dev-a": 2, "dev-b": 2}
    res = runner.invoke(hub_app, ["models", "--db", settings.db, "--json"])
    models = {m["version"]: m for m in orjson.loads(res.stdout)["models"]}
    assert models[2]["devices"] == 2 and models[1]["devices"] == 0 and models[2]["on_topic"]


def _classes(engine: sa.Engine) -> dict[str, int]:
    """Distinct ground-truth classes per device among the results that carry features."""
    r = tables.results.c
    with engine.connect() as conn:
        return {d: n for d, n in conn.execute(
            sa.select(r.device_id, sa.func.count(sa.distinct(r.truth)))
            .where(r.features.is_not(None), r.truth.is_not(None)).group_by(r.device_id))}


def test_gate_rejects_a_worse_model(tmp_path, train_log) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL)
    params = model_params(engine)
    # The fleet reports features with scrambled ground truth: a model learned from it must lose.
    ds = datasets.dataset_from_logs([str(train_log)], window_s=params.window_s, hop_s=params.hop_s,
                                     holdout=[], params=params)
    rng = np.random.default_rng(1)
    store = Store(engine)
    rows = [(dev, i, float(i), float(i) + 2, 1, "x", 0.5, None,
             str(rng.choice(["idle", "walk", "run", "lift"])) if dev != "trn-3" else str(y), 0.1,
             sessions.pack_features(x), time.time())
            for i, (x, y, dev) in enumerate(zip(ds.X, ds.y, ds.devices, strict=True))]
    with sessions.transaction(engine) as conn:
        store.insert_results(conn, rows)
    out = lifecycle.retrain(engine, holdout=["trn-3"], tolerance=0.0, config=SMALL)
    assert out.state == "rejected" and "fail" in out.gate
    with pytest.raises(lifecycle.LifecycleError, match="failed its gate"), engine.connect() as conn:
        rollout.pick(store, conn, "default", out.version, force=False)
    res = runner.invoke(hub_app, ["retrain", "--db", f"sqlite:///{tmp_path / 'hub.sqlite'}", "--holdout-devices",
                                  "trn-3"])
    assert res.exit_code == 4


def test_mirror_augmentation_doubles_training_windows_only(train_log) -> None:
    plain = datasets.dataset_from_logs([str(train_log)], window_s=2.0, hop_s=1.0, holdout=["trn-3"])
    mirrored = datasets.dataset_from_logs([str(train_log)], window_s=2.0, hop_s=1.0, holdout=["trn-3"],
                                           mirror=["ax", "wy"])
    n_train = int((plain.devices != "trn-3").sum())
    assert len(mirrored.y) == len(plain.y) + n_train
    assert (mirrored.devices == "trn-3").sum() == (plain.devices == "trn-3").sum()
    assert not np.allclose(mirrored.X[len(plain.y):], plain.X[plain.devices != "trn-3"])
    with pytest.raises(lifecycle.LifecycleError, match="unknown channels"):
        datasets.dataset_from_logs([str(train_log)], window_s=2.0, hop_s=1.0, holdout=[], mirror=["nope"])


def _device_versions(engine: sa.Engine) -> dict[str, tuple[int | None, str | None]]:
    with engine.connect() as conn:
        return {d: (v, st) for d, v, st in conn.execute(
            sa.select(tables.devices.c.device_id, tables.devices.c.model_version, tables.devices.c.state))}


@pytest.mark.parametrize(("candidate", "running", "tolerance", "ok"), [
    ({"accuracy": 0.9}, {"accuracy": 0.9}, 0.0, True),  # equal passes, at tolerance 0
    ({"accuracy": 0.8999}, {"accuracy": 0.9}, 0.0, False),
    ({"accuracy": 0.89}, {"accuracy": 0.9}, 0.02, True),
    ({"accuracy": 0.87}, {"accuracy": 0.9}, 0.02, False),
    ({"mae": 1.5}, {"mae": 1.5}, 0.0, True),  # regressors: lower error is better
    ({"mae": 1.6}, {"mae": 1.5}, 0.0, False),
    ({"mae": 1.4}, {"mae": 1.5}, 0.0, True),
])
def test_gate_passes_a_candidate_not_worse_than_the_running_version(candidate, running, tolerance, ok) -> None:
    assert lifecycle.passes_gate(candidate, running, tolerance) is ok


def test_a_window_of_numeric_labels_has_their_mean_as_its_target(tmp_path) -> None:
    # 4 readings a window, one window per 4 readings: the target of the first is the mean of
    # 24.26, 24.26, 24.27 and 28.38, not the majority (24.26)
    targets = [24.26, 24.26, 24.27, 28.38, 30.0, 30.0, 31.0, 33.0]
    log = tmp_path / "reg.csv"
    log.write_text("ts,device_id,x,label\n" + "".join(f"{i / 50:.2f},d,{i},{y}\n" for i, y in enumerate(targets)))
    params = PreprocessParams(sample_rate_hz=50.0, window_s=4 / 50, hop_s=4 / 50, channels=("x",))
    _, y, _, _ = datasets.windows_from_logs([str(log)], params)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, [np.mean(targets[:4]), np.mean(targets[4:])])
    mixed = tmp_path / "text.csv"
    mixed.write_text("ts,device_id,x,label\n0,d,1,walk\n")
    with pytest.raises(lifecycle.LifecycleError, match="labels are text"):
        datasets.windows_from_logs([str(log), str(mixed)], params)


def test_a_retrain_never_holds_out_a_device_that_shaped_the_version_it_starts_from() -> None:
    devices = ["a", "b", "c", "d", "e"]
    assert datasets.choose_holdout(devices, None) == ["e"]
    assert datasets.choose_holdout(devices, None, shaped={"d", "e"}, parent="v3") == ["c"]
    with pytest.raises(lifecycle.LifecycleError, match=r"hold-out devices \['e'\] shaped v3"):
        datasets.choose_holdout(devices, ["c", "e"], shaped={"d", "e"}, parent="v3")
    with pytest.raises(lifecycle.LifecycleError, match="every device with labelled windows .* shaped v3"):
        datasets.choose_holdout(devices, None, shaped=set(devices), parent="v3")


def test_fleet_features_of_another_length_are_left_out_and_said(tmp_path: Path, caplog) -> None:
    """A device sending features the model does not take (another length): its results were dropped from
    retraining without a word (a new user trained on 224 windows and never learned why not more)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.sqlite'}")
    pack = sessions.pack_features
    rows = [("good", i, float(i), i + 1.0, 1, "A", 0.9, None, "A", 1.0, pack([0.5, 1.0, 2.0]), 1.0) for i in range(4)]
    rows += [("odd", i, float(i), i + 1.0, 1, "A", 0.9, None, "B", 1.0, pack([0.5] * (i % 2 * 5)), 1.0)
             for i in range(3)]
    rows.append(("old", 0, 0.0, 1.0, 1, "A", 0.9, None, "A\x00", 1.0, pack([0.5, 1.0, 2.0]), 1.0))  # SQLite kept it
    with sessions.transaction(engine) as conn:
        Store(engine).insert_results(conn, rows)
    params = PreprocessParams(sample_rate_hz=50.0, window_s=2.0, hop_s=1.0, channels=("ax",))
    with caplog.at_level("WARNING", logger="cloud_hub.models.lifecycle"):
        ds = lifecycle.fleet_dataset(engine, params, 3)
    assert ds.devices.tolist() == ["good"] * 4
    assert ("left out 4 labelled results whose features are not 3 numbers or whose truth no label can be "
            "(odd: 3, old: 1)") in caplog.text, caplog.text
    engine.dispose()


def test_a_retrain_takes_only_its_own_models_fleet_features(tmp_path: Path) -> None:
    """Version numbers are each model's own: a retrain of `default` from its v1 took the labelled windows of
    every result at v1, another model's too (a second fleet's labels in the first's training data)."""
    from edge_agent import contract as c

    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.sqlite'}")
    pack = sessions.pack_features
    rows = [(dev, i, float(i), i + 1.0, 1, "A", 0.9, None, truth, 1.0, pack([0.5, 1.0, 2.0]), 1.0)
            for dev, truth in (("mine", "walk"), ("theirs", "kitchen"), ("silent", "run")) for i in range(4)]
    store = Store(engine)
    with sessions.transaction(engine) as conn:
        store.insert_results(conn, rows)
        store.apply_statuses(conn, {d: (c.Status(d, c.ONLINE, 1.0, name, 1, "a" * 64, 0), 1.0)
                                    for d, name in (("mine", "default"), ("theirs", "rooms"))})
    params = PreprocessParams(sample_rate_hz=50.0, window_s=2.0, hop_s=1.0, channels=("ax",))
    ds = lifecycle.fleet_dataset(engine, params, 3, versions=[1], name="default")
    assert sorted(set(ds.devices.tolist())) == ["mine", "silent"]  # a device that never said its model: kept
    assert set(ds.y.tolist()) == {"walk", "run"}
    assert sorted(set(lifecycle.fleet_dataset(engine, params, 3, versions=[1]).devices.tolist())) == \
        ["mine", "silent", "theirs"]
    engine.dispose()


def test_a_model_no_better_than_the_majority_class_is_said_and_not_published_by_default(tmp_path: Path) -> None:
    """A new operator's finding: `train` on shuffled labels printed "v4: publishable" (INT8 49.6 %, the majority
    class 59.5 %), and the README's plain `publish` shipped it to the whole fleet without a word."""
    from cloud_hub.rollout.publish import pick
    from tests.helpers import SMALL, make_log

    log = make_log(tmp_path / "good.csv", seconds=60)
    rows = log.read_text().splitlines()
    rng = np.random.default_rng(4)  # labels that no reading tells: in stretches of 3 s, "sit" 4 times in 5
    stretch = {k: "walk" if rng.random() < 0.2 else "sit" for k in range(100)}
    bad = [rows[0]] + [f"{r.rsplit(',', 1)[0]},{stretch[int(float(r.split(',', 1)[0]) // 3) % 100]}"
                       for r in rows[1:]]
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.sqlite'}")
    good = lifecycle.train_from_logs(engine, [str(log)], holdout=["dev-c"], config=SMALL)
    assert good.gate is None
    out = lifecycle.train_from_logs(engine, [str(tmp_path / "bad.csv")], holdout=["dev-c"], config=SMALL)
    assert out.gate is not None and "does no better than the majority class" in out.gate, out.gate
    assert (good.state, out.state) == ("publishable", "rejected")  # `cloud-hub models` says so; train exits 4
    store = Store(engine)
    with engine.connect() as conn:
        assert pick(store, conn, "default", None, force=False).version == good.version  # passed over
        with pytest.raises(lifecycle.LifecycleError, match=r"v2 failed its gate \(INT8 accuracy .* does no better "
                                                           r"than the majority class .*use --force"):
            pick(store, conn, "default", 2, force=False)
        assert pick(store, conn, "default", 2, force=True).version == 2
    with sessions.transaction(engine) as conn:
        store.set_model_state(conn, "default", 1, "rejected")
    with engine.connect() as conn, pytest.raises(lifecycle.LifecycleError,
                                                 match=r"no publishable version of model 'default': v2 is rejected "
                                                       r"\(INT8 accuracy .*\); `--version 2 --force` publishes it"):
        pick(store, conn, "default", None, force=False)
    with engine.connect() as conn, pytest.raises(lifecycle.LifecycleError,  # a canary rolled back: no gate text
                                                 match=r"v1 is rejected \(a canary rolled back: `cloud-hub rollout "
                                                       r"status` says why\); use --force"):
        pick(store, conn, "default", 1, force=False)
    engine.dispose()
    # equal is no better, unless both are perfect (a hold-out of one class that the model gets right)
    from cloud_hub.models.baselines import constant_check
    assert constant_check({"accuracy": 0.6}, {"majority": {"accuracy": 0.6}}) is not None
    assert constant_check({"accuracy": 1.0}, {"majority": {"accuracy": 1.0}}) is None
    err = lambda e: {"mean_error": e, "mae": e}  # noqa: E731 - one output: the MAE is the mean error
    assert constant_check(err(2.0), {"mean": err(2.1)}) is None
    assert constant_check(err(2.2), {"mean": err(2.1)}) is not None


def test_training_windows_of_readings_out_of_range_are_left_out_and_said(tmp_path: Path, caplog) -> None:
    """A running model's statistics (a retrain from logs, a round's hold-out) make a dead register's 4294967295 out
    of range: its windows' features are a row of NaN (edge_agent.preprocess.features.MAX_NORMALIZED), which the
    trainer would refuse with a traceback. They are left out and counted, with their labels, devices and starts."""
    from cloud_hub.models import datasets
    from tests.helpers import make_log

    log = make_log(tmp_path / "good.csv", seconds=60)
    rows = log.read_text().splitlines()
    hostile = [rows[0]] + [",".join([r.split(",")[0], r.split(",")[1], "4294967295", *r.split(",")[3:]])
                           if r.split(",")[1] == "dev-a" and 20.0 <= float(r.split(",")[0]) < 20.5 else r
                           for r in rows[1:]]
    (tmp_path / "register.csv").write_text("\n".join(hostile) + "\n")
    good = datasets.dataset_from_logs([str(log)], window_s=None, hop_s=None, holdout=["dev-c"])
    with caplog.at_level("WARNING"):
        got = datasets.dataset_from_logs([str(tmp_path / "register.csv")], window_s=None, hop_s=None,
                                         holdout=["dev-c"], params=good.params)
    said = [r.getMessage() for r in caplog.records if "standard deviations" in r.getMessage()]
    assert len(said) == 1 and "register.csv" in said[0], said
    n = int(said[0].split(": ")[1].split(" of ")[0])
    assert n >= 2 and len(got.y) == len(good.y) - n and np.isfinite(got.X).all()
    assert len(got.devices) == len(got.order) == len(got.y) and (got.devices == "dev-a").sum() == \
        (good.devices == "dev-a").sum() - n
    # a first training on it (its own statistics): the dead register is left out of them (FIT_ABSURD), so the real
    # readings keep their scale and its windows are out of range, left out and said as above (the review's catch)
    caplog.clear()
    with caplog.at_level("WARNING"):
        first = datasets.dataset_from_logs([str(tmp_path / "register.csv")], window_s=None, hop_s=None,
                                           holdout=["dev-c"])
    np.testing.assert_allclose(first.params.norm_std, good.params.norm_std, rtol=0.01)
    assert any("standard deviations" in r.getMessage() for r in caplog.records)
    assert len(first.y) == len(got.y) and np.isfinite(first.X).all()
    # the review's catch: a training copy's lost readings are NaN on purpose (the mean), not out of range
    copies = datasets.dataset_from_logs([str(log)], window_s=None, hop_s=None, holdout=["dev-c"], offset_copies=2)
    assert len(copies.y) == 3 * int((good.devices != "dev-c").sum()) + int((good.devices == "dev-c").sum())
    assert np.isfinite(copies.X).all()
