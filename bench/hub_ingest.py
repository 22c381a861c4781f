"""Benchmark: results/s the hub stores end to end, against two ceilings measured in the same run.

    python bench/hub_ingest.py                       # --batch 100 and --batch 1, best of 3 each
    python bench/hub_ingest.py --batch 100 --repeat 5 --profile hub.prof
    python bench/hub_ingest.py --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres --batch 100

For each batch size (results per MQTT message, as the agent sends them):

* raw:  ``sqlite3`` ``executemany`` of the same rows into an equivalent table (same pragmas,
  transactions of the hub's ``batch_max`` rows): the database ceiling the target is set against; and
  the same rows in statements of many rows each, the way the hub writes them (a faster ceiling).  With ``--db`` a PostgreSQL
  URL, three ceilings on the hub's own tables: psycopg ``executemany`` of ``INSERT ... ON CONFLICT DO
  NOTHING``, psycopg binary ``COPY`` of the same rows (no conflict handling at all) on one connection,
  and the same ``COPY`` on two connections taking turns, as the hub's two writers do (each its own
  transaction of ``batch_max`` rows): the ceiling the hub is measured against.  Every run gets a fresh
  schema of its own, dropped afterwards.
* bare: a paho subscriber (QoS 1) that only counts the same messages from the same broker: the MQTT
  ceiling (it includes the publisher's speed, like the hub does).
* hub:  :class:`cloud_hub.data.ingest.Hub`, from MQTT in to committed rows out, with commit receipts
  to the devices (the default) and, for comparison, without.

A private mosquitto (LocalBroker, the project's mosquitto.conf) carries the traffic; the load
generator publishes from a separate process (this script with ``_publish``), starting when told to,
so its start-up is not timed. Each figure is the best of ``--repeat`` runs: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from itertools import chain
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import MULTI_MAX_ROWS
from cloud_hub.serve import collect_less
from cloud_hub.settings import HubSettings
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from edge_agent import exits
from edge_agent.mqtt import tcp_no_delay

LABELS = ("walk", "run", "sit", "stand")
DEVICES = 8


def make_batches(n_results: int, per_msg: int, devices: int = DEVICES) -> list[c.ResultBatch]:
    """Deterministic result batches spread over ``devices`` devices."""
    out = []
    seq = 1_700_000_000_000
    per_device = [seq] * devices
    for i in range(n_results // per_msg):
        d = i % devices
        rs = []
        for _ in range(per_msg):
            s = per_device[d]
            per_device[d] += 2000
            t = s / 1000
            rs.append(c.Result(seq=s, start=t, end=t + 2.0, model_version=3, latency_ms=0.4 + (s % 7) / 10,
                               label=LABELS[s % 4], confidence=0.5 + (s % 50) / 100, truth=LABELS[(s // 2000) % 4]))
        out.append(c.ResultBatch(f"dev-{d:03d}", tuple(rs)))
    return out


# --------------------------------------------------------------------------- load generator (child process)


def publish_main(port: int, prefix: str, per_msg: int, n_results: int) -> None:
    topics = c.Topics(prefix)
    payloads = [(topics.results(b.device_id), b.encode()) for b in make_batches(n_results, per_msg)]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                         protocol=paho.MQTTv5)
    client.on_socket_open = tcp_no_delay  # every client of the run as the agent's and the hub's links
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    done = threading.Semaphore(0)
    client.on_publish = lambda *_a: done.release()
    client.connect("127.0.0.1", port)
    client.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    window = 5000  # paho refuses QoS 1 publishes past 65,535 outstanding: keep far below
    for i, (topic, payload) in enumerate(payloads):
        if i >= window:
            done.acquire()
        info = client.publish(topic, payload, qos=1)
        if info.rc not in (paho.MQTT_ERR_SUCCESS,):
            raise SystemExit(f"publish failed: {paho.error_string(info.rc)}")
    for _ in range(min(window, len(payloads))):
        done.acquire()
    print(f"done {time.perf_counter() - t0:.3f}", flush=True)
    client.disconnect()
    client.loop_stop()


class Publisher:
    """The load generator process, connected and waiting for go()."""

    def __init__(self, port: int, prefix: str, per_msg: int, n_results: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_publish", str(port), prefix, str(per_msg), str(n_results)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"publisher did not start: {line!r}")

    def go(self) -> float:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return time.perf_counter()

    def finish(self) -> float:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        self.proc.wait(60)
        return float(line.split()[1])


# --------------------------------------------------------------------------- the three measurements


def raw_sqlite(path: Path, per_msg: int, n_results: int, txn_rows: int, how: str = "executemany") -> tuple[float, float]:
    """rows/s of bare sqlite3 into an equivalent table, CPU µs/row: ``executemany`` of the hub's rows, or
    (``how="multirow"``) the hub's own way, statements of up to ``MULTI_MAX_ROWS`` rows (sizes powers of two)."""
    rows = bench_rows(per_msg, n_results)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
        db.execute(f"PRAGMA {pragma}")
    db.execute('CREATE TABLE results (id INTEGER PRIMARY KEY, device_id VARCHAR(64) NOT NULL, seq BIGINT NOT NULL, '
               'start FLOAT NOT NULL, "end" FLOAT NOT NULL, model_version BIGINT NOT NULL, label VARCHAR(256), '
               'confidence FLOAT, value TEXT, truth VARCHAR(256), latency_ms FLOAT NOT NULL, features BLOB, '
               'received_at FLOAT NOT NULL, UNIQUE (device_id, seq))')
    db.execute("CREATE INDEX ix_results_start ON results (start)")
    head = ('INSERT INTO results (device_id, seq, start, "end", model_version, label, confidence, value, truth, '
            'latency_ms, features, received_at) VALUES ')
    one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    multi: dict[int, str] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), txn_rows):
        db.execute("BEGIN IMMEDIATE")
        txn = rows[i:i + txn_rows]
        if how == "executemany":
            db.executemany(head + one, txn)
        else:
            j = 0
            while j < len(txn):
                size = min(MULTI_MAX_ROWS, 1 << ((len(txn) - j).bit_length() - 1))
                sql = multi.get(size) or multi.setdefault(size, head + ", ".join([one] * size))
                db.execute(sql, tuple(chain.from_iterable(txn[j:j + size])))
                j += size
        db.execute("COMMIT")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    db.close()
    return len(rows) / dt, cpu / len(rows) * 1e6


