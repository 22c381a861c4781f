"""Open the hub's database: an engine at this build's schema revision, or a clear refusal."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_hub.data import revisions
from cloud_hub.data.sessions import DatabaseUnavailable, describe, first_line, new_engine


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
