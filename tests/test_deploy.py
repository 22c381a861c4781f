"""The production broker config (deploy/mosquitto/) on a real mosquitto: every access rule holds.

The broker runs ``deploy/mosquitto/mosquitto.conf`` itself, with only its listener ports and file
locations rewritten into a temporary folder, the shipped ``acl`` verbatim, certificates from
``make-dev-certs.sh`` and passwords from ``add-device.sh``. Clients are :class:`MqttLink`.

mosquitto drops an ACL-denied publish (an MQTT 5 client gets a PUBACK "Not authorized") and grants
a SUBSCRIBE to a denied topic but delivers nothing on it. So a "cannot" test publishes the forbidden
message, waits for its PUBACK (sent after the broker has routed or dropped it), then publishes a
permitted marker and asserts that only the marker arrives at a subscriber that would have seen
both: the forbidden one would have come first. No sleep decides an outcome.

Each forged publish gets a connection of its own: mosquitto 2.0.11 with ``max_queued_messages 0``
closes a client's connection on the packet after an ACL-denied QoS 1 publish (the client
reconnects after its 1 s backoff; eclipse-mosquitto #2579, #3088), which would only slow the test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import LocalBroker, free_port, port_open
from edge_agent import contract as c
from edge_agent.mqtt import ConnectRefused, Message, MqttError, MqttLink
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.broker import BrokerURL, TLSFiles
from edge_agent.settings.loader import load_settings
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MOSQ = DEPLOY / "mosquitto"
PASSWORDS = {"hub": "hub-secret", "dev-a": "a-secret", "dev-b": "b-secret"}
T = c.Topics()  # the ACL is written for the default prefix
QOS1 = c.Delivery(qos=1, retain=False)
RETAINED = c.Delivery(qos=1, retain=True)
NOT_RETAINED = c.Delivery(qos=1, retain=False)


def derive_deploy_config(text: str, *, tls_port: int, mtls_port: int, root: Path) -> str:
    """The shipped config with loopback ports and its files under ``root``; every other line kept."""
    ports = {"8883": tls_port, "8884": mtls_port}
    out = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["listener"]:
            line = f"listener {ports[words[1]]} 127.0.0.1"  # a new listener must be added here
        elif words[:1] == ["user"]:
            continue
        elif not words or words[0].startswith("#"):
            out.append(line)
            continue
        out.append(line.replace("/etc/mosquitto/", f"{root}/etc/").replace("/var/lib/mosquitto/", f"{root}/data/"))
    # As root, mosquitto would switch to user `mosquitto`, which cannot read our temporary files.
    out.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
    return "\n".join(out) + "\n"


@dataclass
class Deploy:
    broker: LocalBroker
    tls_port: int
    mtls_port: int
    etc: Path

    @property
    def certs(self) -> Path:
        return self.etc / "certs"

    def tls(self, client: str | None = None) -> TLSFiles:
        ca = str(self.certs / "ca.crt")
        if client is None:
            return TLSFiles(ca)
        return TLSFiles(ca, str(self.certs / f"{client}.crt"), str(self.certs / f"{client}.key"))


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    root = tmp_path_factory.mktemp("deploy")
    etc = root / "etc"
    etc.mkdir()
    (root / "data").mkdir()
    subprocess.run([str(MOSQ / "make-dev-certs.sh"), str(etc / "certs"), "hub", "dev-a", "dev-b"],
                   check=True, capture_output=True)
    for user, password in PASSWORDS.items():
        subprocess.run([str(MOSQ / "add-device.sh"), "-p", str(etc / "passwd"), user, password],
                       check=True, capture_output=True)
    shutil.copy(MOSQ / "acl", etc / "acl")
    tls_port = free_port()
    mtls_port = free_port()
    while mtls_port == tls_port:
        mtls_port = free_port()
    text = derive_deploy_config((MOSQ / "mosquitto.conf").read_text(), tls_port=tls_port, mtls_port=mtls_port,
                                root=root)
    broker = LocalBroker(root / "broker", port=tls_port, config_text=text).start()
    yield Deploy(broker, tls_port, mtls_port, etc)
    broker.stop()


@pytest.fixture(scope="module")
def retire() -> Iterator[Callable[[MqttLink], None]]:
    """Stop links at the end of the module, all at once.

    A link that never connected sits in paho's reconnect backoff, and stopping it waits up to a
    second for that sleep to end: paid once here instead of once per link.
    """
    links: list[MqttLink] = []
    yield links.append
    with ThreadPoolExecutor(max(len(links), 1)) as pool:
        list(pool.map(MqttLink.stop, links))


class Peer:
    """An MqttLink that records what it receives and the outcome of each publish."""

    def __init__(self, url: str, client_id: str, *, tls: TLSFiles | None, cond: threading.Condition,
                 subscriptions: Sequence[tuple[str, int]] = (), sync_topic: str | None = None) -> None:
        self._cond = cond  # shared by the peers of one test, so a wait can span several of them
        self.messages: list[Message] = []
        self._acks: dict[int, tuple[bool, str]] = {}
        subs = [*subscriptions, *([(sync_topic, 1)] if sync_topic else [])]
        self.link = MqttLink(BrokerURL.parse(url), client_id, tls=tls, subscriptions=subs,
                             on_message=self._on_message, on_published=self._on_published)
        self.link.start()
        try:
            self.link.wait_connected(10)
            if sync_topic:
                # Subscriptions are handled in order: once the last one delivers, all are active.
                self.publish(sync_topic, b"sync:" + uuid.uuid4().bytes.hex().encode())
                self.wait_for(lambda m: m.payload.startswith(b"sync:"))
        except BaseException:
            self.link.stop()
            raise

    def _on_message(self, msg: Message) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_published(self, mid: int, ok: bool, reason: str) -> None:
        with self._cond:
            self._acks[mid] = (ok, reason)
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, delivery: c.Delivery = QOS1) -> tuple[bool, str]:
        """Publish at QoS 1 and return the PUBACK's (success, reason)."""
        mid = self.link.publish(topic, payload, delivery)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, 10), f"no PUBACK for {topic}"
            return self._acks.pop(mid)

    def wait_for(self, pred: Callable[[Message], bool], timeout: float = 10) -> list[Message]:
        """Every message received up to and including the first that satisfies ``pred``."""
        def upto() -> list[Message] | None:
            for i, m in enumerate(self.messages):
                if pred(m):
                    return self.messages[: i + 1]
            return None

        with self._cond:
            got = self._cond.wait_for(upto, timeout)
            assert got is not None, f"expected message never arrived; got {[m.topic for m in self.messages]}"
            return got

    def stop(self) -> None:
        self.link.stop()


