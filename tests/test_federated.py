"""Federated rounds with real processes: `edge-agent run` devices following their own labelled logs,
`cloud-hub serve`, `cloud-hub federate`, a real mosquitto. Devices send INT8 deltas, never windows."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, sessions, tables
from cloud_hub.models import datasets, lifecycle
from cloud_hub.models.signing import keygen
from cloud_hub.rollout import publish as rollout
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract.round_frames import TensorSpec
from edge_agent.device import learn
from edge_agent.mqtt import BrokerURL, MqttLink
from edge_agent.preprocess import PreprocessParams, extract_features
from edge_agent.settings.loader import load_settings
from tests.helpers import SMALL, agent_cmd, make_log, wait_for
from tests.test_hub_cli import ServeProcess

DEVICES = ("fl-1", "fl-2", "fl-3")


def _devices(url: str) -> dict[str, int | None]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return {d: v for d, v in conn.execute(sa.select(tables.devices.c.device_id, tables.devices.c.model_version))}
    finally:
        engine.dispose()


def _query(url: str, stmt: sa.Executable) -> list[tuple]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(stmt)]
    finally:
        engine.dispose()


def _updates(url: str) -> list[tuple]:
    u = tables.fl_updates.c
    return _query(url, sa.select(u.round_id, u.device_id, u.status, u.reason, u.bytes).order_by(u.id))


class Fleet:
    """v1 trained and published signed, `serve` running, one `edge-agent run` per device following its log."""

    def __init__(self, procs, broker, prefix: str, tmp_path: Path, *, partial: tuple[str, ...] = (),
                 devices: tuple[str, ...] = DEVICES, agent_env: dict[str, str] | None = None) -> None:
        self.procs, self.broker, self.prefix, self.tmp, self.devices = procs, broker, prefix, tmp_path, devices
        self.priv, self.pub, _ = keygen(tmp_path / "keys" / "hub.pem")
        self.url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
        settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
            "broker": broker.url, "db": self.url, "prefix": prefix, "client_id": f"{prefix}-cli",
            "signing_key": str(self.priv)})
        engine = db.make_engine(self.url)
        train_log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=60)
        assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-2"], config=SMALL).version == 1
        rollout.publish(engine, settings)
        engine.dispose()
        self.hub = ServeProcess(procs, broker, self.url, prefix, tmp_path / "hub.log")
        self.hub.wait_started()
        self.logs: dict[str, Path] = {}
        self.rest: dict[str, list[str]] = {}
        self.killed: set[str] = set()  # agents a test SIGKILLed on purpose
        for i, dev in enumerate(devices):
            full = make_log(tmp_path / f"{dev}-all.csv", devices=(dev,), seconds=50, seed=10 + i).read_text()
            lines = full.splitlines(keepends=True)
            cut = 60 if dev in partial else len(lines)  # a second of readings: no window yet
            self.logs[dev] = tmp_path / f"{dev}.csv"
            self.logs[dev].write_text("".join(lines[:cut]))
            self.rest[dev] = lines[cut:]
        self.agents = {dev: procs.popen(
            agent_cmd("run", "--broker", broker.url, "--prefix", prefix, "--device-id", dev,
                      "--state-dir", str(tmp_path / dev), "--trusted-key", str(self.pub),
                      "--source", "follow", "--source-path", str(self.logs[dev])),
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{dev}.log", "wb"),  # noqa: SIM115 - closed by procs
            env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2", "EDGE_AGENT_STATUS_INTERVAL_S": "1",
                 **(agent_env or {})})
            for dev in devices}
        self.check(lambda: all(_devices(self.url).get(d) == 1 for d in devices), "every device on v1")

    def alive(self) -> None:
        for dev, p in self.agents.items():
            assert p.poll() is None or dev in self.killed, (self.tmp / f"{dev}.log").read_text()

    def check(self, cond, what: str, timeout: float = 120) -> None:
        def ok() -> bool:
            self.alive()
            return cond()
        wait_for(ok, timeout=timeout, what=what)

    def federate(self, *args: str, log: str = "federate.log") -> subprocess.Popen:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - the process owns it
        return self.procs.popen(
            [sys.executable, "-m", "cloud_hub", "federate", "--broker", self.broker.url, "--db", self.url,
             "--prefix", self.prefix, "--client-id", f"{self.prefix}-fed", "--signing-key", str(self.priv),
             "--min-available", str(len(self.devices)), "--min-windows", "16", "--epochs", "3", "--lr", "0.003", *args],
            stdout=out, stderr=out)

    def stop(self) -> None:
        for p in self.agents.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for dev, p in self.agents.items():
            assert p.wait(60) in (0, -signal.SIGKILL), (self.tmp / f"{dev}.log").read_text()
        self.hub.signal(signal.SIGTERM)


@pytest.mark.slow
def test_rounds_end_to_end_devices_learn_and_swap_to_the_aggregated_model(procs, broker, prefix, tmp_path) -> None:
    fleet = Fleet(procs, broker, prefix, tmp_path)
    # no hold-out log: each round's candidate is gated by the devices' own evaluation (tolerance: any score)
    fed = fleet.federate("--rounds", "2", "--deadline", "120", "--tolerance", "1", "--json")
    assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    out = (tmp_path / "federate.log").read_text()
    views = orjson.loads(out.strip().splitlines()[-1])["rounds"]
    assert [(v["round"], v["state"], v["new_version"], v["accepted"], v["refused"]) for v in views] == [
        (1, "published", 2, 3, 0), (2, "published", 3, 3, 0)], out
    for v in views:
        assert sorted(v["participants"]) == list(DEVICES)
        assert 0.0 <= v["device_metric_before"] <= 1.0 and 0.0 <= v["device_metric_after"] <= 1.0
    # every device verified, swapped and reports the version of the second round
    fleet.check(lambda: all(_devices(fleet.url).get(d) == 3 for d in DEVICES), "every device on v3")
    updates = _updates(fleet.url)
    assert sorted((r, d, s) for r, d, s, _, _ in updates) == sorted(
        (r, d, s) for r in (1, 2) for d in DEVICES for s in ("accepted", "evaluated"))
    m = tables.models.c
    rows = _query(fleet.url, sa.select(m.version, m.state, m.manifest).order_by(m.version))
    assert [(v, s) for v, s, _ in rows] == [(1, "published"), (2, "published"), (3, "published")]
    manifest = orjson.loads(rows[2][2])
    assert manifest["training"]["source"] == "federated" and manifest["training"]["parent_version"] == 2
    assert "in the devices' own evaluation" in manifest["metrics"]["gate"], manifest["metrics"]["gate"]
    assert manifest["metrics"]["evaluated_on"].startswith("federated evaluation")
    assert manifest["metrics"]["gate"].startswith("v3 INT8 "), manifest["metrics"]["gate"]  # the model that ships
    for key in ("int8", "baseline_int8", "fp32", "baseline_fp32"):
        assert 0 <= manifest["metrics"][key]["accuracy"] <= 1 and manifest["metrics"][key]["n"] > 0, key
    assert manifest["training"]["devices"] == list(DEVICES)
    assert manifest["training"]["shaped_by"] == [*DEVICES, "trn-1"]  # v1's training device and both rounds'
    assert all(v["device_fp32_before"] is not None and v["device_fp32_after"] is not None for v in views)
    # the devices' own windows stayed home: the hub holds no feature vector of them
    r = tables.results.c
    assert _query(fleet.url, sa.select(sa.func.count()).where(r.features.is_not(None))) == [(0,)]
    assert _query(fleet.url, sa.select(sa.func.count()).where(r.device_id.in_(DEVICES), r.model_version == 1))[0][0] > 0
    fleet.stop()


@pytest.mark.slow
def test_a_hub_killed_mid_round_resumes_it_and_loses_no_update(procs, broker, prefix, tmp_path) -> None:
    fleet = Fleet(procs, broker, prefix, tmp_path, partial=("fl-3",))
    # its gate is part of the round: the run that resumes it is not told again, and still applies it
    fed = fleet.federate("--rounds", "1", "--deadline", "300", "--holdout-log", str(tmp_path / "train.csv"),
                         "--tolerance", "1")
    u = tables.fl_updates.c
    fleet.check(lambda: len(_query(fleet.url, sa.select(u.id).where(u.status == "accepted"))) == 2,
                "the updates of fl-1 and fl-2", timeout=180)
    fed.kill()  # SIGKILL mid-round: fl-3 has not answered yet (too few labelled windows)
    fed.wait(30)
    # fl-3 gets the rest of its log and answers while no hub listens: the broker keeps the update
    with open(fleet.logs["fl-3"], "a") as f:
        f.writelines(fleet.rest["fl-3"])
    fleet.check(lambda: "sent" in (tmp_path / "fl-3.log").read_text(), "fl-3's update", timeout=180)
    again = fleet.federate("--rounds", "1", "--deadline", "300", log="federate2.log")
    assert again.wait(300) == 0, (tmp_path / "federate2.log").read_text()
    log2 = (tmp_path / "federate2.log").read_text()
    assert "round 1: resuming (open, base v1)" in log2, log2
    assert "round 1: waiting for 3 update(s) from fl-1, fl-2, fl-3, until its deadline in " in log2, log2
    rows = _updates(fleet.url)
    assert sorted((r, d, s) for r, d, s, _, _ in rows) == [(1, d, "accepted") for d in DEVICES], rows
    fr = tables.fl_rounds.c
    assert _query(fleet.url, sa.select(fr.id, fr.state, fr.new_version)) == [(1, "published", 2)]
    manifest = orjson.loads(_query(fleet.url, sa.select(tables.models.c.manifest).where(tables.models.c.version == 2))[0][0])
    assert manifest["training"]["devices"] == list(DEVICES) and manifest["training"]["updates"] == 3
    assert "on the hold-out logs" in manifest["metrics"]["gate"] and "tolerance 1" in manifest["metrics"]["gate"]
    assert "accuracy" in manifest["metrics"]["int8"]
    fleet.check(lambda: all(_devices(fleet.url).get(d) == 2 for d in DEVICES), "every device on v2")
    fleet.stop()


class FakeDevices:
    """The test speaks for devices itself: statuses, and updates crafted good or bad."""

    def __init__(self, broker, prefix: str, names: tuple[str, ...]) -> None:
        self.topics = c.Topics(prefix)
        self.names = names
        self.announcements: queue.Queue[bytes] = queue.Queue()
        self.link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-fakes", subscriptions=[
            (self.topics.rounds("default"), 1)], on_message=lambda m: m.payload and self.announcements.put(m.payload))
        self.link.start()
        self.link.wait_connected(10)

    def report(self, url: str, version: int) -> None:
        m = tables.models.c
        sha = _query(url, sa.select(m.sha256).where(m.version == version))[0][0]
        for d in self.names:
            self.link.publish(self.topics.status(d), c.Status(d, c.ONLINE, time.time(), "default", version, sha).encode(),
                              c.STATUS_DELIVERY)

    def next_round(self, round_id: int) -> cr.Announcement:
        while True:
            ann = cr.decode_announcement(self.announcements.get(timeout=120))
            if ann.plan.round_id == round_id:
                return ann

    def send(self, device: str, payload: bytes) -> None:
        self.link.publish(self.topics.update(device), payload, cu.UPDATE_DELIVERY)


def _update(ann: cr.Announcement, device: str, X: np.ndarray, *, scale: float = 1e-3, encoding: str = "int8",
            base: int | None = None, drop: str | None = None, nan: bool = False, seed: int = 0,
            force_scale: float | None = None, **over) -> bytes:
    p = ann.plan
    rng = np.random.default_rng(seed)
    delta = {k: (rng.normal(0, scale, ann.weights[k].shape)).astype(np.float32) for k in p.trainable if k != drop}
    if nan:
        delta[p.trainable[0]].flat[0] = np.nan
    if nan:  # a device that sends what our encoder refuses
        specs, arrays = tuple(TensorSpec(k, v.shape) for k, v in delta.items()), delta
    else:
        specs, arrays = cu.encode_update_delta(delta, encoding)
    if force_scale is not None:  # int8 values times a scale that overflows float32
        specs = tuple(dataclasses.replace(t, scale=force_scale) for t in specs)
    fields = dict(round_id=p.round_id, device_id=device, model=p.model, base_version=base or p.base_version,
                  n_examples=50, loss_before=1.0, loss_after=0.5, metric_before=0.5, metric_after=0.7, norm=0.1,
                  epochs=1, seconds=0.1, ranges=tuple(tuple(r) for r in learn.activation_ranges(ann.weights, X)),
                  encoding=encoding, tensors=specs, delta=arrays, sent=time.time())
    fields.update(over)
    return cu.Update(**fields).encode()


def _fake_fleet(procs, broker, prefix: str, tmp_path: Path, names: tuple[str, ...]):
    """v1 trained, `serve` running, and devices the test speaks for, reported on v1; with feature rows
    of the training log (for the activation ranges of crafted updates)."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    train_log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-2"], config=SMALL).version == 1
    params = PreprocessParams.from_dict(orjson.loads(_query(url, sa.select(tables.models.c.manifest))[0][0])["preprocess"])
    data, *_ = datasets.windows_from_logs([str(train_log)], params)
    engine.dispose()
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    fakes = FakeDevices(broker, prefix, names)
    fakes.report(url, 1)
    wait_for(lambda: all(_devices(url).get(d) == 1 for d in fakes.names), what="the fake devices on v1")
    return url, train_log, extract_features(data, params), hub, fakes


