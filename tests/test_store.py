"""The store's contract, run against SQLite and (when reachable) PostgreSQL: one suite, two backends."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_hub.data import sessions, tables
from cloud_hub.data.db import make_engine
from cloud_hub.data.sessions import DatabaseUnavailable, transaction
from cloud_hub.data.store import (
    COPY_MIN_ROWS,
    MULTI_MIN_ROWS,
    RESULT_COLUMNS,
    Batch,
    ModelExists,
    ResultRow,
    Store,
    dead_letter,
)
from edge_agent import contract as c
from edge_agent.settings.loader import SettingsError
from tests.conftest import postgres_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def backend_engine(kind: str, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database: a SQLite file, or a PostgreSQL schema of this test's own (dropped after)."""
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
        yield engine
        engine.dispose()
        return
    url = postgres_url()
    if url is None:
        pytest.skip("PostgreSQL is not reachable")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    engine = make_engine(url, schema=schema)
    try:
        yield engine
    finally:
        engine.dispose()
        cleanup = sa.create_engine(url)
        with cleanup.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        cleanup.dispose()


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with backend_engine(request.param, tmp_path) as e:
        yield e


def row(device: str, seq: int, *, label: str | None = "walk", truth: str | None = None,
        features: list[float] | None = None, value: str | None = None, at: float = 100.0) -> ResultRow:
    start = seq / 1000
    return ResultRow(device, seq, start, start + 2.0, 1, label, 0.75, value, truth, 0.5,
                     sessions.pack_features(features), at)


def keys(engine: Engine) -> list[tuple[str, int]]:
    with transaction(engine, write=False) as conn:
        return [tuple(r) for r in conn.execute(sa.select(tables.results.c.device_id, tables.results.c.seq)
                                               .order_by(tables.results.c.device_id, tables.results.c.seq))]


def test_results_insert_is_idempotent_and_counts_new_rows(engine: Engine) -> None:
    store = Store(engine)
    first = [row("a", s) for s in range(1000, 1010)] + [row("b", 1000)]
    with transaction(engine) as conn:
        assert store.insert_results(conn, first) == 11
    with transaction(engine) as conn:
        assert store.insert_results(conn, first) == 0  # a redelivery changes nothing
    with transaction(engine) as conn:
        assert store.insert_results(conn, [row("a", 1009), row("a", 1010), row("b", 1000), row("c", 1000)]) == 2
    with transaction(engine) as conn:
        assert store.insert_results(conn, [row("d", 1)]) == 1  # a single row goes the same way
        assert store.insert_results(conn, []) == 0
    got = keys(engine)
    assert len(got) == len(set(got)) == 14
    assert ("a", 1010) in got and ("c", 1000) in got and ("d", 1) in got


@pytest.mark.parametrize("size", [1, MULTI_MIN_ROWS - 1, MULTI_MIN_ROWS, COPY_MIN_ROWS - 1, COPY_MIN_ROWS, 700, 2500])
def test_big_and_small_batches_count_new_rows_and_duplicates_alike(engine: Engine, size: int) -> None:
    """On PostgreSQL batches from COPY_MIN_ROWS rows go through COPY and a staging table, on SQLite batches
    from MULTI_MIN_ROWS rows through statements of up to 1,024 rows each: the same contract as executemany
    (new rows counted, duplicates within and across batches and statements ignored, two batches in one
    transaction, a rolled-back batch leaves nothing behind)."""
    store = Store(engine)
    batch = [row("a", s) for s in range(size)]
    with transaction(engine) as conn:
        assert store.insert_results(conn, batch) == size
        assert store.insert_results(conn, batch + [row("b", 1)]) == 1  # same transaction: the stage was emptied
    with pytest.raises(RuntimeError), transaction(engine) as conn:
        store.insert_results(conn, [row("c", s) for s in range(size)])
        raise RuntimeError("rolled back")
    with transaction(engine) as conn:  # in-batch duplicates count once; the rolled-back rows are not there
        twice = [row("c", s) for s in range(size)] * 2 + batch
        assert store.insert_results(conn, twice) == size
    with transaction(engine, write=False) as conn:
        stored = conn.execute(sa.select(tables.results.c.device_id, tables.results.c.seq, tables.results.c.label,
                                        tables.results.c.features)).all()
    assert len(stored) == 2 * size + 1 and {r.label for r in stored} == {"walk"}
    assert store.copy == (engine.dialect.name == "postgresql")


