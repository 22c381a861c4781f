"""The simulated devices of ``bench/fleet.py``: one process drives a share of the fleet from one selector loop.

    python bench/fleet_devices.py PORT PREFIX FIRST COUNT SECONDS PERIOD PUBKEY   # started by fleet.py

Every device speaks the real agent's protocol over its own MQTT 5 session (client id ``sim-NNNNN``):

* a retained ``online`` status naming the model it runs, with a last will ``offline``;
* one result every ``PERIOD`` seconds (QoS 1), spread evenly over the period across the devices, kept
  until the hub's receipt and sent again after 60 s without one (the agent's ``resend_after_s``;
  ``FLEET_RESEND_S`` sets another), doubling up to 300 s;
* the retained model topic: a new bundle's digest and Ed25519 signature are checked
  (:func:`edge_agent.device.bundle.check_bundle`, as the agent does before loading it), then the new
  version goes into its status;
* a lost connection is retried as paho retries for the agent (``reconnect_delay_set(1, 30)``: 1 s, then
  twice the last wait, at most 30 s); results made while it is down wait, and every result without a
  receipt is sent again once it is back (the agent's ``resend_all`` after a reconnect);
* its session outlives a dropped connection as the agent's does (``session_expiry_s``, a day; the
  environment variable ``FLEET_SESSION_EXPIRY_S=0`` gives clean sessions, as agents had before): a
  reconnect asks for retained messages only on subscriptions the broker no longer holds.

It runs no model: inference is the agent's own cost (``bench/agent_replay.py``). The clients are driven
through paho's external-loop API: their sockets sit in one selector, a client asks to be written through
``on_socket_register_write``, so an idle device costs nothing per loop. paho's ``reconnect`` is a blocking
TCP connect: a process reconnects its devices one after the other (a real fleet's devices all knock at
once; on loopback a connect takes well under a millisecond, so the broker still sees thousands a second).

The process prints ``ready`` once every device is connected with a model, waits for a line on stdin, runs
``SECONDS``, drains the last receipts, and prints one JSON report (see :func:`main`).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import contract as c
from edge_agent.contract import Bundle
from edge_agent.device.bundle import BundleRejected, check_bundle, load_public_key
from edge_agent.mqtt import tcp_no_delay

MODEL = "fleet"
RESEND_S, RESEND_MAX_S = float(os.environ.get("FLEET_RESEND_S", "60")), 300.0  # the agent's resend_after_s, doubled
# per send up to resend_max_s
SLOT_S = 5.0  # backlog samples
CONNECTING = 32  # sessions of a process waiting for their first CONNACK at a time
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # the agent's reconnect_delay_set(min_delay=1, max_delay=30)
SESSION_EXPIRY_S = int(os.environ.get("FLEET_SESSION_EXPIRY_S", "86400"))  # the agent's session_expiry_s (0: clean)


def session_properties() -> Properties | None:
    if not SESSION_EXPIRY_S:
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    return props


_LAST: list[tuple[bytes, Bundle]] = []  # the last bundle this process checked, with its bytes
CHECKS: list[tuple[int, float]] = []  # (bytes, seconds) of each check that ran


def checked(payload: bytes, key: Any) -> Bundle:
    """:func:`check_bundle`, run once per distinct payload in this process: its devices all get the same
    bytes (compared whole), and a real device checks its own copy on its own CPU (reported, once per bundle)."""
    if _LAST and _LAST[0][0] == payload:
        return _LAST[0][1]
    t = time.perf_counter()
    bundle = check_bundle(payload, trusted_key=key, allow_unsigned=False)
    CHECKS.append((len(payload), time.perf_counter() - t))
    _LAST[:] = [(payload, bundle)]
    return bundle


class Device:
    """One simulated device: its session, the results it still waits a receipt for, its model."""

    def __init__(self, name: str, topics: c.Topics, key: Any, sel: selectors.BaseSelector,
                 retrying: set[Device]) -> None:
        self.name, self.topics, self.key, self.sel, self.retrying = name, topics, key, sel, retrying
        self.model: c.Manifest | None = None
        self.waiting: dict[int, tuple[float, float, int]] = {}  # seq -> (window end, due again at, times sent)
        self.latencies: list[tuple[float, float]] = []  # (window end, seconds until its receipt)
        self.model_at: dict[int, float] = {}  # version -> when it arrived
        self.rejected = 0
        self.bundle_bytes = 0  # model messages received, after the first connect's
        self.connected = False
        self.retry_at: float | None = None  # when to knock again after a lost connection (in ``retrying``)
        self.knocked_at = 0.0
        self.retry_wait = RETRY_MIN_S
        self.drops: list[float] = []  # when the connection was lost
        self.backs: list[float] = []  # when a CONNACK came back after a drop
        self.pending_at_back: set[int] = set()  # results without a receipt when it came back
        self.recovered_at: float | None = None  # when the last of those got its receipt
        cl = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        cl.will_set(topics.status(name), c.Status(name, c.OFFLINE, time.time()).encode(), qos=1, retain=True)
        cl.on_connect, cl.on_disconnect, cl.on_message = self._on_connect, self._on_disconnect, self._on_message
        cl.on_socket_open, cl.on_socket_close = self._sock_open, self._sock_close
        cl.connect_timeout = 2.0  # a blocking TCP connect stalls the whole process: fail fast, knock later
        cl.on_socket_register_write, cl.on_socket_unregister_write = self._want_write, self._done_writing

    # --- the selector: read always, write only when paho has bytes queued
    def _sock_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        tcp_no_delay(client, userdata, sock)  # as the agent's link does
        self.sel.register(sock, selectors.EVENT_READ, self)

    def _sock_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def _done_writing(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, self)

    # --- the protocol
    def status(self, state: str = c.ONLINE) -> None:
        m = self.model
        s = c.Status(self.name, state, time.time(), model_name=m.name if m else None,
                     model_version=m.version if m else None, model_sha256=m.sha256 if m else None,
                     outbox_depth=len(self.waiting))
        self.client.publish(self.topics.status(self.name), s.encode(), qos=1, retain=True)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            raise SystemExit(f"{self.name}: connection refused: {rc}")
        # as the agent's link: retained messages on the first connect, then only for subscriptions the broker
        # no longer holds (session_expiry_s: the session outlives a dropped connection)
        retain = 1 if SESSION_EXPIRY_S and (self.drops or self.backs) else 0
        client.subscribe([(t, SubscribeOptions(qos=1, retainHandling=retain))
                          for t in (self.topics.receipts(self.name), self.topics.model(MODEL))])
        self.connected, self.retry_at, self.retry_wait = True, None, RETRY_MIN_S
        self.retrying.discard(self)
        self.status()
        if self.drops:  # back after a lost connection: everything without a receipt goes again
            now = time.time()
            self.backs.append(now)
            self.pending_at_back = set(self.waiting)
            self.recovered_at = now if not self.waiting else None
            for seq, (end, _due, sends) in list(self.waiting.items()):
                self._send(seq, end, now, sends)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        if self.connected:
            self.drops.append(time.time())
        self.connected = False
        self.retry_at = time.monotonic() + self.retry_wait
        self.retrying.add(self)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/receipts"):
            now = time.time()
            for seq in c.decode_receipt(bytes(msg.payload), self.name).seqs():
                entry = self.waiting.pop(seq, None)
                if entry is not None:
                    self.latencies.append((entry[0], now - entry[0]))
                    self.pending_at_back.discard(seq)
            if self.recovered_at is None and self.backs and not self.pending_at_back:
                self.recovered_at = now
            return
        self.bundle_bytes += len(msg.payload)
        try:
            bundle = checked(bytes(msg.payload), self.key)
        except BundleRejected:
            self.rejected += 1
            return
        self.model = bundle.manifest
        self.model_at.setdefault(bundle.manifest.version, time.time())
        self.status()

    def _send(self, seq: int, end: float, now: float, sends: int) -> None:
        r = c.Result(seq=seq, start=end - 2.5, end=end, model_version=self.model.version if self.model else 0,
                     latency_ms=0.8, label="walk", confidence=0.9)
        self.client.publish(self.topics.results(self.name), c.ResultBatch(self.name, (r,)).encode(), qos=1)
        self.waiting[seq] = (end, now + min(RESEND_MAX_S, RESEND_S * 2 ** min(sends, 8)), sends + 1)

    def produce(self, now: float) -> None:
        seq = int(now * 1000)
        if self.connected:
            self._send(seq, now, now, 0)
        else:  # kept, sent when the connection is back
            self.waiting[seq] = (now, now, 0)

    def resend(self, now: float) -> int:
        if not self.connected:
            return 0
        late = [(s, e, n) for s, (e, due, n) in self.waiting.items() if now >= due]
        for seq, end, sends in late:
            self._send(seq, end, now, sends)
        return len(late)

    def knock(self) -> None:
        """Try to reconnect (paho's blocking TCP connect); on failure wait twice as long next time."""
        self.knocked_at = time.monotonic()
        try:
            self.client.reconnect()
        except OSError:
            self.retry_wait = min(self.retry_wait * 2, RETRY_MAX_S)
            self.retry_at = self.knocked_at + self.retry_wait
            return
        self.retry_at = None  # CONNACK pending: a dropped connection schedules the next knock

    def due(self, mono: float) -> bool:
        """Time to knock: its wait is over, or a knock got no CONNACK within 30 s (paho's connect timeout
        covers only the TCP connect)."""
        if self.retry_at is None:
            return mono - self.knocked_at > RETRY_MAX_S
        return mono >= self.retry_at


def knock(retrying: set[Device]) -> None:
    """Reconnect the devices whose wait is over, at most CONNECTING of them waiting for a CONNACK: real devices
    would all knock at once, overflow mosquitto's listen backlog and retry their SYN a second or three later;
    paced, the storm goes as fast as the broker and the hub take the sessions back."""
    mono = time.monotonic()
    knocking = sum(1 for d in retrying if d.retry_at is None)
    for d in [d for d in retrying if d.due(mono)]:
        if knocking >= CONNECTING:
            return
        d.knock()
        knocking += d.retry_at is None


def pump(sel: selectors.BaseSelector, timeout: float) -> None:
    for key, events in sel.select(timeout):
        client = key.data.client
        if events & selectors.EVENT_READ:
            client.loop_read()
        if events & selectors.EVENT_WRITE and client.socket() is not None:
            client.loop_write()


def main(port: int, prefix: str, first: int, count: int, seconds: float, period: float, pubkey: str) -> None:
    """Connect ``count`` devices, say ready, wait for go, run ``seconds``, print a JSON report: results sent
    and still without a receipt, receipt latencies, when each device got model v2, connection drops and
    returns, when each device's backlog after a return was receipted, and the backlog every 5 s."""
    topics, key, sel = c.Topics(prefix), load_public_key(pubkey), selectors.DefaultSelector()
    retrying: set[Device] = set()
    devices = [Device(f"sim-{i:05d}", topics, key, sel, retrying) for i in range(first, first + count)]
    deadline = time.monotonic() + max(60.0, count / 50)
    started = 0
    while not all(d.connected and d.model for d in devices):
        # at most CONNECTING sessions without a CONNACK at a time: past mosquitto's listen backlog (100) the
        # kernel drops SYNs, and paho's blocking connect would wait out its timeout
        while started < count and started - sum(d.connected for d in devices[:started]) < CONNECTING:
            try:
                devices[started].client.connect("127.0.0.1", port, keepalive=60,  # as an agent resuming its own
                                                clean_start=not SESSION_EXPIRY_S,
                                                properties=session_properties())
            except OSError:
                break  # the broker's queue is full: pump, then try again
            started += 1
        pump(sel, 0.01)
        if time.monotonic() > deadline:
            n = sum(d.connected and d.model is not None for d in devices)
            raise SystemExit(f"devices {first}..: {n} of {count} connected with a model after {deadline:.0f} s")
    for d in devices:
        d.bundle_bytes = 0  # count from go: the model switch and any reconnect
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    k, cycle = 0, 0  # the next device to produce, in turn: device k's results are due at t0 + (k/count + cycle) * period
    backlog: list[tuple[float, int]] = []
    next_slot, next_misc, resent = t0 + SLOT_S, time.monotonic() + 1, 0
    while (now := time.time()) < t0 + seconds:
        while now >= t0 + (k / count + cycle) * period:
            devices[k].produce(now)
            k += 1
            if k == count:
                k, cycle = 0, cycle + 1
        pump(sel, 0.01)
        knock(retrying)
        mono = time.monotonic()
        if mono >= next_misc:
            next_misc += 1
            for d in devices:
                if d.connected:
                    d.client.loop_misc()
                resent += d.resend(now)
        if now >= next_slot:
            backlog.append((now - t0, sum(len(d.waiting) for d in devices)))
            next_slot += SLOT_S
    drain_until = time.monotonic() + 60  # the last receipts
    while any(d.waiting for d in devices) and time.monotonic() < drain_until:
        pump(sel, 0.05)
        knock(retrying)
    for d in devices:
        if d.connected:
            d.status(c.OFFLINE)
            d.client.disconnect()
    end = time.monotonic() + 5
    while any(d.client.want_write() for d in devices if d.client.socket() is not None) and time.monotonic() < end:
        pump(sel, 0.05)
    print(json.dumps({
        "sent": sum(len(d.latencies) + len(d.waiting) for d in devices),
        "unreceipted": sum(len(d.waiting) for d in devices), "resent": resent,
        "latencies": [(round(e, 3), round(x, 4)) for d in devices for e, x in d.latencies],
        "model_at": [d.model_at.get(2) for d in devices], "rejected": sum(d.rejected for d in devices),
        "backlog": backlog,
        "drops": [d.drops[0] if d.drops else None for d in devices],
        "backs": [d.backs[0] if d.backs else None for d in devices],
        "recovered": [d.recovered_at for d in devices if d.backs],
        "never_recovered": sum(1 for d in devices if d.backs and d.recovered_at is None),
        "bundle_checks": CHECKS, "bundle_bytes": sum(d.bundle_bytes for d in devices),
    }), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) != 7:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    main(int(a[0]), a[1], int(a[2]), int(a[3]), float(a[4]), float(a[5]), a[6])