@pytest.mark.slow
def test_bad_updates_are_refused_with_their_reason_and_the_rounds_go_on(procs, broker, prefix, tmp_path) -> None:
    priv, _, _ = keygen(tmp_path / "keys" / "hub.pem")
    url, train_log, X, hub, fakes = _fake_fleet(procs, broker, prefix, tmp_path, ("fk-1", "fk-2", "fk-3", "fk-4"))
    out = open(tmp_path / "federate.log", "ab")  # noqa: SIM115 - the process owns it
    fed = procs.popen([sys.executable, "-m", "cloud_hub", "federate", "--broker", broker.url, "--db", url, "--prefix",
                       prefix, "--client-id", f"{prefix}-fed", "--signing-key", str(priv), "--rounds", "2",
                       "--fraction", "0.75", "--min-available", "4", "--min-updates", "2", "--deadline", "120",
                       "--max-staleness", "0", "--clip", "1.0", "--holdout-log", str(train_log), "--tolerance", "1"],
                      stdout=out, stderr=out)
    ann = fakes.next_round(1)
    p1, p2, p3 = ann.plan.participants
    (outsider,) = set(fakes.names) - set(ann.plan.participants)
    good = _update(ann, p1, X)
    bad = {
        "malformed: not a update (bad magic)": (p1, b"not an update"),
        "base version v7, round 1 trains v1": (p1, _update(ann, p1, X, base=7)),
        "wrong shape": (p1, _update(ann, p1, X, drop=ann.plan.trainable[0])),
        "malformed: update delta holds NaN or inf": (p1, _update(ann, p1, X, encoding="float32", nan=True)),
        "NaN or inf in the delta or the ranges": (p1, _update(ann, p1, X, force_scale=1e38)),
        "far above the clip 1": (p1, _update(ann, p1, X, scale=1.0)),
        "activation ranges of 1 layers": (p1, _update(ann, p1, X, ranges=((0.0, 1.0, 0.0, 1.0),))),
        "an accuracy outside [0, 1]": (p1, _update(ann, p1, X, metric_after=7.0)),
        f"{outsider} was not selected for round 1": (outsider, _update(ann, outsider, X)),
    }
    for device, payload in bad.values():
        fakes.send(device, payload)
    fakes.send(p1, good)
    fakes.send(p1, _update(ann, p1, X, seed=1))  # a second, different one
    fakes.send(p1, good)  # the same again, as a broker's redelivery: counted once, not refused
    fakes.send(p2, _update(ann, p2, X, seed=2))  # the second update closes the round
    wait_for(lambda: _query(url, sa.select(tables.fl_rounds.c.state).where(tables.fl_rounds.c.id == 1)) == [("published",)],
             timeout=120, what="round 1 published")
    # round 2 starts once the devices report v2; an answer to round 1 is now after its deadline
    fakes.report(url, 2)
    ann2 = fakes.next_round(2)
    q1, q2 = ann2.plan.participants[:2]
    fakes.send(p3, _update(ann, p3, X))
    fakes.send(q1, _update(ann2, q1, X))
    fakes.send(q2, _update(ann2, q2, X))
    assert fed.wait(120) == 0, (tmp_path / "federate.log").read_text()
    fakes.link.stop()
    rows = _updates(url)
    refused = [(r, d, reason) for r, d, s, reason, _ in rows if s == "refused"]
    for why, (device, _) in bad.items():
        assert any(r == 1 and d == device and why in reason for r, d, reason in refused), (why, refused)
    assert any(r == 1 and d == p1 and "a second update for round 1" in reason for r, d, reason in refused), refused
    assert any(r == 2 and d == p3 and "after the deadline of round 1" in reason for r, d, reason in refused), refused
    assert len(refused) == len(bad) + 2, refused
    assert sorted((r, d) for r, d, s, _, _ in rows if s == "accepted") == sorted([(1, p1), (1, p2), (2, q1), (2, q2)])
    letters = _query(url, sa.select(tables.dead_letters.c.reason))
    assert sum("update" in r for (r,) in letters) == 2, letters  # the two malformed ones
    fr = tables.fl_rounds.c
    assert _query(url, sa.select(fr.id, fr.state, fr.new_version).order_by(fr.id)) == [(1, "published", 2),
                                                                                        (2, "published", 3)]
    res = CliRunner().invoke(hub_app, ["rounds", "--db", url])
    assert res.exit_code == 0, res.output
    assert "refused 1: a second update for round 1" in res.stdout.replace("\n", " ")
    hub.signal(signal.SIGTERM)