@pytest.mark.parametrize("others", [0, 40])
def test_result_values_round_trip(engine: Engine, others: int) -> None:
    """Alone (one row a statement) and among others (statements of many rows, COPY): each value in its column."""
    store = Store(engine)
    feats = [0.25, -1.5, 3.0e-3]
    with transaction(engine) as conn:
        store.insert_results(conn, [row("z", s) for s in range(others // 2)]
                             + [row("a", 5, truth="run", features=feats), row("a", 6, label=None, value="[1.5,2.0]")]
                             + [row("z", s) for s in range(others // 2, others)])
    with transaction(engine, write=False) as conn:
        got = {r.seq: r for r in conn.execute(sa.select(tables.results).where(tables.results.c.device_id == "a"))}
    assert len(got) == 2 and got[5].truth == "run" and got[5].label == "walk" and got[5].confidence == 0.75
    assert got[5].start == 0.005 and got[5].end == 2.005 and got[5].received_at == 100.0
    np.testing.assert_array_equal(sessions.unpack_features(got[5].features), np.asarray(feats, dtype=np.float32))
    assert got[6].features is None and got[6].value == "[1.5,2.0]" and got[6].label is None


def test_sqlite_with_a_lower_parameter_limit_takes_smaller_statements(tmp_path: Path) -> None:
    """A SQLite built with the old limit of 999 parameters (83 rows of 12): statements of 64 rows, all stored."""
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    store = Store(engine)
    with transaction(engine) as conn:
        conn.connection.dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # type: ignore[union-attr]
        assert store.insert_results(conn, [row("a", s) for s in range(1000)]) == 1000
    assert store._multi_max == 64
    assert keys(engine) == [("a", s) for s in range(1000)]
    engine.dispose()


def test_sqlite_rows_in_one_statement_refused_name_the_rows_column_and_other_paramstyles_still_store(
        tmp_path: Path) -> None:
    """A row SQLite cannot bind, among others: the error names its column's place in a row (as executemany's
    did), not its place among a statement's 12,288 values. A SQLite engine with a named paramstyle (dicts, not
    tuples) takes the row-at-a-time path and stores as before (the review's catch)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    bad = [row("a", s) for s in range(20)]
    bad[7] = bad[7]._replace(model_version=[1])  # type: ignore[arg-type]
    with pytest.raises(sa.exc.DBAPIError, match="parameter 5") as refused, transaction(engine) as conn:
        Store(engine).insert_results(conn, bad)
    assert "parameter 89" not in str(refused.value)
    engine.dispose()
    named = sa.create_engine(f"sqlite:///{tmp_path / 'named.sqlite'}", paramstyle="named")
    tables.metadata.create_all(named)
    with transaction(named) as conn:
        assert Store(named).insert_results(conn, [row("a", s) for s in range(10)]) == 10
    assert keys(named) == [("a", s) for s in range(10)]
    named.dispose()


def test_device_upserts(engine: Engine) -> None:
    store = Store(engine)
    with transaction(engine) as conn:
        store.touch_devices(conn, {"a": 10.0, "b": 10.0})
    with transaction(engine) as conn:
        store.touch_devices(conn, {"a": 5.0})  # late: last_seen never goes back
        store.apply_statuses(conn, {"b": (c.Status("b", c.ONLINE, 1.0, "m", 4, "f" * 64, 17, "oops"), 20.0)})
    with transaction(engine) as conn:
        # the last will carries no model: the model last reported is kept
        store.apply_statuses(conn, {"b": (c.Status("b", c.OFFLINE, 2.0), 30.0)})
        store.apply_statuses(conn, {"c": (c.Status("c", c.ONLINE, 2.0, outbox_depth=3), 40.0)})
    with transaction(engine, write=False) as conn:
        devs = {r.device_id: r for r in conn.execute(sa.select(tables.devices))}
    assert set(devs) == {"a", "b", "c"}
    assert (devs["a"].first_seen, devs["a"].last_seen, devs["a"].state) == (10.0, 10.0, "online")
    b = devs["b"]
    assert (b.first_seen, b.last_seen, b.state) == (10.0, 30.0, "offline")
    assert (b.model_name, b.model_version, b.model_sha256) == ("m", 4, "f" * 64)
    assert (b.outbox_depth, b.last_error) == (0, None)
    assert (devs["c"].state, devs["c"].outbox_depth, devs["c"].first_seen) == ("online", 3, 40.0)


def test_dead_letters_are_bounded(engine: Engine) -> None:
    store = Store(engine)
    big = b"x" * 5000
    with transaction(engine) as conn:
        n = store.insert_dead_letters(conn, [dead_letter("p/devices/a/results", big, "too big", 7.0, 1024),
                                             dead_letter("p/devices/a/status", b"\x00\xff", "bad", 8.0, 1024)])
    assert n == 2
    with transaction(engine, write=False) as conn:
        rows = conn.execute(sa.select(tables.dead_letters).order_by(tables.dead_letters.c.id)).all()
    assert [(r.topic, bytes(r.payload), r.size, r.reason) for r in rows] == [
        ("p/devices/a/results", b"x" * 1024, 5000, "too big"), ("p/devices/a/status", b"\x00\xff", 2, "bad")]


def test_batch_write_is_one_unit(engine: Engine) -> None:
    store = Store(engine)
    batch = Batch(rows=[row("a", 1), row("a", 2)], seen={"a": 50.0},
                  statuses={"a": (c.Status("a", c.ONLINE, 1.0, model_version=2), 50.0)},
                  dead=[dead_letter("t", b"?", "why", 50.0, 10)])
    with transaction(engine) as conn:
        w = store.write(conn, batch)
    assert (w.new, w.duplicates, w.dead) == (2, 0, 1)
    with pytest.raises(RuntimeError), transaction(engine) as conn:
        store.write(conn, Batch(rows=[row("a", 3)]))
        raise RuntimeError("rolled back")
    assert keys(engine) == [("a", 1), ("a", 2)]
    with transaction(engine) as conn:
        w = store.write(conn, batch)
    assert (w.new, w.duplicates) == (0, 2)


def test_model_registry(engine: Engine) -> None:
    store = Store(engine)
    with transaction(engine) as conn:
        store.add_model(conn, name="m", version=1, sha256="a" * 64, manifest={"name": "m", "version": 1},
                        created=1.0, bundle=b"B1", metrics={"accuracy": 0.9}, weights=b"W1")
        store.add_model(conn, name="m", version=2, sha256="b" * 64, manifest={"name": "m", "version": 2},
                        created=2.0, state="publishable")
        store.add_model(conn, name="other", version=1, sha256="c" * 64, manifest={}, created=3.0)
    with pytest.raises(ModelExists), transaction(engine) as conn:
        store.add_model(conn, name="m", version=2, sha256="d" * 64, manifest={}, created=4.0)
    with pytest.raises(ValueError, match="model state"), transaction(engine) as conn:
        store.add_model(conn, name="m", version=9, sha256="d" * 64, manifest={}, created=4.0, state="great")
    with transaction(engine) as conn:
        assert store.set_model_state(conn, "m", 1, "published", at=5.0)
        assert store.set_model_state(conn, "m", 2, "rejected")
        assert not store.set_model_state(conn, "m", 7, "rejected")
    with transaction(engine, write=False) as conn:
        latest = store.get_model(conn, "m")
        first = store.get_model(conn, "m", 1)
        assert store.get_model(conn, "nope") is None
        assert [(r.name, r.version) for r in store.list_models(conn)] == [("m", 1), ("m", 2), ("other", 1)]
        assert [r.version for r in store.list_models(conn, "m")] == [1, 2]
        assert store.get_weights(conn, "m", 1) == b"W1" and store.get_weights(conn, "m", 2) is None
    assert latest is not None and (latest.version, latest.state, latest.bundle) == (2, "rejected", None)
    assert first is not None and first.state == "published" and first.published_at == 5.0
    assert first.manifest == {"name": "m", "version": 1} and first.metrics == {"accuracy": 0.9}
    assert first.bundle == b"B1" and first.sha256 == "a" * 64


def test_concurrent_sqlite_writers_never_see_database_is_locked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engines = [make_engine(url) for _ in range(4)]
    errors: list[BaseException] = []

    def work(i: int, engine: Engine) -> None:
        store = Store(engine)
        try:
            for k in range(40):
                with transaction(engine) as conn:
                    # read, then write: the pattern that fails at once under a deferred BEGIN
                    conn.execute(sa.select(sa.func.count()).select_from(tables.results)).scalar_one()
                    store.insert_results(conn, [row(f"d{i}", k * 10 + j) for j in range(10)])
                    store.touch_devices(conn, {f"d{i}": float(k), "shared": float(k)})
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, e)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(keys(engines[0])) == 4 * 40 * 10
    for e in engines:
        e.dispose()


def test_sqlite_pragmas_and_columns(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == sessions.SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert tuple(col.name for col in tables.results.c if col.name != "id") == RESULT_COLUMNS
    engine.dispose()


def test_make_engine_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not a database URL"):
        make_engine("not a url")
    with pytest.raises(SettingsError, match="no driver"):
        make_engine("nosuchdb://x/y")
    with pytest.raises(SettingsError, match=r"no driver .*; for PostgreSQL write postgresql\+psycopg://"):
        make_engine("postgres://u@127.0.0.1/db")  # Heroku's spelling
    with pytest.raises(SettingsError, match="the folder .*missing-dir' does not exist"):  # a usage error, exit 2
        make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'hub.sqlite'}")
    with pytest.raises(DatabaseUnavailable, match="cannot open"):
        make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", connect_args={"connect_timeout": 2})
    with pytest.raises(SettingsError, match="schema"):
        make_engine("sqlite://", schema="x")


def test_history_of_is_each_devices_latest_results_of_a_version_in_its_own_order(engine: Engine) -> None:
    """A canary device's baseline (canary.judge): per device, the latest N of one version, oldest first."""
    store = Store(engine)
    rows = [row(d, s, label=f"l{s}", at=float(s)) for d in ("a", "b", "c") for s in range(1000, 1010)]
    rows += [(*r[:4], 2, *r[5:]) for r in (row("a", s, label=f"l{s}", at=float(s)) for s in range(1010, 1015))]  # v2
    with transaction(engine) as conn:
        store.insert_results(conn, rows)
    with transaction(engine, write=False) as conn:
        got = store.history_of(conn, 1, ["a", "b"], 3)
        fresh = store.canary_results(conn, [1, 2], since=1008.0)
    assert [(r[0], r[1], r[2]) for r in got] == [(d, 1, f"l{s}") for d in ("a", "b") for s in (1007, 1008, 1009)]
    assert [(r[0], r[2]) for r in fresh] == [("a", "l1008"), ("a", "l1009"), *(("a", f"l{s}") for s in range(1010, 1015)),
                                             ("b", "l1008"), ("b", "l1009"), ("c", "l1008"), ("c", "l1009")]