@pytest.fixture
def peers(deploy: Deploy, retire: Callable[[MqttLink], None]) -> Iterator[Callable[..., Peer]]:
    """Connect as ``user`` (password over TLS on 8883, or ``cert=True``: certificate on 8884).

    Peers stop when the test ends; ``linger=True`` ones (no subscriptions) at the end of the module.
    """
    made: list[Peer] = []
    n = iter(range(1000))
    cond = threading.Condition()

    def connect(user: str, *, cert: bool = False, subscriptions: Sequence[tuple[str, int]] = (),
                sync: bool = True, linger: bool = False) -> Peer:
        if cert:
            url, tls = f"mqtts://127.0.0.1:{deploy.mtls_port}", deploy.tls(user)
        else:
            url, tls = f"mqtts://{user}:{PASSWORDS[user]}@127.0.0.1:{deploy.tls_port}", deploy.tls()
        # A topic this identity may both publish and read: proves its subscriptions are active.
        sync_topic = T.model(f"sync-{uuid.uuid4().hex[:8]}") if user == "hub" else T.status(user)
        peer = Peer(url, f"{user}-{next(n)}-{uuid.uuid4().hex[:6]}", tls=tls, cond=cond,
                    subscriptions=subscriptions, sync_topic=sync_topic if subscriptions and sync else None)
        if linger and not subscriptions:
            retire(peer.link)
        else:
            made.append(peer)
        return peer

    yield connect
    # In parallel: a link stopped during paho's reconnect backoff takes up to a second to join.
    with ThreadPoolExecutor(max(len(made), 1)) as pool:
        list(pool.map(Peer.stop, made))


@pytest.fixture
def tag() -> bytes:
    """A payload prefix unique to this test: retained messages of earlier tests never match it."""
    return uuid.uuid4().hex.encode()


def ours(tag: bytes, messages: list[Message]) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in messages if m.payload.startswith(tag)]


def model_topic() -> str:
    return T.model(f"m-{uuid.uuid4().hex[:8]}")


# --------------------------------------------------------------------------- the config itself


