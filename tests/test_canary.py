"""Canary rollouts with real processes: six live agents, a real broker, `cloud-hub serve` judging the
cohort; a scrambled model rolls back by itself, a good one reaches the whole fleet."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cloud_hub import canary, db, lifecycle, rollout
from cloud_hub.cli import app as hub_app
from cloud_hub.settings import HubSettings
from cloud_hub.signing import keygen
from edge_agent import contract as c
from edge_agent.mqtt import BrokerURL, MqttLink
from edge_agent.settings import load_settings
from tests.helpers import SMALL, agent_cmd, make_log, wait_for
from tests.test_hub_cli import ServeProcess

AGENTS = [f"live-{i}" for i in range(1, 7)]
runner = CliRunner()


def _scrambled_log(src: Path, out: Path) -> Path:
    """The same readings with every class renamed to the next: a model of it is consistently wrong."""
    shift = {"idle": "walk", "walk": "run", "run": "lift", "lift": "idle"}
    lines = src.read_text().splitlines()
    rows = [",".join([*ln.split(",")[:-1], shift[ln.split(",")[-1]]]) for ln in lines[1:]]
    out.write_text("\n".join([lines[0], *rows]) + "\n")
    return out


def _devices(url: str) -> dict[str, tuple[int | None, str]]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return {d: (v, s) for d, v, s in conn.execute(
                sa.select(db.devices.c.device_id, db.devices.c.model_version, db.devices.c.state))}
    finally:
        engine.dispose()


def _results(url: str) -> dict[tuple[str, int], int]:
    """Stored results per (device, model version)."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return {(d, v): n for d, v, n in conn.execute(
                sa.select(db.results.c.device_id, db.results.c.model_version, sa.func.count())
                .group_by(db.results.c.device_id, db.results.c.model_version))}
    finally:
        engine.dispose()


def _rollout_state(url: str, version: int) -> str | None:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(db.rollouts.c.state).where(db.rollouts.c.version == version)
                                ).scalar_one_or_none()
    finally:
        engine.dispose()


def test_cohort_choice_is_stable_never_everyone_and_names_unknown_devices() -> None:
    fleet = [f"d{i}" for i in range(10)]
    cohort = canary.choose_cohort(fleet, fraction=0.1, salt="m/v2")
    assert len(cohort) == 1 and cohort == canary.choose_cohort(list(reversed(fleet)), fraction=0.1, salt="m/v2")
    assert len(canary.choose_cohort(fleet, fraction=0.25, salt="m/v2")) == 3
    assert len(canary.choose_cohort(fleet[:2], fraction=0.9, salt="x")) == 1  # never the whole fleet
    assert {tuple(canary.choose_cohort(fleet, fraction=0.3, salt=f"m/v{v}")) for v in range(8)} != {
        tuple(cohort)}, "each version picks its own cohort"
    with pytest.raises(canary.CanaryError, match=r"devices \['nope'\] are unknown"):
        canary.choose_cohort(fleet, named=["d1", "nope"])
    with pytest.raises(canary.CanaryError, match="every device"):
        canary.choose_cohort(fleet[:2], named=fleet[:2])
    assert canary.parse_canary("10%") == pytest.approx(0.1) and canary.parse_canary("0.5") == 0.5
    for bad in ("0%", "100%", "ten"):
        with pytest.raises(canary.CanaryError, match="--canary"):
            canary.parse_canary(bad)


