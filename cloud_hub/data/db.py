"""Open the hub's database: an engine at this build's schema revision, or a clear refusal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_hub.data import revisions
from cloud_hub.data.sessions import DatabaseUnavailable, describe, first_line, new_engine, sqlite_file


def make_engine(url: str, *, schema: str | None = None, create: bool = True, migrate: bool = False,
                check: bool = True, **kw: Any) -> Engine:
    """An engine for ``url`` with our SQLite pragmas, on a database at this build's schema revision.

    ``create`` gives an empty (or, for SQLite, missing) database the current schema; without it a
    missing SQLite file is refused rather than created (read-only commands). ``migrate`` upgrades a
    database whose schema is behind instead of refusing it; ``check=False`` skips the revision check
    (the ``db`` commands). ``schema`` (PostgreSQL only) puts every table in that schema, creating it:
    the tests use one schema per test so that they never collide.
    Raises :class:`SettingsError` for a malformed URL or a missing driver,
    :class:`DatabaseUnavailable` when the database cannot be reached or read, and
    :class:`cloud_hub.data.revisions.SchemaError` when its schema is not this build's.
    """
    engine = new_engine(url, schema=schema, create=create, **kw)
    try:
        if schema is not None:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        if check:
            revisions.check(engine, create=create, migrate=migrate)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise DatabaseUnavailable(f"cannot open {describe(engine)}: {first_line(exc)}") from exc
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextmanager
def removed_if_left_empty(url: str) -> Iterator[None]:
    """A SQLite file that this block creates is removed again if the block fails before storing anything.

    A command that fails (a hub whose broker is not there, a ``train`` on a log it cannot read) must not
    leave an empty database behind: the next command would find it and report "no model" where the truth
    is "no database here". Only a file that did not exist when the block began is removed, and only while
    it holds no row but the schema's revision stamp; a file that was there before is never touched.
    """
    path = sqlite_file(url)
    existed = path is None or path.exists()
    try:
        yield
    except BaseException:
        if not existed and path is not None and path.exists() and _holds_no_rows(url):
            for leftover in (path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))):
                leftover.unlink(missing_ok=True)
        raise


def _holds_no_rows(url: str) -> bool:
    """Whether every table but Alembic's stamp is empty (False when it cannot tell: then the file stays)."""
    engine = sa.create_engine(url)  # no pragmas: it only reads, and must not switch the journal mode
    try:
        with engine.connect() as conn:
            tables = [t for t in sa.inspect(conn).get_table_names() if t != "alembic_version"]
            return not any(conn.execute(sa.select(sa.literal(1)).select_from(sa.table(t)).limit(1)).first()
                           for t in tables)
    except sa.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()