# --------------------------------------------------------------------------- the device's side, in process


def _plan_and_weights(**over) -> tuple[cr.RoundPlan, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    weights = {"scaler_mean": np.zeros(4, np.float32), "scaler_scale": np.ones(4, np.float32),
               "coef_0": rng.normal(0, 0.5, (4, 8)).astype(np.float32), "intercept_0": np.zeros(8, np.float32),
               "coef_1": rng.normal(0, 0.5, (8, 2)).astype(np.float32), "intercept_1": np.zeros(2, np.float32)}
    fields = dict(round_id=1, model="default", base_version=1, base_sha256="a" * 64, task="classification",
                  participants=("me",), deadline=time.time() + 60, min_windows=10,
                  trainable=("coef_0", "intercept_0", "coef_1", "intercept_1"))
    fields.update(over)
    return cr.RoundPlan(**fields), weights


def test_the_window_store_keeps_the_newest_labelled_windows_on_disk(tmp_path) -> None:
    from edge_agent.device.learner import WindowStore

    store = WindowStore(tmp_path / "w.npz", capacity=5)
    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    store.add("L1", feats, ["a", None, "b", ""], np.arange(4.0))  # unlabelled windows are not kept
    store.add("L1", feats + 100, ["c", "d", "e", "f"], np.arange(4.0) + 10)
    assert store.y == ["b", "c", "d", "e", "f"] and store.X.shape == (5, 3) and store.new == 5
    assert store.X[0].tolist() == [6.0, 7.0, 8.0] and store.t.tolist() == [2.0, 10.0, 11.0, 12.0, 13.0]
    store.save()
    again = WindowStore(tmp_path / "w.npz", capacity=5)
    assert again.y == store.y and np.array_equal(again.X, store.X) and again.layout == "L1"
    assert np.array_equal(again.t, store.t)
    again.add("L1", feats + 100, ["c", "d", "e", "f"], np.arange(4.0) + 10)  # a followed log read again
    assert again.y == store.y and again.new == store.new, "windows seen before are kept once"
    again.add("L2", np.ones((1, 2), np.float32), ["z"], np.zeros(1))  # other preprocessing: start again
    assert again.y == ["z"] and again.X.shape == (1, 2)
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    assert WindowStore(tmp_path / "torn.npz", capacity=5).y == []  # a torn file: an empty store, not a crash



def test_the_learner_answers_only_a_round_it_can_and_was_asked_to(tmp_path) -> None:
    from cloud_hub.models.signing import load_private_key, sign_round
    from edge_agent.device.bundle import load_public_key
    from edge_agent.device.learner import Learner, held_out

    priv, pub, _ = keygen(tmp_path / "k.pem")
    other, _, _ = keygen(tmp_path / "other.pem")
    sent: list[tuple[str, bytes]] = []
    manifest = type("M", (), {"version": 1, "sha256": "a" * 64, "labels": ("x", "y")})
    running = type("B", (), {"manifest": manifest})
    learner = Learner(device_id="me", state_dir=tmp_path, model_name="default", capacity=100,
                      trusted_key=load_public_key(pub), allow_unsigned=False, running=lambda: running,  # type: ignore[arg-type,return-value]
                      publish=lambda t, p, _e=None: sent.append((t, p)), topic="t/devices/me/update")

    def offer(plan: cr.RoundPlan, weights, key=priv) -> str | None:
        ann = cr.announcement(plan, weights)
        signed = cr.Announcement(sign_round(ann.plan, load_private_key(key)), ann.weights) if key else ann
        why, got = learner._check(signed.encode())
        return why if got is None else "ok"

    plan, w = _plan_and_weights()
    assert "unsigned" in offer(plan, w, key=None)
    assert "not the trusted key" in offer(plan, w, key=other)
    assert "not selected" in offer(_plan_and_weights(participants=("someone",))[0], w)
    assert "this device runs v1: not answering" in offer(_plan_and_weights(base_version=2)[0], w)
    assert "deadline has passed" in offer(_plan_and_weights(deadline=time.time() - 1)[0], w)
    assert "0 labelled windows" in offer(plan, w)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 4)).astype(np.float32)
    starts = np.arange(40) * 15.0  # four windows a minute for ten minutes: minutes 0 and 5 are held out
    learner.on_windows("L", X, ["x" if v > 0 else "y" for v in X[:, 0]], starts)
    assert offer(plan, w) == "ok"
    ann = cr.announcement(plan, w)
    learner.offer(cr.Announcement(sign_round(ann.plan, load_private_key(priv)), ann.weights).encode())
    learner.tick()
    learner.close()
    assert len(sent) == 1 and sent[0][0] == "t/devices/me/update"
    update = cu.decode_update(sent[0][1], "me")
    held = held_out(starts)
    assert held.sum() == 8 and update.n_examples == 32  # held-out windows are never trained on
    assert update.round_id == 1 and update.metric_after >= update.metric_before
    assert {t.name for t in update.tensors} == set(plan.trainable) and update.encoding == "int8"
    assert len(update.ranges) == 2
    learner.offer(cr.Announcement(sign_round(ann.plan, load_private_key(priv)), ann.weights).encode())
    learner.tick()
    learner.close()
    assert len(sent) == 1, "a round is answered once"
    # the hub then asks it to evaluate the round's candidate: both models scored on the held-out windows
    ev, _ = _plan_and_weights(kind="evaluate", trainable=())
    candidate = {k: v + np.float32(0.01) if k.startswith("coef") else v for k, v in w.items()}
    ann = cr.announcement(ev, candidate)
    learner.offer(cr.Announcement(sign_round(ann.plan, load_private_key(priv)), ann.weights).encode())
    learner.tick()
    learner.close()
    assert len(sent) == 2
    answer = cu.decode_update(sent[1][1], "me")
    assert answer.kind == "evaluate" and answer.tensors == () and answer.n_examples == held.sum()
    truth = (X[held, 0] <= 0).astype(int)  # scored here through the ONNX-equivalent forward pass, independently
    assert answer.metric_before == pytest.approx(np.mean(learn.predict(w, "classification", X[held]).argmax(1) == truth))
    assert answer.metric_after == pytest.approx(np.mean(learn.predict(candidate, "classification",
                                                                      X[held]).argmax(1) == truth))
    assert Learner(device_id="me", state_dir=tmp_path, model_name="default", capacity=100, trusted_key=None,
                   allow_unsigned=True, running=lambda: None, publish=lambda t, p, _e=None: None,
                   topic="x").answered == ["1/train", "1/evaluate"]


