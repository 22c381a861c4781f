"""Ingestion through a real mosquitto into real SQLite files: exactly once, dead letters, DB outages."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import db, sessions, tables
from cloud_hub.data.ingest import Hub, Pending
from cloud_hub.data.store import ResultRow
from cloud_hub.settings import HubSettings
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from edge_agent.mqtt import Message, MqttLink
from edge_agent.settings.broker import BrokerURL
from tests.helpers import wait_for
from tests.test_store import BACKENDS, backend_engine


class Publisher:
    """A device-side MQTT link that counts PUBACKs."""

    def __init__(self, broker: LocalBroker, client_id: str) -> None:
        self._acked = 0
        self._lock = threading.Lock()
        self.sent = 0
        self.link = MqttLink(BrokerURL.parse(broker.url), client_id, on_published=self._on_published)
        self.link.start()
        self.link.wait_connected(10)

    def _on_published(self, _mid: int, ok: bool, _rc: str) -> None:
        assert ok
        with self._lock:
            self._acked += 1

    def publish(self, topic: str, payload: bytes, delivery: c.Delivery = c.RESULTS_DELIVERY) -> None:
        self.link.publish(topic, payload, delivery)
        self.sent += 1

    def wait_acked(self) -> None:
        wait_for(lambda: self._acked >= self.sent, what="PUBACKs")

    def stop(self) -> None:
        self.link.stop()


def batch(device: str, first: int, n: int, **kw: object) -> c.ResultBatch:
    return c.ResultBatch(device, tuple(
        c.Result(seq=s, start=s / 10, end=s / 10 + 2, model_version=1, latency_ms=0.5, label="walk",
                 confidence=0.9, **kw)  # type: ignore[arg-type]
        for s in range(first, first + n)))


def stored_keys(url: str) -> list[tuple[str, int]]:
    engine = db.make_engine(url)
    with sessions.transaction(engine, write=False) as conn:
        got = [tuple(r) for r in conn.execute(sa.select(tables.results.c.device_id, tables.results.c.seq))]
    engine.dispose()
    return got


def settings_for(broker: LocalBroker, prefix: str, tmp_path: Path, **kw: object) -> HubSettings:
    return HubSettings(broker=broker.url, db=f"sqlite:///{tmp_path / 'hub.sqlite'}", prefix=prefix,
                       client_id=f"{prefix}-hub", log_interval_s=0, **kw)  # type: ignore[arg-type]


def ready(hub: Hub, pub: Publisher, probe: str = "probe") -> None:
    """Wait until the hub's first subscriptions are in place: a retained status reaches it either way.

    (Messages published before a hub's very first SUBSCRIBE has no session to queue them in.)
    """
    before = hub.stats.messages
    pub.publish(hub.topics.status(probe), c.Status(probe, c.ONLINE, 1.0).encode(), c.STATUS_DELIVERY)
    wait_for(lambda: hub.stats.messages > before, what="the hub to subscribe")


@pytest.fixture
def publisher(shared_broker: LocalBroker, prefix: str) -> Iterator[Publisher]:
    p = Publisher(shared_broker, f"{prefix}-pub")
    yield p
    p.stop()


@pytest.fixture
def hub(shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> Iterator[Hub]:
    h = Hub(settings_for(shared_broker, prefix, tmp_path, dead_letter_max_bytes=1024))
    h.start()
    ready(h, publisher)
    yield h
    h.stop()


def test_batches_from_several_devices_are_stored_exactly_once(hub: Hub, publisher: Publisher) -> None:
    topics = hub.topics
    expected = set()
    for k in range(20):
        for d in range(5):
            b = batch(f"dev-{d}", 1000 + k * 10, 10)
            publisher.publish(topics.results(b.device_id), b.encode())
            expected |= {(b.device_id, r.seq) for r in b.results}
    publisher.wait_acked()
    wait_for(lambda: hub.stats.stored >= len(expected), what="all rows")
    got = stored_keys(hub.settings.db)
    assert len(got) == len(expected) == 1000
    assert set(got) == expected
    with sessions.transaction(hub.engine, write=False) as conn:
        devices = {r.device_id: r.state for r in conn.execute(sa.select(tables.devices))}
    assert devices == {"probe": "online", **{f"dev-{d}": "online" for d in range(5)}}


def test_publishing_the_same_batches_twice_stores_no_duplicates(hub: Hub, publisher: Publisher) -> None:
    batches = [batch("dev-a", 100 + 5 * k, 5) for k in range(30)]
    for _ in range(2):
        for b in batches:
            publisher.publish(hub.topics.results("dev-a"), b.encode())
    publisher.wait_acked()
    wait_for(lambda: hub.stats.stored + hub.stats.duplicates >= 300, what="both copies processed")
    assert (hub.stats.stored, hub.stats.duplicates) == (150, 150)
    got = stored_keys(hub.settings.db)
    assert len(got) == len(set(got)) == 150


def test_garbage_goes_to_dead_letters_and_valid_results_around_it_are_stored(
        hub: Hub, publisher: Publisher, prefix: str) -> None:
    topics = hub.topics
    good = [batch("dev-a", 10 * k, 10) for k in range(6)]
    valid_obj = orjson.loads(good[0].encode())
    bad: list[tuple[str, bytes, str]] = [
        (topics.results("dev-a"), b"not json at all", "not valid JSON"),
        (topics.results("dev-a"), orjson.dumps({**valid_obj, "v": 99}), "unsupported schema version 99"),
        (topics.results("dev-a"), good[0].encode().replace(b'"start":0.0', b'"start":1e999'), "not valid JSON"),
        (topics.results("dev-a"), good[0].encode().replace(b'"start":0.0', b'"start":NaN'), "not valid JSON"),
        (topics.results("dev-b"), good[1].encode(), "differs from 'dev-b' in the topic"),
        (topics.results("dev-a"), b"[" + b"1," * (c.MAX_RESULTS_BYTES // 2) + b"1]", "over the"),
        (topics.results("dev-a"), orjson.dumps({**valid_obj, "results": [{"seq": 1}]}), "missing"),
        (topics.results("dev-a"), orjson.dumps({**valid_obj, "extra": 1}), "unknown field(s) extra"),
        (topics.status("dev-a"), b'{"v":1,"device_id":"dev-a","state":"sleeping","ts":1}', "status.state"),
        (f"{prefix}/devices/bad id!/results", good[2].encode(), "invalid device id"),
        # past the hub's fast path (cloud_hub/data/result_rows.py): the contract names the reason
        (topics.results("dev-a"), orjson.dumps({**valid_obj, "results": [
            {**valid_obj["results"][0], "features": [1.0, 4e38]}]}), "features must hold numbers a float32 can hold"),
        (topics.results("dev-a"), orjson.dumps({**valid_obj, "results": [
            {**valid_obj["results"][0], "end": -1.0}]}), "end -1.0 is before start"),
    ]
    assert b'"start":0.0' in good[0].encode()
    for i, g in enumerate(good):  # a valid message, a bad one, a valid one, ...
        publisher.publish(topics.results("dev-a"), g.encode())
        for topic, payload, _ in bad[2 * i:2 * i + 2]:
            publisher.publish(topic, payload)
    publisher.wait_acked()
    wait_for(lambda: hub.stats.stored >= 60 and hub.stats.dead_letters >= len(bad), what="all messages")
    assert set(stored_keys(hub.settings.db)) == {("dev-a", s) for s in range(60)}
    with sessions.transaction(hub.engine, write=False) as conn:
        letters = conn.execute(sa.select(tables.dead_letters).order_by(tables.dead_letters.c.id)).all()
    assert len(letters) == len(bad)
    by_topic_payload = {(r.topic, bytes(r.payload)): r for r in letters}
    for topic, payload, reason in bad:
        letter = by_topic_payload[(topic, payload[:1024])]
        assert reason in letter.reason, (reason, letter.reason)
        assert letter.size == len(payload) and letter.received_at > 0
    assert max(len(r.payload) for r in letters) == 1024  # bounded raw bytes
    assert hub.link.connected and hub.stats.db_errors == 0  # never stopped


def test_status_messages_update_devices(hub: Hub, publisher: Publisher) -> None:
    topics = hub.topics
    publisher.publish(topics.status("dev-s"), c.Status("dev-s", c.ONLINE, 1.0, "default", 3, "e" * 64, 12,
                                                       "sensor glitch").encode(), c.STATUS_DELIVERY)
    publisher.wait_acked()
    wait_for(lambda: hub.stats.messages >= 2, what="status")
    publisher.publish(topics.status("dev-s"), c.Status("dev-s", c.OFFLINE, 2.0).encode(), c.STATUS_DELIVERY)
    publisher.wait_acked()
    wait_for(lambda: hub.stats.messages >= 3, what="offline status")
    with sessions.transaction(hub.engine, write=False) as conn:
        dev = conn.execute(sa.select(tables.devices).where(tables.devices.c.device_id == "dev-s")).one()
    assert (dev.device_id, dev.state, dev.model_name, dev.model_version, dev.model_sha256) == (
        "dev-s", "offline", "default", 3, "e" * 64)
    assert (dev.outbox_depth, dev.last_error) == (0, None)
    # clear the retained messages this test left on the shared broker
    publisher.publish(topics.status("dev-s"), b"", c.STATUS_DELIVERY)
    publisher.wait_acked()


def test_database_outage_acks_nothing_and_the_batch_is_retried(
        broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    settings = settings_for(broker, prefix, tmp_path)
    hub = Hub(settings)
    hub.start()
    pub = Publisher(broker, f"{prefix}-pub")
    ready(hub, pub)
    path = tmp_path / "hub.sqlite"
    outage = sqlite3.connect(path, isolation_level=None)
    outage.execute("ALTER TABLE results RENAME TO results_away")  # every insert now fails
    for k in range(5):
        b = batch("dev-a", k * 10, 10)
        pub.publish(hub.topics.results("dev-a"), b.encode())
    pub.wait_acked()
    wait_for(lambda: hub.stats.db_errors >= 2, what="failed writes")
    assert hub.stats.stored == 0 and hub.stats.messages == 1  # nothing committed but the probe: nothing acked
    # A hub that stops during the outage leaves its messages to the broker ...
    hub.stop(timeout=0.5)
    outage.execute("ALTER TABLE results_away RENAME TO results")
    outage.close()
    # ... which redelivers them to the next session of the same client id.
    again = Hub(settings)
    again.start()
    wait_for(lambda: again.stats.stored >= 50, what="redelivered rows")
    assert sorted(stored_keys(settings.db)) == [("dev-a", s) for s in range(50)]

    # An outage while running: the same batch is retried until it commits.
    outage = sqlite3.connect(path, isolation_level=None)
    outage.execute("ALTER TABLE results RENAME TO results_away")
    errors = again.stats.db_errors
    pub.publish(again.topics.results("dev-a"), batch("dev-a", 50, 10).encode())
    wait_for(lambda: again.stats.db_errors >= errors + 2, what="failed writes")
    outage.execute("ALTER TABLE results_away RENAME TO results")
    outage.close()
    wait_for(lambda: again.stats.stored >= 60, what="retried batch")
    assert sorted(stored_keys(settings.db)) == [("dev-a", s) for s in range(60)]
    again.stop()
    pub.stop()


def test_shared_subscription_splits_the_fleet_between_hubs(
        shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> None:
    base = settings_for(shared_broker, prefix, tmp_path, share_group="workers")
    hubs = [Hub(HubSettings(**{**base.__dict__, "client_id": f"{prefix}-hub{i}"})) for i in range(2)]
    for h in hubs:
        h.start()
    # Shared subscriptions get no retained messages: probe live until each hub has had one.
    while not all(h.stats.messages for h in hubs):
        publisher.publish(hubs[0].topics.status("probe"), c.Status("probe", c.ONLINE, 1.0).encode())
        publisher.wait_acked()
        time.sleep(0.05)
    probes = sum(h.stats.messages for h in hubs)
    for k in range(40):
        publisher.publish(hubs[0].topics.results(f"dev-{k % 4}"), batch(f"dev-{k % 4}", k * 10, 10).encode())
    publisher.wait_acked()
    wait_for(lambda: sum(h.stats.stored for h in hubs) >= 400, what="all rows")
    got = stored_keys(base.db)
    assert len(got) == len(set(got)) == 400
    assert all(h.stats.stored > 0 for h in hubs), [h.stats for h in hubs]
    assert sum(h.stats.messages for h in hubs) == probes + 40
    for h in hubs:
        h.stop()


def test_stop_flushes_and_acknowledges(broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    settings = settings_for(broker, prefix, tmp_path)
    hub = Hub(settings)
    hub.start()
    pub = Publisher(broker, f"{prefix}-pub")
    ready(hub, pub)
    for k in range(50):
        pub.publish(hub.topics.results("dev-a"), batch("dev-a", k * 10, 10).encode())
    pub.wait_acked()
    hub.stop()
    first = hub.stats.stored
    # Whatever the first session committed was acknowledged: the next one gets no duplicates.
    again = Hub(settings)
    again.start()
    wait_for(lambda: first + again.stats.stored >= 500, what="the rest")
    assert again.stats.duplicates == 0
    assert len(set(stored_keys(settings.db))) == len(stored_keys(settings.db)) == 500
    again.stop()
    pub.stop()


@pytest.mark.parametrize("kind", BACKENDS)
def test_exactly_once_and_a_row_the_database_refuses(
        kind: str, shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> None:
    """Both backends: a row the database refuses (here a constraint added for the test) dead-letters its message
    alone. A NUL in a label, which PostgreSQL's text refused and SQLite stored, is the contract's to refuse now:
    the same dead letter, naming the field, on both."""
    with backend_engine(kind, tmp_path) as engine:
        with engine.begin() as conn:
            if kind == "sqlite":
                conn.exec_driver_sql("CREATE TRIGGER no_poison BEFORE INSERT ON results WHEN NEW.label = 'poison' "
                                     "BEGIN SELECT RAISE(ABORT, 'no poison here'); END")
            else:
                conn.exec_driver_sql("ALTER TABLE results ADD CONSTRAINT no_poison CHECK (label <> 'poison')")
        hub = Hub(settings_for(shared_broker, prefix, tmp_path), engine=engine)
        hub.start()
        ready(hub, publisher)
        batches = [batch(f"dev-{k % 2}", 10 * k, 10) for k in range(20)]
        poison = c.ResultBatch("dev-0", (c.Result(5000, 1.0, 2.0, 1, 0.5, label="poison"),))
        nul = c.ResultBatch("dev-1", (c.Result(5000, 1.0, 2.0, 1, 0.5, label="wa_lk"),)).encode().replace(
            b"wa_lk", b"wa\\u0000lk")  # our encoder refuses it: a third-party device's
        for b in batches[:10] + [poison] + batches[10:] + batches[:5]:
            publisher.publish(hub.topics.results(b.device_id), b.encode())
        publisher.publish(hub.topics.results("dev-1"), nul)
        publisher.wait_acked()
        wait_for(lambda: hub.stats.messages + hub.stats.dead_letters >= 28, what="all messages")
        hub.stop()
        with sessions.transaction(engine, write=False) as conn:
            got = [tuple(r) for r in conn.execute(sa.select(tables.results.c.device_id, tables.results.c.seq))]
            letters = sorted(conn.execute(sa.select(tables.dead_letters.c.reason)).scalars().all())
    expected = {(b.device_id, r.seq) for b in batches for r in b.results}
    assert (len(got), set(got)) == (200, expected)
    assert len(letters) == 2 and letters[0].startswith("database refused:"), letters
    assert letters[1] == "results[0].label must not hold a NUL character (\\u0000), got 'wa\\x00lk'", letters
    assert hub.stats.duplicates == 50


def test_a_retained_status_does_not_make_a_silent_device_look_seen_now(
        shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> None:
    """Every (re)subscription gets the retained statuses again: they must not move last_seen to now."""
    old = time.time() - 3600
    topics = c.Topics(prefix)
    publisher.publish(topics.status("quiet"), c.Status("quiet", c.ONLINE, old).encode(), c.STATUS_DELIVERY)
    publisher.wait_acked()
    hub = Hub(settings_for(shared_broker, prefix, tmp_path))
    hub.start()
    try:
        wait_for(lambda: hub.stats.messages >= 1, what="the retained status")
    finally:
        hub.stop()
    engine = db.make_engine(settings_for(shared_broker, prefix, tmp_path).db)
    with engine.connect() as conn:
        seen = conn.execute(sa.select(tables.devices.c.last_seen).where(tables.devices.c.device_id == "quiet")).scalar_one()
    engine.dispose()
    assert seen == pytest.approx(old), "last seen an hour ago, as its status says"


class Receipts:
    """A device's receipts topic, each receipt kept as it came (payload and decoded)."""

    def __init__(self, broker: LocalBroker, topics: c.Topics, device: str) -> None:
        self.device = device
        self.got: list[tuple[bytes, c.Receipt]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(BrokerURL.parse(broker.url), f"{topics.prefix}-receipts-{device}",
                             on_message=self._on_message, subscriptions=[(topics.receipts(device), 1)])
        self.link.start()
        self.link.wait_connected(10)
        self.link.wait_subscribed(10)

    def _on_message(self, msg: Message) -> None:
        receipt = c.decode_receipt(msg.payload, self.device)  # what the device's decoder accepts
        with self._lock:
            self.got.append((msg.payload, receipt))

    def covering(self, seqs: set[int], after: int = 0) -> list[tuple[bytes, c.Receipt]]:
        """The receipts from the ``after``-th on, once together they cover ``seqs``."""
        def covered() -> bool:
            with self._lock:
                return seqs <= {s for _, r in self.got[after:] for s in r.seqs()}
        wait_for(covered, what=f"receipts for {len(seqs)} results")
        with self._lock:
            return self.got[after:]

    def stop(self) -> None:
        self.link.stop()


def test_receipts_mark_what_was_stored_before_for_a_device_that_asks(
        hub: Hub, publisher: Publisher, shared_broker: LocalBroker) -> None:
    """New rows, a batch mixing new rows and rows stored before, a batch of duplicates only: the receipt's
    dup names exactly the rows stored before. A device that does not ask (an older build) gets receipts
    without dup, which its strict decoder accepts."""
    receipts = Receipts(shared_broker, hub.topics, "dev-m")
    topic = hub.topics.results("dev-m")
    seen = 0
    try:
        for first, n, mark, dup in ((0, 50, True, set()), (25, 75, True, set(range(25, 50))),
                                    (0, 10, True, set(range(10))), (90, 20, False, set())):
            b = batch("dev-m", first, n)
            publisher.publish(topic, c.ResultBatch(b.device_id, b.results, mark_duplicates=mark).encode())
            got = receipts.covering({r.seq for r in b.results}, after=seen)
            seen += len(got)
            assert {s for _, r in got for s in r.dup_seqs()} == dup, (first, n)
            if not mark:
                assert all(b'"dup"' not in payload for payload, _ in got)
        publisher.wait_acked()
    finally:
        receipts.stop()
    assert (hub.stats.stored, hub.stats.duplicates) == (110, 45)  # 90..99 of the last were stored: not marked


def test_a_receipt_too_big_for_one_message_is_split_into_receipts_the_device_accepts(
        hub: Hub, shared_broker: LocalBroker) -> None:
    """14,000 irregular 19-digit seqs committed in one batch: as one receipt they make ~280 KB, over the
    device decoder's 256 KiB, and the device would send them again forever. Every receipt the hub sends
    fits, and together they cover each result."""
    rng = np.random.default_rng(24)
    seqs = {int(s) for s in rng.integers(10**18, 9 * 10**18, 14_000, dtype=np.int64)}
    whole = orjson.dumps({"v": c.SCHEMA_VERSION, "device_id": "dev-big", "runs": c.seq_runs(seqs)})
    assert len(whole) > c.MAX_RECEIPT_BYTES  # as one receipt: too big for the device
    receipts = Receipts(shared_broker, hub.topics, "dev-big")
    try:
        hub._send_receipts(Pending(rows=[ResultRow("dev-big", s, 0.0, 1.0, 1, None, None, None, None, 0.0, None, 0.0) for s in seqs], dup={("dev-big", s) for s in seqs}))
        got = receipts.covering(seqs)
    finally:
        receipts.stop()
    assert len(got) > 1 and all(len(payload) <= c.MAX_RECEIPT_BYTES for payload, _ in got)
    assert sorted(s for _, r in got for s in r.seqs()) == sorted(seqs)
    assert {s for _, r in got for s in r.dup_seqs()} == seqs


def _rows_in(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM results").fetchone()[0])


def test_a_linger_groups_results_into_one_transaction_receipted_and_acked_after_its_commit(
        shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> None:
    """Ten one-result messages of ten devices, each sent once the previous one reached the broker, and a
    linger far longer than the test: the batch closes at batch_max rows, so they make ONE transaction, and
    each receipt (one per device) and PUBACK leaves only once the database holds all ten rows."""
    settings = settings_for(shared_broker, prefix, tmp_path, batch_max=10, batch_linger_ms=600_000.0,
                            batch_max_delay_s=600.0)
    hub = Hub(settings)
    path = tmp_path / "hub.sqlite"
    sent: list[tuple[str, int]] = []  # (what left the hub, result rows committed at that moment)
    publish, ack = hub.link.publish, hub.link.ack

    def observed_publish(topic: str, payload: bytes, delivery: c.Delivery) -> int:
        sent.append(("receipt", _rows_in(path)))
        return publish(topic, payload, delivery)

    def observed_ack(mid: int, qos: int) -> None:
        sent.append(("ack", _rows_in(path)))
        ack(mid, qos)

    hub.link.publish, hub.link.ack = observed_publish, observed_ack  # type: ignore[method-assign]
    hub.start()  # returns once the broker acknowledged the subscriptions
    try:
        for d in range(10):
            publisher.publish(hub.topics.results(f"dev-{d}"), batch(f"dev-{d}", 100, 1).encode())
            publisher.wait_acked()
        wait_for(lambda: len(sent) >= 20, what="the ten results receipted and acknowledged")
        assert (hub.stats.batches, hub.stats.messages, hub.stats.receipts) == (1, 10, 10)
        assert sorted(sent) == [("ack", 10)] * 10 + [("receipt", 10)] * 10
    finally:
        hub.stop()


def test_a_lone_result_is_written_after_the_linger_not_held_for_a_fuller_batch(
        shared_broker: LocalBroker, prefix: str, tmp_path: Path, publisher: Publisher) -> None:
    """A quiet hub: each result, alone, is committed and receipted in its own transaction although the
    batch is far from full and its longest delay is ten minutes: the linger alone bounds its wait."""
    settings = settings_for(shared_broker, prefix, tmp_path, batch_linger_ms=50.0, batch_max_delay_s=600.0)
    hub = Hub(settings)
    hub.start()
    try:
        for k in range(3):
            publisher.publish(hub.topics.results("dev-q"), batch("dev-q", 10 * k, 1).encode())
            wait_for(lambda k=k: hub.stats.receipts > k, what=f"lone result {k} receipted")  # type: ignore[misc]
        assert (hub.stats.batches, hub.stats.receipts) == (3, 3)
        assert sorted(stored_keys(settings.db)) == [("dev-q", 0), ("dev-q", 10), ("dev-q", 20)]
    finally:
        hub.stop()


def test_serve_collects_young_garbage_less_often_and_never_more_often(tmp_path) -> None:
    """The collector at CPython's default (700) took 14 % of a PostgreSQL hub's CPU (bench/hub_ingest.py):
    serve raises the youngest threshold to GC_GEN0, keeps a higher one, and leaves the older ones alone."""
    import gc

    from cloud_hub.serve import GC_GEN0, collect_less, serve
    from cloud_hub.tools.local_broker import free_port

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        stopped = threading.Event()
        stopped.set()  # serve sets the threshold first, then returns at its first look at the stop event
        serve(HubSettings(broker=f"mqtt://127.0.0.1:{free_port()}", db=f"sqlite:///{tmp_path / 'hub.sqlite'}",
                          connect_timeout_s=5), stop=stopped)
        assert gc.get_threshold() == (GC_GEN0, 10, 10)
        gc.set_threshold(GC_GEN0 * 3, 7, 9)
        collect_less()
        assert gc.get_threshold() == (GC_GEN0 * 3, 7, 9)
    finally:
        gc.set_threshold(*before)
