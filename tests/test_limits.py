"""What one device may send the hub (cloud_hub/data/limits.py): a token bucket per device, checked before
a message costs a decode or a write; past it messages are acknowledged and dropped, counted, and named in
a dead letter; an honest device keeps what was dropped and sends it again, so nothing of it is lost."""

from __future__ import annotations

import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from cloud_hub.data.limits import Admission, DeviceLimiter
from cloud_hub.tools.local_broker import LocalBroker, free_port
from edge_agent import contract as c
from edge_agent.mqtt import MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.helpers import Processes, fleet_files, wait_for
from tests.test_delivery_e2e import finish, start_replay
from tests.test_hub_cli import ServeProcess
from tests.test_ingest import stored_keys


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_device_gets_its_burst_then_its_rate_and_the_others_are_untouched() -> None:
    clock = Clock()
    lim = DeviceLimiter(rate=10, burst=5, clock=clock)
    assert [lim.admit("flood") for _ in range(8)] == [True] * 5 + [False] * 3
    assert all(lim.admit(f"dev-{i}") for i in range(50))  # each device has its own bucket
    clock.t += 0.5  # half a second: five more
    assert [lim.admit("flood") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.t += 60  # a long pause refills to the burst, not beyond
    assert sum(lim.admit("flood") for _ in range(20)) == 5
    assert lim.dropped_total == 3 + 2 + 15 and lim.most_dropped(1) == {"flood": 20}
    assert lim.report() == {"flood": 20} and lim.report() == {}  # said once


def test_the_buckets_are_bounded_and_a_forgotten_device_loses_nothing() -> None:
    clock = Clock()
    lim = DeviceLimiter(rate=1, burst=2, max_devices=100, clock=clock)
    for i in range(1000):
        assert lim.admit(f"dev-{i}")
        clock.t += 0.001
    assert len(lim._buckets) <= 100


def test_admission_names_the_device_once_per_report_and_lets_foreign_topics_through() -> None:
    topics = c.Topics("edgeml")
    adm = Admission(topics, rate=1, burst=1, report_s=10)
    assert adm.admit("not/ours") and adm.admit("edgeml/devices/bad id/results")  # the decoder says why
    assert adm.admit(topics.results("dev-a")) and not adm.admit(topics.results("dev-a"))
    assert not adm.admit(topics.status("dev-a"))  # statuses share the device's bucket
    letters = adm.dead_letters(now=1.0, monotonic=50.0)
    assert [d["topic"] for d in letters] == [topics.results("dev-a")]
    assert "device dev-a over its limit of 1 messages/s" in letters[0]["reason"] and "2 messages" in letters[0]["reason"]
    assert not adm.admit(topics.results("dev-a"))
    assert adm.dead_letters(now=2.0, monotonic=55.0) == []  # not before report_s
    assert len(adm.dead_letters(now=3.0, monotonic=61.0)) == 1


@pytest.mark.slow
def test_a_flooding_client_is_dropped_and_named_while_a_throttled_agent_loses_nothing(
        procs: Processes, broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    """A limit of 3 messages/s (bursts of 5): a client floods 5,000 valid messages as fast as it can while
    an agent replays sending one result per message (so it goes over the limit too). The flood is dropped
    and named in a dead letter and on /api/fleet; the agent's dropped messages come again from its outbox
    until every result is stored, exactly once."""
    log, model, expected = fleet_files(tmp_path / "fleet", seconds=30.0)
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    port = free_port()  # for the HTTP door
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log", args=["--http", str(port)],
                       env={"CLOUD_HUB_DEVICE_MAX_MSGS_PER_S": "3", "CLOUD_HUB_DEVICE_BURST": "5"})
    hub.wait_started()
    topics = c.Topics(prefix)
    flooder = MqttLink(BrokerURL.parse(broker.url), "flooder", max_inflight=500)
    flooder.start()
    flooder.wait_connected(10)
    agent = start_replay(procs, broker, prefix, log, model, tmp_path / "agent", "--speed", "8",
                         env={"EDGE_AGENT_BATCH_MAX_RESULTS": "1"})
    t0 = time.time()
    for i in range(5000):
        r = c.Result(seq=i, start=t0, end=t0 + 1, model_version=1, latency_ms=1.0, label="walk", confidence=0.9)
        flooder.publish(topics.results("flood-1"), c.ResultBatch("flood-1", (r,)).encode(), c.RESULTS_DELIVERY)
    wait_for(lambda: flooder._outgoing == 0, timeout=120, what="the broker to take the flood")
    flooder.stop()
    report = finish(agent)
    assert report["published"] == report["windows"] == len(expected), report
    assert report["resent"] > 0, "the agent's dropped messages went out again"

    def dead() -> list[str]:
        con = sqlite3.connect(tmp_path / "hub.sqlite")
        try:
            return [r for (r,) in con.execute("SELECT reason FROM dead_letters")]
        finally:
            con.close()

    wait_for(lambda: any("device flood-1 over its limit" in r for r in dead()), timeout=60,
             what="a dead letter naming the flooder")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=30) as resp:
        fleet = orjson.loads(resp.read())
    assert fleet["limited"].get("flood-1", 0) > 4000, fleet["limited"]
    con = sqlite3.connect(tmp_path / "hub.sqlite")
    stored_flood = con.execute("SELECT count(*) FROM results WHERE device_id = 'flood-1'").fetchone()[0]
    con.close()
    assert 5 <= stored_flood < 500, stored_flood  # its burst, then 3 a second: not 5,000
    assert hub.signal(signal.SIGTERM) == 0
    agent_keys = [k for k in stored_keys(url) if k[0] != "flood-1"]
    assert len(agent_keys) == len(set(agent_keys)) and set(agent_keys) == expected  # every result, once
