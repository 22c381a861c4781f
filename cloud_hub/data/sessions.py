"""Sessions with the hub's database: engines with our SQLite pragmas, transactions, errors, feature blobs.

Feature vectors are stored as float32 little-endian bytes (:func:`pack_features`), never as pickles: any
reader in any language can load them, and loading them cannot run code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from cloud_hub.errors import HubError
from cloud_hub.settings import no_driver
from edge_agent import exits
from edge_agent.settings.loader import SettingsError

SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseUnavailable(HubError):
    """The database cannot be reached or opened."""

    exit_code = exits.UNAVAILABLE


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # We emit BEGIN ourselves (see _sqlite_on_begin): pysqlite's implicit BEGIN is deferred, and a
    # deferred transaction that reads then writes gets SQLITE_BUSY at once, without waiting for the
    # busy timeout. That, not WAL, is where most "database is locked" errors come from.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
                   "foreign_keys=ON"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()
    # floor() is built into SQLite only when compiled with math functions; aggregation needs it.
    dbapi_conn.create_function("floor", 1, _floor, deterministic=True)


def _floor(x: float | None) -> float | None:
    return None if x is None else float(math.floor(x))


def _sqlite_on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("hub_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def new_engine(url: str, *, schema: str | None = None, create: bool = True, **kw: Any) -> Engine:
    """An engine for ``url`` with our SQLite pragmas, not yet connected (:func:`cloud_hub.data.db.make_engine`
    opens one at this build's schema revision). Raises :class:`SettingsError` for a malformed URL or a missing
    driver, and :class:`DatabaseUnavailable` for a missing SQLite file when ``create`` is off."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise SettingsError(f"db {url!r} is not a database URL") from exc
    if schema is not None:
        if parsed.get_backend_name() != "postgresql":
            raise SettingsError("a schema can only be chosen on PostgreSQL")
        kw.setdefault("connect_args", {})["options"] = f"-csearch_path={schema}"
    try:
        engine = sa.create_engine(parsed, **kw)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:  # make_engine called with a URL no settings checked
        raise SettingsError(no_driver(parsed, exc)) from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        path = sqlite_file(parsed)
        if create and path is not None and not path.parent.is_dir():  # SQLite: "unable to open database file"
            raise SettingsError(f"db {parsed.render_as_string(hide_password=True)!r}: the folder "
                                f"{str(path.parent)!r} does not exist (create it, or name a file in another)")
        if not create and path is not None and not path.exists():  # connecting would create it
            raise DatabaseUnavailable(f"database file {parsed.database!r} does not exist (`cloud-hub train` or "
                                      "`cloud-hub serve` creates one; --db or db in the config names another)")
    return engine


def sqlite_file(url: str | sa.engine.URL) -> Path | None:
    """The file of a SQLite URL; None for another database, an in-memory one or a malformed URL."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def describe(engine: Engine) -> str:
    """The engine's URL without its password."""
    return shown_url(engine.url)


def shown_url(url: sa.URL | str) -> str:
    """A database URL without its password, in the user part or as a query parameter (``?password=``)."""
    text = sa.make_url(url).render_as_string(hide_password=True)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", text)


def first_line(exc: BaseException) -> str:
    """The first line of a database error's message (drivers' messages run over several)."""
    inner = getattr(exc, "orig", None) or exc
    return str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back if it raises.

    ``write=True`` takes SQLite's write lock at BEGIN (``BEGIN IMMEDIATE``), so concurrent writers
    queue on the busy timeout instead of failing with "database is locked".
    """
    with engine.connect() as conn:
        if write:
            conn.execution_options(hub_write=True)
        with conn.begin():
            yield conn


def pack_features(values: Sequence[float] | np.ndarray | None) -> bytes | None:
    """A feature vector as float32 little-endian bytes (None stays None)."""
    if values is None:
        return None
    return np.asarray(values, dtype="<f4").tobytes()


def unpack_features(blob: bytes | None) -> np.ndarray | None:
    """The inverse of :func:`pack_features`."""
    if blob is None:
        return None
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the database or its driver (else it is the hub's own: a bug)."""
    return isinstance(exc, sa.exc.SQLAlchemyError)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may go away by retrying (connection lost, locked, deadlock)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError
                      | sa.exc.DisconnectionError)