@pytest.mark.slow
def test_a_device_that_never_answers_stalls_nothing_past_the_deadline(procs, broker, prefix, tmp_path) -> None:
    url, train_log, X, hub, fakes = _fake_fleet(procs, broker, prefix, tmp_path, ("ok-1", "silent-1"))
    out = open(tmp_path / "federate.log", "ab")  # noqa: SIM115 - the process owns it
    fed = procs.popen([sys.executable, "-m", "cloud_hub", "federate", "--broker", broker.url, "--db", url, "--prefix",
                       prefix, "--client-id", f"{prefix}-fed", "--insecure-unsigned", "--rounds", "1",
                       "--min-available", "2", "--deadline", "4", "--holdout-log", str(train_log), "--tolerance", "1"],
                      stdout=out, stderr=out)
    ann = fakes.next_round(1)
    assert ann.plan.participants == ("ok-1", "silent-1") and ann.plan.min_updates == 2
    fakes.send("ok-1", _update(ann, "ok-1", X))  # silent-1 never answers
    assert fed.wait(120) == 0, (tmp_path / "federate.log").read_text()
    fakes.link.stop()
    log = (tmp_path / "federate.log").read_text()
    assert "round 1: closed, 1 update(s) counted at the deadline; no update from silent-1" in log, log
    fr = tables.fl_rounds.c
    assert _query(url, sa.select(fr.state, fr.new_version)) == [("published", 2)]
    assert [(d, s) for _, d, s, _, _ in _updates(url)] == [("ok-1", "accepted")]
    hub.signal(signal.SIGTERM)


