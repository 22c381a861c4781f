"""Schema revisions: which one a database is at, and upgrading it with Alembic.

Every hub database carries Alembic's ``alembic_version`` table. Opening one (:func:`check`, called by
:func:`cloud_hub.data.db.make_engine`) compares its revision with this build's head with one SELECT,
without importing Alembic: an empty database gets the current schema and is stamped at head; a
database that is behind is refused with the command that upgrades it (or upgraded, with
``auto_migrate``); one that is ahead, unknown or not a hub database at all is refused and left
alone. :func:`upgrade` runs the migrations in ``cloud_hub/data/migrations/versions`` in one transaction,
after a backup copy of a SQLite file (the SQLite backup API: consistent while a hub is writing).

A database created before migrations existed (the hub's tables, no ``alembic_version``) is adopted
by :func:`upgrade`: the columns the baseline has and it lacks (``models.weights``) are added, then
it is stamped at the baseline and upgraded like any other.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cloud_hub.data.sessions import DatabaseUnavailable, describe, first_line, transaction
from cloud_hub.data.tables import metadata

log = logging.getLogger(__name__)

REVISIONS: tuple[str, ...] = ("0001_baseline", "0002_rollouts", "0003_device_drift", "0004_federated_rounds",
                              "0005_secure_rounds", "0006_fp32_graph")
"""Every revision of ``cloud_hub/data/migrations/versions``, oldest first (a test checks the two agree)."""
HEAD = REVISIONS[-1]
UNVERSIONED = "unversioned"  # the hub's tables without alembic_version: made before migrations existed
HUB_TABLES = frozenset({"devices", "results", "dead_letters", "models"})  # of the baseline revision
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

_version = sa.Table(  # Alembic's own definition of its version table
    "alembic_version", sa.MetaData(),
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


class SchemaError(DatabaseUnavailable):
    """The database's schema is not the one this build works with."""


class SchemaBehind(SchemaError):
    """An older revision: ``cloud-hub db upgrade`` brings it to head."""


class SchemaUnknown(SchemaError):
    """A revision this build does not know (a newer build wrote it), or not a hub database at all."""


@dataclass(frozen=True, slots=True)
class Upgraded:
    before: str | None  # revision before (None: empty database)
    after: str
    backup: Path | None  # the SQLite backup copy written first


def current(conn: Connection) -> str | None:
    """The database's revision, :data:`UNVERSIONED`, or None for an empty database."""
    try:
        names = set(sa.inspect(conn).get_table_names())
    except sa.exc.DatabaseError as exc:  # e.g. a file that is not SQLite
        raise DatabaseUnavailable(f"cannot read {describe(conn.engine)}: {first_line(exc)}") from exc
    if "alembic_version" in names:
        revs = list(conn.execute(sa.select(_version.c.version_num)).scalars())
        if len(revs) != 1:
            raise SchemaUnknown(f"{describe(conn.engine)} has {len(revs)} schema revisions in alembic_version, not one")
        if not names >= HUB_TABLES:
            raise SchemaUnknown(f"{describe(conn.engine)} is not a cloud-hub database (revision {revs[0]!r}, tables "
                                f"{', '.join(sorted(names - {'alembic_version'})) or 'none'})")
        return str(revs[0])
    if not names:
        return None
    if names >= HUB_TABLES:
        return UNVERSIONED
    raise SchemaUnknown(f"{describe(conn.engine)} is not a cloud-hub database (it has tables {', '.join(sorted(names)[:8])})")


