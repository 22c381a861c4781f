"""A device's MQTT session outlives its connection: a reconnect does not download the retained model again,
and a model published while the device was away reaches it when it is back (issue #27 §2: 10,000 devices
reconnecting after a broker restart fetched 3.5 GB of retained bundles).

A real agent (`edge-agent run`, one device) reaches a real mosquitto through :class:`FaultProxy`, which
cuts its connection and counts the bytes that come down to it; a watcher reads the agent's status straight
from the broker."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from edge_agent.mqtt import MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.faultproxy import FaultProxy
from tests.helpers import Processes, agent_cmd, make_bundle, make_log, publish_retained, wait_for

DEVICE = "sess-1"


@pytest.fixture
def proxy(broker: LocalBroker) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", broker.port).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    log = make_log(tmp_path_factory.mktemp("session") / "log.csv", seconds=30.0)
    return {v: make_bundle(log, version=v).encode() for v in (1, 2, 3)}


class StatusWatch:
    """The agent's last status, read from the broker itself (not through the proxy)."""

    def __init__(self, broker: LocalBroker, prefix: str) -> None:
        self.seen: queue.SimpleQueue[c.Status] = queue.SimpleQueue()
        self.last: c.Status | None = None
        self.link = MqttLink(BrokerURL.parse(broker.url), f"watch-{prefix}",
                             subscriptions=[(c.Topics(prefix).status(DEVICE), 1)],
                             on_message=lambda m: self.seen.put(c.decode_status(m.payload, DEVICE)))
        self.link.start()
        self.link.wait_connected(10)

    def now(self) -> c.Status | None:
        while not self.seen.empty():
            self.last = self.seen.get()
        return self.last

    def wait(self, what: str, check) -> None:
        wait_for(lambda: (s := self.now()) is not None and check(s), timeout=60, what=what)


def start_agent(procs: Processes, proxy: FaultProxy, prefix: str, state: Path, **env: str) -> subprocess.Popen:
    """A live agent (simulated readings: it ticks, swaps models and reports its status between chunks)."""
    return procs.popen(agent_cmd("run", "--broker", proxy.url, "--prefix", prefix, "--device-id", DEVICE,
                                 "--state-dir", str(state), "--source", "simulated"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "EDGE_AGENT_INSECURE_ALLOW_UNSIGNED": "true",
                            "EDGE_AGENT_STATUS_INTERVAL_S": "1", "EDGE_AGENT_SIM_RATE_HZ": "20", **env})


def stop(agent: subprocess.Popen, watch: StatusWatch) -> None:
    watch.link.stop()
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=60)
    assert "Traceback" not in err, err


def test_a_reconnect_keeps_the_session_and_fetches_only_what_is_new(procs, broker, prefix, proxy, bundles,
                                                                      tmp_path: Path) -> None:
    topic = c.Topics(prefix).model("default")
    publish_retained(broker.url, topic, bundles[1])
    watch = StatusWatch(broker, prefix)
    agent = start_agent(procs, proxy, prefix, tmp_path / "state")
    try:
        watch.wait("the agent online on v1", lambda s: s.state == c.ONLINE and s.model_version == 1)
        first = proxy.link_of(f"edge-agent-{DEVICE}")
        assert first is not None and first.down > len(bundles[1])  # a new process asks for the retained bundle

        # 1. the connection drops and comes back: the session is resumed, the retained v1 is not sent again
        proxy.reset_now(first)
        wait_for(lambda: (ln := proxy.link_of(f"edge-agent-{DEVICE}")) is not None and ln is not first,
                 timeout=60, what="the agent reconnected")
        second = proxy.link_of(f"edge-agent-{DEVICE}")
        publish_retained(broker.url, topic, bundles[2])  # comes down after anything the broker sent on connect
        watch.wait("the agent on v2", lambda s: s.model_version == 2)
        assert len(bundles[2]) <= second.down < len(bundles[2]) + len(bundles[1]), second.down

        # 2. a model published while the device is away is queued in its session and arrives when it is back
        proxy.refusing = True
        proxy.reset_now(second)
        watch.wait("the broker's last will for the agent", lambda s: s.state == c.OFFLINE)
        publish_retained(broker.url, topic, bundles[3])
        proxy.refusing = False
        watch.wait("the agent back on v3", lambda s: s.state == c.ONLINE and s.model_version == 3)
    finally:
        stop(agent, watch)


def test_clean_sessions_when_the_operator_asks(procs, broker, prefix, proxy, bundles, tmp_path: Path) -> None:
    """session_expiry_s = 0: every connect is a new session, and the retained model comes down again."""
    topic = c.Topics(prefix).model("default")
    publish_retained(broker.url, topic, bundles[1])
    watch = StatusWatch(broker, prefix)
    agent = start_agent(procs, proxy, prefix, tmp_path / "state", EDGE_AGENT_SESSION_EXPIRY_S="0")
    try:
        watch.wait("the agent online on v1", lambda s: s.state == c.ONLINE and s.model_version == 1)
        first = proxy.link_of(f"edge-agent-{DEVICE}")
        proxy.reset_now(first)
        wait_for(lambda: (ln := proxy.link_of(f"edge-agent-{DEVICE}")) is not None and ln is not first
                 and ln.down > len(bundles[1]), timeout=60, what="the retained v1 downloaded again")
    finally:
        stop(agent, watch)