def _settings(text: str) -> dict[str, str]:
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def test_shipped_config_is_locked_down_and_keeps_the_queue_limits(tmp_path: Path) -> None:
    text = (MOSQ / "mosquitto.conf").read_text()
    conf = _settings(text)
    assert conf["allow_anonymous"] == "false"
    assert conf["password_file"] == "/etc/mosquitto/passwd" and conf["acl_file"] == "/etc/mosquitto/acl"
    assert "listener 1883" not in [line.strip() for line in text.splitlines()]  # no plain listener
    for key in ("cafile", "certfile", "keyfile", "require_certificate", "use_identity_as_username"):
        assert key in conf
    dev = _settings((REPO / "mosquitto.conf").read_text())
    for key in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_packet_size",
                "set_tcp_nodelay", "persistence", "persistent_client_expiration"):
        assert conf[key] == dev[key], key
    assert int(conf["max_queued_messages"]) >= 10_000_000 and int(conf["max_queued_bytes"]) > 0
    derived = derive_deploy_config(text, tls_port=1, mtls_port=2, root=tmp_path)
    assert not [v for v in _settings(derived).values() if "/etc/mosquitto" in v or "/var/lib/mosquitto" in v]
    changed = [(a, b) for a, b in zip(text.splitlines(), derived.splitlines(), strict=False) if a != b]
    assert all(a.split()[0] in ("listener", "password_file", "acl_file", "cafile", "certfile", "keyfile",
                                "persistence_location") for a, _ in changed), changed


def test_acl_prefix_matches_the_contract() -> None:
    assert T.prefix == "edgeml"
    acl = (MOSQ / "acl").read_text()
    assert "pattern readwrite edgeml/devices/%u/results" in acl
    rules = [line for line in acl.splitlines() if line.strip() and not line.startswith("#")]
    assert not [r for r in rules if "%c" in r]  # the client id is chosen by the client: never trust it


# --------------------------------------------------------------------------- devices


def test_device_publishes_its_own_results_and_status_to_the_hub(peers, tag: bytes) -> None:
    hub = peers("hub", subscriptions=[(T.all_results, 1), (T.all_status, 1)])
    dev = peers("dev-a")
    batch = c.ResultBatch("dev-a", (c.Result(1, 0.0, 2.0, 1, 0.4, "ABD", 0.9),)).encode()
    assert dev.publish(T.results("dev-a"), tag + batch)[0]
    assert dev.publish(T.status("dev-a"), tag + b"online")[0]
    got = hub.wait_for(lambda m: m.payload == tag + b"online")
    assert ours(tag, got) == [(T.results("dev-a"), tag + batch), (T.status("dev-a"), tag + b"online")]


def forge(peers, user: str, topics: Sequence[str], payload: bytes, *, cert: bool = False,
          retain: bool = False) -> None:
    """Publish as ``user`` to each topic, each from a fresh connection; every PUBACK says "Not authorized"."""
    for topic in topics:
        # mosquitto 2.0.11 drops this connection on its next packet; paho then sits in its
        # reconnect backoff, so stopping it costs up to a second: done once, at the end.
        peer = peers(user, cert=cert, linger=True)
        ok, reason = peer.publish(topic, payload, RETAINED if retain else QOS1)
        assert not ok and "Not authorized" in reason, (topic, reason)  # mosquitto 2.x, MQTT 5


def test_device_cannot_publish_as_another_device(peers, tag: bytes) -> None:
    hub = peers("hub", subscriptions=[(T.all_results, 1), (T.all_status, 1), ("#", 1)])
    forge(peers, "dev-a", [T.results("dev-b"), T.status("dev-b"), "edgeml/devices/dev-a/other", "elsewhere"],
          tag + b"forged")
    dev = peers("dev-a")
    assert dev.publish(T.results("dev-a"), tag + b"marker")[0]
    got = hub.wait_for(lambda m: m.payload == tag + b"marker")
    assert set(ours(tag, got)) == {(T.results("dev-a"), tag + b"marker")}


