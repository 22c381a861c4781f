"""The one place that imports paho: a small MQTT 5 link used by the agent and the hub.

paho calls back on its own network thread. Handlers passed in here must be quick and thread-safe
(put on a queue, set an event). Notes on paho 2.x quirks that shape this module:

* ``publish()`` returns ``MQTT_ERR_NO_CONN`` while disconnected, yet keeps a QoS>0 message queued
  and sends it after the reconnect (with the same mid). That is "queued", not "failed".
* ``publish()`` returns ``MQTT_ERR_QUEUE_SIZE`` and sends nothing when too many messages are
  outstanding; it never raises. We raise :class:`MqttError` for every code but success/no-conn.
* A refused CONNACK still reaches ``on_connect``: it is an error (bad credentials, not authorized),
  not "connected", and it is reported to whoever waits for the connection.
* A large ``max_inflight`` makes QoS 1 slower, not faster (measured: 1000 in flight 7.6k msg/s,
  100 in flight 13k msg/s), so the default is 100.
* ``loop_stop()`` right after ``disconnect()`` may end the network thread before it has written
  the packets queued before the DISCONNECT (seen under CPU load: the hub's last PUBACKs never
  left, and the next session got those messages again). :meth:`MqttLink.stop` waits for the
  disconnection first.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from edge_agent import exits
from edge_agent.contract import Delivery
from edge_agent.lazy import defer
from edge_agent.settings.broker import BrokerURL, TLSFiles

defer("urllib.request")  # paho reads it only for a SOCKS proxy, with PySocks installed (edge_agent/lazy.py)

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from edge_agent.mqtt.client import LINGER_MAX_S, PAHO_LOG, LingeringClient, tcp_no_delay  # noqa: E402

log = logging.getLogger(__name__)


_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code
_QUICK_DROP_S = 5.0  # a connection the broker closes sooner than this after opening it counts as a quick drop
_QUICK_DROPS = 3  # ...and this many in a row as a session takeover




class MqttError(exits.Failure):
    """An MQTT operation failed."""

    exit_code = exits.UNAVAILABLE


class ConnectRefused(MqttError):
    """The broker answered CONNACK with a failure reason (bad credentials, not authorized, ...)."""

    def __init__(self, reason: str, broker: BrokerURL) -> None:
        super().__init__(f"broker {broker} refused the connection: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """A received message, detached from paho."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    delivery: Delivery