def bench_rows(per_msg: int, n_results: int) -> list[tuple]:
    now = time.time()
    return [(b.device_id, r.seq, r.start, r.end, r.model_version, r.label, r.confidence, None, r.truth,
             r.latency_ms, None, now) for b in make_batches(n_results, per_msg) for r in b.results]


class PgSchema:
    """A fresh PostgreSQL schema with the hub's tables (make_engine), dropped on exit."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from cloud_hub.data.db import make_engine
        self.url, self.name = url, f"bench_{uuid.uuid4().hex[:10]}"
        make_engine(url, schema=self.name).dispose()  # creates the schema and the tables
        self.hub_url = sa.engine.make_url(url).update_query_dict({"options": f"-csearch_path={self.name}"}) \
            .render_as_string(hide_password=False)

    def connect(self):  # a bare psycopg connection on the schema
        import psycopg
        import sqlalchemy as sa

        u = sa.engine.make_url(self.url)
        return psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
                               options=f"-csearch_path={self.name}")

    def __enter__(self) -> PgSchema:
        return self

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        engine.dispose()


def raw_postgres(url: str, per_msg: int, n_results: int, txn_rows: int, how: str) -> tuple[float, float]:
    """rows/s of bare psycopg into the hub's results table: ``executemany`` (ON CONFLICT DO NOTHING),
    binary ``COPY`` (``copy``), or binary ``COPY`` on two connections taking turns (``copy2``, as the hub's
    two writers), in transactions of the hub's ``batch_max`` rows; CPU µs/row of this process."""
    from cloud_hub.data.store import _COLS, _PG_TYPES

    rows = bench_rows(per_msg, n_results)
    chunks = iter([rows[i:i + txn_rows] for i in range(0, len(rows), txn_rows)])
    lock = threading.Lock()
    sql = (f"INSERT INTO results ({_COLS}) VALUES ({', '.join(['%s'] * 12)}) "
           "ON CONFLICT (device_id, seq) DO NOTHING")

    def writer(db: object) -> None:  # each transaction takes the next batch, whichever connection is free
        while True:
            with lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            with db.transaction(), db.cursor() as cur:  # type: ignore[attr-defined]
                if how == "executemany":
                    cur.executemany(sql, chunk)
                else:
                    with cur.copy(f"COPY results ({_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.set_types(_PG_TYPES)
                        for r in chunk:
                            copy.write_row(r)

    with PgSchema(url) as schema:
        conns = [schema.connect() for _ in range(2 if how == "copy2" else 1)]
        try:
            threads = [threading.Thread(target=writer, args=(db,)) for db in conns]
            t0, c0 = time.perf_counter(), time.process_time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            for db in conns:
                db.close()
    return len(rows) / dt, cpu / len(rows) * 1e6


def bare_subscriber(broker: LocalBroker, per_msg: int, n_results: int) -> tuple[float, float, float]:
    """results/s that a paho subscriber receives (QoS 1, counting only), CPU µs/result, the publisher's rate."""
    prefix = f"bare-{uuid.uuid4().hex[:8]}"
    want = n_results // per_msg
    got = [0]
    all_in = threading.Event()

    def on_message(*_a: object) -> None:
        got[0] += 1
        if got[0] == want:
            all_in.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=prefix, protocol=paho.MQTTv5)
    sub.on_socket_open = tcp_no_delay
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    sub.subscribe(c.Topics(prefix).all_results, qos=1)
    subscribed.wait(10)
    pub = Publisher(broker.port, prefix, per_msg, n_results)
    c0 = time.process_time()
    t0 = pub.go()
    if not all_in.wait(300):
        raise RuntimeError(f"bare subscriber got {got[0]} of {want} messages")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    pub_s = pub.finish()
    sub.disconnect()
    sub.loop_stop()
    return n_results / dt, cpu / n_results * 1e6, n_results / pub_s


