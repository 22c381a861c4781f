"""The durable outbox and the publisher that drains it through a real broker."""

from __future__ import annotations

import queue
import sqlite3
import threading

import pytest

from cloud_hub.tools.local_broker import REPO_CONF, LocalBroker
from edge_agent import contract as c
from edge_agent.device.outbox import Outbox, OutboxFull
from edge_agent.device.publisher import Publisher
from edge_agent.mqtt import Message, MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.helpers import wait_for


def _rows(device: str, seqs: range) -> list[tuple[int, bytes]]:
    return [(s, c.encode_result_obj(c.Result(s, s / 1000, s / 1000 + 1, 1, 0.1, "A", 0.5))) for s in seqs]


def test_rows_survive_reopen_and_keys_are_idempotent(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert box.put("d1", _rows("d1", range(10))) == 10
    assert box.put("d1", _rows("d1", range(5, 15))) == 5  # 5..9 already pending
    assert box.put("d2", _rows("d2", range(3))) == 3
    box.close()
    box = Outbox(tmp_path / "o.sqlite")
    assert box.depth == 18
    pending = box.pending(0, 100)
    assert [p.seq for p in pending if p.device_id == "d1"] == list(range(15))
    box.delete([p.id for p in pending[:4]])
    assert box.depth == 14
    assert box.pending(pending[3].id, 2)[0].id == pending[4].id
    box.close()


def test_drop_oldest_overflow_is_counted_and_persisted(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=10)
    box.put("d", _rows("d", range(8)))
    box.put("d", _rows("d", range(8, 14)))
    assert box.depth == 10 and box.dropped == 4
    assert box.pending(0, 1)[0].seq == 4  # the oldest four went
    box.close()
    assert Outbox(tmp_path / "o.sqlite", max_rows=10).dropped == 4


def test_block_overflow_waits_for_room(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=5, overflow="block")
    box.put("d", _rows("d", range(5)))
    with pytest.raises(OutboxFull):
        box.put("d", _rows("d", range(5, 6)), timeout=0.05)
    box.mark_sent([p.id for p in box.pending(0, 5)])  # at the broker, but not yet stored by the hub
    with pytest.raises(OutboxFull):
        box.put("d", _rows("d", range(5, 6)), timeout=0.05)
    t = threading.Timer(0.05, box.confirm, args=("d", [0, 1]))  # the hub's receipt frees room
    t.start()
    assert box.put("d", _rows("d", range(5, 7)), timeout=30) == 2
    t.join()
    assert box.depth == 5 and box.dropped == 0


def test_a_receipts_runs_remove_exactly_their_seqs_without_being_expanded(tmp_path) -> None:
    """A receipt's runs (first, step, count) are removed by range: the same rows as its seqs one by one, whatever
    the steps; a forged run of a million seqs (a hostile peer's: expanded first, it cost a core for 30 s on 200
    such receipts) removes only what the outbox holds in it."""
    import random

    rng = random.Random(7)
    held = sorted(rng.sample(range(5000), 1500))
    one, two = Outbox(tmp_path / "one.sqlite"), Outbox(tmp_path / "two.sqlite")
    for box in (one, two):
        box.put("d", _rows("d", held))
        box.put("e", _rows("e", held[:10]))
    for _ in range(40):
        first, step, count = rng.randrange(5000), rng.choice([1, 1, 2, 3, 7, 250]), rng.randrange(1, 300)
        runs = [(first, step, count), (rng.randrange(5000), 1, rng.randrange(1, 50))]
        seqs = sorted({f + k * st for f, st, n in runs for k in range(n)})
        assert one.confirm_runs("d", runs) == two.confirm("d", seqs)
    assert one.depth == two.depth and one.depth < 1510
    left = one.depth - 10
    assert one.confirm_runs("d", [(0, 1, 1_000_000)]) == left and one.depth == 10  # "e" keeps its rows
    assert one.confirm_runs("e", [(held[3], held[5] - held[3], 2)]) == 2 and one.depth == 8


def test_a_row_leaves_only_with_its_receipt_and_is_due_again_without_one(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite", resend_after_s=10, resend_max_s=25)
    box.put("d", _rows("d", range(4)))
    rows = box.pending(0, 10)
    assert box.mark_sent([r.id for r in rows], now=1000.0) == 4
    assert box.depth == 4 and box.unreceipted() == 4, "the broker's PUBACK removes nothing"
    assert box.take_due(10, now=1009.0) == []
    assert box.confirm("d", [0, 2, 99]) == 2  # an unknown seq (another run's) is ignored
    assert box.confirm("other", [1]) == 0
    due = box.take_due(10, now=1010.0)
    assert [r.seq for r in due] == [1, 3] and box.unreceipted() == 0 and box.depth == 2
    assert box.mark_sent([r.id for r in due], now=2000.0) == 2  # second attempt: the wait doubles
    assert box.take_due(10, now=2019.0) == [] and len(box.take_due(10, now=2020.0)) == 2
    box.mark_sent([r.id for r in due], now=3000.0)  # third: 40 s, capped at 25 s
    assert len(box.take_due(10, now=3025.0)) == 2
    box.mark_sent([r.id for r in due], now=4000.0)
    assert box.resend_all() == 2 and len(box.take_due(10, now=0.0)) == 2, "a reconnect makes all due now"
    box.close()


def test_a_new_process_sends_unreceipted_rows_again(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.put("d", _rows("d", range(3)))
    box.mark_sent([r.id for r in box.pending(0, 10)])
    box.close()
    box = Outbox(tmp_path / "o.sqlite")
    assert [r.seq for r in box.pending(0, 10)] == [0, 1, 2] and box.unreceipted() == 0
    box.close()


def test_an_outbox_from_before_receipts_is_upgraded_in_place(tmp_path) -> None:
    path = tmp_path / "o.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
                             created REAL NOT NULL, payload BLOB NOT NULL, UNIQUE (device_id, seq));
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO outbox (device_id, seq, created, payload) VALUES ('d', 7, 1.0, x'7b7d');
        INSERT INTO meta VALUES ('dropped', 3);
    """)
    old.close()
    box = Outbox(path)
    assert box.depth == 1 and box.dropped == 3 and [r.seq for r in box.pending(0, 10)] == [7]
    box.mark_sent([box.pending(0, 1)[0].id])
    assert box.unreceipted() == 1 and box.confirm("d", [7]) == 1 and box.depth == 0
    box.close()


def test_drop_oldest_may_drop_unreceipted_rows_but_never_rows_in_flight(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=6)
    box.put("d", _rows("d", range(6)))
    rows = box.pending(0, 6)
    box.mark_sent([r.id for r in rows[:2]])  # 0, 1: at the broker, waiting for receipts
    box.floor = rows[3].id  # 2, 3: in flight
    box.put("d", _rows("d", range(6, 9)))
    assert box.dropped == 3 and box.depth == 6
    assert sorted(r.seq for r in box.pending(0, 100)) == [2, 3, 5, 6, 7, 8]
    box.close()


def _collector(broker: LocalBroker, topics: c.Topics, name: str) -> tuple[MqttLink, queue.Queue[Message]]:
    got: queue.Queue[Message] = queue.Queue()
    link = MqttLink(BrokerURL.parse(broker.url), name, clean_start=False, session_expiry_s=600,
                    on_message=got.put, subscriptions=[(topics.all_results, 1)])
    link.start()
    link.wait_connected(10)
    link.wait_subscribed(10)
    return link, got


def _received_keys(got: queue.Queue[Message], expected: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Every key received until all of ``expected`` arrived (duplicates and strangers included)."""
    keys: list[tuple[str, int]] = []
    while not expected <= set(keys):
        msg = got.get(timeout=30)
        batch = c.decode_results(msg.payload)
        assert len(batch.results) <= 7
        keys += [(batch.device_id, r.seq) for r in batch.results]
    return keys


def test_without_receipts_publisher_drains_outbox_across_broker_restart(broker: LocalBroker, prefix: str, tmp_path) -> None:
    topics = c.Topics(prefix)
    sub, got = _collector(broker, topics, f"{prefix}-sub")
    box = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-pub")
    pub = Publisher(box, link, topics, batch_max_results=7, batch_max_delay_s=0.05, max_inflight=3,
                    receipts=False)
    link._on_published = pub.on_published
    link.start()
    pub.start()
    box.put("a", _rows("a", range(50)))
    box.put("b", _rows("b", range(20)))
    pub.notify()
    first_set = {("a", s) for s in range(50)} | {("b", s) for s in range(20)}
    first = _received_keys(got, first_set)
    assert pub.wait_drained(30)
    # Broker goes away: results keep being accepted into the outbox, nothing fails.
    broker.stop()
    box.put("a", _rows("a", range(50, 90)))
    pub.notify()
    assert box.depth == 40
    broker.start()
    assert pub.wait_drained(60), "drained after the broker came back"
    second_set = {("a", s) for s in range(50, 90)}
    second = _received_keys(got, second_set)
    assert set(first) == first_set
    # Every new row arrived. The subscriber's persistent session may get a message of the first
    # phase again after the broker restart (QoS 1 is at-least-once on the wire; the hub dedups).
    assert second_set <= set(second) <= first_set | second_set
    pub.stop()
    link.stop()
    sub.stop()
    box.close()


def test_restarted_agent_resends_what_was_not_acknowledged(broker: LocalBroker, prefix: str, tmp_path) -> None:
    """Rows written while no broker was reachable are delivered by the next process."""
    topics = c.Topics(prefix)
    box = Outbox(tmp_path / "o.sqlite")
    box.put("a", _rows("a", range(30)))
    box.close()  # the first process dies before any PUBACK
    sub, got = _collector(broker, topics, f"{prefix}-sub")
    box = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-pub2")
    pub = Publisher(box, link, topics, batch_max_results=7, batch_max_delay_s=0.0, receipts=False)
    link._on_published = pub.on_published
    link.start()
    pub.start()
    assert pub.wait_drained(30)
    want = {("a", s) for s in range(30)}
    assert set(_received_keys(got, want)) == want
    assert box.depth == 0
    pub.stop()
    link.stop()
    sub.stop()


def test_partial_batches_never_resend_rows(shared_broker: LocalBroker, prefix: str, tmp_path) -> None:
    """A full batch of one device goes out while another device's older partial batch waits: no row twice."""
    topics = c.Topics(prefix)
    sub, got = _collector(shared_broker, topics, f"{prefix}-sub")
    box = Outbox(tmp_path / "o.sqlite")
    box.put("b", _rows("b", range(1)))  # oldest row: a partial batch that waits for its delay
    box.put("a", _rows("a", range(7)))  # a full batch: sent at once
    link = MqttLink(BrokerURL.parse(shared_broker.url), f"{prefix}-pub")
    pub = Publisher(box, link, topics, batch_max_results=7, batch_max_delay_s=30.0, max_inflight=2,
                    receipts=False)
    link._on_published = pub.on_published
    link.start()
    link.wait_connected(10)
    pub.start()
    pub.notify()
    assert set(_received_keys(got, {("a", s) for s in range(7)})) == {("a", s) for s in range(7)}
    rounds = pub.rounds
    for _ in range(5):  # let the pump run a few rounds while b's batch waits
        pub.notify()
    wait_for(lambda: pub.rounds >= rounds + 5, what="five pump rounds")
    assert pub.wait_drained(30)
    keys: list[tuple[str, int]] = []
    while ("b", 0) not in keys:  # the broker keeps order: anything sent twice arrived before b's batch
        batch = c.decode_results(got.get(timeout=30).payload)
        keys += [(batch.device_id, r.seq) for r in batch.results]
    assert keys == [("b", 0)], "nothing but b's batch after a's"
    assert (pub.published_messages, pub.acked_results) == (2, 8), "each row was handed to the broker once"
    pub.stop()
    link.stop()
    sub.stop()


def test_overflow_never_drops_rows_being_sent(tmp_path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=10)
    box.put("d", _rows("d", range(10)))
    box.pending(0, 4, hold=True)  # the publisher holds or sent the first four
    box.put("d", _rows("d", range(10, 13)))
    assert box.dropped == 3 and box.depth == 10
    assert [p.seq for p in box.pending(0, 100)] == [0, 1, 2, 3, *range(7, 13)]


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "until-broker"])
def test_rows_the_broker_refuses_stay_in_the_outbox(tmp_path, prefix: str, receipts: bool) -> None:
    """An ACL-denied publish gets a PUBACK with a failure reason (MQTT 5): those rows were not
    delivered and stay; the allowed device's rows leave (at the hub's receipt, or at the PUBACK)."""
    from cloud_hub.data.ingest import Hub
    from tests.test_ingest import settings_for

    topics = c.Topics(prefix)
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {prefix}/devices/good/#\n")
    base = tmp_path / "base.conf"
    base.write_text(REPO_CONF.read_text() + f"\nacl_file {acl}\n")
    broker = LocalBroker(tmp_path / "mosquitto", base_config=base).start()
    hub = Hub(settings_for(broker, prefix, tmp_path)) if receipts else None
    try:
        if hub is not None:
            hub.start()
        box = Outbox(tmp_path / "o.sqlite")
        link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-pub",
                        subscriptions=[(topics.receipts("good"), 1)] if receipts else ())
        pub = Publisher(box, link, topics, batch_max_results=5, batch_max_delay_s=0.0, receipts=receipts)
        link._on_published = pub.on_published
        link._on_message = lambda m: pub.on_receipt(m.topic, m.payload)
        box.put("good", _rows("good", range(10)))
        box.put("denied", _rows("denied", range(7)))
        link.start()
        pub.start()
        assert not pub.wait_drained(60), "refused rows can never drain"
        assert pub.refused == 7 and pub.acked_results == 10 and pub.stored_results == 10
        assert {(r.device_id, r.seq) for r in box.pending(0, 100)} == {("denied", s) for s in range(7)}
        assert "not authorized" in (pub.last_error or "").lower()
        pub.stop()
        link.stop()
        box.close()
    finally:
        if hub is not None:
            hub.stop()
        broker.kill()
