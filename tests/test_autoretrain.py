"""Retraining while serve runs: after N new labelled windows, gated, and published when configured."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from cloud_hub.data import db, sessions
from cloud_hub.data.store import Store
from cloud_hub.models import datasets, lifecycle
from cloud_hub.models.signing import keygen
from cloud_hub.rollout.autoretrain import AutoRetrainer
from cloud_hub.serve import serve
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent.mqtt import Message, MqttLink
from edge_agent.settings.broker import BrokerURL
from edge_agent.settings.loader import load_settings
from tests.helpers import SMALL, make_log, model_params


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory):
    log = make_log(tmp_path_factory.mktemp("ar") / "train.csv", devices=("a1", "a2", "a3"), seconds=60)
    return log


def _settings(tmp_path, **kw) -> HubSettings:
    return load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={},
                         flags={"db": f"sqlite:///{tmp_path / 'hub.sqlite'}", **kw})


def _report(engine, log, params, first_seq: int) -> int:
    """Insert the log's windows as if agents had reported them with features and ground truth."""
    ds = datasets.dataset_from_logs([str(log)], window_s=params.window_s, hop_s=params.hop_s, holdout=[],
                                     params=params)
    rows = [(dev, first_seq + i, float(i), float(i) + 2, 1, str(y), 0.9, None, str(y), 0.1,
             sessions.pack_features(x), time.time()) for i, (x, y, dev) in enumerate(zip(ds.X, ds.y, ds.devices, strict=True))]
    with sessions.transaction(engine) as conn:
        Store(engine).insert_results(conn, rows)
    return len(rows)


def test_retrains_after_n_new_labelled_windows(tmp_path, labelled) -> None:
    settings = _settings(tmp_path, retrain_every_n=100, retrain_tolerance=1.0)
    engine = db.make_engine(settings.db)
    lifecycle.train_from_logs(engine, [str(labelled)], holdout=["a3"], config=SMALL)
    params = model_params(engine)
    _report(engine, labelled, params, 0)  # reported before serve started: not counted
    auto = AutoRetrainer(settings, engine)
    assert auto.enabled and auto.new_labelled() == 0 and auto.check() is None
    n = _report(engine, labelled, params, 10**9)
    assert n >= 100 and auto.new_labelled() == n
    outcome = auto.check()
    assert outcome is not None and outcome.version == 2 and outcome.state == "publishable"
    assert auto.new_labelled() == 0 and auto.check() is None


def test_serve_retrains_and_publishes_when_configured(broker, prefix, tmp_path, labelled) -> None:
    priv, pub, _ = keygen(tmp_path / "k.pem")
    settings = _settings(tmp_path, broker=broker.url, prefix=prefix, retrain_every_n=50, retrain_tolerance=1.0,
                         auto_publish=True, signing_key=str(priv), client_id=f"{prefix}-hub")
    engine = db.make_engine(settings.db)
    lifecycle.train_from_logs(engine, [str(labelled)], holdout=["a3"], config=SMALL)
    models: queue.Queue[Message] = queue.Queue()
    watcher = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-w", on_message=models.put,
                       subscriptions=[(c.Topics(prefix).model("default"), 1)])
    watcher.start()
    watcher.wait_connected(10)
    stop = threading.Event()
    started = threading.Event()
    thread = threading.Thread(target=serve, args=(settings,), kwargs={"stop": stop,
                                                                       "on_started": lambda _h: started.set()})
    thread.start()
    try:
        assert started.wait(30)
        _report(engine, labelled, model_params(engine), 10**9)
        bundle = c.decode_bundle(models.get(timeout=90).payload)
        assert bundle.manifest.version == 2 and bundle.manifest.signature is not None
    finally:
        stop.set()
        thread.join(60)
        watcher.stop()


def test_auto_publish_while_a_canary_is_open_keeps_the_version_publishable_and_says_why(tmp_path, monkeypatch,
                                                                                      caplog) -> None:
    """A review's finding: publish's refusals while a canary is open (exit 2 now) must stay errors auto-publish
    catches: it raised out of check(), and serve logged a traceback instead of the line below."""
    import logging
    from types import SimpleNamespace

    from cloud_hub.settings import HubSettings
    from tests.helpers import SMALL, make_log

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=120)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    v2 = lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    with sessions.transaction(engine) as conn:
        Store(engine).add_rollout(conn, name="default", version=1, previous=None, cohort=["on-1"],
                                  min_results=5, tolerance=0.0, at=time.time())
    auto = AutoRetrainer(HubSettings(db=url, signing_key="/nonexistent.pem", auto_publish=True, retrain_every_n=1),
                         engine)
    monkeypatch.setattr(auto, "new_labelled", lambda: 1)
    monkeypatch.setattr(lifecycle, "retrain", lambda engine, name, tolerance: SimpleNamespace(
        version=v2.version, state="publishable", gate="pass"))
    with caplog.at_level(logging.WARNING):
        out = auto.check()
    assert out is not None and out.version == v2.version
    said = [r.getMessage() for r in caplog.records]
    assert any(f"v{v2.version} not published: a canary of default v1 is open" in m for m in said), said
    engine.dispose()