def test_device_cannot_publish_a_model(peers, tag: bytes) -> None:
    topic = model_topic()
    hub = peers("hub", subscriptions=[(topic, 1), (T.all_results, 1)])
    assert hub.publish(topic, tag + b"signed bundle", RETAINED)[0]
    forge(peers, "dev-a", [topic], tag + b"evil bundle", retain=True)
    dev = peers("dev-a")
    assert dev.publish(T.results("dev-a"), tag + b"marker")[0]
    got = hub.wait_for(lambda m: m.payload == tag + b"marker")
    assert ours(tag, got) == [(topic, tag + b"signed bundle"), (T.results("dev-a"), tag + b"marker")]
    # The retained bundle is still the hub's: what every device gets on (re)connect.
    other = peers("dev-b", subscriptions=[(topic, 1)], sync=False)
    first = other.wait_for(lambda m: m.topic == topic)[-1]
    assert first.retain and first.payload == tag + b"signed bundle"


def test_device_cannot_read_another_devices_topics(peers, tag: bytes) -> None:
    b = peers("dev-b")
    assert b.publish(T.status("dev-b"), tag + b"b status", RETAINED)[0]  # retained: offered on subscribe
    spy_filters = [T.results("dev-b"), T.status("dev-b"), T.all_results, T.all_status, "#",
                   T.shared(T.all_results, "spies")]
    a = peers("dev-a", subscriptions=[(f, 1) for f in spy_filters])
    hub = peers("hub", subscriptions=[(T.all_results, 1)])
    assert b.publish(T.results("dev-b"), tag + b"b result")[0]
    hub.wait_for(lambda m: m.payload == tag + b"b result")  # the broker has routed it to everyone
    assert a.publish(T.results("dev-a"), tag + b"marker")[0]
    got = a.wait_for(lambda m: m.payload == tag + b"marker")
    assert {topic for topic, _ in ours(tag, got)} == {T.results("dev-a")}
    assert not [m for m in a.messages if "dev-b" in m.topic]


def test_device_reads_the_model_topic(peers, tag: bytes) -> None:
    topic = model_topic()
    hub = peers("hub")
    assert hub.publish(topic, tag + b"bundle v1", RETAINED)[0]
    dev = peers("dev-a", subscriptions=[(f"{T.prefix}/models/+", 1)])  # wildcard: every model, as allowed
    retained = dev.wait_for(lambda m: m.topic == topic)[-1]
    assert retained.retain and retained.payload == tag + b"bundle v1"
    assert hub.publish(topic, tag + b"bundle v2", RETAINED)[0]
    assert dev.wait_for(lambda m: m.payload == tag + b"bundle v2")[-1].topic == topic


def test_device_reads_only_its_own_receipts_and_only_the_hub_writes_them(peers, tag: bytes) -> None:
    a = peers("dev-a", subscriptions=[(T.receipts("dev-a"), 1), (T.receipts("dev-b"), 1), (T.all_receipts, 1)])
    forge(peers, "dev-a", [T.receipts("dev-a"), T.receipts("dev-b")], tag + b"forged receipt")
    forge(peers, "dev-b", [T.receipts("dev-a")], tag + b"forged receipt")
    hub = peers("hub")
    assert hub.publish(T.receipts("dev-b"), tag + b"for b")[0]
    assert hub.publish(T.receipts("dev-a"), tag + b"for a")[0]
    got = a.wait_for(lambda m: m.payload == tag + b"for a")
    assert set(ours(tag, got)) == {(T.receipts("dev-a"), tag + b"for a")}, "nothing forged, nothing of b's"


def test_device_reads_only_its_own_canary_bundle_and_only_the_hub_writes_it(peers, tag: bytes) -> None:
    a = peers("dev-a", subscriptions=[(T.device_model("dev-a"), 1), (T.device_model("dev-b"), 1),
                                      (f"{T.prefix}/devices/+/model", 1)])
    forge(peers, "dev-a", [T.device_model("dev-a"), T.device_model("dev-b")], tag + b"forged bundle")
    forge(peers, "dev-b", [T.device_model("dev-a")], tag + b"forged bundle")
    hub = peers("hub")
    assert hub.publish(T.device_model("dev-b"), tag + b"canary for b")[0]
    assert hub.publish(T.device_model("dev-a"), tag + b"canary for a")[0]
    got = a.wait_for(lambda m: m.payload == tag + b"canary for a")
    assert set(ours(tag, got)) == {(T.device_model("dev-a"), tag + b"canary for a")}, "nothing forged, nothing of b's"


