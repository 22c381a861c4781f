"""Schema migrations (Alembic) on SQLite and PostgreSQL: upgrades keep every row, and a database this
build cannot serve is refused with one line naming it, changing nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from cloud_hub.cli.app import app
from cloud_hub.data import db, sessions, tables
from cloud_hub.data import revisions as schema
from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import Batch, Store, dead_letter
from cloud_hub.models import datasets, lifecycle
from tests.conftest import postgres_url
from tests.helpers import SMALL, make_log
from tests.test_ingest import Publisher, batch, settings_for, stored_keys, wait_for

runner = CliRunner()
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout + res.stderr


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file that does not exist yet, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.sqlite'}"
        return
    pg = postgres_url()
    if pg is None:
        pytest.skip("PostgreSQL is not reachable")
    admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
    name = f"edgeml_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(pg).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def raw(url: str) -> sa.Engine:
    """An engine that does no schema check at all: for building old databases and looking at them."""
    return db.make_engine(url, check=False)


def revision_of(url: str) -> str | None:
    engine = raw(url)
    try:
        with engine.connect() as conn:
            return schema.current(conn)
    finally:
        engine.dispose()


def create_legacy(url: str) -> sa.Engine:
    """The hub's tables as a build before migrations (and before models.weights) left them."""
    engine = raw(url)
    tables.metadata.create_all(engine, tables=[tables.metadata.tables[t] for t in sorted(schema.HUB_TABLES)])
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE models DROP COLUMN weights"))
        for column in ("drift_psi", "mean_confidence"):  # added by later revisions
            conn.execute(sa.text(f"ALTER TABLE devices DROP COLUMN {column}"))
    return engine


def fill(engine: sa.Engine, log: Path, *, weights: bool = True) -> dict[str, int]:
    """Results with labelled features, devices, a registered model, dead letters; returns row counts."""
    ds = datasets.dataset_from_logs([str(log)], window_s=2.0, hop_s=1.0, holdout=["dev-c"])
    train, test = datasets.split(ds, ["dev-c"])
    bundle, _, _, blob = lifecycle.build(train, test, name="default", version=1, config=SMALL)
    store = Store(engine)
    rows = [(str(d), 1_000 * i, float(i), float(i) + 2, 1, str(y), 0.9, None, str(y), 0.3,
             sessions.pack_features(x), 5.0) for i, (x, y, d) in enumerate(zip(ds.X, ds.y, ds.devices, strict=True))]
    with sessions.transaction(engine) as conn:
        store.write(conn, Batch(rows=rows, seen={"dev-a": 5.0, "dev-b": 5.0, "dev-c": 5.0},
                                dead=[dead_letter("t/x", b"garbage", "not JSON", 5.0, 1024)]))
        values = {"name": "default", "version": 1, "created": 1.0, "sha256": bundle.manifest.sha256,
                  "manifest": orjson.dumps(bundle.manifest.to_obj()).decode(), "bundle": bundle.encode(),
                  "metrics": "{}", "state": "published", "published_at": 1.0}
        if weights:
            values["weights"] = blob
        conn.execute(sa.table("models", *(sa.column(k) for k in values)).insert().values(values))
        later = set(sa.inspect(conn).get_table_names())
        for table, rows in LATER_ROWS.items():  # the tables of later revisions, where this one has them
            if table in later:
                conn.execute(sa.table(table, *(sa.column(k) for k in rows[0])).insert(), rows)
    return counts(engine)


# Rows for the tables later revisions added (only the columns each revision created them with).
LATER_ROWS: dict[str, list[dict[str, object]]] = {
    "rollouts": [{"model_name": "default", "version": v, "previous_version": v - 1, "cohort": '["dev-a"]',
                  "state": state, "min_results": 50, "tolerance": 0.02, "started_at": 2.0 + v}
                 for v, state in ((2, "rolled_back"), (3, "canary"))],
    "events": [{"ts": 3.0 + i, "kind": kind, "model_name": "default", "version": 2, "detail": "{}"}
               for i, kind in enumerate(("canary_started", "rolled_back", "published"))],
    "fl_rounds": [{"model_name": "default", "base_version": 1, "state": "open", "participants": '["dev-a","dev-b"]',
                   "plan": "{}", "announcement": b"signed", "opened_at": 4.0, "deadline": 64.0}],
    "fl_updates": [{"round_id": 1, "update_round": 1, "device_id": d, "status": "accepted", "n_examples": 40,
                    "staleness": 0, "bytes": 1200, "sha256": d * 8, "payload": b"delta", "received_at": 5.0}
                   for d in ("dev-a", "dev-b")],
}


def counts(engine: sa.Engine) -> dict[str, int]:
    """Rows of every hub table the database has (those of later revisions too)."""
    with engine.connect() as conn:
        present = set(sa.inspect(conn).get_table_names()) & set(tables.metadata.tables)
        return {t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in sorted(present)}


