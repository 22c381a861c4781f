"""Canary rollouts with real processes: six live agents, a real broker, `cloud-hub serve` judging the
cohort; a scrambled model rolls back by itself, a good one reaches the whole fleet."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, tables
from cloud_hub.models import lifecycle
from cloud_hub.models.signing import keygen
from cloud_hub.rollout import canary
from cloud_hub.rollout import publish as rollout
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent.mqtt import BrokerURL, MqttLink
from edge_agent.settings.loader import load_settings
from tests.helpers import SMALL, agent_cmd, make_log, wait_for
from tests.test_hub_cli import ServeProcess

AGENTS = [f"live-{i}" for i in range(1, 5)]
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
                sa.select(tables.devices.c.device_id, tables.devices.c.model_version, tables.devices.c.state))}
    finally:
        engine.dispose()


def _results(url: str) -> dict[tuple[str, int], int]:
    """Stored results per (device, model version)."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return {(d, v): n for d, v, n in conn.execute(
                sa.select(tables.results.c.device_id, tables.results.c.model_version, sa.func.count())
                .group_by(tables.results.c.device_id, tables.results.c.model_version))}
    finally:
        engine.dispose()


def _rollout_state(url: str, version: int) -> str | None:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(tables.rollouts.c.state).where(tables.rollouts.c.version == version)
                                ).scalar_one_or_none()
    finally:
        engine.dispose()


def test_a_share_without_its_percent_sign_says_how_to_write_it() -> None:
    """A new operator's finding: `--canary 10` was refused as "must be between 0 and 100%", which 10 is."""
    assert canary.parse_canary("10%") == pytest.approx(0.1) and canary.parse_canary("0.25") == 0.25
    with pytest.raises(canary.CanaryError, match=r"got '10': write 10% for 10 percent$"):
        canary.parse_canary("10")
    with pytest.raises(canary.CanaryError, match=r"as 10% or 0.1, got '150%'$"):
        canary.parse_canary("150%")


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


BACK = {"idle": "lift", "walk": "idle", "run": "walk", "lift": "run"}  # not the scrambled model's shift


def _hard_stretches(line: str, every_s: float = 60.0, hard_s: float = 10.0) -> str:
    """A recording's row, relabelled during 10 s of every minute: a hard stretch every model gets wrong
    (the scrambled one too)."""
    fields = line.split(",")
    if float(fields[0]) % every_s < hard_s:
        fields[-1] = BACK[fields[-1]]
    return ",".join(fields)


class Recordings:
    """Each agent follows its own file; the test appends a device's recording to it phase by phase."""

    def __init__(self, root: Path, seconds: float) -> None:
        log = make_log(root / "recordings.csv", devices=tuple(AGENTS), seconds=seconds)  # the training's classes
        header, *rows = log.read_text().splitlines()
        self.rows = {d: [r for r in rows if r.split(",", 2)[1] == d] for d in AGENTS}
        self.files = {d: root / f"{d}.csv" for d in AGENTS}
        for f in self.files.values():
            f.write_text(header + "\n")

    def feed(self, t0: float, t1: float) -> None:
        """Append every device's rows with t0 <= ts < t1, hard stretches included."""
        for d, f in self.files.items():
            with open(f, "a") as out:
                out.writelines(_hard_stretches(r) + "\n" for r in self.rows[d] if t0 <= float(r.split(",", 1)[0]) < t1)


