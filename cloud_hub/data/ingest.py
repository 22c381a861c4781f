"""Ingestion: MQTT in, one transaction per batch, receipts and acknowledgements only after the commit.

Threads: paho's network thread only puts each :class:`Message` on a queue (and a marker on every
connect/disconnect); a decoder thread drains the queue into a batch, decoding every message through
the contract; one writer thread writes each batch in ONE transaction and, once it is committed, sends
the PUBACK of every message in it. The decoder works on the next batch while the writer waits for the
database (at most one decoded batch waits for a writer). On PostgreSQL two writers, each with its own
connection and transaction, take turns: one streams its batch while the other's is being stored
(two batches holding the same row, a redelivery, are serialized by the unique key; a deadlock
between them is retried like any transient error). With a persistent session (clean start off,
session expiry set) the broker redelivers whatever was not acknowledged when the hub died, and the
idempotent insert on (device_id, seq) makes the redelivery harmless: exactly one row per result.

Why receipts: the PUBACK a device gets only says the broker has its results, and a broker keeps
queued messages in memory between autosaves. So once a batch is committed the hub tells each device
which of its results are stored (``{prefix}/devices/{id}/receipts``, runs of seqs, new rows and
duplicates alike, the duplicates marked for a device that asks; split so that each receipt fits the
device's decoder), and the device keeps every result until then, sending it again when no receipt
comes. Receipts go out before the PUBACKs of the same batch; if the hub dies in between, the broker
redelivers, the rows are duplicates and are receipted again.

Batches are made by :mod:`cloud_hub.data.batches` (why a batch lingers is said there).

Why acknowledgements check the connection generation: packet ids (mids) are per connection. After a
reconnect the broker resends the unacknowledged messages and may give their old mids to other
messages; a PUBACK for an old mid sent on the new connection could acknowledge a message that was
never stored. The writer counts the connect/disconnect markers it has dequeued and acknowledges a batch
only if no connection event happened since its messages arrived; otherwise the broker redelivers them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_hub.data.batches import CONNECTION_EVENT, STOP, Batcher, Pending
from cloud_hub.data.db import make_engine
from cloud_hub.data.limits import Admission
from cloud_hub.data.sessions import describe, is_transient
from cloud_hub.data.store import DEVICE_ID, SEQ, ResultRow, Store, Written, dead_letter
from cloud_hub.errors import HubError
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent import exits
from edge_agent.contract import ContractError, Topics
from edge_agent.mqtt import Message, MqttError, MqttLink

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0
_DEVICE_OF, _SEQ_OF = operator.itemgetter(DEVICE_ID), operator.itemgetter(SEQ)
SEEN_RESOLUTION_S = 1.0  # devices.last_seen moves forward at most this often per device (saves a write a batch)


# The network thread rests as long as a batch lingers, up to this: its rest delays every packet in and out
# (PUBACKs, receipts), and past ~10 ms it saves little more CPU (bench/paho_floor.py).
NETWORK_REST_MAX_MS = 10.0

class BrokerUnavailable(HubError):
    """The broker cannot be reached or refused the connection."""

    exit_code = exits.UNAVAILABLE


@dataclass(slots=True)
class HubStats:
    """Counters kept by the writer thread (read them from anywhere; they only grow)."""

    messages: int = 0
    stored: int = 0  # new result rows committed
    duplicates: int = 0  # result rows that were already stored
    dead_letters: int = 0
    batches: int = 0
    db_errors: int = 0
    unacked: int = 0  # messages left for redelivery because the connection changed before their ack
    receipts: int = 0  # receipt messages sent to devices
    rate_limited: int = 0  # messages dropped because their device was over its limit (data/limits.py)


class Hub:
    """One hub worker: subscribes to every device's results and status and stores them."""

    def __init__(self, settings: HubSettings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.topics: Topics = settings.topics
        self._own_engine = engine is None
        self.engine = make_engine(settings.db, migrate=settings.auto_migrate) if engine is None else engine
        self.store = Store(self.engine)
        self.stats = HubStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._connection_events = 0  # incremented on the network thread only
        self._touched: dict[str, float] = {}  # device -> last_seen last committed by this hub
        self._local = threading.local()  # .conn: each writer thread's connection
        self._stop_deadline: float | None = None
        self._stopping = threading.Event()  # cuts a retry backoff short
        self._batcher = Batcher(settings, self._queue, self._stopping)
        self._decoded: queue.Queue[Pending] = queue.Queue(maxsize=1)  # decoder -> writers
        self._decoder = threading.Thread(target=self._decode, name="hub-decoder", daemon=True)
        self._stats_lock = threading.Lock()
        self.on_commit: Callable[[float], None] | None = None  # seconds per committed batch (metrics)
        writers = 2 if self.engine.dialect.name == "postgresql" else 1  # SQLite has one write lock anyway
        self._writers = [threading.Thread(target=self._run, args=(i,), name=f"hub-writer-{i}", daemon=True)
                         for i in range(writers)]
        group = settings.share_group
        self.admission = None if not settings.device_max_msgs_per_s else Admission(
            self.topics, settings.device_max_msgs_per_s, max(settings.device_burst, 1),
            max_bytes=settings.dead_letter_max_bytes)
        self.link = MqttLink(
            settings.broker_url, settings.session_id, tls=settings.tls, clean_start=False,
            session_expiry_s=settings.session_expiry_s, manual_ack=True, keepalive_s=settings.keepalive_s,
            on_message=self._queue.put if self.admission is None else self._on_message, on_connected=self._on_connection_event, exclusive=True,
            linger_s=min(settings.batch_linger_ms, NETWORK_REST_MAX_MS) / 1000.0,
            subscriptions=[(self.topics.shared(self.topics.all_results, group), 1),
                           (self.topics.shared(self.topics.all_status, group), 1)],
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self, connect_timeout: float | None = None, *, stop: threading.Event | None = None) -> bool:
        """Start the writer and connect; :class:`BrokerUnavailable` if no connection in time. Returns
        False (and has stopped) when ``stop`` was set meanwhile (SIGTERM/SIGINT during the connect)."""
        self._decoder.start()
        for writer in self._writers:
            writer.start()
        timeout = self.settings.connect_timeout_s if connect_timeout is None else connect_timeout
        try:
            self.link.start()
            log.info("connecting to %s (giving up after %g s)", self.settings.broker_url, timeout)
            deadline = time.monotonic() + timeout
            # In slices, so that a signal ends the wait at once.
            while not self.link.connected_within(max(0.0, min(0.2, deadline - time.monotonic()))):
                if stop is not None and stop.is_set():
                    self.stop(timeout=1.0, report=False)
                    return False
                if time.monotonic() >= deadline:
                    raise MqttError(f"no connection to {self.settings.broker_url} within {timeout:g} s: "
                                    f"{self.link.unreachable_reason()}")
            self.link.wait_subscribed(timeout)
        except MqttError as exc:
            self.stop(timeout=1.0, report=False)
            raise BrokerUnavailable(str(exc)) from exc
        log.info("hub %s ingesting %s/devices/+/{results,status}%s into %s", self.settings.session_id,
                 self.topics.prefix, f" (share group {self.settings.share_group})" if self.settings.share_group
                 else "", describe(self.engine))
        return True

    def stop(self, timeout: float = 30.0, *, report: bool = True) -> None:
        """Flush, commit and acknowledge what was received, then disconnect.

        If the database stays unavailable for ``timeout`` seconds, the pending batch is left
        unacknowledged: the broker redelivers it to the next session.
        """
        self._stop_deadline = time.monotonic() + timeout
        self._queue.put(STOP)
        self._stopping.set()
        for thread in (self._decoder, *self._writers):
            if thread.is_alive():
                thread.join(timeout + 5.0)
        if report:
            self._log_stats(final=True)
        self.link.stop()
        if self._own_engine:
            self.engine.dispose()

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + self._decoded.qsize()

    # ----------------------------------------------------------------- network thread

    def _on_message(self, msg: Message) -> None:
        """A device over its limit: acknowledged and dropped here, before it costs a decode or a write."""
        if self.admission.admit(msg.topic):  # type: ignore[union-attr]
            self._queue.put(msg)
        else:
            self.stats.rate_limited += 1  # written by this thread only
            self.link.ack(msg.mid, msg.qos)

    def _on_connection_event(self, _up: bool) -> None:
        self._connection_events += 1
        self._queue.put(CONNECTION_EVENT)

    # ----------------------------------------------------------------- writer thread

    def _decode(self) -> None:
        """The decoder thread: batches of decoded messages for the writer, until the stop marker."""
        while True:
            pending = self._batcher.collect(timeout=0.5)
            if self.admission is not None and (limited := self.admission.dead_letters(time.time())):
                pending = pending or Pending(generation=self._batcher.generation)
                pending.dead.extend(limited)
            if pending is not None:
                self._decoded.put(pending)
                if pending.final:
                    for _ in self._writers[1:]:
                        self._decoded.put(Pending(final=True))  # every writer stops after the last batch
                    return

    def _run(self, index: int = 0) -> None:
        interval = self.settings.log_interval_s if index == 0 else 0.0  # writer 0 logs
        self._next_log = time.monotonic() + interval if interval > 0 else float("inf")
        self._last_log = (time.monotonic(), 0)
        self._local.conn = None
        while True:
            try:
                pending = self._decoded.get(timeout=min(0.5, interval) if interval > 0 else 0.5)
            except queue.Empty:
                pending = None
            if pending is not None and (pending.messages or pending.dead):
                log.debug("committing a batch: %d messages, %d results", len(pending.messages), len(pending.rows))
                touched = self._touched
                pending.seen = {d: t for d, t in pending.seen.items()
                                if t - touched.get(d, -SEEN_RESOLUTION_S) >= SEEN_RESOLUTION_S}
                t0 = time.perf_counter()
                written = self._commit(pending)
                if written is not None:
                    if self.on_commit is not None:
                        self.on_commit(time.perf_counter() - t0)
                    touched.update(pending.seen)
                    self._count(pending, written)
                    if self.settings.receipts:
                        self._send_receipts(pending)
                    self._ack(pending)
            if index == 0 and time.monotonic() >= self._next_log:
                self._log_stats()
            if pending is not None and pending.final:
                if self._local.conn is not None:
                    self._local.conn.close()
                return

    def _commit(self, pending: Pending) -> Written | None:
        """Write the batch in one transaction, retrying with backoff; None if stop() gave up waiting."""
        delay = 0.2
        while True:
            try:
                return self._write(pending)
            except Exception as exc:  # the outer loop of a long-running process: log and carry on
                with self._stats_lock:
                    self.stats.db_errors += 1
                if isinstance(exc, sa.exc.DBAPIError) and not is_transient(exc):
                    log.error("the database refused a batch (%s); writing its messages one by one",
                              _first_line(exc))
                    try:
                        return self._commit_one_by_one(pending)
                    except Exception as inner:
                        exc = inner
                log.warning("database write failed, retrying in %.1f s (nothing acknowledged): %s",
                            delay, _first_line(exc), exc_info=not isinstance(exc, sa.exc.SQLAlchemyError))
            if not self._stopping.wait(delay):
                pass  # backoff over, not stopping
            elif (remaining := (self._stop_deadline or 0.0) - time.monotonic()) > 0:
                time.sleep(min(delay, remaining))  # stopping: keep trying until stop()'s timeout
            else:
                log.error("stopping with %d messages uncommitted: the broker will redeliver them",
                          len(pending.messages))
                return None
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def _write(self, pending: Pending) -> Written:
        """One transaction on the writer's own connection, kept open between batches (a pool checkout
        and return per batch cost as much as writing 10 rows); dropped on any error."""
        conn = self._local.conn
        if conn is None:
            conn = self._local.conn = self.engine.connect()
            conn.execution_options(hub_write=True)
        try:
            with conn.begin():
                written = self.store.write(conn, pending)
                pending.dup = self._duplicates(conn, pending, written)
                return written
        except BaseException:
            self._local.conn = None
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def _duplicates(self, conn: sa.Connection, pending: Pending, written: Written) -> set[tuple[str, int]]:
        """The keys of the batch that were stored before it, of the devices that ask for them: none to look
        for when every row was new, all of them when none was, else a look at the table."""
        if not written.duplicates or not any(pending.marking.values()):
            return set()
        rows = [row for row in pending.rows if pending.marking.get(row[DEVICE_ID])]
        if written.new == 0:
            return {(row[DEVICE_ID], row[SEQ]) for row in rows}
        return self.store.stored_before(conn, rows)

    def _commit_one_by_one(self, pending: Pending) -> Written | None:
        """Isolate the message(s) the database refuses (e.g. a NUL in a PostgreSQL string).

        Afterwards ``pending.rows`` holds only the rows that were stored: only those are receipted."""
        total = [0, 0, 0]
        stored: list[ResultRow] = []
        pending.dup = set()
        for msg in pending.messages:
            single = Pending()
            self._batcher.add(single, msg, time.time())
            try:
                w = self._write(single)
                stored += single.rows
                pending.dup |= single.dup
            except sa.exc.DBAPIError as exc:
                if is_transient(exc):
                    raise  # the caller retries the whole batch: idempotent, nothing is duplicated
                letter = dead_letter(msg.topic, msg.payload, f"database refused: {_first_line(exc)}",
                                     time.time(), self.settings.dead_letter_max_bytes)
                w = self._write(Pending(dead=[letter]))
            total = [total[0] + w.new, total[1] + w.duplicates, total[2] + w.dead]
        pending.rows = stored
        return Written(*total)

    def _count(self, pending: Pending, written: Written) -> None:
        stats = self.stats
        with self._stats_lock:
            stats.batches += 1
            stats.messages += len(pending.messages)
            stats.stored += written.new
            stats.duplicates += written.duplicates
            stats.dead_letters += written.dead

    def _send_receipts(self, pending: Pending) -> None:
        """Tell each device which of its results this committed batch holds, and (when it asks) which of
        them were stored before: one message per device, or as many as it takes for each to fit."""
        per_device: dict[str, list[int]] = {}
        for device, rows in itertools.groupby(pending.rows, key=_DEVICE_OF):  # a message's rows are together
            seqs = per_device.get(device)
            if seqs is None:
                per_device[device] = seqs = []
            seqs.extend(map(_SEQ_OF, rows))  # grouped in C: a Python step per row cost 5 % of a busy hub
        publish, topics, dup = self.link.publish, self.topics, pending.dup
        for device, seqs in per_device.items():
            try:
                payloads = c.receipt_payloads(device, seqs, [s for s in seqs if (device, s) in dup] if dup else ())
                for payload in payloads:
                    publish(topics.receipts(device), payload, c.RECEIPT_DELIVERY)
                    with self._stats_lock:
                        self.stats.receipts += 1
            except (MqttError, ContractError) as exc:  # the device sends again and gets its receipt then
                log.warning("receipt to %s not sent: %s", device, exc)

    def _ack(self, pending: Pending) -> None:
        stats = self.stats
        if pending.generation != self._connection_events or not self.link.connected:
            with self._stats_lock:
                stats.unacked += len(pending.messages)
            log.info("connection changed: %d committed messages left for redelivery", len(pending.messages))
            return
        ack = self.link.ack
        for msg in pending.messages:
            ack(msg.mid, msg.qos)

    def _log_stats(self, final: bool = False) -> None:
        now = time.monotonic()
        last_t, last_seen = getattr(self, "_last_log", (now, 0))
        s = self.stats
        seen = s.messages + s.dead_letters
        if final:
            log.info("final: this session: %d rows stored, %d duplicates ignored, %d dead letters, %d messages, "
                     "%d receipts sent", s.stored, s.duplicates, s.dead_letters, s.messages, s.receipts)
        elif seen != last_seen or self.backlog:  # an idle hub says nothing
            rate = (s.stored + s.duplicates - getattr(self, "_last_rows", 0)) / max(now - last_t, 1e-9)
            log.info("%.0f results/s, backlog %d messages; this session: %d rows stored, %d duplicates ignored, "
                     "%d dead letters, %d messages", rate, self.backlog, s.stored, s.duplicates, s.dead_letters,
                     s.messages)
        self._last_log = (now, seen)
        self._last_rows = s.stored + s.duplicates
        interval = self.settings.log_interval_s
        self._next_log = now + interval if interval > 0 else float("inf")


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__
