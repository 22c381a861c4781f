"""The hub's batches: the decoder thread's side of ingestion (:mod:`cloud_hub.data.ingest` writes them).

The network thread puts every message on a queue, and a marker on every connect and disconnect; the
decoder drains the queue into a :class:`Pending` batch, decoding each message through the contract (a
message it refuses becomes a dead letter, with the contract's reason).

Why a batch lingers: a fleet of devices each sending now and then keeps the queue nearly empty, and a
batch that ended whenever the queue was empty held one message: one transaction per result. So once
the queue runs dry a batch waits for more, up to ``batch_linger_ms`` after its first message (a few
milliseconds; 0 = write at once), and a busy hub commits groups. Nothing is acknowledged or receipted
before its batch commits, so the linger delays receipts and acks, never the guarantee. A batch ends
at once at ``batch_max`` rows, and ``batch_max_delay_s`` bounds it while messages keep arriving.

Messages of one connection per batch: a batch ends at a connection marker, and carries the count of
markers dequeued before it (its ``generation``); the writer acknowledges it only if no connection event
happened since (packet ids are per connection).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.data.result_rows import result_rows
from cloud_hub.data.store import Batch, dead_letter
from cloud_hub.settings import HubSettings
from edge_agent.contract import ContractError, decode_status
from edge_agent.mqtt import Message

log = logging.getLogger("cloud_hub.data.ingest")  # the hub's one voice for what it receives

CONNECTION_EVENT = object()  # queued by the network thread on every connect and disconnect
STOP = object()  # queued by Hub.stop(): everything before it is flushed, committed and acknowledged
TOPIC_CACHE_MAX = 100_000


@dataclass(slots=True)
class Pending(Batch):
    """A batch being collected: the decoded rows plus the messages to acknowledge after commit."""

    messages: list[Message] = field(default_factory=list)
    generation: int = 0
    final: bool = False
    marking: dict[str, bool] = field(default_factory=dict)  # device -> all its messages ask mark_duplicates
    dup: set[tuple[str, int]] = field(default_factory=set)  # keys stored before this batch (devices marking)


class Batcher:
    """Takes messages off the network thread's queue and makes batches of them (one decoder thread)."""

    def __init__(self, settings: HubSettings, inbox: queue.SimpleQueue[Any], stopping: threading.Event) -> None:
        self.settings = settings
        self.topics = settings.topics
        self._queue = inbox
        self._stopping = stopping  # set by Hub.stop(): a batch no longer lingers
        self.generation = 0  # connection markers dequeued so far
        self._topics_seen: dict[str, tuple[str, str]] = {}

    def collect(self, timeout: float) -> Pending | None:
        """Block for the first item, then take what comes, until batch_max rows, a connection event or stop,
        or the queue is empty once the linger (counted from the first item) or the max delay is over."""
        get = self._queue.get
        try:
            item = get(timeout=timeout)
        except queue.Empty:
            return None
        pending = Pending(generation=self.generation)
        now = time.time()
        start = time.monotonic()
        deadline = start + self.settings.batch_max_delay_s
        linger_until = min(start + self.settings.batch_linger_ms / 1000.0, deadline)
        batch_max = self.settings.batch_max
        while True:
            if item is CONNECTION_EVENT:
                self.generation += 1
                if pending.messages:
                    break  # messages of one connection per batch (see the module docstring)
                pending.generation = self.generation
            elif item is STOP:
                pending.final = True
                break
            else:
                self.add(pending, item, now)
                if len(pending.rows) >= batch_max or time.monotonic() >= deadline:
                    break
            try:
                item = get(block=False)
            except queue.Empty:
                # Drained: linger for more (a busy hub then writes, receipts and acknowledges groups), but never
                # past the linger counted from the batch's first item, nor once stop() was called.
                wait = linger_until - time.monotonic()
                if wait <= 0 or not pending.messages or self._stopping.is_set():
                    break
                try:
                    item = get(timeout=wait)
                except queue.Empty:
                    break
        return pending

    def add(self, pending: Pending, msg: Message, now: float) -> None:
        """Decode one message into the batch; anything the contract refuses becomes a dead letter."""
        pending.messages.append(msg)
        topic = msg.topic
        try:
            parsed = self._topics_seen.get(topic)
            if parsed is None:
                parsed = self.topics.parse(topic)
                if len(self._topics_seen) >= TOPIC_CACHE_MAX:
                    self._topics_seen.clear()
                self._topics_seen[topic] = parsed
            kind, device = parsed
            if kind == "results":
                rows, mark = result_rows(msg.payload, device, now)  # plain tuples in ResultRow's order
                pending.rows.extend(rows)
                pending.seen[device] = now
                pending.marking[device] = pending.marking.get(device, True) and mark
            elif kind == "status":
                status = decode_status(msg.payload, device)
                # A retained status comes again with every (re)subscription: it says nothing about now.
                pending.statuses[device] = (status, min(now, status.ts) if msg.retain else now)
            else:
                raise ContractError(f"the hub does not ingest {kind} topics")
        except ContractError as exc:
            pending.dead.append(dead_letter(topic, msg.payload, exc.reason, now,
                                            self.settings.dead_letter_max_bytes))
        except Exception as exc:  # a decoder bug must not stop ingestion: keep the message, say why
            log.exception("could not decode a message on %s", topic)
            pending.dead.append(dead_letter(topic, msg.payload, f"hub failed to decode: {exc!r}", now,
                                            self.settings.dead_letter_max_bytes))
