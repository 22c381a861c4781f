"""The links between the processes fail too: every MQTT link goes through a proxy that swallows bytes and
resets connections (a PUBLISH, a PUBACK or a receipt lost on the way), stalls, and leaves links half-open.
Nothing is lost, nothing is doubled, and a half-open link is noticed when the keepalive says."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cloud_hub.tools.local_broker import LocalBroker
from edge_agent.contract import Delivery
from edge_agent.mqtt import MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.faultproxy import FaultProxy
from tests.helpers import Processes, fleet_files, outbox, wait_for
from tests.test_delivery_e2e import assert_exactly_once, finish, start_replay
from tests.test_hub_cli import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(broker: LocalBroker) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", broker.port).start()
    yield p
    p.stop()


def test_the_proxy_swallows_resets_and_blackholes(proxy: FaultProxy) -> None:
    """The tool itself: a reset after a swallowed chunk breaks the link, a reconnect works, a black hole
    keeps the link open while nothing gets through."""
    changes: list[bool] = []
    link = MqttLink(BrokerURL.parse(proxy.url), "proxy-probe", keepalive_s=30, on_connected=changes.append)
    link.start()
    try:
        link.wait_connected(10)
        first = proxy.open_links()[0]
        proxy.reset(first, "up")
        link.publish("probe/x", b"lost", Delivery(qos=0, retain=False))
        wait_for(lambda: first.closed and first.swallowed > 0, timeout=10, what="the swallowed chunk and reset")
        wait_for(lambda: changes.count(True) >= 2, timeout=30, what="a reconnect through the proxy")
        assert proxy.resets == 1
        second = proxy.open_links()[-1]
        proxy.blackhole(second)
        link.publish("probe/y", b"into the void", Delivery(qos=0, retain=False))
        wait_for(lambda: second.swallowed > 0, timeout=10, what="bytes swallowed by the black hole")
        assert not second.closed and link.connected  # half-open: nobody knows yet
    finally:
        link.stop()


@pytest.mark.parametrize("keepalive", [2, 4])
def test_a_half_open_link_is_noticed_within_the_keepalive(proxy: FaultProxy, keepalive: int) -> None:
    """MQTT keepalive: with no packet from the broker for ``keepalive`` s the client pings; without an answer
    for another ``keepalive`` s it drops the link. A half-open link is noticed between 1 and 2 keepalives
    after the last packet that got through (plus the loop's tick), never sooner, never much later."""
    lost = threading.Event()
    link = MqttLink(BrokerURL.parse(proxy.url), f"keepalive-{keepalive}", keepalive_s=keepalive,
                    on_connected=lambda up: None if up else lost.set())
    link.start()
    try:
        link.wait_connected(10)
        time.sleep(0.2)  # let the CONNACK's aftermath pass: the clock starts at the last packet in
        proxy.blackhole(proxy.open_links()[0])
        t0 = time.monotonic()
        assert lost.wait(2 * keepalive + 10), "a half-open link was never noticed"
        noticed = time.monotonic() - t0
        assert keepalive * 0.9 <= noticed <= 2 * keepalive + 5, noticed
    finally:
        link.stop()


def test_a_replay_through_a_faulty_network_stores_every_result_once(
        procs: Processes, broker: LocalBroker, proxy: FaultProxy, prefix: str, tmp_path: Path) -> None:
    """Three agents replay while every link (theirs and the hub's) is reset after swallowed bytes, reset
    outright and stalled at random, about once a second: every result is stored exactly once and every
    outbox ends empty."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    fleets = {}
    for n in range(3):
        log, model, expected = fleet_files(tmp_path / f"fleet{n}", seconds=30.0)
        renamed = tmp_path / f"fleet{n}.csv"
        renamed.write_text(log.read_text().replace("dev-", f"n{n}-dev-"))
        fleets[n] = (renamed, model, {(d.replace("dev-", f"n{n}-dev-"), s) for d, s in expected})
    hub = ServeProcess(procs, proxy, url, prefix, tmp_path / "hub.log")  # type: ignore[arg-type]
    hub.wait_started()
    agents = {n: start_replay(procs, proxy, prefix, log, model, tmp_path / f"agent{n}", "--speed", "6")  # type: ignore[arg-type]
              for n, (log, model, _) in fleets.items()}
    # First the losses that matter, each for sure: a result on its way to the broker, a receipt on its
    # way to a device, a result on its way to the hub, a receipt on its way from the hub.
    for who, way in [("edge-agent-", "up"), ("edge-agent-", "down"), (f"{prefix}-hub", "down"), (f"{prefix}-hub", "up")]:
        wait_for(lambda who=who: proxy.link_of(who) is not None, timeout=60, what=f"the link of {who}")
        link = proxy.link_of(who)
        assert link is not None
        proxy.reset(link, way, packet=3)
        wait_for(lambda link=link: link.closed, timeout=60, what=f"a PUBLISH swallowed {way} on {who}'s link")
    stop = threading.Event()
    chaos = proxy.chaos(random.Random(29), stop)  # then anything, anywhere, about once a second
    try:
        wait_for(lambda: proxy.resets >= 6, timeout=120, what="more resets while the agents replay")
    finally:
        stop.set()
        chaos.join(10)
    reports = {n: finish(agent) for n, agent in agents.items()}
    expected = set().union(*(keys for _, _, keys in fleets.values()))
    for n, report in reports.items():
        assert report["published"] == report["windows"] == len(fleets[n][2]), report
        assert outbox(tmp_path / f"agent{n}") == {}
    assert hub.signal(signal.SIGTERM) == 0
    assert_exactly_once(url, expected)
    assert proxy.resets >= 3


def test_half_open_links_of_the_hub_and_an_agent_are_noticed_per_keepalive_and_nothing_is_lost(
        procs: Processes, broker: LocalBroker, proxy: FaultProxy, prefix: str, tmp_path: Path) -> None:
    """``keepalive_s = 2`` for both: while an agent replays, the hub's link and the agent's go half-open
    (the proxy drops everything and closes nothing). Each process notices within two keepalives (plus its
    reconnect delay), connects again, and every result is stored exactly once."""
    keepalive = 2
    log, model, expected = fleet_files(tmp_path / "fleet", seconds=30.0)
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, proxy, url, prefix, tmp_path / "hub.log",  # type: ignore[arg-type]
                       env={"CLOUD_HUB_KEEPALIVE_S": str(keepalive)})
    hub.wait_started()
    state = tmp_path / "agent"
    agent = start_replay(procs, proxy, prefix, log, model, state, "--speed", "3",  # type: ignore[arg-type]
                         env={"EDGE_AGENT_KEEPALIVE_S": str(keepalive)})
    wait_for(lambda: proxy.link_of("edge-agent-") is not None and len(outbox(state)) > 0, timeout=60,
             what="the agent's link and its first results")
    noticed = {}
    for who in (f"{prefix}-hub", "edge-agent-"):
        old = proxy.link_of(who)
        assert old is not None
        proxy.blackhole(old)
        t0 = time.monotonic()
        wait_for(lambda who=who, old=old: proxy.link_of(who) not in (None, old), timeout=2 * keepalive + 30,
                 what=f"{who} to notice its half-open link and connect again")
        noticed[who] = time.monotonic() - t0
    for who, seconds in noticed.items():
        # noticed after 1-2 keepalives; then the reconnect (paho's first retry comes after about a second)
        assert keepalive * 0.9 <= seconds <= 2 * keepalive + 8, (who, noticed)
    report = finish(agent)
    assert report["published"] == report["windows"] == len(expected), report
    assert outbox(state) == {}
    assert hub.signal(signal.SIGTERM) == 0
    assert_exactly_once(url, expected)


def test_a_federated_round_through_a_faulty_network_completes_and_counts_each_update_once(
        procs: Processes, broker: LocalBroker, proxy: FaultProxy, prefix: str, tmp_path: Path) -> None:
    """`serve`, `federate` and three learning agents all reach the broker through the proxy, which resets
    and stalls their links at random during the round: the round completes, each device's update is
    counted once, and every device ends on the new version."""
    from tests.test_federated import DEVICES, Fleet, _devices, _updates

    fleet = Fleet(procs, proxy, prefix, tmp_path)
    stop = threading.Event()
    chaos = proxy.chaos(random.Random(26), stop, every_s=(0.5, 2.0))
    try:
        # At least one reset whatever the chaos picks: a round of this small model takes ~0.15 s, and on a quiet
        # machine it could end before the chaos's first reset (a swallow on an idle link never fires, a stall
        # resets nothing). Every link (the hub's, the agents') is reset as federate starts, before its round.
        for link in proxy.open_links():
            proxy.reset_now(link)
        fed = fleet.federate("--rounds", "1", "--deadline", "120", "--tolerance", "1", "--json")
        assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    finally:
        stop.set()
        chaos.join(10)
    out = (tmp_path / "federate.log").read_text()
    views = orjson.loads(out.strip().splitlines()[-1])["rounds"]
    assert [(v["round"], v["state"], v["new_version"], v["accepted"]) for v in views] == [(1, "published", 2, 3)], out
    accepted = [(r, d) for r, d, s, _, _ in _updates(fleet.url) if s == "accepted"]
    assert sorted(accepted) == [(1, d) for d in DEVICES]  # once each, whatever was sent again
    fleet.check(lambda: all(_devices(fleet.url).get(d) == 2 for d in DEVICES), "every device on v2")
    assert proxy.resets > 0
    fleet.stop()