class MqttLink:
    """One MQTT 5 connection with reconnect-and-backoff, resubscription and tracked publishes."""

    def __init__(
        self,
        broker: BrokerURL,
        client_id: str,
        *,
        tls: TLSFiles | None = None,
        clean_start: bool | Literal["first"] = True,
        session_expiry_s: int | None = None,
        will: Will | None = None,
        manual_ack: bool = False,
        max_inflight: int = 100,
        keepalive_s: int = 30,
        on_message: Callable[[Message], None] | None = None,
        on_published: Callable[[int, bool, str], None] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        exclusive: bool = False,
        retained_once: bool = False,
        linger_s: float = 0.0,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._on_message = on_message
        self._on_published = on_published
        self._on_connected = on_connected
        self._subscriptions = list(subscriptions)
        self._connected = threading.Event()
        self.disconnected_since: float | None = time.monotonic()  # None while connected
        self.fatal: str | None = None  # why this link gave up for good (a session takeover)
        self._outgoing = 0  # publishes not yet acknowledged (QoS 1) or sent (QoS 0)
        self._exclusive = exclusive
        # With a session the broker keeps (clean_start False or "first": the agent's, see its _session_start), a
        # reconnect of this link asks for retained messages only where the subscription is new,
        # i.e. the broker lost the session: what was published meanwhile is queued in the session, and a
        # retained bundle is not downloaded again (#27 §2).
        self._retained_once = retained_once
        self._connected_at = 0.0
        self._quick_drops = 0
        self._refused: str | None = None
        self._state_changed = threading.Condition()
        self.connects = 0
        self.session_present = False  # the last CONNACK's: the broker resumed this client's session
        self._stopping = False
        self._sub_pending: dict[int, str] = {}  # SUBSCRIBE mid -> filter, until its SUBACK
        self._sub_error: str | None = None
        self._tls = TLSFiles()  # the TLS files of an mqtts:// link (set by _new_client)
        self._subscribed = False
        self._client = self._new_client(tls=tls, will=will, manual_ack=manual_ack, max_inflight=max_inflight)
        # how long the network thread rests between turns (a busy hub's); never long enough to miss a keepalive
        self._client.linger = min(max(0.0, linger_s), LINGER_MAX_S)

    def _new_client(self, *, tls: TLSFiles | None, will: Will | None, manual_ack: bool,
                    max_inflight: int) -> LingeringClient:
        """The paho client, configured from the broker URL and wired to this link's handlers; made last,
        once every field those handlers read is set."""
        broker = self.broker
        client = LingeringClient(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5, manual_ack=manual_ack,
        )
        client.enable_logger(PAHO_LOG)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # bounded by our own outbox, which checks every return code
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            files = self._tls = tls or TLSFiles()
            client.tls_set(
                ca_certs=files.ca_file, certfile=files.cert_file, keyfile=files.key_file,
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.delivery.qos, retain=will.delivery.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = tcp_no_delay
        return client

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Connect in the background; paho reconnects with backoff from then on."""
        props = Properties(PacketTypes.CONNECT)
        if self._session_expiry_s is not None:
            props.SessionExpiryInterval = self._session_expiry_s
        try:
            self._client.connect_async(
                self.broker.host, self.broker.port, keepalive=self._keepalive_s,
                clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY if self._clean_start == "first" else self._clean_start,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.broker}: {exc}") from exc
        self._client.loop_start()

    def connected_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the connection; False if it is not there yet (refused: raises)."""
        with self._state_changed:
            self._state_changed.wait_for(lambda: self._connected.is_set() or self._refused or self.fatal, timeout)
        if self._refused and not self._connected.is_set():
            raise ConnectRefused(self._refused, self.broker)
        if self.fatal:
            raise MqttError(self.fatal)
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise :class:`ConnectRefused` on a refused CONNACK, MqttError on timeout."""
        with self._state_changed:
            ok = self._state_changed.wait_for(lambda: self._connected.is_set() or self._refused or self.fatal, timeout)
        if self._refused and not self._connected.is_set():
            raise ConnectRefused(self._refused, self.broker)
        if self.fatal:
            raise MqttError(self.fatal)
        if not ok:
            raise MqttError(f"no connection to {self.broker} within {timeout:g} s: {self.unreachable_reason()}")

    def unreachable_reason(self) -> str:
        """Why the broker cannot be reached, found out with a plain TCP connection (paho does not say)."""
        if self._refused:
            return f"the broker refused the connection ({self._refused})"
        host, port = self.broker.host, self.broker.port
        try:
            with socket.create_connection((host, port), timeout=3):
                pass
        except socket.gaierror as exc:
            return f"unknown host {host!r} ({exc.strerror})"
        except ConnectionRefusedError:
            return f"connection refused (nothing listens on {host}:{port})"
        except TimeoutError:
            return f"no answer from {host}:{port} (timed out)"
        except OSError as exc:
            return exc.strerror or str(exc)
        if not self.broker.tls:
            return "the TCP connection opens but MQTT does not come up (a TLS/plain mismatch, or not an MQTT broker?)"
        return self._tls_problem() or "the TCP connection opens and TLS comes up, but MQTT does not"

    def _tls_problem(self) -> str | None:
        """A TLS handshake made as paho makes it, for the cause paho does not say (a certificate signed by
        another CA, a host name the certificate does not hold); None when it succeeds."""
        host, port = self.broker.host, self.broker.port
        try:
            context = self._tls.client_context()
            with socket.create_connection((host, port), timeout=3) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return (f"the broker's certificate is not accepted: {exc.verify_message} (ca_file must hold the CA that "
                    f"signed it, and the broker URL's host {host!r} must be one of its names)")
        except (ssl.SSLError, OSError) as exc:
            return f"the TLS handshake fails: {getattr(exc, 'reason', None) or exc}"

    def wait_subscribed(self, timeout: float) -> None:
        """Block until the broker acknowledged every subscription of the current connection.

        A SUBACK with a failure reason (brokers that check the ACL at subscribe time, shared
        subscriptions not supported) raises :class:`MqttError`: a subscriber that silently receives
        nothing is worse than one that stops. (mosquitto 2.0 grants such filters and applies its
        ACL per message instead.)
        """
        with self._state_changed:
            ok = self._state_changed.wait_for(lambda: self._subscribed or self._sub_error or self.fatal, timeout)
        if self.fatal:
            raise MqttError(self.fatal)
        if self._sub_error:
            raise MqttError(self._sub_error)
        if not ok:
            raise MqttError(f"subscriptions not acknowledged by {self.broker} within {timeout:g} s")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, final: Sequence[tuple[str, bytes, Delivery]] = (), timeout: float = 5.0) -> None:
        """Publish last messages (e.g. status offline), wait for their PUBACKs (bounded), disconnect."""
        if final and self.connected:
            try:
                for topic, payload, d in final:
                    self.publish(topic, payload, d)
            except (MqttError, ValueError) as exc:
                log.warning("final publish failed: %s", exc)
        if self.connected:
            # mosquitto 2.0.11 drops a client that disconnects while one of its QoS 1 publishes is
            # unacknowledged ("disconnected due to out of memory"), without applying the PUBACKs the
            # client sent before: the hub's last acknowledgements were lost that way, its receipts
            # being in flight. So let what we published be acknowledged first (bounded).
            with self._state_changed:
                self._state_changed.wait_for(lambda: self._outgoing <= 0 or not self.connected, timeout)
        self._stopping = True
        props = None
        if self._retained_once:  # the next process starts a session of its own: this one would only queue
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        if self._client.disconnect(properties=props) == paho.MQTT_ERR_SUCCESS:
            # loop_stop() ends the network thread at its next turn, whether or not it has written what
            # is queued (PUBACKs of the hub's last batch, the DISCONNECT): wait until paho reports the
            # disconnection, which it does once the DISCONNECT is on the wire.
            with self._state_changed:
                self._state_changed.wait_for(lambda: not self._connected.is_set(), timeout)
        self._client.loop_stop()

    # ----------------------------------------------------------------- operations

    def publish(self, topic: str, payload: bytes, delivery: Delivery, expiry_s: float | None = None) -> int:
        """Queue a publish and return its mid; PUBACK is reported through ``on_published``. ``expiry_s``: the
        broker drops the message if it is still queued for a subscriber after that long (MQTT 5's message
        expiry), e.g. a copy that another copy will replace."""
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
        info = self._client.publish(topic, payload, qos=delivery.qos, retain=delivery.retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._state_changed:
            self._outgoing += 1  # the callback may already have counted it down: a counter, not a set
        return info.mid

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK of a received message (manual_ack mode) once its effects are durable."""
        if qos > 0:
            self._client.ack(mid, qos)

    def subscribe(self, topic_filter: str, qos: int) -> None:
        self._subscriptions.append((topic_filter, qos))
        if self.connected:
            self._send_subscribe(self._client, topic_filter, qos)

    def _send_subscribe(self, client: paho.Client, topic_filter: str, qos: int) -> None:
        # retain handling 1: retained messages only for a subscription the session did not hold yet
        retain = 1 if self._retained_once and self.connects > 1 else 0
        with self._state_changed:
            self._subscribed = False
            _rc, mid = client.subscribe(topic_filter, options=SubscribeOptions(qos=qos, retainHandling=retain))
            if mid is not None:
                self._sub_pending[mid] = topic_filter

    # ----------------------------------------------------------------- paho callbacks (network thread)

    def _handle_connect(self, client: paho.Client, _u: object, flags: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.error("broker %s refused the connection: %s", self.broker, rc)
            with self._state_changed:
                self._refused = str(rc)
                self._state_changed.notify_all()
            return
        self.connects += 1
        self.session_present = bool(getattr(flags, "session_present", False))
        with self._state_changed:
            self._sub_pending.clear()
            self._subscribed = not self._subscriptions
        for topic_filter, qos in self._subscriptions:
            self._send_subscribe(client, topic_filter, qos)
        with self._state_changed:
            self._refused = None
            self._connected.set()
            self.disconnected_since = None
            self._connected_at = time.monotonic()
            self._state_changed.notify_all()
        log.info("connected to %s as %s", self.broker, self.client_id)
        if self._on_connected is not None:
            self._on_connected(True)

    def _handle_disconnect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if not self._stopping and self._connected.is_set():
            self._check_takeover(client, rc)
        was = self._connected.is_set()
        with self._state_changed:
            self._connected.clear()
            if was:
                self.disconnected_since = time.monotonic()
            self._state_changed.notify_all()
        if was:
            (log.info if self._stopping else log.warning)("disconnected from %s: %s", self.broker, rc)
            if self._on_connected is not None:
                self._on_connected(False)

    def _check_takeover(self, client: paho.Client, rc: ReasonCode) -> None:
        """Two processes with one client id knock each other off, forever, each logging "Unspecified
        error". MQTT 5 brokers may say so (reason 0x8E); mosquitto 2.0 just closes the connection, so
        connections the broker closes within seconds of opening them, several times in a row, are
        taken for the same thing. A link with ``exclusive`` (the hub) then stops; others say why."""
        quick = time.monotonic() - self._connected_at < _QUICK_DROP_S
        self._quick_drops = self._quick_drops + 1 if quick else 0
        if rc.value != _SESSION_TAKEN_OVER and self._quick_drops < _QUICK_DROPS:
            return
        why = ("took over the session" if rc.value == _SESSION_TAKEN_OVER else
               f"is probably connected: the broker closed {self._quick_drops} connections within seconds")
        message = (f"another client with the client id {self.client_id!r} {why} on {self.broker}; "
                   "give each process its own client id")
        if self._exclusive:  # its owner stops and says why, in its one error line (waits on the link raise it)
            with self._state_changed:
                self.fatal = message
                self._state_changed.notify_all()
            client.disconnect()  # ends paho's reconnect loop
        else:
            log.error("%s", message)

    def _handle_subscribe(self, _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        with self._state_changed:
            topic_filter = self._sub_pending.pop(mid, "?")
            failed = [str(rc) for rc in codes if rc.is_failure]
            if failed:
                self._sub_error = f"broker refused the subscription to {topic_filter}: {', '.join(failed)}"
                log.error("%s", self._sub_error)
            if not self._sub_pending:
                self._subscribed = True
            self._state_changed.notify_all()

    def _handle_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid))

    def _handle_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._state_changed:
            self._outgoing -= 1
            self._state_changed.notify_all()
        if self._on_published is not None:
            self._on_published(mid, not rc.is_failure, str(rc))