def check(engine: Engine, *, create: bool = True, migrate: bool = False) -> str:
    """Make sure ``engine``'s database is at :data:`HEAD`; returns the revision.

    ``create`` gives an empty database the current schema; ``migrate`` upgrades one that is behind
    instead of refusing it. Raises :class:`SchemaBehind`, :class:`SchemaUnknown`, or
    :class:`DatabaseUnavailable` for a database that cannot be read (e.g. a file that is not SQLite).
    """
    for attempt in range(3):
        try:
            with transaction(engine) as conn:
                rev = current(conn)
                if rev is None and create:
                    metadata.create_all(conn)
                    _stamp(conn, HEAD)
                    return HEAD
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == 2:
                raise
            continue  # another process created the schema at the same moment: look again
        except sa.exc.DatabaseError as exc:  # the file is not a database, the server refused, ...
            raise DatabaseUnavailable(f"cannot open {describe(engine)}: {first_line(exc)}") from exc
        break
    if rev == HEAD:
        return rev
    if rev is None:
        raise SchemaError(f"{describe(engine)} holds no cloud-hub tables (nothing to read)")
    if rev == UNVERSIONED or rev in REVISIONS:
        if migrate:
            done = upgrade(engine)
            log.warning("auto_migrate: upgraded %s from %s to %s%s", describe(engine), done.before, done.after,
                        f" (backup: {done.backup})" if done.backup else "")
            return done.after
        what = "was created before schema migrations" if rev == UNVERSIONED else f"is at schema revision {rev}"
        backup = ("it writes a backup first" if engine.dialect.name == "sqlite" else
                  "back the database up first: on PostgreSQL it writes none")
        raise SchemaBehind(f"{describe(engine)} {what}; this build needs {HEAD}: run "
                           f"`cloud-hub db upgrade --db {describe(engine)}` ({backup}), "
                           "or set auto_migrate = true for `serve`")
    raise SchemaUnknown(f"{describe(engine)} is at schema revision {rev!r}, which this build does not know "
                        f"(its newest is {HEAD}; written by a newer cloud-hub?): nothing was changed")


def upgrade(engine: Engine, *, backup: bool = True, target: str = "head") -> Upgraded:
    """Upgrade to ``target`` in one transaction (SQLite: after a backup copy); idempotent at head."""
    with transaction(engine) as conn:
        before = current(conn)
    if before not in (None, UNVERSIONED, *REVISIONS):
        raise SchemaUnknown(f"{describe(engine)} is at schema revision {before!r}, which this build does not "
                            f"know (its newest is {HEAD}): nothing was changed")
    copy = sqlite_backup(engine, before) if backup and before not in (None, HEAD) else None
    with transaction(engine) as conn:
        if current(conn) == UNVERSIONED:
            _adopt(conn)
        _alembic("upgrade", conn, target)
        after = current(conn)
    assert after is not None
    return Upgraded(before, after, copy)


def downgrade(engine: Engine, target: str) -> str:
    """Downgrade to ``target`` (a revision, or ``-1``) in one transaction; returns the new revision.

    A migration that cannot be undone without losing data raises ``NotImplementedError`` with why."""
    with transaction(engine) as conn:
        _alembic("downgrade", conn, target)
        rev = current(conn)
    return rev or "none"


def history() -> list[tuple[str, str]]:
    """(revision, first line of its description), oldest first."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(MIGRATIONS))
    return [(s.revision, (s.doc or "").strip().splitlines()[0].replace("``", "") if s.doc else "")
            for s in reversed(list(scripts.walk_revisions()))]


def sqlite_backup(engine: Engine, revision: str | None) -> Path | None:
    """Copy a SQLite database file next to itself; None for other databases and in-memory ones."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return None
    src = Path(engine.url.database).expanduser()
    dst = src.with_name(f"{src.name}.{revision or 'empty'}-{time.strftime('%Y%m%dT%H%M%S')}.bak")
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        source.backup(target)  # page by page, consistent even while another process writes
    finally:
        target.close()
        source.close()
    return dst


def _adopt(conn: Connection) -> None:
    """Bring a pre-migration hub database to the baseline's shape and stamp it there."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("models")}
    if "weights" not in columns:
        conn.execute(sa.text(f"ALTER TABLE models ADD COLUMN weights {_blob(conn)}"))
    _stamp(conn, REVISIONS[0])


def _blob(conn: Connection) -> str:
    return "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"


def _stamp(conn: Connection, revision: str) -> None:
    _version.create(conn, checkfirst=True)
    conn.execute(_version.insert().values(version_num=revision))


def _alembic(command: str, conn: Connection, target: str) -> None:
    from alembic import command as commands
    from alembic.config import Config
    from alembic.util import CommandError

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # "setup plugin ..." x7 at every upgrade
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    try:
        getattr(commands, command)(cfg, target)
    except CommandError as exc:  # e.g. a target revision that does not exist
        raise SchemaUnknown(f"{describe(conn.engine)}: {command} to {target!r}: {exc}") from exc