def test_device_reads_the_round_and_writes_only_its_own_update(peers, tag: bytes) -> None:
    hub = peers("hub", subscriptions=[(T.all_updates, 1)])
    a = peers("dev-a", subscriptions=[(T.rounds("default"), 1), (T.update("dev-b"), 1)])
    forge(peers, "dev-a", [T.rounds("default"), T.update("dev-b")], tag + b"forged")
    assert hub.publish(T.rounds("default"), tag + b"round 1", RETAINED)[0]
    assert a.wait_for(lambda m: m.payload == tag + b"round 1")[-1].retain is False  # live, not from the store
    b = peers("dev-b")
    assert b.publish(T.update("dev-b"), tag + b"update of b")[0]
    got = hub.wait_for(lambda m: m.payload == tag + b"update of b")
    assert ours(tag, got) == [(T.update("dev-b"), tag + b"update of b")], "nothing forged reached the hub"
    assert ours(tag, a.messages) == [(T.rounds("default"), tag + b"round 1")], "a reads no other device's update"
    assert hub.publish(T.rounds("default"), b"", RETAINED)[0]  # clear it for the other tests


@pytest.mark.parametrize("kind", ["step", "receipt"])
def test_a_message_for_one_device_reaches_it_only_and_only_the_hub_writes_it(peers, tag: bytes, kind: str) -> None:
    """A secure round's step holds the shares sealed for one device; a round answer's receipt makes a device forget
    an answer: another device neither reads nor forges either."""
    topic, delivery = (T.round_step, RETAINED) if kind == "step" else (T.answered, NOT_RETAINED)
    a = peers("dev-a", subscriptions=[(topic("dev-a"), 1), (topic("dev-b"), 1)])
    forge(peers, "dev-b", [topic("dev-a"), topic("dev-b")], tag + b"forged")
    hub = peers("hub")
    assert hub.publish(topic("dev-b"), tag + b"for b", delivery)[0]
    assert hub.publish(topic("dev-a"), tag + b"for a", delivery)[0]
    got = a.wait_for(lambda m: m.payload == tag + b"for a")
    assert ours(tag, got) == [(topic("dev-a"), tag + b"for a")], "nothing forged, nothing of b's"
    if delivery.retain:
        for device in ("dev-a", "dev-b"):
            assert hub.publish(topic(device), b"", RETAINED)[0]


# --------------------------------------------------------------------------- the hub


def test_hub_workers_share_the_fleet_through_a_shared_subscription(peers, tag: bytes) -> None:
    shared = T.shared(T.all_results, "hubs")
    hubs = [peers("hub", subscriptions=[(shared, 1)]) for _ in range(2)]
    devs = {d: peers(d) for d in ("dev-a", "dev-b")}
    sent = {(T.results(d), tag + f"{d}-{i}".encode()) for d in devs for i in range(10)}
    for topic, payload in sorted(sent):
        assert devs[topic.split("/")[2]].publish(topic, payload)[0]
    with hubs[0]._cond:  # one condition for all peers: wait until the two workers hold all 20
        assert hubs[0]._cond.wait_for(
            lambda: len([x for h in hubs for x in ours(tag, h.messages)]) >= len(sent), 10)
        got = [x for h in hubs for x in ours(tag, h.messages)]
    assert sorted(got) == sorted(sent)  # every result once, split between the workers
    assert all(ours(tag, h.messages) for h in hubs)  # both took a share (mosquitto: round robin)


def test_hub_with_a_client_certificate_reads_devices_with_certificates(peers, tag: bytes) -> None:
    hub = peers("hub", cert=True, subscriptions=[(T.all_results, 1)])
    # CN=dev-a is the username: the same ACL applies.
    forge(peers, "dev-a", [T.results("dev-b"), T.model("default")], tag + b"forged", cert=True)
    dev = peers("dev-a", cert=True)
    assert dev.publish(T.results("dev-a"), tag + b"marker")[0]
    got = hub.wait_for(lambda m: m.payload == tag + b"marker")
    assert ours(tag, got) == [(T.results("dev-a"), tag + b"marker")]


# --------------------------------------------------------------------------- authentication, TLS


def test_wrong_password_unknown_user_and_anonymous_are_refused(deploy: Deploy, retire) -> None:
    port = deploy.tls_port
    urls = (f"mqtts://dev-a:wrong@127.0.0.1:{port}", f"mqtts://dev-a:b-secret@127.0.0.1:{port}",
            f"mqtts://nobody:x@127.0.0.1:{port}", f"mqtts://127.0.0.1:{port}")
    links = [MqttLink(BrokerURL.parse(url), f"intruder-{uuid.uuid4().hex[:6]}", tls=deploy.tls()) for url in urls]
    for link in links:
        retire(link)
        link.start()
    for url, link in zip(urls, links, strict=True):
        with pytest.raises(ConnectRefused) as err:
            link.wait_connected(10)
        assert "Not authorized" in err.value.reason or "Bad user name or password" in err.value.reason, url