def backup_of(out: str) -> Path:
    """The backup file ``db upgrade`` names."""
    assert "backup: " in out, out
    path = Path(out.split("backup: ")[1].splitlines()[0])
    assert path.is_file(), path
    return path


def backup_holds(path: Path, revision: str, rows: dict[str, int]) -> None:
    """The backup is the database as it was: at ``revision``, with every row of every table."""
    with sqlite3.connect(path) as old:
        assert old.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        versions = [v for (v,) in old.execute("SELECT version_num FROM alembic_version")] \
            if revision != schema.UNVERSIONED else []
        held = {t: old.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in rows}
    assert versions == ([] if revision == schema.UNVERSIONED else [revision])
    assert held == rows


def test_revisions_of_the_code_match_the_migration_scripts() -> None:
    assert [rev for rev, _ in schema.history()] == list(schema.REVISIONS)
    assert schema.REVISIONS[-1] == schema.HEAD


@pytest.mark.parametrize("via", ["migrations", "make_engine"])
def test_the_migrations_build_exactly_the_schema_of_the_code(url: str, via: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = raw(url)
    if via == "migrations":
        assert schema.upgrade(engine).after == schema.HEAD
    else:
        schema.check(engine)
    with engine.connect() as conn:
        assert schema.current(conn) == schema.HEAD
        diff = compare_metadata(MigrationContext.configure(conn), tables.metadata)
    engine.dispose()
    assert diff == [], diff


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log(tmp_path_factory.mktemp("schema") / "fleet.csv", seconds=30)


@pytest.mark.parametrize("start", schema.REVISIONS)
def test_a_database_full_of_data_upgrades_from_every_revision_and_is_served(
        url: str, start: str, log: Path, shared_broker, prefix: str, tmp_path: Path) -> None:
    engine = raw(url)
    schema.upgrade(engine, target=start, backup=False)
    before = fill(engine, log)
    engine.dispose()
    assert all(before[t] == len(rows) for t, rows in LATER_ROWS.items() if t in before)
    code, out = cli("db", "upgrade", "--db", url)
    assert code == 0, out
    assert revision_of(url) == schema.HEAD
    if start == schema.HEAD:
        assert "nothing to do" in out and "backup" not in out, out
    elif url.startswith("sqlite"):  # a versioned database is copied first, like one from before migrations
        backup_holds(backup_of(out), start, before)
    _serves(url, before, shared_broker, prefix, tmp_path)


def _serves(url: str, before: dict[str, int], broker, prefix: str, tmp_path: Path) -> None:
    """Every row is still there, and the current code ingests, aggregates and retrains on it."""
    engine = db.make_engine(url, create=False)
    after = counts(engine)
    assert {t: n for t, n in after.items() if t in before} == before
    assert not any(n for t, n in after.items() if t not in before), "tables the upgrade created start empty"
    code, out = cli("stats", "--db", url, "--json")
    assert code == 0, out
    assert orjson.loads(out)["results"] == before["results"] and orjson.loads(out)["dead_letters"] == 1
    pub = Publisher(broker, f"{prefix}-pub")
    hub = Hub(dataclasses.replace(settings_for(broker, prefix, tmp_path), db=url))
    hub.start()
    try:
        pub.publish(hub.topics.results("dev-new"), batch("dev-new", 0, 5).encode())
        wait_for(lambda: ("dev-new", 4) in set(stored_keys(url)), what="a new batch stored")
    finally:
        hub.stop()
        pub.stop()
    outcome = lifecycle.retrain(engine, holdout=["dev-c"], tolerance=1.0, min_windows=20, config=SMALL)
    assert outcome.version == 2 and outcome.state == "publishable"
    engine.dispose()


def test_a_database_from_before_migrations_is_refused_then_adopted(
        url: str, log: Path, shared_broker, prefix: str, tmp_path: Path) -> None:
    engine = create_legacy(url)
    before = fill(engine, log, weights=False)
    engine.dispose()
    for command in (["stats"], ["devices"], ["models"]):
        code, out = cli(*command, "--db", url)
        assert code == 3, out
        assert "was created before schema migrations" in out and "cloud-hub db upgrade" in out
        assert "Traceback" not in out
    assert revision_of(url) == schema.UNVERSIONED, "refusing changed nothing"
    code, out = cli("db", "upgrade", "--db", url)
    assert code == 0, out
    assert f"upgraded {schema.UNVERSIONED} -> {schema.HEAD}" in out
    if url.startswith("sqlite"):
        copy = backup_of(out)
        backup_holds(copy, schema.UNVERSIONED, before)
        with sqlite3.connect(copy) as old:
            assert "weights" not in {r[1] for r in old.execute("PRAGMA table_info(models)")}
    code, out = cli("db", "upgrade", "--db", url)
    assert code == 0 and "nothing to do" in out
    _serves(url, before, shared_broker, prefix, tmp_path)


@pytest.mark.parametrize("start", [schema.UNVERSIONED, schema.REVISIONS[0], schema.REVISIONS[-2]])
def test_serve_with_auto_migrate_upgrades_by_itself_after_a_backup(
        url: str, start: str, log: Path, shared_broker, prefix: str, tmp_path: Path) -> None:
    if start == schema.UNVERSIONED:
        engine = create_legacy(url)
    else:
        engine = raw(url)
        schema.upgrade(engine, target=start, backup=False)
    before = fill(engine, log, weights=start != schema.UNVERSIONED)
    engine.dispose()
    settings = dataclasses.replace(settings_for(shared_broker, prefix, tmp_path), db=url)
    with pytest.raises(schema.SchemaBehind, match="db upgrade"):
        Hub(settings)
    assert not list(tmp_path.glob("*.bak")), "refusing wrote nothing"
    hub = Hub(dataclasses.replace(settings, auto_migrate=True))
    hub.stop(timeout=1)
    assert revision_of(url) == schema.HEAD
    engine = raw(url)
    assert {t: n for t, n in counts(engine).items() if t in before} == before
    engine.dispose()
    if url.startswith("sqlite"):
        copies = list(tmp_path.glob("hub.sqlite.*.bak"))
        assert len(copies) == 1, copies
        backup_holds(copies[0], start, before)


def _digest(url: str) -> str:
    if url.startswith("sqlite"):
        return hashlib.sha256(Path(url.removeprefix("sqlite:///")).read_bytes()).hexdigest()
    engine = raw(url)
    with engine.connect() as conn:
        tables = sorted(sa.inspect(conn).get_table_names())
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() \
            if "alembic_version" in tables else []
    engine.dispose()
    return repr((tables, versions))


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    Path(url.removeprefix("sqlite:///")).write_bytes(b"SQLite format 2\x00" + bytes(range(256)) * 64)
    _refused_unchanged(url, "file is not a database")


@pytest.mark.parametrize("case", ["newer revision", "another application"])
def test_a_database_this_build_cannot_serve_is_refused_and_left_alone(url: str, tmp_path: Path, case: str) -> None:
    if case == "newer revision":
        engine = raw(url)
        schema.check(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        engine.dispose()
        expect = "9999_from_the_future"
    else:
        engine = raw(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)"))
        engine.dispose()
        expect = "is not a cloud-hub database"
    _refused_unchanged(url, expect)


def _refused_unchanged(url: str, expect: str) -> None:
    digest = _digest(url)
    for command in (["stats"], ["models"], ["db", "upgrade"], ["db", "current"],
                    ["serve", "--broker", "mqtt://127.0.0.1:1"]):
        code, out = cli(*command, "--db", url)
        assert code == 3, (command, out)
        assert expect in out and "Traceback" not in out, (command, out)
        assert len(out.strip().splitlines()) == 1, (command, out)
    assert _digest(url) == digest, "nothing changed"


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.sqlite"
    for command in (["stats"], ["devices"], ["models"], ["db", "current"], ["export", str(tmp_path / "x.emlb")]):
        code, out = cli(*command, "--db", f"sqlite:///{missing}")
        assert code == 3 and "does not exist" in out, (command, out)
    assert not missing.exists()


def test_each_migration_downgrades_or_says_why_it_cannot(url: str) -> None:
    engine = raw(url)
    for i, rev in enumerate(schema.REVISIONS):
        schema.upgrade(engine, target=rev, backup=False)
        try:
            after = schema.downgrade(engine, "-1")
        except NotImplementedError as exc:
            assert "backup" in str(exc) and len(str(exc)) > 40  # the reason, and what to do instead
            continue
        assert after == (schema.REVISIONS[i - 1] if i else "none")
        schema.upgrade(engine, target=rev, backup=False)
    engine.dispose()


def test_the_sqlite_backup_is_consistent_while_a_writer_is_busy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    store = Store(engine)
    stop = threading.Event()

    def write() -> None:
        seq = 0
        while not stop.is_set():
            rows = [("dev", seq + i, 1.0, 2.0, 1, "a", 0.5, None, None, 0.1, None, 1.0) for i in range(200)]
            with sessions.transaction(engine) as conn:
                store.insert_results(conn, rows)
            seq += 200

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: counts(engine)["results"] >= 2_000, what="the writer to write")
        copy = schema.sqlite_backup(engine, "test")
    finally:
        stop.set()
        writer.join()
    assert copy is not None
    with sqlite3.connect(copy) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n = c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        seqs = np.array([s for (s,) in c.execute("SELECT seq FROM results ORDER BY seq")])
    assert n >= 2_000 and n % 200 == 0, "whole transactions only"
    assert (seqs == np.arange(n)).all()
    engine.dispose()