@pytest.mark.slow
def test_a_scrambled_canary_rolls_back_by_itself_and_a_good_one_reaches_the_fleet(procs, broker, prefix,
                                                                                  tmp_path) -> None:
    priv, pub, _ = keygen(tmp_path / "keys" / "hub.pem")
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
        "broker": broker.url, "db": url, "prefix": prefix, "client_id": f"{prefix}-cli", "signing_key": str(priv)})
    engine = db.make_engine(url)
    train_log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2", "trn-3"), seconds=90)
    assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL).version == 1
    rollout.publish(engine, settings)
    events: queue.Queue[dict] = queue.Queue()
    watch = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-events", subscriptions=[(c.Topics(prefix).events, 1)],
                     on_message=lambda m: events.put(orjson.loads(m.payload)))
    watch.start()
    watch.wait_connected(10)
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log", env={
        "CLOUD_HUB_SIGNING_KEY": str(priv), "CLOUD_HUB_CANARY_CHECK_S": "0.5"})
    hub.wait_started()
    agents = [procs.popen(
        agent_cmd("run", "--broker", broker.url, "--prefix", prefix, "--device-id", dev,
                  "--state-dir", str(tmp_path / dev), "--trusted-key", str(pub), "--source", "simulated"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2", "EDGE_AGENT_STATUS_INTERVAL_S": "1",
             "EDGE_AGENT_SIM_SEED": str(i)})
        for i, dev in enumerate(AGENTS)]

    def running(check) -> bool:  # a dead agent or hub fails the wait at once, with its error
        for p in [*agents, hub.proc]:
            assert p.poll() is None, p.stderr.read() if p.stderr else hub.log.read_text()
        return check()

    try:
        wait_for(lambda: running(lambda: all(_results(url).get((d, 1), 0) >= 3 for d in AGENTS)),
                 timeout=120, what="results of every agent on v1")
        # v2 is consistently wrong: sent to two agents first, it must come back by itself
        assert lifecycle.train_from_logs(engine, [str(_scrambled_log(train_log, tmp_path / "scrambled.csv"))],
                                         holdout=["trn-3"], config=SMALL).version == 2
        res = runner.invoke(hub_app, ["publish", "--db", url, "--broker", broker.url, "--prefix", prefix,
                                      "--signing-key", str(priv), "--devices", "live-1,live-2", "--min-results", "12"])
        assert res.exit_code == 0, res.output
        assert "sent to 2 of 6 devices (live-1, live-2)" in res.stdout
        wait_for(lambda: running(lambda: _rollout_state(url, 2) == "rolled_back"), timeout=180,
                 what="the automatic rollback")
        before = _results(url)
        wait_for(lambda: running(lambda: all(_results(url).get((d, 1), 0) > before.get((d, 1), 0) + 2
                                             for d in ("live-1", "live-2"))), timeout=120,
                 what="results of the cohort back on v1")
        # a good v3 (other seed): canary to a third of the fleet, then promoted to every agent
        assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL,
                                         seed=1).version == 3
        t0 = time.monotonic()
        res = runner.invoke(hub_app, ["publish", "--db", url, "--broker", broker.url, "--prefix", prefix,
                                      "--signing-key", str(priv), "--canary", "34%", "--min-results", "12",
                                      "--tolerance", "0.3"])
        assert res.exit_code == 0, res.output
        wait_for(lambda: running(lambda: all(_devices(url)[d][0] == 3 for d in AGENTS)), timeout=180,
                 what="every agent on v3")
        print(f"v3: publish --canary to the whole fleet in {time.monotonic() - t0:.1f} s")
        wait_for(lambda: running(lambda: all(_results(url).get((d, 3), 0) >= 1 for d in AGENTS)), timeout=60,
                 what="results of every agent on v3")
        assert _rollout_state(url, 3) == "promoted"
    finally:
        for p in agents:
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in agents]
        hub.signal(signal.SIGTERM)
        watch.stop()
    assert all(p.returncode == 0 for p in agents), errs
    with engine.connect() as conn:
        rows = conn.execute(sa.select(db.results.c.device_id, db.results.c.model_version)
                            .order_by(db.results.c.device_id, db.results.c.seq)).all()
        models = {v: s for v, s in conn.execute(sa.select(db.models.c.version, db.models.c.state))}
    engine.dispose()
    by_device = {d: [v for dd, v in rows if dd == d] for d in AGENTS}
    for dev, versions in by_device.items():
        phases = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        if dev in ("live-1", "live-2"):
            assert phases == [1, 2, 1, 3], (dev, phases)  # every result carries the version that made it
        else:
            assert 2 not in versions and phases == [1, 3], (dev, phases)  # never ran the scrambled model
    assert models == {1: "published", 2: "rejected", 3: "published"}
    res = runner.invoke(hub_app, ["rollout", "status", "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    status = orjson.loads(res.stdout)
    assert [(r["version"], r["state"]) for r in status["rollouts"]] == [(3, "promoted"), (2, "rolled_back")]
    assert "accuracy" in status["rollouts"][1]["reason"] and "worse" in status["rollouts"][1]["reason"]
    kinds = [e["kind"] for e in reversed(status["events"])]
    assert kinds == ["canary_started", "rolled_back", "canary_started", "promoted"]
    published: list[dict] = []
    while not events.empty():
        published.append(events.get_nowait())
    assert [(e["kind"], e["version"]) for e in published] == [
        ("canary_started", 2), ("rolled_back", 2), ("canary_started", 3), ("promoted", 3)]
    assert published[1]["by"] == "automatic" and published[1]["back_to"] == 1


def test_rollback_by_hand_and_operator_mistakes_are_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    res = runner.invoke(hub_app, ["rollback", "--db", url, "--broker", "mqtt://127.0.0.1:1"])
    assert res.exit_code == 2 and "no open canary of default to roll back" in res.stderr
    res = runner.invoke(hub_app, ["publish", "--db", url, "--broker", "mqtt://127.0.0.1:1", "--canary", "150%"])
    assert res.exit_code in (2, 4) and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_send_waits_for_every_puback_without_deadlocking_on_early_ones(broker, prefix, tmp_path: Path) -> None:
    """PUBACKs arrive while later messages are still being published (paho reports them holding the
    lock publish() needs): send must neither deadlock nor miss one."""
    settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
        "broker": broker.url, "db": f"sqlite:///{tmp_path / 'h.sqlite'}", "prefix": prefix,
        "client_id": f"{prefix}-send"})
    got: queue.Queue[bytes] = queue.Queue()
    watch = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-watch", subscriptions=[(f"{prefix}/events", 1)],
                     on_message=lambda m: got.put(m.payload))
    watch.start()
    watch.wait_connected(10)
    try:
        for round_ in range(5):
            canary.send(settings, [(f"{prefix}/events", f"{round_}-{i}".encode(), canary.EVENTS_DELIVERY)
                                   for i in range(400)], timeout=60)
        wait_for(lambda: got.qsize() >= 2000, what="every message delivered")
    finally:
        watch.stop()