def _fails_to_connect(retire: Callable[[MqttLink], None], url: str, tls: TLSFiles | None) -> str:
    link = MqttLink(BrokerURL.parse(url), f"probe-{uuid.uuid4().hex[:6]}", tls=tls)
    retire(link)
    link.start()
    # The TLS handshake fails at once on loopback, so no CONNACK ever comes; a longer wait could
    # only turn a failure into a pass, never the reverse.
    with pytest.raises(MqttError) as err:
        link.wait_connected(0.5)
    assert not link.connected
    return str(err.value)


def test_tls_verifies_the_broker_by_name_and_ca(deploy: Deploy, retire) -> None:
    url = f"mqtts://dev-a:{PASSWORDS['dev-a']}@localhost:{deploy.tls_port}"  # the DNS SAN
    link = MqttLink(BrokerURL.parse(url), "dev-a-localhost", tls=deploy.tls())
    link.start()
    try:
        link.wait_connected(10)
    finally:
        link.stop()
    why = _fails_to_connect(retire, url, TLSFiles())  # the system CAs do not trust the development CA
    # a new operator's finding: the cause was "the TLS/MQTT handshake fails", not a word of certificates
    assert "the broker's certificate is not accepted: " in why and "ca_file must hold the CA that signed it" in why, why
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_exchange(deploy.tls_port, ssl.create_default_context())


def _tls_exchange(port: int, ctx: ssl.SSLContext) -> bytes:
    """TLS handshake, then an MQTT CONNECT; what comes back (b"" when the broker hangs up)."""
    connect = bytes([0x10, 16, 0, 4, *b"MQTT", 5, 0x02, 0, 30, 0, 0, 3, *b"raw"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(connect)
        return s.recv(16)


def test_mutual_tls_port_requires_a_client_certificate(deploy: Deploy, retire) -> None:
    _fails_to_connect(retire, f"mqtts://dev-a:{PASSWORDS['dev-a']}@127.0.0.1:{deploy.mtls_port}", deploy.tls())
    ctx = ssl.create_default_context(cafile=deploy.tls().ca_file)
    try:  # TLS 1.3 reports a missing client certificate after the handshake: on the first read
        answer = _tls_exchange(deploy.mtls_port, ctx)
    except (ssl.SSLError, ConnectionResetError):
        answer = b""
    assert answer == b"", answer  # no CONNACK
    ctx.load_cert_chain(deploy.tls("dev-a").cert_file, deploy.tls("dev-a").key_file)
    assert _tls_exchange(deploy.mtls_port, ctx)[:1] == b"\x20"  # with a certificate: CONNACK


def test_plain_tcp_to_the_tls_port_fails(deploy: Deploy, retire) -> None:
    _fails_to_connect(retire, f"mqtt://dev-a:{PASSWORDS['dev-a']}@127.0.0.1:{deploy.tls_port}", None)
    # The same on the wire: an MQTT CONNECT in clear text never gets a CONNACK (0x20).
    connect = bytes([0x10, 16, 0, 4, *b"MQTT", 5, 0x02, 0, 30, 0, 0, 3, *b"raw"])
    with socket.create_connection(("127.0.0.1", deploy.tls_port), timeout=5) as s:
        s.sendall(connect)
        try:
            answer = s.recv(16)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20")


# --------------------------------------------------------------------------- provisioning, examples


@pytest.mark.parametrize("bad", ["a/b", "dev+", "#", "a:b", "", "x" * 65])
def test_add_device_refuses_ids_the_acl_cannot_hold(tmp_path: Path, bad: str) -> None:
    passwd = tmp_path / "passwd"
    run = subprocess.run([str(MOSQ / "add-device.sh"), "-p", str(passwd), bad, "pw"], capture_output=True, text=True)
    assert run.returncode == 2 and "invalid device id" in run.stderr
    assert not passwd.exists()


def test_add_device_generates_a_password_and_removes_the_entry(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    run = subprocess.run([str(MOSQ / "add-device.sh"), "-p", str(passwd), "-c", str(tmp_path / "certs"), "s01"],
                         capture_output=True, text=True, check=True)
    password = next(line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("password: "))
    assert len(password) >= 24 and password not in passwd.read_text()
    assert passwd.read_text().startswith("s01:") and oct(passwd.stat().st_mode & 0o777) == "0o640"
    cert = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "certs/s01.crt"), "-noout", "-subject"],
                          capture_output=True, text=True, check=True).stdout
    assert "CN = s01" in cert
    subprocess.run([str(MOSQ / "add-device.sh"), "-p", str(passwd), "--remove", "s01"], check=True,
                   capture_output=True)
    assert "s01:" not in passwd.read_text()