def test_held_out_windows_are_whole_minutes_or_the_latest_fifth_of_a_short_recording() -> None:
    from edge_agent.device.learner import held_out

    long = np.arange(0.0, 600.0, 0.5)  # ten minutes of windows every 0.5 s
    held = held_out(long)
    assert set(np.floor(long[held] / 60).astype(int).tolist()) == {0, 5}  # whole minutes: neighbours stay out too
    assert np.array_equal(held_out(long[::-1]), held[::-1]), "chosen by time, not by position in the store"
    short = np.arange(0.0, 50.0, 0.5)  # less than a minute: the latest fifth
    assert held_out(short).sum() == 20 and held_out(short)[-20:].all()
    assert not held_out(np.arange(3.0)).any()  # too few to hold any out


def test_judge_counts_one_update_per_device_and_round_and_names_the_real_fault() -> None:
    from cloud_hub.rounds.judge import judge_update
    from cloud_hub.rounds.store import RoundRow

    plan, w = _plan_and_weights(participants=("a", "b"))
    header = cr.announcement(plan, w).plan.header() | {"max_staleness": 1}
    r1 = RoundRow(1, "default", 1, "closed", ("a", "b"), header, 0.0, 1.0, None, None, {}, None)
    r2 = RoundRow(2, "default", 1, "open", ("a", "b"), header | {"round": 2}, 0.0, 1.0, None, None, {}, None)
    rows = {1: r1, 2: r2}
    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    ann1 = cr.announcement(plan, w)
    ann2 = cr.announcement(dataclasses.replace(plan, round_id=2), w)
    counted: dict[tuple[str, int], str] = {}

    def since(model: str, after: int, upto: int) -> int:
        return sum(1 for i, r in rows.items() if r.model_name == model and after < i <= upto)

    def verdict(payload: bytes, device: str = "a", current: RoundRow = r2):
        import hashlib

        v = judge_update(payload, device, current=current, rounds=rows.get, prior=lambda d, i: counted.get((d, i)),
                  digest=hashlib.sha256(payload).hexdigest(), refuse_factor=3.0, rounds_since=since)
        if v.status in ("accepted", "late"):
            counted[(device, v.update.round_id)] = hashlib.sha256(payload).hexdigest()
        return v.status, v.reason

    late, fresh = _update(ann1, "a", X), _update(ann2, "a", X)
    assert verdict(late) == ("late", None)  # its answer to round 1, counted in round 2 at a lower weight
    assert verdict(fresh) == ("accepted", None)  # and its answer to round 2: both count
    assert verdict(_update(ann2, "b", X, base=7), device="b") == ("refused", "base version v7, round 2 trains v1")
    assert verdict(late) == ("duplicate", None)  # a redelivery: counted once
    assert verdict(_update(ann1, "a", X, seed=5)) == ("refused", "a second update for round 1")
    status, reason = verdict(_update(ann2, "a", X, model="other"))
    assert status == "refused" and "model 'other'" in reason, reason  # not "a second update"
    # Rounds of another model in between: they neither make an answer later nor take it in.
    rows[3] = RoundRow(3, "other", 1, "closed", ("a", "b"), header | {"round": 3}, 0.0, 1.0, None, None, {}, None)
    rows[4] = RoundRow(4, "default", 1, "open", ("a", "b"), header | {"round": 4}, 0.0, 1.0, None, None, {}, None)
    assert verdict(_update(ann2, "b", X), device="b", current=rows[4]) == ("late", None)  # one round of its model late
    status, reason = verdict(_update(ann2, "b", X, seed=7), device="b", current=rows[3])
    assert status == "refused" and "trains 'other'" in reason, reason  # never averaged into another model


