"""paho's client as the link drives it: a network thread that rests between turns, TCP_NODELAY, a quiet shutdown.

Part of the paho adapter (:mod:`edge_agent.mqtt`, the one package that imports paho).
"""

from __future__ import annotations

import logging
import select
import socket
import time

import paho.mqtt.client as paho

log = logging.getLogger(__name__)


class _QuietDisconnectRace(logging.Filter):
    """paho's network thread may run one more loop between disconnect() and loop_stop() and log
    "Client is not connected" at ERROR level: harmless, and alarming in a clean shutdown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


PAHO_LOG = logging.getLogger("paho")
PAHO_LOG.addFilter(_QuietDisconnectRace())


LINGER_MAX_S = 0.1  # the longest rest of a lingering network thread (never long enough to miss a keepalive)
_DRAIN_MAX = 1000  # packets read in one wake of a lingering network thread, at most (then it writes)


class LingeringClient(paho.Client):
    """paho's client whose network thread, given a ``linger``, wakes at most once per ``linger`` seconds.

    paho's thread wakes for every packet: at 1,000 one-result messages a second that costs more than the
    packets themselves (``bench/paho_floor.py``: 208 µs a result with the hub's four packets, 95 µs when
    the thread rests 5 ms after each turn). Here each turn reads everything that has arrived (paho reads
    one packet a turn), then rests: what arrives meanwhile waits up to ``linger`` and is read in the next
    turn with the rest, and what other threads queue (acks, receipts) is written then. A lone packet on an
    idle link is still read at once. ``linger`` 0 is paho's own behaviour."""

    linger = 0.0

    def _loop(self, timeout: float = 1.0) -> paho.MQTTErrorCode:
        rc = super()._loop(timeout)
        if self.linger and rc == paho.MQTT_ERR_SUCCESS:
            time.sleep(self.linger)
        return rc

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        if not self.linger:
            return rc
        for _ in range(_DRAIN_MAX):
            sock = self._sock
            if rc != paho.MQTT_ERR_SUCCESS or sock is None:
                break
            pending = getattr(sock, "pending", None)  # bytes a TLS socket has decrypted but not handed out
            if not (pending and pending()) and not select.select([sock], [], [], 0)[0]:
                break
            rc = super().loop_read(max_packets)
        return rc


if "_loop" not in vars(paho.Client):  # the hook above is paho's private loop turn: fail loudly if it moves
    raise ImportError("edge_agent.mqtt needs paho-mqtt 2.x (this one's Client has no _loop)")


def tcp_no_delay(_c: object, _u: object, sock: object) -> None:
    """Turn Nagle's algorithm off: results, acks and receipts are small messages, and each would
    otherwise wait behind the peer's delayed ACK (40 ms on Linux; measured at the end of a replay)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (AttributeError, OSError) as exc:  # not a TCP socket (a websocket wrapper, a unix socket)
        log.debug("TCP_NODELAY not set on %r: %s", sock, exc)