def test_example_agent_config_is_valid(deploy: Deploy) -> None:
    # Only the TLS files are swapped for existing ones: validate() checks that they exist.
    tls = deploy.tls("dev-a")
    settings = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=DEPLOY / "agent.toml", environ={},
                             flags={"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file})
    assert settings.broker_url.tls and settings.prefix == T.prefix
    assert settings.state_dir == "/var/lib/edge-agent"  # the unit's StateDirectory=
    assert settings.trusted_key and not settings.insecure_allow_unsigned


def test_example_hub_config_is_valid(deploy: Deploy) -> None:
    from cloud_hub.settings import ENV_PREFIX, HubSettings

    settings = load_settings(HubSettings, env_prefix=ENV_PREFIX, config=DEPLOY / "hub.toml", environ={},
                             flags={"ca_file": deploy.tls().ca_file})
    assert settings.broker_url.tls and settings.broker_url.username == "hub"  # the ACL's hub identity
    assert settings.prefix == T.prefix and settings.share_group and settings.signing_key


@pytest.mark.parametrize(("unit", "command", "user"), [
    ("edge-agent", "edge-agent run --config /etc/edge-agent/agent.toml", "edge-agent"),
    ("cloud-hub", "cloud-hub serve --config /etc/cloud-hub/hub.toml", "cloud-hub"),
])
def test_systemd_units_run_the_service_confined(unit: str, command: str, user: str) -> None:
    lines = {line.strip() for line in (DEPLOY / "systemd" / f"{unit}.service").read_text().splitlines()}
    assert f"ExecStart=/opt/edgeml/bin/{command}" in lines
    for want in (f"User={user}", f"StateDirectory={unit}", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "CapabilityBoundingSet="):
        assert want in lines, want


def test_agent_image_installs_the_base_package_only() -> None:
    agent = (DEPLOY / "Dockerfile.agent").read_text()
    hub = (DEPLOY / "Dockerfile.hub").read_text()
    assert "FROM python:3.11-slim" in agent and "pip install . " in agent and "[hub" not in agent
    assert 'pip install ".[hub,postgres]"' in hub


# ----------------------------------------------------------------------------- open files

SYSTEMD_DEFAULT_NOFILE = 1024  # systemd's soft limit for a service that sets none (Debian's mosquitto.service)


def _mqtt_connect(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60): thousands of sessions without a client each."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


def _sessions_held(limit: int, sessions: int, procs, tmp_path: Path) -> int:
    """Start mosquitto with RLIMIT_NOFILE at ``limit``, open ``sessions`` sessions; how many got a CONNACK."""
    port = free_port()
    conf = tmp_path / f"nofile-{limit}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n")
    # util-linux's prlimit sets the limit and execs mosquitto: the pid is the broker's
    proc = procs.popen(["prlimit", f"--nofile={limit}:{limit}", shutil.which("mosquitto") or "/usr/sbin/mosquitto",
                        "-c", str(conf)], stderr=subprocess.DEVNULL)

    def listening() -> bool:
        assert proc.poll() is None, "mosquitto exited"
        return port_open("127.0.0.1", port)

    wait_for(listening, timeout=10, what=f"mosquitto listening on port {port}")
    socks: list[socket.socket] = []
    held = 0
    try:
        for i in range(sessions):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(_mqtt_connect(f"n{i}"))
            try:
                reply = s.recv(4)  # CONNACK, or b"" when the broker closed the socket it could not keep
            except OSError:
                reply = b""
            held += reply[:1] == b"\x20"
    finally:
        for s in socks:
            s.close()
    return held


