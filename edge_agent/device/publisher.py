"""Moves results from the durable outbox to the broker; rows leave the outbox on the hub's receipt.

One thread: it batches pending rows per device into result messages (bounded by count and by the
age of the oldest row), keeps at most ``max_inflight`` messages unacknowledged, and on each PUBACK
marks the message's rows sent. A row is deleted only when the hub's receipt says it is committed
(``receipts=True``, the default), or at the PUBACK for setups without a hub (``receipts=False``).

Sent rows without a receipt go out again when their ``due`` time comes (a wait that doubles per
attempt) and after every reconnect: the broker may have lost them (a crash between autosaves, or a
broker without persistence). paho itself resends messages that are in flight across a reconnect
(same mid), so a row read in this process is never handed to paho twice while it is in flight;
after a restart every row is sent again. Re-sends are harmless: the hub ignores duplicates by key
and receipts them again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque

from edge_agent.contract import RESULTS_DELIVERY, ContractError, Topics, decode_receipt, join_results
from edge_agent.device.disk_room import is_disk_full
from edge_agent.device.outbox import Outbox, OutboxRow
from edge_agent.mqtt import MqttError, MqttLink

log = logging.getLogger(__name__)

_DUE_CHECK_S = 0.5  # how often the pump looks for unreceipted rows whose time to be sent again came
# A receipt usually follows the PUBACK within milliseconds: rows are marked sent in the outbox (an
# UPDATE) only when theirs has not come after this long, or when many wait, which saves a write per
# message on the fast path. Until then they are protected like rows in flight.
_MARK_AFTER_S = 1.0
_MARK_MAX_ROWS = 5_000
_DISK_NOTE_S = 60.0  # a full disk failing the pump's writes is said this often (the agent says the rest)


class Publisher:
    """Background pump from an :class:`Outbox` to an :class:`MqttLink`."""

    def __init__(self, outbox: Outbox, link: MqttLink, topics: Topics, *, batch_max_results: int = 100,
                 batch_max_delay_s: float = 0.5, max_inflight: int = 20, receipts: bool = True) -> None:
        self.outbox = outbox
        self.link = link
        self.topics = topics
        self.batch_max_results = batch_max_results
        self.batch_max_delay_s = batch_max_delay_s
        self.max_inflight = max_inflight
        self.receipts = receipts
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._receipts: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._inflight: dict[int, list[int]] = {}  # mid -> outbox row ids
        self._topics: dict[int, str] = {}  # mid -> its topic (named when the broker refuses it)
        self.refusals: dict[str, str] = {}  # device id -> why the broker will never take its results (final)
        self._read_upto = 0  # highest row id read from the outbox in this process (held, in flight or sent)
        self._held: list[OutboxRow] = []  # waiting for a full batch or its age (new rows and re-sends)
        self._done: list[int] = []  # acknowledged rows not yet marked/deleted (a failed write is retried)
        self._acked: deque[tuple[float, list[int]]] = deque()  # PUBACKed, waiting a moment for their receipt
        self._acked_rows = 0
        self._refused_ids: set[int] = set()  # rows whose message the broker refused (kept until restart)
        self._resend_all = False  # set on a reconnect, handled by the pump
        self._next_due_check = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain = False
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.rounds = 0  # pump rounds run (lets tests wait for the pump without sleeping)
        self.published_messages = 0
        self.acked_results = 0  # PUBACKed rows (a re-sent row counts again)
        self.stored_results = 0  # rows removed by a receipt (or at the PUBACK without receipts)
        self.already_stored = 0  # of those, rows the hub had stored before (its receipt's dup): not new there
        self.resent_results = 0  # rows handed to the broker again for want of a receipt
        self.refused = 0
        self.discarded = 0
        self.last_error: str | None = None
        self._disk_note = 0.0

    # called from paho's network thread
    def on_published(self, mid: int, ok: bool, reason: str) -> None:
        self._acks.put((mid, ok, reason))
        self._wake.set()

    def on_receipt(self, topic: str, payload: bytes) -> None:
        self._receipts.put((topic, payload))
        self._wake.set()

    def on_reconnect(self) -> None:
        """The connection came back: whatever waits for a receipt may be lost with the old broker."""
        self._resend_all = True
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
                     poll_s: float = 0.1, on_wait: float = 10.0, unreachable_s: float | None = None) -> bool:
        """Block until every row of the outbox is stored (receipted, or acknowledged without receipts).

        Returns False at the timeout, when ``stop`` is set, or when all that is left are rows the
        broker refused (they are not resent in this process: waiting would never end). Raises
        :class:`MqttError` with the cause when the broker has been unreachable for ``unreachable_s``.
        Says every ``on_wait`` seconds what it is waiting for: a missing hub is never a silent hang.
        """
        self.flush_all()
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        next_note = start + min(on_wait, 3.0)  # the first word early: a wrong port should not look like a hang
        while self.outbox.depth > 0:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                return False
            if (stop is not None and stop.is_set()) or (self._refused_ids and self.outbox.depth <= len(
                    self._refused_ids) and not self._inflight):
                return False
            if self.link.fatal is not None:
                raise MqttError(self.link.fatal)
            away = self.link.disconnected_since
            if unreachable_s is not None and away is not None and now - away > unreachable_s:
                raise MqttError(f"cannot reach the broker {self.link.broker} for {now - away:.0f} s: "
                                f"{self.link.unreachable_reason()}")
            if now >= next_note:
                next_note = now + on_wait
                log.warning("waiting for %s: %d results not yet stored (%s)",
                            "the hub's receipts" if self.receipts else "the broker", self.outbox.depth,
                            "connected" if away is None else
                            f"not connected to {self.link.broker}: {self.link.unreachable_reason()}")
            self.outbox.wait_empty(poll_s)  # wakes at once when the last row goes
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
                self.outbox.check_space()
                self._handle_acks()
                self._handle_receipts()
                if self.link.connected:
                    self._requeue()
                    self._send()
            except Exception as exc:  # the pump must outlive any single failure; the rows stay queued
                if is_disk_full(exc):  # the outbox could not write (a receipt is tried again): said once a minute
                    if time.monotonic() >= self._disk_note:
                        self._disk_note = time.monotonic() + _DISK_NOTE_S
                        log.warning("publisher: the disk of %s is full (%s); trying again",
                                    self.outbox.path.parent, exc)
                else:
                    self.last_error = f"publisher: {exc}"
                    log.exception("publisher error")
                time.sleep(0.5)
            self.rounds += 1

    def _handle_acks(self) -> None:
        done = self._done
        while True:
            try:
                mid, ok, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            ids = self._inflight.pop(mid, None)
            topic = self._topics.pop(mid, "")
            if ids is None:
                continue  # a duplicate callback: idempotent
            if ok:
                done.extend(ids)
            else:
                # e.g. "Not authorized": the rows stay in the outbox and are retried after a restart.
                self.refused += len(ids)
                self._refused_ids.update(ids)
                self.last_error = f"broker refused a results message: {reason}"
                log.error("broker refused %d results on %s: %s", len(ids), topic, reason)
                device = self.topics.parse(topic)[1]
                if "authoriz" in reason.lower() and device not in self.refusals:  # MQTT 5's 0x87: final, as the ACL
                    self.refusals[device] = (
                        f"the broker {self.link.broker} does not let this client publish on {topic} ({reason}): its "
                        "access rules let a device publish under its own id only, so device_id must be the client "
                        "certificate's CN or the MQTT username, and prefix the ACL's (deploy/README.md: Access "
                        f"rules); {self.outbox.depth} results kept in the outbox")
        if done:
            # If this raises, the ids stay in self._done for the next round.
            if self.receipts:
                self._acked.append((time.monotonic(), done))
                self._acked_rows += len(done)
            else:
                self.stored_results += self.outbox.delete(done)
            self.acked_results += len(done)
            self._done = []

    def _mark_sent(self, everything: bool = False) -> None:
        """Mark PUBACKed rows whose receipt is late (all of them with ``everything``) as sent."""
        cutoff = time.monotonic() - _MARK_AFTER_S
        acked = self._acked
        while acked and (everything or acked[0][0] <= cutoff or self._acked_rows > _MARK_MAX_ROWS):
            ids = acked[0][1]
            self.outbox.mark_sent(ids)  # rows receipted meanwhile are gone: nothing to mark
            acked.popleft()
            self._acked_rows -= len(ids)

    def _handle_receipts(self) -> None:
        while True:
            try:
                topic, payload = self._receipts.get_nowait()
            except queue.Empty:
                return
            try:
                receipt = decode_receipt(payload, self.topics.parse(topic)[1])
            except ContractError as exc:  # not fatal: the rows stay and are sent again
                self.last_error = f"bad receipt on {topic}: {exc.reason}"
                log.warning("%s", self.last_error)
                continue
            try:
                already = self.outbox.confirm_runs(receipt.device_id, receipt.dup) if receipt.dup else 0
                self.already_stored += already
                self.stored_results += already
                self.stored_results += self.outbox.confirm_runs(receipt.device_id, receipt.runs)
            except Exception:  # e.g. a full disk: the receipt is applied again (confirming twice is harmless)
                self._receipts.put((topic, payload))
                raise

    def _requeue(self) -> None:
        """Take unreceipted rows whose time has come (or all of them after a reconnect) for sending."""
        if not self.receipts:
            return
        self._mark_sent(everything=self._resend_all)
        if self._resend_all:
            self._resend_all = False
            self.outbox.resend_all()
            self._next_due_check = 0.0
        now = time.monotonic()
        if now < self._next_due_check:
            return
        room = self.max_inflight * self.batch_max_results - len(self._held)
        due = self.outbox.take_due(room) if room > 0 else []
        if due:
            self._held[:0] = due  # oldest first
            self.resent_results += len(due)
        # Look again soon while there is more to take, else at the normal pace.
        self._next_due_check = now if len(due) == room else now + _DUE_CHECK_S

    def _send(self) -> None:
        while len(self._inflight) < self.max_inflight:
            room = (self.max_inflight - len(self._inflight)) * self.batch_max_results
            if len(self._held) < room:
                # hold: from this read on, overflow never drops these rows (held, then in flight)
                more = self.outbox.pending(self._read_upto, room - len(self._held), hold=True)
                if more:
                    self._held.extend(more)
                    self._read_upto = more[-1].id
            if not self._held:
                return
            batches = self._ready_batches()
            if not batches:
                return
            for device_id, rows in batches:
                if nul := [r for r in rows if b"\\u0000" in r.payload]:  # JSON can only escape a NUL
                    # written by a build before the contract refused a NUL in a label or truth: every hub now
                    # refuses the batch holding it, with the good results around it, at every retry
                    self._discard(nul, "a NUL in a label or truth (written by an older build; refused by the hub)")
                    rows = [r for r in rows if b"\\u0000" not in r.payload]
                if negative := [r for r in rows if r.seq < 0]:  # a ts before 1970, taken by a build before sources refused it
                    self._discard(negative, "a key below 0 (a reading's ts before 1970; refused by the hub)")
                    rows = [r for r in rows if r.seq >= 0]
                if not rows:
                    continue
                # mark_duplicates: the receipt then says which were stored before (a hub of this build
                # or newer reads it; an older one refuses it: upgrade the hub first)
                payload = join_results(device_id, [r.payload for r in rows], mark_duplicates=self.receipts)
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
                self._topics[mid] = topic
                self.published_messages += 1
                sent = {r.id for r in rows}
                self._held = [r for r in self._held if r.id not in sent]
                if len(self._inflight) >= self.max_inflight:
                    return

    def _discard(self, rows: list[OutboxRow], reason: str) -> None:
        ids = {r.id for r in rows}
        self.outbox.delete(list(ids))
        self._held = [r for r in self._held if r.id not in ids]
        self.discarded += len(ids)
        self.last_error = f"discarded {self.discarded} unsendable results: {reason}"
        log.error("%s", self.last_error)

    def _ready_batches(self) -> list[tuple[str, list[OutboxRow]]]:
        """Full batches, plus partial ones whose oldest row has waited long enough (or when draining)."""
        per_device: dict[str, list[OutboxRow]] = defaultdict(list)
        for row in self._held:
            per_device[row.device_id].append(row)
        now = time.time()
        ready: list[tuple[str, list[OutboxRow]]] = []
        for device_id, rows in per_device.items():
            for i in range(0, len(rows), self.batch_max_results):
                chunk = rows[i:i + self.batch_max_results]
                if len(chunk) == self.batch_max_results or self._drain \
                        or now - chunk[0].created >= self.batch_max_delay_s:
                    ready.append((device_id, chunk))
        return ready