def hub_run(broker: LocalBroker, workdir: Path, per_msg: int, n_results: int,
            profile: cProfile.Profile | None, receipts: bool = True, db_url: str | None = None,
            linger_ms: float | None = None) -> tuple[float, float, int, int]:
    """results/s stored (committed) by the hub, from the publisher's start; CPU µs/result; receipts sent;
    transactions."""
    prefix = f"hub-{uuid.uuid4().hex[:8]}"
    if db_url is None:
        return _hub_run(broker, f"sqlite:///{workdir / f'{prefix}.sqlite'}", prefix, per_msg, n_results, profile,
                        receipts, linger_ms)
    with PgSchema(db_url) as schema:
        return _hub_run(broker, schema.hub_url, prefix, per_msg, n_results, profile, receipts, linger_ms)


class _Timed(Hub):
    """The hub, telling the bench when its last result is committed: the bench waits on an event, not in
    a polling loop that would take the hub's GIL 500 times a second."""

    def __init__(self, settings: HubSettings, n_results: int) -> None:
        super().__init__(settings)
        self.n_results, self.all_stored = n_results, threading.Event()

    def _count(self, pending, written) -> None:  # type: ignore[no-untyped-def]
        super()._count(pending, written)
        if self.stats.stored >= self.n_results:
            self.all_stored.set()