def test_lateness_counts_the_rounds_of_the_same_model_only(tmp_path) -> None:
    from cloud_hub.rounds.store import RoundStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    store = RoundStore()
    with sessions.transaction(engine) as conn:
        for i, name in enumerate(("default", "other", "other", "default", "default"), 1):
            store.add_round(conn, round_id=i, name=name, base_version=1, participants=["a"], plan={},
                            announcement=b"", opened_at=0.0, deadline=1.0)
    with engine.connect() as conn:
        assert store.rounds_since(conn, "default", 1, 4) == 1  # rounds 2 and 3 trained another model
        assert store.rounds_since(conn, "default", 1, 5) == 2 and store.rounds_since(conn, "other", 2, 5) == 1
        assert store.rounds_since(conn, "default", 4, 4) == 0
    engine.dispose()


def test_a_round_whose_version_was_registered_before_a_crash_is_finished_with_it(tmp_path) -> None:
    """The coordinator stopped between registering the round's version and recording the round: the next
    run finishes the round with that version instead of making a second one."""
    from cloud_hub.data.store import Store
    from cloud_hub.models import weights
    from cloud_hub.rounds import fedavg
    from cloud_hub.rounds.finish import finish
    from cloud_hub.rounds.store import RoundStore

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    store = Store(engine)
    with engine.connect() as conn:
        v1 = store.get_model(conn, "default", 1)
        tensors = fedavg.mlp_tensors(weights.from_bytes(store.get_weights(conn, "default", 1)))
    plan = cr.RoundPlan(1, "default", 1, v1.sha256, "classification", ("a",), time.time() + 60,
                        trainable=("coef_1", "intercept_1"))
    header = cr.announcement(plan, tensors).plan.header()
    specs, arrays = cu.encode_update_delta({k: np.zeros_like(tensors[k]) for k in plan.trainable}, "int8")
    payload = cu.Update(1, "a", "default", 1, 10, 1.0, 1.0, 0.5, 0.5, 0.0, 1, 0.1,
                        ((0.0, 1.0, 0.0, 1.0), (0.0, 1.0, 0.0, 1.0)), "int8", specs, arrays).encode()
    with sessions.transaction(engine) as conn:
        RoundStore().add_round(conn, round_id=1, name="default", base_version=1, participants=["a"], plan=header,
                               announcement=b"x", opened_at=time.time(), deadline=time.time())
        store.add_model(conn, name="default", version=2, sha256="b" * 64, created=time.time(), state="rejected",
                        manifest={**v1.manifest, "version": 2, "training": {"source": "federated", "round": 1}},
                        metrics={"gate": "v2 failed its gate"})
        RoundStore().set_round(conn, 1, state="closed", expect=("open",), closed_at=time.time())
    with engine.connect() as conn:
        round_row = RoundStore().rounds(conn, "default")[0]

    def no_evaluation(_tensors):
        raise AssertionError("the round's version exists: nothing is aggregated or evaluated again")

    state, version, _, reason = finish(engine, None, round_row, [("a", 0, payload)], signing_key=None,  # type: ignore[arg-type]
                                       allow_unsigned=True, evaluate=no_evaluation)
    assert (state, version, reason) == ("rejected", 2, "v2 failed its gate")
    with engine.connect() as conn:
        assert [m.version for m in store.list_models(conn, "default")] == [1, 2], "no second version was made"
    engine.dispose()