@pytest.mark.parametrize("expiry", ["86400", "0"])
def test_a_canary_rolled_back_while_the_device_was_away_ends_when_it_is_back(procs, broker, prefix, proxy, bundles,
                                                                               tmp_path: Path, expiry: str) -> None:
    """The rollback's empty message waits in the kept session; without one (clean sessions, an expired or lost
    session) the agent forgets its canary at a reconnect that resumed nothing, and the fleet's bundle wins."""
    topics = c.Topics(prefix)
    publish_retained(broker.url, topics.model("default"), bundles[1])
    publish_retained(broker.url, topics.device_model(DEVICE), bundles[2])  # the device is in a canary of v2
    watch = StatusWatch(broker, prefix)
    agent = start_agent(procs, proxy, prefix, tmp_path / "state", EDGE_AGENT_SESSION_EXPIRY_S=expiry)
    try:
        watch.wait("the agent on its canary, v2", lambda s: s.state == c.ONLINE and s.model_version == 2)
        proxy.refusing = True
        proxy.reset_now(proxy.link_of(f"edge-agent-{DEVICE}"))
        watch.wait("the broker's last will for the agent", lambda s: s.state == c.OFFLINE)
        publish_retained(broker.url, topics.device_model(DEVICE), b"")  # the canary is rolled back
        proxy.refusing = False
        watch.wait("the agent back on the fleet's v1", lambda s: s.state == c.ONLINE and s.model_version == 1)
    finally:
        stop(agent, watch)


def test_a_new_process_starts_its_own_session(procs, broker, prefix, proxy, bundles, tmp_path: Path) -> None:
    """A killed agent leaves its session at the broker; the next process with that client id (here moved to
    another prefix) must not inherit its subscriptions and get what is published under the old prefix."""
    old, new = c.Topics(prefix), c.Topics(f"{prefix}-moved")
    publish_retained(broker.url, old.model("default"), bundles[1])
    publish_retained(broker.url, new.model("default"), bundles[1])
    first = start_agent(procs, proxy, prefix, tmp_path / "old")
    watch = StatusWatch(broker, prefix)
    watch.wait("the first agent online", lambda s: s.state == c.ONLINE and s.model_version == 1)
    first.kill()  # no DISCONNECT: its session stays
    first.wait(30)
    watch.link.stop()
    watch = StatusWatch(broker, f"{prefix}-moved")
    second = start_agent(procs, proxy, f"{prefix}-moved", tmp_path / "new")
    try:
        watch.wait("the agent under the new prefix", lambda s: s.state == c.ONLINE and s.model_version == 1)
        link = proxy.link_of(f"edge-agent-{DEVICE}")
        before = link.down
        publish_retained(broker.url, old.model("default"), bundles[3])  # the old prefix's: not for it any more
        publish_retained(broker.url, new.model("default"), bundles[2])
        watch.wait("the agent on v2", lambda s: s.model_version == 2)
        assert link.down - before < len(bundles[2]) + len(bundles[3]), link.down - before
    finally:
        stop(second, watch)


def test_the_session_survives_a_broker_restart(procs, broker, prefix, proxy, bundles, tmp_path: Path) -> None:
    """mosquitto saves only the sessions whose last connect did not start clean: an agent restarted on the
    same state dir resumes its session from the first connect, so a broker restart (the reconnect storm of
    docs/scale.md) does not send every device the retained model again."""
    topic = c.Topics(prefix).model("default")
    publish_retained(broker.url, topic, bundles[1])
    watch = StatusWatch(broker, prefix)
    state = tmp_path / "state"
    first = start_agent(procs, proxy, prefix, state)
    watch.wait("the agent online on v1", lambda s: s.state == c.ONLINE and s.model_version == 1)
    stop(first, watch)  # a clean exit; the next process of this state dir resumes from its first connect
    watch = StatusWatch(broker, prefix)
    agent = start_agent(procs, proxy, prefix, state)
    try:
        watch.wait("the agent online again", lambda s: s.state == c.ONLINE and s.model_version == 1
                   and (ln := proxy.link_of(f"edge-agent-{DEVICE}")) is not None and not ln.closed)
        before = proxy.link_of(f"edge-agent-{DEVICE}")
        watch.link.stop()
        broker.restart()  # SIGTERM: mosquitto saves its sessions, then starts again on the same port
        watch = StatusWatch(broker, prefix)
        wait_for(lambda: (ln := proxy.link_of(f"edge-agent-{DEVICE}")) is not None and ln is not before,
                 timeout=60, what="the agent reconnected to the restarted broker")
        after = proxy.link_of(f"edge-agent-{DEVICE}")
        publish_retained(broker.url, topic, bundles[2])
        watch.wait("the agent on v2", lambda s: s.model_version == 2)
        assert len(bundles[2]) <= after.down < len(bundles[2]) + len(bundles[1]), after.down
    finally:
        stop(agent, watch)
