"""The real-broker harness and the MQTT link: publish and receive through mosquitto with our contract."""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time

import pytest

from cloud_hub.tools.local_broker import LocalBroker, derive_config, port_open
from edge_agent import contract as c
from edge_agent.mqtt import ConnectRefused, Message, MqttLink, Will
from edge_agent.settings.broker import BrokerURL


def _link(broker: LocalBroker, client_id: str, **kw) -> MqttLink:
    link = MqttLink(BrokerURL.parse(broker.url), client_id, **kw)
    link.start()
    link.wait_connected(10)
    link.wait_subscribed(10)
    return link


def test_derived_config_keeps_queue_limits(tmp_path) -> None:
    text = derive_config("listener 1883 127.0.0.1\nmax_queued_messages 0\npersistence_location /x/\n",
                         port=5555, workdir=tmp_path)
    assert "listener 5555 127.0.0.1" in text and "listener 1883" not in text
    assert "max_queued_messages 0" in text and "/x/" not in text


def test_publish_and_receive_results_through_real_broker(shared_broker: LocalBroker, prefix: str) -> None:
    topics = c.Topics(prefix)
    got: queue.Queue[Message] = queue.Queue()
    sub = _link(shared_broker, f"{prefix}-sub", on_message=got.put, subscriptions=[(topics.all_results, 1)])
    acked = threading.Event()
    pub = _link(shared_broker, f"{prefix}-pub", on_published=lambda mid, ok, rc: ok and acked.set())
    batch = c.ResultBatch("dev-1", (c.Result(7, 10.0, 12.0, 1, 0.3, "ABD", 0.8, truth="ABD"),))
    pub.publish(topics.results("dev-1"), batch.encode(), c.RESULTS_DELIVERY)
    msg = got.get(timeout=10)
    kind, device = topics.parse(msg.topic)
    assert (kind, device, msg.qos) == ("results", "dev-1", 1)
    assert c.decode_results(msg.payload, device) == batch
    assert acked.wait(10), "PUBACK reported"
    pub.stop()
    sub.stop()


def test_link_turns_nagle_off(shared_broker: LocalBroker, prefix: str) -> None:
    """Small packets (results, acks, receipts) must not wait behind a delayed ACK: TCP_NODELAY on the
    client's socket, and on the broker's through ``set_tcp_nodelay`` in the config tests derive."""
    link = _link(shared_broker, f"{prefix}-nodelay")
    sock = link._client.socket()
    assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    link.stop()
    assert "set_tcp_nodelay true" in shared_broker.config_path.read_text()


def test_last_will_marks_device_offline(broker: LocalBroker, prefix: str) -> None:
    topics = c.Topics(prefix)
    offline = c.Status("dev-2", c.OFFLINE, 0.0)
    dev = _link(broker, f"{prefix}-dev", keepalive_s=1,
                will=Will(topics.status("dev-2"), offline.encode(), c.STATUS_DELIVERY))
    dev.publish(topics.status("dev-2"), c.Status("dev-2", c.ONLINE, 1.0).encode(), c.STATUS_DELIVERY)
    got: queue.Queue[Message] = queue.Queue()
    watcher = _link(broker, f"{prefix}-watch", on_message=got.put, subscriptions=[(topics.all_status, 1)])
    assert c.decode_status(got.get(timeout=10).payload).state == c.ONLINE
    dev._client._sock.close()  # an abrupt network loss: the broker publishes the will  # type: ignore[union-attr]
    dev._client.loop_stop()
    assert c.decode_status(got.get(timeout=15).payload).state == c.OFFLINE
    watcher.stop()


def test_broker_stop_and_restart_keeps_port_and_retained(broker: LocalBroker, prefix: str) -> None:
    topics = c.Topics(prefix)
    pub = _link(broker, f"{prefix}-pub")
    acked = threading.Event()
    pub._on_published = lambda mid, ok, rc: acked.set()
    pub.publish(topics.status("d"), c.Status("d", c.ONLINE, 1.0).encode(), c.STATUS_DELIVERY)
    assert acked.wait(10)
    pub.stop()
    port, pid = broker.port, broker.pid
    broker.restart()
    assert broker.port == port and broker.pid != pid and port_open("127.0.0.1", port)
    got: queue.Queue[Message] = queue.Queue()
    sub = _link(broker, f"{prefix}-sub", on_message=got.put, subscriptions=[(topics.all_status, 1)])
    msg = got.get(timeout=10)
    assert msg.retain and c.decode_status(msg.payload).state == c.ONLINE
    sub.stop()


