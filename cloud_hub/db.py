"""The hub's schema (one MetaData) and its session helpers, for SQLite and PostgreSQL.

Times are epoch seconds as doubles, like the contract's window ``start``/``end``. Feature vectors are
stored as float32 little-endian bytes (:func:`pack_features`), never as pickles: any reader in any
language can load them, and loading them cannot run code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from edge_agent.settings import SettingsError

SQLITE_BUSY_TIMEOUT_MS = 30_000
MODEL_STATES = ("candidate", "publishable", "rejected", "published")
ONLINE, OFFLINE = "online", "offline"


class HubError(Exception):
    """Base of the hub's own errors."""


class DatabaseUnavailable(HubError):
    """The database cannot be reached or opened."""


metadata = sa.MetaData()

devices = sa.Table(
    "devices", metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),  # hub clock: last message of any kind
    sa.Column("state", sa.String(16), nullable=False, server_default=ONLINE),
    sa.Column("model_name", sa.String(64)),
    sa.Column("model_version", sa.BigInteger),
    sa.Column("model_sha256", sa.String(64)),
    sa.Column("outbox_depth", sa.BigInteger),
    sa.Column("last_error", sa.Text),
    sa.Column("status_ts", sa.Double),  # device clock of the last status message
    sa.Column("drift_psi", sa.Double),  # its last status's (edge_agent/drift.py)
    sa.Column("mean_confidence", sa.Double),
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("start", sa.Double, nullable=False),
    sa.Column("end", sa.Double, nullable=False),
    sa.Column("model_version", sa.BigInteger, nullable=False),
    sa.Column("label", sa.String(256)),
    sa.Column("confidence", sa.Double),
    sa.Column("value", sa.Text),  # JSON list (regression output) or NULL
    sa.Column("truth", sa.String(256)),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("features", sa.LargeBinary),  # float32 little-endian, see pack_features
    sa.Column("received_at", sa.Double, nullable=False),
    sa.UniqueConstraint("device_id", "seq", name="uq_results_device_seq"),
    sa.Index("ix_results_start", "start"),
)

dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # the first dead_letter_max_bytes bytes
    sa.Column("size", sa.BigInteger, nullable=False),  # the full payload size
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
)

models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),  # JSON
    sa.Column("bundle", sa.LargeBinary),  # the encoded contract Bundle (manifest + INT8 ONNX)
    sa.Column("weights", sa.LargeBinary),  # FP32 training weights as arrays (cloud_hub.weights), for warm starts
    sa.Column("metrics", sa.Text),  # JSON
    sa.Column("state", sa.String(16), nullable=False, server_default="candidate"),
    sa.Column("published_at", sa.Double),
    sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    sa.CheckConstraint("state IN ('candidate', 'publishable', 'rejected', 'published')", name="ck_models_state"),
)

ROLLOUT_STATES = ("canary", "promoted", "rolled_back")

rollouts = sa.Table(  # a version sent to a cohort of devices first (cloud_hub/canary.py)
    "rollouts", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("previous_version", sa.BigInteger),  # on the model topic when the canary started
    sa.Column("cohort", sa.Text, nullable=False),  # JSON list of device ids
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("min_results", sa.BigInteger, nullable=False),
    sa.Column("tolerance", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
    sa.Column("reason", sa.Text),  # why it was promoted or rolled back
    sa.CheckConstraint("state IN ('canary', 'promoted', 'rolled_back')", name="ck_rollouts_state"),
)

events = sa.Table(  # what the hub did to the fleet's models, also published on {prefix}/events
    "events", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(64)),
    sa.Column("version", sa.BigInteger),
    sa.Column("detail", sa.Text, nullable=False),  # JSON
)


ROUND_STATES = ("open", "closed", "published", "rejected", "failed")

fl_rounds = sa.Table(  # a federated round (cloud_hub/rounds.py): its plan, its announcement and what came of it
    "fl_rounds", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("base_version", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("participants", sa.Text, nullable=False),  # JSON list of the selected device ids
    sa.Column("plan", sa.Text, nullable=False),  # JSON: the announcement's header
    sa.Column("announcement", sa.LargeBinary, nullable=False),  # the signed payload, re-published on resume
    sa.Column("opened_at", sa.Double, nullable=False),
    sa.Column("deadline", sa.Double, nullable=False),
    sa.Column("closed_at", sa.Double),
    sa.Column("new_version", sa.BigInteger),  # the aggregated model, registered (published or rejected)
    sa.Column("outcome", sa.Text),  # JSON: accuracy before/after, bytes, ...
    sa.Column("reason", sa.Text),
    sa.CheckConstraint("state IN ('open', 'closed', 'published', 'rejected', 'failed')", name="ck_fl_rounds_state"),
    sa.Index("ix_fl_rounds_model_state", "model_name", "state"),
)

fl_updates = sa.Table(  # every update a device sent, with the hub's verdict
    "fl_updates", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("round_id", sa.BigInteger, nullable=False),  # the round it counted in (or was refused by)
    sa.Column("update_round", sa.BigInteger),  # the round the device answered (older when late)
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("n_examples", sa.BigInteger),
    sa.Column("staleness", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),  # of the payload: a redelivery is recognised
    sa.Column("metrics", sa.Text),  # JSON: loss and metric before/after, norm, epochs, seconds
    sa.Column("payload", sa.LargeBinary),  # the update as received, kept for accepted and late ones
    sa.Column("received_at", sa.Double, nullable=False),
    sa.CheckConstraint("status IN ('accepted', 'late', 'refused', 'evaluated')", name="ck_fl_updates_status"),
    sa.Index("ix_fl_updates_round_device", "round_id", "device_id"),
    sa.Index("ix_fl_updates_sha256", "sha256"),  # a redelivery is looked up by it
)


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
    :class:`cloud_hub.schema.SchemaError` when its schema is not this build's.
    """
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
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise SettingsError(f"db {parsed.render_as_string(hide_password=True)!r}: no driver ({exc})") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        path = parsed.database
        if not create and path not in (None, "", ":memory:") and not Path(path).expanduser().exists():
            raise DatabaseUnavailable(f"database file {path!r} does not exist")  # connecting would create it
    try:
        if schema is not None:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        if check:
            from cloud_hub import schema as revisions

            revisions.check(engine, create=create, migrate=migrate)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise DatabaseUnavailable(f"cannot open {describe(engine)}: {first_line(exc)}") from exc
    except BaseException:
        engine.dispose()
        raise
    return engine


def describe(engine: Engine) -> str:
    """The engine's URL without its password."""
    return engine.url.render_as_string(hide_password=True)


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


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may go away by retrying (connection lost, locked, deadlock)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError
                      | sa.exc.DisconnectionError)
