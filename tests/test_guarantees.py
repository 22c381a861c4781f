"""Guarantees a line of code upholds, each tested so that breaking that line fails the test.

* Overflow never drops a row the publisher has in flight (the outbox floor): rows the broker has
  not acknowledged yet may still reach the hub, so dropping them would count as lost what arrives,
  and keep in their place rows that never leave.
* The hub sends a receipt only after its commit: a device deletes a result on its receipt, so a
  receipt for rows that are not committed yet loses them if the hub dies before its commit.

Both run against a real mosquitto. PUBACKs are held back by pausing the broker (SIGSTOP by pid,
SIGCONT in a finally); the commit is held back by another connection's exclusive SQLite transaction.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_hub.data import db
from cloud_hub.data.ingest import Hub
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from edge_agent.device.outbox import Outbox
from edge_agent.device.publisher import Publisher
from edge_agent.mqtt import Message, MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.helpers import wait_for
from tests.test_ingest import Publisher as Device
from tests.test_ingest import batch, ready, settings_for, stored_keys


@contextmanager
def paused(broker: LocalBroker) -> Iterator[None]:
    """The broker stops reading and answering (its sockets stay open): no PUBACK comes until the end."""
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


def _rows(seqs: range) -> list[tuple[int, bytes]]:
    return [(s, c.encode_result_obj(c.Result(s, s / 10, s / 10 + 2, 1, 0.5, "walk", 0.9))) for s in seqs]


@pytest.fixture
def hub(broker: LocalBroker, prefix: str, tmp_path: Path) -> Iterator[Hub]:
    h = Hub(settings_for(broker, prefix, tmp_path))
    h.start()
    probe = Device(broker, f"{prefix}-probe")
    ready(h, probe)
    probe.stop()
    yield h
    h.stop(timeout=5)


def test_overflow_never_drops_a_row_the_publisher_has_in_flight(broker: LocalBroker, hub: Hub, prefix: str,
                                                                tmp_path: Path) -> None:
    topics = hub.topics
    box = Outbox(tmp_path / "outbox.sqlite", max_rows=10)
    link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-dev", subscriptions=[(topics.receipts("d"), 1)],
                    on_published=lambda *a: pub.on_published(*a),
                    on_message=lambda m: pub.on_receipt(m.topic, m.payload))
    pub = Publisher(box, link, topics, batch_max_results=2, batch_max_delay_s=0.0, max_inflight=2)
    link.start()
    link.wait_subscribed(10)
    pub.start()
    try:
        with paused(broker):
            box.put("d", _rows(range(10)))  # full
            pub.notify()
            wait_for(lambda: pub.published_messages == 2, what="two messages in flight")
            box.put("d", _rows(range(10, 13)))  # three over the bound, while seqs 0-3 wait for their PUBACK
            assert box.dropped == 3
            kept = [r.seq for r in box.pending(0, 100)]
            assert kept == [0, 1, 2, 3, *range(7, 13)], "the oldest rows not in flight made room"
        assert pub.wait_drained(30)
    finally:
        pub.stop()
        link.stop()
        box.close()
    # "dropped" is exact: the hub has every row but the three the outbox counts as dropped.
    wait_for(lambda: len(stored_keys(hub.settings.db)) >= 10, what="the rows stored")
    assert sorted(stored_keys(hub.settings.db)) == [("d", s) for s in (0, 1, 2, 3, *range(7, 13))]


def test_results_an_older_build_wrote_with_a_nul_are_discarded_not_resent_forever(broker: LocalBroker, hub: Hub,
                                                                                 prefix: str, tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An outbox row with a NUL in its label, or a key below 0 (written before the contract, then the sources,
    refused them): every hub refuses the batch holding it, good results included, at every retry. The publisher
    discards those rows, says so, and the rest is stored."""
    topics = hub.topics
    box = Outbox(tmp_path / "outbox.sqlite")
    link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-dev", subscriptions=[(topics.receipts("d"), 1)],
                    on_published=lambda *a: pub.on_published(*a),
                    on_message=lambda m: pub.on_receipt(m.topic, m.payload))
    pub = Publisher(box, link, topics, batch_max_results=10, batch_max_delay_s=0.0)
    rows = _rows(range(6))
    rows[2] = (2, rows[2][1].replace(b'"walk"', b'"wa\\u0000lk"'))  # as an older build encoded it
    box.put("d", rows)
    box.put("d", _rows([-1500]))  # a reading's ts before 1970, as an older build took it
    link.start()
    link.wait_subscribed(10)
    pub.start()
    try:
        assert pub.wait_drained(30)
    finally:
        pub.stop()
        link.stop()
        box.close()
    wait_for(lambda: len(stored_keys(hub.settings.db)) >= 5, what="the other rows stored")
    assert sorted(stored_keys(hub.settings.db)) == [("d", s) for s in (0, 1, 3, 4, 5)]
    assert pub.discarded == 2 and "a NUL in a label or truth" in caplog.text and "a key below 0" in caplog.text
    assert hub.stats.dead_letters == 0


class Receipts:
    """A device's receipts topic, as the device sees it: every message, in order."""

    def __init__(self, broker: LocalBroker, topics: c.Topics, device: str, client_id: str) -> None:
        self.got: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.link = MqttLink(BrokerURL.parse(broker.url), client_id, subscriptions=[(topics.receipts(device), 1)],
                             on_message=self.got.put)
        self.link.start()
        self.link.wait_subscribed(10)

    def next(self) -> Message:
        return self.got.get(timeout=30)

    def stop(self) -> None:
        self.link.stop()


def _fail_fast_when_locked(engine: sa.Engine) -> None:
    """The hub's writes fail at once on a locked database (instead of waiting 30 s for the lock), so
    ``stats.db_errors`` says the hub has tried to commit the batch."""
    sa.event.listen(engine, "connect", lambda conn, _rec: conn.execute("PRAGMA busy_timeout=0"))
    engine.dispose()  # connections made from now on get it


def test_a_receipt_is_sent_only_after_the_commit(broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    _fail_fast_when_locked(engine)
    hub = Hub(settings_for(broker, prefix, tmp_path), engine=engine)
    hub.start()
    device = Device(broker, f"{prefix}-dev")
    receipts = Receipts(broker, hub.topics, "dev-a", f"{prefix}-receipts")
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        ready(hub, device)
        lock.execute("BEGIN EXCLUSIVE")  # the hub cannot commit until the ROLLBACK below
        device.publish(hub.topics.results("dev-a"), batch("dev-a", 0, 5).encode())
        wait_for(lambda: hub.stats.db_errors >= 1, what="the hub trying to commit the batch")
        # On the hub's own connection and on the receipts topic: it arrives after any receipt the
        # hub published before it (MQTT keeps the order of one client's messages on one topic).
        hub.link.publish(hub.topics.receipts("dev-a"), b"marker", c.RECEIPT_DELIVERY)
        assert receipts.next().payload == b"marker", "a receipt went out before the commit"
        lock.execute("ROLLBACK")
        receipt = c.decode_receipt(receipts.next().payload, "dev-a")
        assert sorted(receipt.seqs()) == [0, 1, 2, 3, 4]
        assert sorted(stored_keys(hub.settings.db)) == [("dev-a", s) for s in range(5)]
    finally:
        lock.close()
        receipts.stop()
        device.stop()
        hub.stop(timeout=5)
        engine.dispose()