@pytest.mark.slow
def test_a_bad_canary_rolls_back_and_a_good_one_is_promoted_through_hard_stretches(procs, broker, prefix,
                                                                                   tmp_path) -> None:
    """Four agents follow recordings in which every model is wrong 10 s a minute (clustered errors).
    A scrambled v2 sent to two of them is rolled back by `serve` on its own; a good v3 (a retrain) meets
    the same hard stretches on its cohort and is promoted to the whole fleet."""
    priv, pub, _ = keygen(tmp_path / "keys" / "hub.pem")
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
        "broker": broker.url, "db": url, "prefix": prefix, "client_id": f"{prefix}-cli", "signing_key": str(priv)})
    engine = db.make_engine(url)
    train_log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2", "trn-3"), seconds=240)
    assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL).version == 1
    rollout.publish(engine, settings)
    rec = Recordings(tmp_path / "rec", seconds=1800)
    events: queue.Queue[dict] = queue.Queue()
    watch = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-events", subscriptions=[(c.Topics(prefix).events, 1)],
                     on_message=lambda m: events.put(orjson.loads(m.payload)))
    watch.start()
    watch.wait_connected(10)
    # the operator forgets serve's key at first: it says so, rolls back, and promotes once given the key
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log", env={
        "CLOUD_HUB_CANARY_CHECK_S": "0.5", "CLOUD_HUB_CANARY_MAX_RESULTS": "5000"})
    hub.wait_started()
    agents = [procs.popen(
        agent_cmd("run", "--broker", broker.url, "--prefix", prefix, "--device-id", dev,
                  "--state-dir", str(tmp_path / dev), "--trusted-key", str(pub), "--source", "follow",
                  "--source-path", str(rec.files[dev])),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2", "EDGE_AGENT_STATUS_INTERVAL_S": "1"})
        for dev in AGENTS]
    cohort = ("live-1", "live-2")

    def running(check) -> bool:  # a dead agent or hub fails the wait at once, with its error
        for p in [*agents, hub.proc]:
            assert p.poll() is None, p.stderr.read() if p.stderr else hub.log.read_text()
        return check()

    def on(version: int, devices=AGENTS) -> None:
        wait_for(lambda: running(lambda: all(_devices(url).get(d, (None, ""))[0] == version for d in devices)),
                 timeout=120, what=f"{devices} running v{version}")

    def publish_canary(version: int) -> str:
        res = runner.invoke(hub_app, ["publish", "--db", url, "--broker", broker.url, "--prefix", prefix,
                                      "--signing-key", str(priv), "--devices", ",".join(cohort),
                                      "--version", str(version), "--min-results", "100", "--tolerance", "0.15"])
        assert res.exit_code == 0, res.output
        return res.output

    try:
        on(1)
        rec.feed(0, 300)  # history on v1: 5 minutes each, with their hard stretches
        wait_for(lambda: running(lambda: all(_results(url).get((d, 1), 0) >= 550 for d in AGENTS)), timeout=120,
                 what="every agent's history on v1")
        assert lifecycle.train_from_logs(engine, [str(_scrambled_log(train_log, tmp_path / "scrambled.csv"))],
                                         holdout=["trn-3"], config=SMALL).version == 2
        out = publish_canary(2)
        assert "sent to 2 of 4 devices (live-1, live-2)" in out
        assert "a serve started without one (--signing-key" in out  # the key given here is not serve's
        on(2, cohort)
        rec.feed(300, 600)
        wait_for(lambda: running(lambda: _rollout_state(url, 2) == "rolled_back"), timeout=120,
                 what="the automatic rollback")
        on(1, cohort)
        assert lifecycle.train_from_logs(engine, [str(train_log)], holdout=["trn-3"], config=SMALL,
                                         seed=1).version == 3
        publish_canary(3)
        on(3, cohort)
        rec.feed(600, 1800)
        wait_for(lambda: running(lambda: "cannot be promoted by this hub" in hub.log.read_text()), timeout=120,
                 what="serve saying it cannot promote without a key")
        assert _rollout_state(url, 3) == "canary"
        hub.signal(signal.SIGTERM)
        hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub2.log", env={
            "CLOUD_HUB_CANARY_CHECK_S": "0.5", "CLOUD_HUB_CANARY_MAX_RESULTS": "5000"},
            args=("--signing-key", str(priv)))
        hub.wait_started()
        on(3)
        assert _rollout_state(url, 3) == "promoted"
    finally:
        for p in agents:
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in agents]
        if hub.proc.poll() is None:
            hub.signal(signal.SIGTERM)
        watch.stop()
    assert all(p.returncode == 0 for p in agents), errs
    with engine.connect() as conn:
        rows = conn.execute(sa.select(tables.results.c.device_id, tables.results.c.model_version)
                            .order_by(tables.results.c.device_id, tables.results.c.seq)).all()
        models = {v: s for v, s in conn.execute(sa.select(tables.models.c.version, tables.models.c.state))}
    engine.dispose()
    by_device = {d: [v for dd, v in rows if dd == d] for d in AGENTS}
    for dev, versions in by_device.items():
        phases = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        if dev in cohort:
            # v2's results end at the rollback (the cohort is back on v1, fed nothing until v3 comes)
            assert phases in ([1, 2, 3], [1, 2, 1, 3]), (dev, phases)
        else:
            assert 2 not in versions and phases in ([1], [1, 3]), (dev, phases)  # never ran the scrambled model
    assert models == {1: "published", 2: "rejected", 3: "published"}
    res = runner.invoke(hub_app, ["rollout", "status", "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    status = orjson.loads(res.stdout)
    assert [(r["version"], r["state"]) for r in status["rollouts"]] == [(3, "promoted"), (2, "rolled_back")]
    rolled, promoted = status["rollouts"][1]["reason"], status["rollouts"][0]["reason"]
    # each cohort device is judged against its own history (under load the verdict may come before the
    # second device's results do: it rests on the evidence so far)
    assert rolled.startswith("worse: accuracy") and "0 against the fleet" in rolled, rolled
    assert promoted.startswith("not worse: accuracy") and "0 against the fleet" in promoted, promoted
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
    db.make_engine(url).dispose()  # a hub database without a canary (rollback never creates one)
    res = runner.invoke(hub_app, ["rollback", "--db", url, "--broker", "mqtt://127.0.0.1:1"])
    assert res.exit_code == 2 and "no open canary of default to roll back" in res.stderr
    res = runner.invoke(hub_app, ["publish", "--db", url, "--broker", "mqtt://127.0.0.1:1", "--canary", "150%"])
    assert res.exit_code in (2, 4) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # a new operator's findings: "--devices ," was refused as a bad --canary share, and --canary beside --devices
    # was ignored without a word
    key, _, _ = keygen(tmp_path / "keys" / "hub.pem")
    args = ["publish", "--db", url, "--broker", "mqtt://127.0.0.1:1", "--signing-key", str(key)]
    for extra, wants in ((["--devices", ","], "--devices ',' names no device"),
                         (["--devices="], "--devices '' names no device"),
                         (["--canary", "10%", "--devices", "sim-0"], "--canary and --devices both choose the cohort")):
        res = runner.invoke(hub_app, [*args, *extra])
        assert res.exit_code == 2 and wants in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


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


def _hub_with_v1(broker, prefix: str, tmp_path: Path) -> tuple[str, list[str], sa.Engine, Path]:
    """A hub database holding v1, trained on a log of trn-1 and trn-2: (its URL, publish's flags with a signing
    key, its engine, the log)."""
    priv, _, _ = keygen(tmp_path / "keys" / "hub.pem")
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    args = ["--db", url, "--broker", broker.url, "--prefix", prefix, "--signing-key", str(priv)]
    engine = db.make_engine(url)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=120)
    assert lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL).version == 1
    return url, args, engine, log