# --------------------------------------------------------------------------- a round closed in process


def _closed_round(engine: sa.Engine, participants: tuple[str, ...], **plan_extra) -> tuple[object, dict]:
    """Round 1 on v1 (already registered), closed, its plan the coordinator's with ``plan_extra``."""
    from cloud_hub.data.store import Store
    from cloud_hub.models import weights
    from cloud_hub.rounds import fedavg
    from cloud_hub.rounds.store import RoundStore

    with engine.connect() as conn:
        v1 = Store(engine).get_model(conn, "default", 1)
        tensors = fedavg.mlp_tensors(weights.from_bytes(Store(engine).get_weights(conn, "default", 1)))
    plan = cr.RoundPlan(1, "default", 1, v1.sha256, "classification", participants, time.time() + 60,
                        trainable=("coef_1", "intercept_1"))
    header = cr.announcement(plan, tensors).plan.header() | plan_extra
    with sessions.transaction(engine) as conn:
        RoundStore().add_round(conn, round_id=1, name="default", base_version=1, participants=list(participants),
                               plan=header, announcement=b"x", opened_at=time.time(), deadline=time.time())
        RoundStore().set_round(conn, 1, state="closed", expect=("open",), closed_at=time.time())
    with engine.connect() as conn:
        return RoundStore().rounds(conn, "default")[0], tensors


def _zero_update(device: str, tensors: dict, *, round_id: int = 1, n: int = 10, value: float = 0.0) -> bytes:
    """An update whose delta is ``value`` in every trained weight (exact in INT8: one step of its scale)."""
    specs, arrays = cu.encode_update_delta({k: np.full_like(tensors[k], value) for k in ("coef_1", "intercept_1")},
                                           "int8")
    return cu.Update(round_id, device, "default", 1, n, 1.0, 1.0, 0.5, 0.5, 0.0, 1, 0.1,
                     ((0.0, 1.0, 0.0, 1.0), (0.0, 1.0, 0.0, 1.0)), "int8", specs, arrays).encode()