def _hub_run(broker: LocalBroker, url: str, prefix: str, per_msg: int, n_results: int,
             profile: cProfile.Profile | None, receipts: bool, linger_ms: float | None) -> tuple[float, float, int, int]:
    # device_max_msgs_per_s=0: this measures the store path, with 8 devices each sending far faster than an
    # agent does (thousands of one-result messages a second); the per-device limit would drop most of them.
    settings = HubSettings(broker=broker.url, db=url, prefix=prefix, client_id=prefix, log_interval_s=0,
                           receipts=receipts, device_max_msgs_per_s=0,
                           **({} if linger_ms is None else {"batch_linger_ms": linger_ms}))
    collect_less()  # as serve does
    hub = _Timed(settings, n_results)
    if profile is not None:
        run = hub._run

        def profiled(*args: int) -> None:  # the writer's index
            profile.enable()
            try:
                run(*args)
            finally:
                profile.disable()

        hub._writers[0]._target = profiled  # type: ignore[attr-defined]  # bench only: profile the writer thread
    hub.start()  # returns once the broker acknowledged the subscriptions
    pub = Publisher(broker.port, prefix, per_msg, n_results)
    c0 = time.process_time()
    t0 = pub.go()
    if not hub.all_stored.wait(300):
        raise RuntimeError(f"the hub stored {hub.stats.stored} of {n_results} results in 300 s")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    pub.finish()
    hub.stop()
    if hub.stats.dead_letters or hub.stats.duplicates:
        raise RuntimeError(f"unexpected: {hub.stats}")
    return n_results / dt, cpu / n_results * 1e6, hub.stats.receipts, hub.stats.batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, action="append", help="results per message (repeatable; default 100 and 1)")
    ap.add_argument("--results", type=int, default=0, help="results per run (default 200000 for batch>=10, else 30000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", help="write a cProfile of the hub's writer thread to this file")
    ap.add_argument("--db", help="a PostgreSQL SQLAlchemy URL (postgresql+psycopg://...) instead of SQLite files")
    ap.add_argument("--linger", type=float, help="the hub's batch_linger_ms (default: the hub's default)")
    args = ap.parse_args()
    pg = args.db is not None
    if pg and not args.db.startswith("postgresql+psycopg://"):
        ap.error("--db takes a postgresql+psycopg:// URL (SQLite is the default)")
    logging.basicConfig(level=logging.ERROR)  # the hub's and the links' info lines would drown the figures
    logging.getLogger("paho").setLevel(logging.CRITICAL)
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp:
        work = Path(tmp)
        broker = LocalBroker(work / "mosquitto").start()
        try:
            for per_msg in args.batch or [100, 1]:
                n = args.results or (200_000 if per_msg >= 10 else 30_000)
                n -= n % per_msg
                raws, copies, copies2, bare_runs, hubs, plain = [], [], [], [], [], []
                txn = HubSettings().batch_max
                for i in range(args.repeat):  # interleaved, so that all of them see the same background load
                    if pg:
                        raws.append(raw_postgres(args.db, per_msg, n, txn, "executemany"))
                        copies.append(raw_postgres(args.db, per_msg, n, txn, "copy"))
                        copies2.append(raw_postgres(args.db, per_msg, n, txn, "copy2"))
                    else:
                        raws.append(raw_sqlite(work / f"raw-{per_msg}-{i}.sqlite", per_msg, n, txn))
                        copies.append(raw_sqlite(work / f"multi-{per_msg}-{i}.sqlite", per_msg, n, txn, "multirow"))
                    bare_runs.append(bare_subscriber(broker, per_msg, n))
                    hubs.append(hub_run(broker, work, per_msg, n, profile, db_url=args.db, linger_ms=args.linger))
                    plain.append(hub_run(broker, work, per_msg, n, None, receipts=False, db_url=args.db,
                                         linger_ms=args.linger))
                (raw, raw_cpu), (hub, hub_cpu, receipts, txns) = max(raws), max(hubs)
                no_receipts = max(plain)[0]
                bare, bare_cpu, _ = max(bare_runs)
                pub_rate = max(r[2] for r in bare_runs)
                print(f"--batch {per_msg}: {n} results, {n // per_msg} messages, best of {args.repeat}")
                print("  runs with receipts:", [f"{h[0]:,.0f}" for h in hubs], "without:", [f"{h[0]:,.0f}" for h in plain])
                if pg:
                    copy, copy_cpu = max(copies)
                    print(f"  raw psycopg executemany {raw:10,.0f} rows/s     {raw_cpu:6.1f} µs CPU/row "
                          "(INSERT ... ON CONFLICT DO NOTHING)")
                    print(f"  raw psycopg COPY        {copy:10,.0f} rows/s     {copy_cpu:6.1f} µs CPU/row (binary)")
                    copy2, copy2_cpu = max(copies2)
                    print(f"  raw COPY, 2 connections {copy2:10,.0f} rows/s     {copy2_cpu:6.1f} µs CPU/row "
                          "(the hub's two writers, batches of batch_max rows)")
                else:
                    print(f"  raw sqlite3 executemany {raw:10,.0f} rows/s     {raw_cpu:6.1f} µs CPU/row")
                    multi, multi_cpu = max(copies)
                    print(f"  raw sqlite3, many rows  {multi:10,.0f} rows/s     {multi_cpu:6.1f} µs CPU/row "
                          "(the hub's way: statements of many rows)")
                print(f"  bare paho subscriber    {bare:10,.0f} results/s  {bare_cpu:6.1f} µs CPU/result  "
                      f"({bare / per_msg:,.0f} msg/s; publisher alone {pub_rate:,.0f} results/s)")
                print(f"  hub stored + receipts   {hub:10,.0f} results/s  {hub_cpu:6.1f} µs CPU/result  "
                      f"({hub / per_msg:,.0f} msg/s, {receipts:,} receipt messages, {txns:,} transactions)")
                print(f"  hub without receipts    {no_receipts:10,.0f} results/s")
                ceiling = (f"hub / raw COPY on 2 connections = {hub / max(copies2)[0]:.0%} (target >= 70%)   "
                           f"hub / raw COPY = {hub / max(copies)[0]:.0%}   hub / raw executemany") if pg else \
                    (f"hub / raw sqlite3 many rows = {hub / max(copies)[0]:.0%}   hub / raw sqlite3 executemany"
                     + (" (target >= 70%)" if per_msg > 1 else ""))
                print(f"  {ceiling} = {hub / raw:.0%}   hub / bare subscriber = {hub / bare:.0%}"
                      f"{' (target >= 70%)' if per_msg == 1 else ''}   "
                      f"receipts cost {1 - hub / no_receipts:.0%}", flush=True)
        finally:
            broker.stop()
    if profile is not None:
        profile.dump_stats(args.profile)
        print(f"profile of the writer thread: {args.profile} (python -m pstats {args.profile})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        publish_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        from cloud_hub.data.sessions import DatabaseUnavailable
        os.environ.setdefault("PYTHONHASHSEED", "0")
        try:
            main()
        except DatabaseUnavailable as exc:
            print(f"hub_ingest.py: {exc}", file=sys.stderr)
            raise SystemExit(exits.UNAVAILABLE) from None