def test_a_share_is_drawn_from_online_devices_running_the_model(broker, prefix, tmp_path: Path) -> None:
    """A device known only from its results, or offline, or running another model, held a cohort seat it
    could never be judged on (a new user's canary went to two hand-made devices that never sent a status)."""
    from cloud_hub.data import sessions
    from cloud_hub.data.store import Store

    url, args, engine, log = _hub_with_v1(broker, prefix, tmp_path)
    not_pem = ["--db", url, "--broker", broker.url, "--prefix", prefix, "--signing-key", str(log)]
    res = runner.invoke(hub_app, ["publish", *not_pem])  # an operator's slip: exit 2 naming the setting (it was 4)
    assert res.exit_code == 2 and f"signing_key {str(log)!r} is not a PEM private key" in res.stderr, res.output
    res = runner.invoke(hub_app, ["publish", *args])  # v1 to the fleet: the canary's comparison
    assert res.exit_code == 0, res.output
    assert lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL).version == 2
    store = Store(engine)

    def statuses(online: tuple[str, ...]) -> None:
        fleet = {d: (c.Status(d, c.ONLINE if d in online else c.OFFLINE, 1.0, "default", 1, "a" * 64, 0), 1.0)
                 for d in ("on-1", "on-2", "on-3", "off-1")}
        fleet["other-1"] = (c.Status("other-1", c.ONLINE, 1.0, "other", 1, "a" * 64, 0), 1.0)
        with sessions.transaction(engine) as conn:
            store.touch_devices(conn, {"results-only-1": 1.0, "results-only-2": 1.0})
            store.apply_statuses(conn, fleet)

    statuses(online=("on-1",))
    res = runner.invoke(hub_app, ["publish", *args, "--canary", "60%"])
    assert res.exit_code in (2, 4) and "at least 2 online devices running default" in res.stderr, res.output
    assert "the hub knows 7 devices, 1 of them such" in res.stderr and "--devices A,B" in res.stderr, res.stderr

    statuses(online=("on-1", "on-2", "on-3"))
    # A canary of the version the fleet runs compared it with the one before, which no device ran any more: it
    # never decided, blocked every publish, and its rollback marked the fleet's model rejected
    res = runner.invoke(hub_app, ["publish", *args, "--version", "1", "--canary", "60%"])
    assert res.exit_code == 2 and "default v1 is the version on the model topic: the fleet runs it already" in \
        res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    res = runner.invoke(hub_app, ["publish", *args, "--canary", "60%"])
    assert res.exit_code == 0, res.output
    said = next(line for line in res.output.splitlines() if line.startswith("canary:"))
    assert "sent to 2 of the 3 online devices running default (on-" in said, said
    cohort = said.split("(", 1)[1].split(")", 1)[0].split(", ")
    assert set(cohort) < {"on-1", "on-2", "on-3"}, cohort
    # A fleet publish while the canary is open moved the fleet under it (its judge then compared with a version
    # the fleet no longer ran, and a rollback named one version while the cohort went to another): refused
    res = runner.invoke(hub_app, ["publish", *args, "--version", "1", "--force"])
    assert res.exit_code == 2 and "a canary of default v2 is open (against v1): end it first" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    engine.dispose()


