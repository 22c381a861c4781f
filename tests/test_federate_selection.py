"""`federate` asks only devices that can answer (issue #26 §6): with real agents, `serve` and a real
mosquitto, a device whose last status is offline (a clean stop, or SIGKILL and its last will) or that
runs another version is never selected; with none left, `federate` stops at once with its exit code and
one line naming what it waited for and whom it could not ask, instead of opening a round nobody answers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import tables
from edge_agent import contract as c
from edge_agent import exits
from edge_agent.mqtt import BrokerURL, MqttLink
from tests.helpers import wait_for
from tests.test_federated import DEVICES, Fleet, _query


def _states(url: str) -> dict[str, tuple[str, int | None]]:
    d = tables.devices.c
    return {dev: (state, version) for dev, state, version in _query(url, sa.select(d.device_id, d.state, d.model_version))}


def _federate(fleet: Fleet, *args: str) -> list[str]:
    return [sys.executable, "-m", "cloud_hub", "federate", "--broker", fleet.broker.url, "--db", fleet.url,
            "--prefix", fleet.prefix, "--client-id", f"{fleet.prefix}-fed", "--signing-key", str(fleet.priv),
            "--rounds", "1", "--min-available", "1", *args]


@pytest.mark.slow
def test_federate_asks_only_devices_online_on_the_base_version_and_stops_when_none_is(
        procs, broker, prefix, tmp_path) -> None:
    fleet = Fleet(procs, broker, prefix, tmp_path)  # v1 published, `serve`, fl-1, fl-2, fl-3 running it
    stopped, killed, left = DEVICES
    fleet.agents[stopped].send_signal(signal.SIGTERM)  # says goodbye: its retained status goes offline
    assert fleet.agents[stopped].wait(60) == 0
    fleet.agents[killed].kill()  # no goodbye: the broker publishes its last will
    fleet.agents[killed].wait(60)
    other = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-other")  # a device online on another version
    other.start()
    other.wait_connected(10)
    other.publish(c.Topics(prefix).status("fl-old"),
                  c.Status("fl-old", c.ONLINE, time.time(), "default", 7, "b" * 64).encode(), c.STATUS_DELIVERY)
    wait_for(lambda: _states(fleet.url) == {stopped: ("offline", 1), killed: ("offline", 1), left: ("online", 1),
                                            "fl-old": ("online", 7)}, timeout=60, what="the devices' statuses")

    out = open(tmp_path / "federate.log", "ab")  # noqa: SIM115 - the process owns it
    fed = procs.popen(_federate(fleet, "--min-windows", "16", "--epochs", "1", "--lr", "0.003", "--deadline", "120",
                                "--holdout-log", str(tmp_path / "train.csv"), "--tolerance", "1"),
                      stdout=out, stderr=out)
    assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    log = (tmp_path / "federate.log").read_text()
    assert f"round 1: v1 to 1 of 1 devices ({left}; " in log, log
    r, u = tables.fl_rounds.c, tables.fl_updates.c
    assert [orjson.loads(p) for p, in _query(fleet.url, sa.select(r.participants))] == [[left]]
    assert _query(fleet.url, sa.select(u.device_id, u.status)) == [(left, "accepted")]
    assert _query(fleet.url, sa.select(r.state, r.new_version)) == [("published", 2)]

    wait_for(lambda: _states(fleet.url)[left] == ("online", 2), timeout=120, what=f"{left} on v2")
    fleet.agents[left].send_signal(signal.SIGTERM)
    assert fleet.agents[left].wait(60) == 0
    wait_for(lambda: _states(fleet.url)[left] == ("offline", 2), timeout=60, what=f"{left} offline")
    t0 = time.monotonic()
    res = subprocess.run(_federate(fleet, "--wait-devices", "2"), capture_output=True, text=True, timeout=120)
    assert res.returncode == exits.MODEL, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "cloud-hub: error: only 0 device(s) report running default v2 (need 1) after 2 s; fl-old on v7; "
        f"{stopped}, {killed}, {left} offline: are the agents and `cloud-hub serve` running on {broker.url}?"], res.stderr
    assert time.monotonic() - t0 < 60, "it waits --wait-devices, not a round's deadline"
    assert len(_query(fleet.url, sa.select(r.id))) == 1, "no round was opened"
    other.stop()
    fleet.hub.signal(signal.SIGTERM)