def test_the_broker_unit_lifts_the_open_files_limit_a_fleet_needs(procs, tmp_path: Path) -> None:
    """mosquitto holds one file per session and never raises its limit: under systemd's default it refuses
    devices past about a thousand; under the shipped drop-in (and compose's ulimits) it takes them."""
    import resource

    import yaml

    drop_in = (DEPLOY / "systemd" / "mosquitto.service.d" / "edgeml.conf").read_text().splitlines()
    shipped = int(next(line.split("=", 1)[1] for line in drop_in if line.startswith("LimitNOFILE=")))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["broker"]["ulimits"]["nofile"] == {"soft": shipped, "hard": shipped}
    assert shipped >= 20_000  # the 10,000 devices of docs/scale.md, twice over

    sessions = SYSTEMD_DEFAULT_NOFILE + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * sessions + 64  # this test's own sockets, and the broker's under a limit this process passes on
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-files limit here ({hard}) is below {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        under_lifted = min(shipped, hard) if hard != resource.RLIM_INFINITY else shipped
        assert _sessions_held(under_lifted, sessions, procs, tmp_path) == sessions
        assert _sessions_held(SYSTEMD_DEFAULT_NOFILE, sessions, procs, tmp_path) < SYSTEMD_DEFAULT_NOFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_lingering_hub_link_reads_every_message_over_tls(deploy: Deploy) -> None:
    """The hub's network thread rests between turns and then reads all that arrived, over TLS as over TCP. (The
    drain's look at ``pending()``, what TLS decrypted and not handed out, is not what this guards: mosquitto
    writes one record a packet, so the socket says readable whenever a packet is left.)"""
    from tests.test_broker import burst_through_lingering_link

    burst_through_lingering_link(f"mqtts://hub:{PASSWORDS['hub']}@127.0.0.1:{deploy.tls_port}", T.results("dev-a"),
                                 pub_url=f"mqtts://dev-a:{PASSWORDS['dev-a']}@127.0.0.1:{deploy.tls_port}",
                                 tls=deploy.tls())


def test_an_agent_whose_device_id_is_not_its_login_stops_in_one_line(deploy: Deploy, procs, peers,
                                                                       tmp_path: Path) -> None:
    """A new operator's finding: an agent logged in as dev-a with device_id dev-b logged "broker refused 2 results:
    Not authorized" every second for ever, its outbox filling. The refusal is final (the ACL does not change by
    waiting): the agent stops, exit 3, saying which topic, why, and what to make equal; its results stay kept.
    Started again with the device_id fixed, it runs and delivers its own results; the other id's stay refused
    (the review's catch: they had stopped it again at every start)."""
    from edge_agent import exits
    from tests.helpers import agent_cmd, make_bundle, make_log
    from tests.test_signals import Lines, stopped

    model = tmp_path / "v1.emlb"
    model.write_bytes(make_bundle(make_log(tmp_path / "train.csv", seconds=30)).encode())

    def agent(device: str) -> subprocess.Popen:
        return procs.popen(agent_cmd(
            "run", "--broker", f"mqtts://dev-a:{PASSWORDS['dev-a']}@127.0.0.1:{deploy.tls_port}", "--device-id",
            device, "--state-dir", str(tmp_path / "state"), "--model", str(model), "--source", "simulated"),
            stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.1",
                                                    "EDGE_AGENT_RECEIPTS": "false",
                                                    "EDGE_AGENT_CA_FILE": str(deploy.certs / "ca.crt")})

    run = agent("dev-b")
    _, err = run.communicate(timeout=120)
    assert run.returncode == exits.UNAVAILABLE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"edge-agent: error: the broker mqtts://dev-a@127.0.0.1:{deploy.tls_port} does not let "
                           "this client publish on edgeml/devices/dev-b/results (Not authorized)"), last
    assert "device_id must be the client certificate's CN or the MQTT username" in last and "Traceback" not in err

    hub = peers("hub", subscriptions=[(T.results("dev-a"), 1)])
    fixed = agent("dev-a")
    lines = Lines(fixed.stderr)
    hub.wait_for(lambda m: m.topic == T.results("dev-a"), timeout=60)  # its own results go through
    wait_for(lambda: lines.said("on edgeml/devices/dev-b/results: Not authorized"), timeout=30,
             what="the other id's kept results refused again")
    done = stopped(fixed, signal.SIGTERM, lines)
    assert done.returncode == 0 and "edge-agent: error" not in done.stderr, done.stderr[-3000:]