def test_a_canary_publish_stopped_after_the_broker_took_it_clears_its_cohort(broker, prefix, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A new operator's finding: Ctrl-C during `publish --devices` exited 130 without a word, after the broker had
    the bundle on the cohort's topic: the device ran a version no rollout recorded, and neither `rollback` nor a
    fleet publish took it back. Now the cohort's topics are cleared again and the command says no canary started;
    afterwards, a rolled-back version is refused naming its rollback, not a gate it passed."""
    from cloud_hub.cli.common import Interrupted
    from cloud_hub.data import sessions
    from cloud_hub.data.store import Store

    url, args, engine, log = _hub_with_v1(broker, prefix, tmp_path)
    res = runner.invoke(hub_app, ["publish", *args[:6]])  # no signing key: exit 2 as a canary's publish (it was 4)
    assert res.exit_code == 2 and "no signing key: pass --signing-key" in res.stderr, res.output
    assert runner.invoke(hub_app, ["publish", *args]).exit_code == 0
    assert lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL).version == 2
    with sessions.transaction(engine) as conn:
        Store(engine).apply_statuses(conn, {d: (c.Status(d, c.ONLINE, 1.0, "default", 1, "a" * 64, 0), 1.0)
                                            for d in ("on-1", "on-2")})
    real_send, sent = canary.send, []

    def stopped_once_sent(settings, messages, timeout=30.0, began=None):  # Ctrl-C as the PUBACKs come in
        real_send(settings, messages, timeout, began)
        sent.append([topic for topic, _, _ in messages])
        if len(sent) == 1:
            raise Interrupted

    # a broker not there: nothing was sent, so nothing is taken back (it waited twice and said the model may
    # have reached the cohort)
    calls: list[int] = []
    monkeypatch.setattr(canary, "send", lambda *a, **k: (calls.append(1), real_send(*a, **k))[1])
    res = runner.invoke(hub_app, ["publish", *args[:2], "--broker", "mqtt://127.0.0.1:1", *args[4:], "--devices",
                                  "on-1", "--version", "2"], env={"CLOUD_HUB_CONNECT_TIMEOUT_S": "2"})
    assert res.exit_code == 3 and "no connection to mqtt://127.0.0.1:1 within 2 s" in res.stderr, res.output
    assert calls == [1], "no second send to take back what was never sent"
    monkeypatch.setattr(canary, "send", stopped_once_sent)
    res = runner.invoke(hub_app, ["publish", *args, "--devices", "on-1", "--version", "2"])
    assert res.exit_code == 130 and "interrupted: no canary started" in res.stderr, res.output
    assert sent[0][0] == f"{prefix}/devices/on-1/model" and sent[1] == [f"{prefix}/devices/on-1/model"]
    with sessions.transaction(engine, write=False) as conn:
        assert Store(engine).rollouts(conn, "default") == []
    # what the broker keeps retained on the cohort's topic: nothing (a marker published after the SUBACK comes
    # after every retained message of the subscription)
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    watch = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-watch", subscriptions=[(f"{prefix}/devices/+/model", 1)],
                     on_message=lambda m: got.put((m.topic, m.payload)))
    watch.start()
    try:
        watch.wait_connected(10)
        watch.wait_subscribed(10)
        watch.publish(f"{prefix}/devices/marker/model", b"marker", c.RESULTS_DELIVERY)
        seen = []
        while not seen or seen[-1][0] != f"{prefix}/devices/marker/model":
            seen.append(got.get(timeout=10))
        assert seen == [(f"{prefix}/devices/marker/model", b"marker")], [t for t, _ in seen]
    finally:
        watch.stop()
    monkeypatch.setattr(canary, "send", real_send)
    with sessions.transaction(engine) as conn:
        Store(engine).apply_statuses(conn, {"on-1": (c.Status("on-1", c.OFFLINE, 1.5, "default", 1, "a" * 64, 0), 1.5)})
    res = runner.invoke(hub_app, ["publish", *args, "--devices", "on-1", "--version", "2"])
    assert res.exit_code == 0 and "note: not online: on-1 (offline): the canary waits" in res.stderr, res.output
    # a canary its cohort does not run (signed with a key they do not trust): status names each device and why
    with sessions.transaction(engine) as conn:
        Store(engine).apply_statuses(conn, {"on-1": (c.Status(
            "on-1", c.ONLINE, 2.0, "default", 1, "a" * 64, 0, last_error="model refused: signed by key 4070"), 2.0)})
    view = orjson.loads(runner.invoke(hub_app, ["rollout", "status", "--db", url, "--json"]).stdout)
    (line,) = view["cohort_not_running"]
    assert line.startswith("on-1: runs default v1, not v2 (online, last seen ") and \
        line.endswith("; its last error: model refused: signed by key 4070"), line
    with sessions.transaction(engine) as conn:
        Store(engine).apply_statuses(conn, {"on-1": (c.Status("on-1", c.ONLINE, 3.0, "default", 2, "b" * 64, 0), 3.0)})
    view = orjson.loads(runner.invoke(hub_app, ["rollout", "status", "--db", url, "--json"]).stdout)
    assert view["cohort_not_running"] == [] and view["verdict"] is not None
    # a rollback to a broker not there said nothing for 30 s: now it gives up at connect_timeout_s (and says
    # after 3 s what is in the way, as publish does)
    res = runner.invoke(hub_app, ["rollback", "--db", url, "--broker", "mqtt://127.0.0.1:1"],
                        env={"CLOUD_HUB_PREFIX": prefix, "CLOUD_HUB_CONNECT_TIMEOUT_S": "4"})
    assert res.exit_code == 3 and "no connection to mqtt://127.0.0.1:1 within 4 s" in res.stderr, res.output
    assert runner.invoke(hub_app, ["rollback", *args[:4]], env={"CLOUD_HUB_PREFIX": prefix}).exit_code == 0
    res = runner.invoke(hub_app, ["publish", *args, "--devices", "on-1", "--version", "2"])
    assert res.exit_code == 4 and "v2 is rejected: its canary was rolled back (rolled back by hand" in res.stderr, \
        res.output
    assert "failed its gate" not in res.stderr
    engine.dispose()