def test_no_device_that_shaped_a_version_counts_as_held_out_for_it(tmp_path) -> None:
    """v1 trained on dev-a (dev-c held out), federated with dev-b into v2; results of v2 from all three:
    only dev-c's are held out (the manifest copies the base's train_devices; the round's are not in them)."""
    from cloud_hub.data.aggregate import fleet_stats
    from cloud_hub.data.store import Store
    from cloud_hub.rounds.finish import finish

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    log = make_log(tmp_path / "train.csv", devices=("dev-a", "dev-c"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["dev-c"], config=SMALL)
    held_log = make_log(tmp_path / "held.csv", devices=("dev-c",), seconds=20, seed=3)
    # a gate no model passes (tolerance -1): the version is registered, never published
    r, tensors = _closed_round(engine, ("dev-b",), tolerance=-1.0, holdout_logs=[str(held_log)])
    state, version, _, _ = finish(engine, None, r, [("dev-b", 0, _zero_update("dev-b", tensors))],  # type: ignore[arg-type]
                                  signing_key=None, allow_unsigned=True, evaluate=lambda *_: None)
    assert (state, version) == ("rejected", 2)
    rows = [(dev, seq, float(seq), float(seq) + 2, 2, "walk", 0.9, None, truth, 1.0, None, time.time())
            for dev in ("dev-a", "dev-b", "dev-c") for seq, truth in enumerate(("walk", "run", "walk"))]
    with sessions.transaction(engine) as conn:
        Store(engine).insert_results(conn, rows)
    with engine.connect() as conn:
        v2 = fleet_stats(conn).versions[2]
    assert v2.train_devices == ("dev-a", "dev-b")
    assert (v2.summary.results, v2.held_out.results, v2.held_out.labelled) == (9, 3, 3)  # dev-c's only
    assert v2.held_out.accuracy == pytest.approx(2 / 3)
    engine.dispose()


def test_a_late_update_is_averaged_in_at_its_staleness_weight(tmp_path) -> None:
    """Two updates of the same size, one fresh and one a round late: the new master is the base plus their
    deltas weighted 1 and 1/sqrt(2) (FedBuff), not their plain mean."""
    from cloud_hub.data.store import Store
    from cloud_hub.models import weights
    from cloud_hub.rounds import fedavg
    from cloud_hub.rounds.finish import finish

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    r, tensors = _closed_round(engine, ("a", "b"), tolerance=-1.0, holdout_logs=[str(log)])
    counted = [("a", 0, _zero_update("a", tensors, n=40, value=0.01)),
               ("b", 1, _zero_update("b", tensors, n=40, value=-0.01))]  # answered the round before: 1 late
    state, version, _, _ = finish(engine, None, r, counted, signing_key=None, allow_unsigned=True,  # type: ignore[arg-type]
                                  evaluate=lambda *_: None)
    assert (state, version) == ("rejected", 2)
    with engine.connect() as conn:
        got = fedavg.mlp_tensors(weights.from_bytes(Store(engine).get_weights(conn, "default", 2)))
    w = 1 / np.sqrt(2)
    step = 0.01 * (1 - w) / (1 + w)  # (40 * 0.01 + 40 w * -0.01) / (40 + 40 w)
    for name in ("coef_1", "intercept_1"):
        np.testing.assert_allclose(got[name], tensors[name] + np.float32(step), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["coef_0"], tensors["coef_0"])  # not trained in the round
    engine.dispose()


def test_the_devices_judge_the_int8_model_that_ships_and_the_gate_decides_on_it(tmp_path) -> None:
    """A real learner trains in round 1, then evaluates its candidate: the INT8 model in the evaluate
    announcement is the one the hub registers, and the device's INT8 scores are those of the registered
    bundle and of the running v1, run through onnxruntime here on the same held-out windows."""
    from cloud_hub.data.store import Store
    from cloud_hub.rounds import fedavg
    from cloud_hub.rounds.finish import finish
    from cloud_hub.rounds.judge import answer_metrics
    from edge_agent.device.learner import Learner, held_out
    from edge_agent.runner import ModelRunner

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    with engine.connect() as conn:
        v1 = c.decode_bundle(Store(engine).get_model(conn, "default", 1).bundle)
    params = PreprocessParams.from_dict(v1.manifest.preprocess)
    data, labels, _, starts = datasets.windows_from_logs([str(make_log(tmp_path / "me.csv", devices=("me",),
                                                                         seconds=120, seed=7))], params)
    X = extract_features(data, params)
    sent: list[bytes] = []
    learner = Learner(device_id="me", state_dir=tmp_path, model_name="default", capacity=1000, trusted_key=None,
                      allow_unsigned=True, running=lambda: v1, publish=lambda _t, p, _e=None: sent.append(p), topic="t")
    learner.on_windows("L", X, [str(v) for v in labels], starts)

    def answer(ann: cr.Announcement) -> cu.Update:
        learner.offer(ann.encode())
        learner.tick()
        learner.close()
        return cu.decode_update(sent[-1], "me")

    r, tensors = _closed_round(engine, ("me",), tolerance=-1.0)  # a gate no model passes: nothing is published
    train = dataclasses.replace(cr.RoundPlan(**{**dataclasses.asdict(_plan_and_weights()[0]), "participants": ("me",)}),
                                base_sha256=v1.manifest.sha256, trainable=("coef_1", "intercept_1"), lr=0.01)
    update = answer(cr.announcement(train, tensors))
    shipped: list[bytes] = []

    def evaluate(candidate: dict, int8: bytes) -> dict | None:
        shipped.append(int8)
        plan = dataclasses.replace(train, kind="evaluate", trainable=())
        got = answer(cr.announcement(plan, candidate, int8))
        return fedavg.evaluation({"me": (got.n_examples, answer_metrics(got))})

    state, version, outcome, gate = finish(engine, None, r, [("me", 0, sent[0])], signing_key=None,  # type: ignore[arg-type]
                                           allow_unsigned=True, evaluate=evaluate)
    assert (state, version) == ("rejected", 2) and update.kind == "train"
    ev = cu.decode_update(sent[-1], "me")
    assert ev.int8_after != ev.metric_after, "these windows tell the INT8 model from its FP32 weights"
    with engine.connect() as conn:
        v2 = Store(engine).get_model(conn, "default", 2)
    bundle = c.decode_bundle(v2.bundle)
    assert bundle.model == shipped[0], "the devices scored the very model the hub registered"
    known = np.isin(labels, v1.manifest.labels)  # windows of a class v1 knows: those the device scores on
    held = held_out(starts[known])
    X_held, truth = X[known][held], labels[known][held]
    assert ev.n_examples == held.sum() > 0
    for runner_of, score in ((v1, ev.int8_before), (bundle, ev.int8_after)):
        predicted = ModelRunner(runner_of).predict(X_held).labels
        assert score == pytest.approx(np.mean(np.asarray(predicted) == truth))
    assert v2.metrics["int8"]["accuracy"] == pytest.approx(ev.int8_after)  # what the version reports
    assert v2.metrics["baseline_int8"]["accuracy"] == pytest.approx(ev.int8_before)
    assert v2.metrics["fp32"]["accuracy"] == pytest.approx(ev.metric_after)  # and its FP32 weights beside
    assert (outcome["evaluation_after"], outcome["evaluation_fp32_after"]) == pytest.approx((ev.int8_after,
                                                                                              ev.metric_after))
    assert gate.startswith(f"v2 INT8 {100 * ev.int8_after:.1f}% vs running v1 INT8 {100 * ev.int8_before:.1f}%")
    assert "the same windows as these figures" in gate
    engine.dispose()
