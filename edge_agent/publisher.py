"""Moves results from the durable outbox to the broker, deleting them only after PUBACK.

One thread: it batches pending rows per device into result messages (bounded by count and by the
age of the oldest row), keeps at most ``max_inflight`` messages unacknowledged, and deletes rows
when their message is acknowledged. paho keeps unacknowledged QoS 1 messages across reconnects and
resends them itself (same mid), so rows read in this process are never handed over twice;
after a restart reading starts again at the first pending row, and every one is sent again (the hub ignores
duplicates by key).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

from edge_agent.contract import RESULTS_DELIVERY, ContractError, Topics, join_results
from edge_agent.mqtt import MqttError, MqttLink
from edge_agent.outbox import Outbox, Pending

log = logging.getLogger(__name__)


class Publisher:
    """Background pump from an :class:`Outbox` to an :class:`MqttLink`."""

    def __init__(self, outbox: Outbox, link: MqttLink, topics: Topics, *, batch_max_results: int = 100,
                 batch_max_delay_s: float = 0.5, max_inflight: int = 20) -> None:
        self.outbox = outbox
        self.link = link
        self.topics = topics
        self.batch_max_results = batch_max_results
        self.batch_max_delay_s = batch_max_delay_s
        self.max_inflight = max_inflight
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._inflight: dict[int, list[int]] = {}  # mid -> outbox row ids
        self._read_upto = 0  # highest row id read from the outbox in this process (held, in flight or sent)
        self._held: list[Pending] = []  # read past the cursor, waiting for a full batch or its age
        self._done: list[int] = []  # acknowledged rows not yet deleted (a failed delete is retried)
        self._refused_ids: set[int] = set()  # rows whose message the broker refused (kept until restart)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain = False
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.published_messages = 0
        self.acked_results = 0
        self.refused = 0
        self.discarded = 0
        self.last_error: str | None = None

    # called from paho's network thread
    def on_published(self, mid: int, ok: bool, reason: str) -> None:
        self._acks.put((mid, ok, reason))
        self._wake.set()

    def notify(self) -> None:
        """New rows are in the outbox."""
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def flush_all(self) -> None:
        """From now on send partial batches at once (end of a replay, shutdown)."""
        self._drain = True
        self._wake.set()

    def wait_drained(self, timeout: float | None = None, *, stop: threading.Event | None = None,
                     poll_s: float = 0.05) -> bool:
        """Block until every row of the outbox is acknowledged.

        Returns False at the timeout, when ``stop`` is set, or when all that is left are rows the
        broker refused (they are not resent in this process: waiting would never end).
        """
        self.flush_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.outbox.depth > 0:
            if deadline is not None and time.monotonic() > deadline:
                return False
            if (stop is not None and stop.is_set()) or (self._refused_ids and self.outbox.depth <= len(
                    self._refused_ids) and not self._inflight):
                return False
            time.sleep(poll_s)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    # ----------------------------------------------------------------- the pump

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(0.2, self.batch_max_delay_s or 0.2))
            self._wake.clear()
            try:
                self._handle_acks()
                if self.link.connected:
                    self._send()
            except Exception as exc:  # the pump must outlive any single failure; the rows stay queued
                self.last_error = f"publisher: {exc}"
                log.exception("publisher error")
                time.sleep(0.5)

    def _handle_acks(self) -> None:
        done = self._done
        while True:
            try:
                mid, ok, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            ids = self._inflight.pop(mid, None)
            if ids is None:
                continue  # a duplicate callback: idempotent
            if ok:
                done.extend(ids)
            else:
                # e.g. "Not authorized": the rows stay in the outbox and are retried after a restart.
                self.refused += len(ids)
                self._refused_ids.update(ids)
                self.last_error = f"broker refused a results message: {reason}"
                log.error("broker refused %d results: %s", len(ids), reason)
        if done:
            self.outbox.delete(done)  # if this raises, the ids stay in self._done for the next round
            self.acked_results += len(done)
            self._done = []
        self.outbox.floor = self._read_upto  # overflow never drops what is held or in flight

    def _send(self) -> None:
        while len(self._inflight) < self.max_inflight:
            room = (self.max_inflight - len(self._inflight)) * self.batch_max_results
            if len(self._held) < room:
                more = self.outbox.pending(self._read_upto, room - len(self._held))
                if more:
                    self._held.extend(more)
                    self._read_upto = more[-1].id
            if not self._held:
                return
            batches = self._ready_batches()
            if not batches:
                return
            for device_id, rows in batches:
                payload = join_results(device_id, [r.payload for r in rows])
                try:
                    topic = self.topics.results(device_id)
                except ContractError as exc:  # written by a version that did not check ids: unsendable
                    self._discard(rows, exc.reason)
                    continue
                try:
                    mid = self.link.publish(topic, payload, RESULTS_DELIVERY)
                except MqttError as exc:
                    self.last_error = str(exc)
                    log.warning("publish failed, will retry: %s", exc)
                    return
                self._inflight[mid] = [r.id for r in rows]
                self.published_messages += 1
                sent = {r.id for r in rows}
                self._held = [r for r in self._held if r.id not in sent]
                if len(self._inflight) >= self.max_inflight:
                    return

    def _discard(self, rows: list[Pending], reason: str) -> None:
        ids = {r.id for r in rows}
        self.outbox.delete(list(ids))
        self._held = [r for r in self._held if r.id not in ids]
        self.discarded += len(ids)
        self.last_error = f"discarded {self.discarded} unsendable results: {reason}"
        log.error("%s", self.last_error)

    def _ready_batches(self) -> list[tuple[str, list[Pending]]]:
        """Full batches, plus partial ones whose oldest row has waited long enough (or when draining)."""
        per_device: dict[str, list[Pending]] = defaultdict(list)
        for row in self._held:
            per_device[row.device_id].append(row)
        now = time.time()
        ready: list[tuple[str, list[Pending]]] = []
        for device_id, rows in per_device.items():
            for i in range(0, len(rows), self.batch_max_results):
                chunk = rows[i:i + self.batch_max_results]
                if len(chunk) == self.batch_max_results or self._drain \
                        or now - chunk[0].created >= self.batch_max_delay_s:
                    ready.append((device_id, chunk))
        return ready