def test_refused_connack_is_an_error(tmp_path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "secret"], check=True)
    pw.chmod(0o600)
    base = tmp_path / "base.conf"
    base.write_text(f"allow_anonymous false\npassword_file {pw}\n")
    with LocalBroker(tmp_path / "b", base_config=base) as broker:
        good = MqttLink(BrokerURL.parse(f"mqtt://alice:secret@127.0.0.1:{broker.port}"), "good")
        good.start()
        good.wait_connected(10)
        good.stop()
        bad = MqttLink(BrokerURL.parse(f"mqtt://alice:wrong@127.0.0.1:{broker.port}"), "bad")
        bad.start()
        with pytest.raises(ConnectRefused, match="Not authorized|Bad user name or password"):
            bad.wait_connected(10)
        bad.stop()



def burst_through_lingering_link(url: str, topic: str, *, pub_url: str | None = None, tls=None, n: int = 300,
                                 linger_s: float = 0.05) -> None:
    """``n`` QoS 1 messages published 2 ms apart reach a link whose network thread rests ``linger_s`` between
    turns: every one, once, in order, in far fewer turns than messages. paho's own loop turns once a message at
    this pace (the cost the rest saves), and reads one packet a turn: without the draining, ``n`` messages
    would take ``n`` rests (15 s here, past the wait)."""
    got: list[bytes] = []
    cond = threading.Condition()

    def on_message(m: Message) -> None:
        with cond:
            got.append(m.payload)
            cond.notify_all()
        sub.ack(m.mid, m.qos)

    broker = BrokerURL.parse(url)
    sub = MqttLink(broker, f"linger-sub-{threading.get_ident()}", tls=tls, manual_ack=True, linger_s=linger_s,
                   on_message=on_message, subscriptions=[(topic, 1)])
    pub = MqttLink(BrokerURL.parse(pub_url or url), f"linger-pub-{threading.get_ident()}", tls=tls)
    turns = [0]
    loop = sub._client._loop
    sub._client._loop = lambda timeout=1.0: (turns.__setitem__(0, turns[0] + 1), loop(timeout))[1]  # type: ignore[method-assign]
    try:
        for link in (sub, pub):
            link.start()
            link.wait_connected(10)
        sub.wait_subscribed(10)
        want = [b"m%04d" % i for i in range(n)]
        for payload in want:
            pub.publish(topic, payload, c.RESULTS_DELIVERY)
            time.sleep(0.002)  # a fleet's pace, not a burst: each message would wake paho's thread on its own
        with cond:
            assert cond.wait_for(lambda: len(got) >= n, 10), f"{len(got)} of {n} messages in 10 s"
        assert got == want
        assert turns[0] < n / 3, f"{turns[0]} turns of the network thread for {n} messages"
    finally:
        pub.stop()
        sub.stop()


def test_a_lingering_link_reads_a_burst_in_few_turns(shared_broker: LocalBroker, prefix: str) -> None:
    burst_through_lingering_link(shared_broker.url, f"{prefix}/linger")


def test_dev_broker_keeps_retained_models_across_a_restart(procs, prefix: str) -> None:
    """`./dev broker PORT`, the README's private broker: the repository's config on that port, with its
    persistence folder made (mosquitto does not make it, and logged an error at every autosave): a retained
    model survives a restart, as the config promises."""
    from pathlib import Path

    from cloud_hub.tools.local_broker import free_port
    from tests.helpers import wait_for

    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    topic = c.Topics(prefix).model("dev-broker")

    def start() -> subprocess.Popen:
        proc = procs.popen([str(repo / "dev"), "broker", str(port)], cwd=repo, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        wait_for(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, what="./dev broker")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return proc

    first = start()
    pub = _link_url(url, f"{prefix}-retain", on_published=None)
    pub.publish(topic, b"bundle v1", c.MODEL_DELIVERY)
    pub.stop()  # waits for its PUBACK: the broker holds it
    first.terminate()
    assert first.wait(10) == 0
    said = first.stderr.read().decode() if first.stderr else ""
    assert "Error" not in said, said  # "Error saving in-memory database" without its folder
    start()
    got: queue.Queue[Message] = queue.Queue()
    sub = _link_url(url, f"{prefix}-read", on_message=got.put, subscriptions=[(topic, 1)])
    msg = got.get(timeout=10)
    sub.publish(topic, b"", c.MODEL_DELIVERY)  # cleared: mosquitto-data/ is the developer's
    sub.stop()
    assert (msg.payload, msg.retain) == (b"bundle v1", True)


def _link_url(url: str, client_id: str, **kw) -> MqttLink:
    link = MqttLink(BrokerURL.parse(url), client_id, **kw)
    link.start()
    link.wait_connected(10)
    link.wait_subscribed(10)
    return link
