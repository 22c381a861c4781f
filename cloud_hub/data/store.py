"""Idempotent batched writes: results, devices, dead letters, and the model registry.

The hot path (:meth:`Store.insert_results`) compiles the dialect's
``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` once and executes it with plain tuples
through ``exec_driver_sql``: SQLAlchemy's per-row parameter processing (dict to tuple, type
processors) cost more than the insert itself (measured on SQLite: 35k rows/s through
``conn.execute(stmt, dicts)``, 85-90k rows/s this way, raw ``sqlite3`` about 90k on the same
loaded machine). The rows are plain values already, so there is nothing to process. On SQLite a batch
of :data:`MULTI_MIN_ROWS` or more goes in statements of many rows each instead (one step and one
release of the GIL a statement, not a row).

On PostgreSQL through psycopg 3, batches of :data:`COPY_MIN_ROWS` or more go through binary
``COPY`` straight into ``results`` inside a savepoint: the unique key (device_id, seq) refuses the
whole batch if any row is already stored (a redelivery, a replay), and then, back at the savepoint,
the batch goes through a session-private staging table and one ``INSERT ... SELECT ... ON CONFLICT
DO NOTHING`` that empties the stage: its row count is the new rows, so duplicates are counted as
before. ``bench/hub_ingest.py --db URL`` measures it against bare ``COPY`` and ``executemany``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Final, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from cloud_hub.data.tables import MODEL_STATES, dead_letters, devices, events, models, results, rollouts
from cloud_hub.errors import HubError
from edge_agent.contract import Status
from edge_agent.settings.loader import SettingsError


class ResultRow(NamedTuple):
    """One result as the hub stores it: the ``results`` table's columns (without ``id``), in its order.

    A tuple, so that a batch goes to ``executemany``/COPY as it is; named, so that no code counts positions."""

    device_id: str
    seq: int
    start: float
    end: float
    model_version: int
    label: str | None
    confidence: float | None
    value: str | None  # a regressor's outputs as a JSON list
    truth: str | None
    latency_ms: float
    features: bytes | None  # float32 little-endian (sessions.pack_features)
    received_at: float  # the hub's clock


RESULT_COLUMNS: tuple[str, ...] = ResultRow._fields
"""The order of the values in a :class:`ResultRow`."""
# The hub's hot path builds plain tuples in this order and reads them by these positions: a NamedTuple per
# row costs 1.2 µs more per result there (bench/hub_ingest.py: 118k vs 135k results/s; the garbage
# collector keeps tracking tuple subclasses, it stops tracking plain tuples of plain values).
DEVICE_ID: Final = 0
SEQ: Final = 1
RECEIVED_AT: Final = 11
assert (RESULT_COLUMNS[DEVICE_ID], RESULT_COLUMNS[SEQ], RESULT_COLUMNS[RECEIVED_AT]) == ("device_id", "seq", "received_at")

_INSERTS: dict[str, Any] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
COPY_MIN_ROWS = 16
"""Smaller batches are inserted with ``executemany``: COPY's two extra statements cost more than it saves."""
MULTI_MIN_ROWS: Final = 8
"""SQLite: batches of this many rows or more go in statements of many rows (:meth:`Store.insert_results`)."""
MULTI_MAX_ROWS: Final = 1024
"""SQLite: the most rows in one statement (longer ones gained nothing more; fewer if SQLite's limit is lower)."""
_PG_TYPES = ("text", "int8", "float8", "float8", "int8", "text", "float8", "text", "text", "float8", "bytea", "float8")
_COLS = ", ".join(f'"{c}"' for c in RESULT_COLUMNS)
_STAGE = (f"CREATE TEMP TABLE IF NOT EXISTS results_stage ON COMMIT DELETE ROWS AS SELECT {_COLS} FROM results "
          "WITH NO DATA")
_UNIQUE_VIOLATION = "23505"
_FROM_STAGE = (f"WITH staged AS (DELETE FROM results_stage RETURNING {_COLS}) INSERT INTO results ({_COLS}) "
               f"SELECT {_COLS} FROM staged ON CONFLICT (device_id, seq) DO NOTHING")
_MODEL_COLUMNS = [c for c in models.c if c.name not in ("id", "weights")]  # weights: fetched on demand


class ModelExists(HubError):
    """A model with this name and version is already registered."""


@dataclass(slots=True)
class Batch:
    """What one transaction writes: result rows, device sightings, statuses and dead letters."""

    rows: list[ResultRow] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # device id -> received time (hub clock)
    statuses: dict[str, tuple[Status, float]] = field(default_factory=dict)  # the latest per device
    dead: list[dict[str, Any]] = field(default_factory=list)  # see Store.dead_letter


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch write changed."""

    new: int  # result rows inserted
    duplicates: int  # result rows already stored (redeliveries, replays)
    dead: int  # dead letters


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    version: int
    created: float
    sha256: str
    manifest: dict[str, Any]
    bundle: bytes | None
    metrics: dict[str, Any] | None
    state: str
    published_at: float | None


class Store:
    """Statements compiled once for one engine's dialect (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        insert = _INSERTS.get(dialect.name)
        if insert is None:
            raise SettingsError(f"database {dialect.name!r} is not supported: use sqlite or postgresql")
        self.dialect = dialect.name
        self.copy = dialect.name == "postgresql" and dialect.driver == "psycopg"  # COPY for big batches
        stmt = insert(results).on_conflict_do_nothing(index_elements=["device_id", "seq"])
        compiled = stmt.compile(dialect=dialect, column_keys=list(RESULT_COLUMNS), for_executemany=True)
        self._results_sql = str(compiled)
        self._positional = bool(dialect.positional)
        if self._positional and tuple(compiled.positiontup or ()) != RESULT_COLUMNS:
            raise AssertionError(f"unexpected parameter order {compiled.positiontup}")
        head, _, rest = self._results_sql.partition(" VALUES ")
        row, _, tail = rest.partition(")")
        self._multi_rows = dialect.name == "sqlite" and self._positional  # (a named paramstyle binds dicts)
        if self._multi_rows and (not rest.startswith("(") or row.count("?") != len(RESULT_COLUMNS)):
            raise AssertionError(f"unexpected insert {self._results_sql}")
        self._multi_head, self._multi_row, self._multi_tail = head + " VALUES ", row + ")", tail
        self._multi_sql: dict[int, str] = {}
        self._multi_max = 0

        dev = insert(devices)
        newer = sa.case((dev.excluded.last_seen > devices.c.last_seen, dev.excluded.last_seen),
                        else_=devices.c.last_seen)
        self._touch = dev.on_conflict_do_update(index_elements=["device_id"], set_={"last_seen": newer})
        keep = {name: sa.func.coalesce(getattr(dev.excluded, name), devices.c[name])
                for name in ("model_name", "model_version", "model_sha256", "drift_psi", "mean_confidence")}
        self._status = dev.on_conflict_do_update(index_elements=["device_id"], set_={
            "last_seen": newer, "state": dev.excluded.state, "outbox_depth": dev.excluded.outbox_depth,
            "last_error": dev.excluded.last_error, "status_ts": dev.excluded.status_ts, **keep,
        })

    # ----------------------------------------------------------------- results and devices

    def insert_results(self, conn: Connection, rows: Sequence[ResultRow]) -> int:
        """Insert result rows; return how many were new."""
        if not rows:
            return 0
        if self.copy and len(rows) >= COPY_MIN_ROWS:
            return self._copy_results(conn, rows)
        if not self._positional:
            params: Any = [dict(zip(RESULT_COLUMNS, r, strict=True)) for r in rows]
        elif type(rows[0]) is tuple:
            params = rows
        else:  # the drivers bind a tuple subclass (ResultRow) through a slower path (+1.7 µs a row)
            params = [tuple(r) for r in rows]
        if self._multi_rows and len(params) >= MULTI_MIN_ROWS:
            return self._insert_multi(conn, params)
        if len(params) == 1:
            params = params[0]
        return int(conn.exec_driver_sql(self._results_sql, params).rowcount)

    def _insert_multi(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """SQLite: the rows in statements of many rows each (``VALUES (...), (...), ...``), sizes powers of two.

        ``executemany`` steps the statement once a row, and ``sqlite3`` lets go of the GIL at every step: on a
        hub whose network and decoder threads want it too, the writer waited for it once a row (see
        ``docs/benchmarks.md``, "Receipts in statements of many rows"). Each size's statement is cached."""
        if self._multi_max == 0:  # the linked SQLite's limit on parameters (999 before 3.32, 32766 since)
            getlimit = getattr(conn.connection.dbapi_connection, "getlimit", None)  # another driver: the old limit
            limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit is not None else 999
            self._multi_max = 1 << max(0, min(MULTI_MAX_ROWS, limit // len(RESULT_COLUMNS)).bit_length() - 1)
        new, i, n = 0, 0, len(rows)
        flat = chain.from_iterable
        while i < n:
            size = min(self._multi_max, 1 << ((n - i).bit_length() - 1))  # the largest power of two that fits
            sql = self._multi_sql.get(size)
            if sql is None:
                sql = self._multi_sql[size] = self._multi_head + ", ".join([self._multi_row] * size) + self._multi_tail
            try:
                new += conn.exec_driver_sql(sql, tuple(flat(rows[i:i + size]))).rowcount
            except sa.exc.DBAPIError:  # SQLite undid the statement: again a row at a time, for an error that
                new += conn.exec_driver_sql(self._results_sql, rows[i:i + size]).rowcount  # names a row's column
            i += size
        return new

    def _copy_results(self, conn: Connection, rows: Sequence[ResultRow]) -> int:
        """PostgreSQL: binary COPY into ``results``; if a row is already there, through the stage.

        Driver errors come out as SQLAlchemy's, like every other statement's (the hub tells a
        refused row from a lost connection by them)."""
        dbapi_error = conn.dialect.loaded_dbapi.Error
        try:
            with conn.connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
                cur.execute("SAVEPOINT copy_results")
                try:
                    _copy(cur, "results", rows)
                except dbapi_error as exc:
                    if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT copy_results")
                    cur.execute(_STAGE)
                    _copy(cur, "results_stage", rows)
                    cur.execute(_FROM_STAGE)
                    return int(cur.rowcount)
                cur.execute("RELEASE SAVEPOINT copy_results")
                return len(rows)
        except dbapi_error as exc:
            raise sa.exc.DBAPIError.instance("COPY results", None, exc, dbapi_error) from exc

    def touch_devices(self, conn: Connection, seen: Mapping[str, float]) -> None:
        """Create devices first seen now; move ``last_seen`` forward (never back)."""
        if seen:
            conn.execute(self._touch, [{"device_id": d, "first_seen": t, "last_seen": t}
                                       for d, t in sorted(seen.items())])  # sorted: no PG deadlocks

    def apply_statuses(self, conn: Connection, statuses: Mapping[str, tuple[Status, float]]) -> None:
        """Upsert device status (state, model, outbox depth, last error) from status messages.

        A status without model fields (the last will) keeps the model (and drift) last reported.
        """
        if statuses:
            conn.execute(self._status, [
                {"device_id": d, "first_seen": t, "last_seen": t, "state": s.state, "model_name": s.model_name,
                 "model_version": s.model_version, "model_sha256": s.model_sha256,
                 "outbox_depth": s.outbox_depth, "last_error": s.last_error, "status_ts": s.ts,
                 "drift_psi": s.drift_psi, "mean_confidence": s.mean_confidence}
                for d, (s, t) in sorted(statuses.items())
            ])

    def insert_dead_letters(self, conn: Connection, letters: Sequence[Mapping[str, Any]]) -> int:
        """Insert dead letters built with :func:`dead_letter`."""
        if letters:
            conn.execute(dead_letters.insert(), list(letters))
        return len(letters)

    def write(self, conn: Connection, batch: Batch) -> Written:
        """Everything of one batch, in the caller's transaction."""
        new = self.insert_results(conn, batch.rows)
        self.touch_devices(conn, batch.seen)
        self.apply_statuses(conn, batch.statuses)
        dead = self.insert_dead_letters(conn, batch.dead)
        return Written(new=new, duplicates=len(batch.rows) - new, dead=dead)

    def stored_before(self, conn: Connection, rows: Sequence[ResultRow]) -> set[tuple[str, int]]:
        """The keys of result ``rows`` just written (``ON CONFLICT DO NOTHING``) that an earlier write had
        stored: their stored ``received_at`` is not the row's. For receipts that tell a device its new
        results from its duplicates; only a batch mixing both needs it."""
        received: dict[str, dict[int, float]] = {}
        for row in rows:
            received.setdefault(row[DEVICE_ID], {})[row[SEQ]] = row[RECEIVED_AT]
        before: set[tuple[str, int]] = set()
        r = results.c
        for device, seqs in sorted(received.items()):
            keys = list(seqs)
            for i in range(0, len(keys), 500):  # bounded IN lists
                query = sa.select(r.seq, r.received_at).where(r.device_id == device, r.seq.in_(keys[i:i + 500]))
                before.update((device, seq) for seq, at in conn.execute(query) if at != seqs[seq])
        return before

    # ----------------------------------------------------------------- reads for the lifecycle and the CLI

    @staticmethod
    def _labelled() -> sa.ColumnElement[bool]:
        return sa.and_(results.c.features.is_not(None), results.c.truth.is_not(None))

    def max_labelled_id(self, conn: Connection) -> int:
        """The id of the newest result that carries features and ground truth (0 if none)."""
        return int(conn.execute(sa.select(sa.func.max(results.c.id)).where(self._labelled())).scalar() or 0)

    def count_labelled_after(self, conn: Connection, after_id: int) -> int:
        """Results with features and ground truth stored after the result ``after_id``."""
        return int(conn.execute(sa.select(sa.func.count()).select_from(results)
                                .where(self._labelled(), results.c.id > after_id)).scalar_one())

    def labelled_features(self, conn: Connection, versions: Sequence[int] | None = None
                          ) -> Iterator[tuple[str, str, bytes, float]]:
        """(device, truth, packed features, window start) of every labelled result, oldest first;
        only results of model ``versions`` when given."""
        r = results.c
        query = sa.select(r.device_id, r.truth, r.features, r.start).where(self._labelled()).order_by(r.id)
        if versions is not None:
            query = query.where(r.model_version.in_(list(versions)))
        for device, truth, blob, start in conn.execute(query):
            yield str(device), str(truth), bytes(blob), float(start)

    def dead_letters(self, conn: Connection, *, limit: int, since: float | None = None,
                     topics: Sequence[str] | None = None) -> tuple[int, list[dict[str, Any]]]:
        """How many dead letters match, and the newest ``limit`` of them (received at or after ``since``, on
        one of ``topics``), newest first: id, topic, reason, size, received_at and the kept payload bytes."""
        d = dead_letters.c
        where = [d.received_at >= since] if since is not None else []
        if topics is not None:
            where.append(d.topic.in_(list(topics)))
        total = int(conn.execute(sa.select(sa.func.count()).select_from(dead_letters).where(*where)).scalar_one())
        query = (sa.select(d.id, d.topic, d.reason, d.size, d.received_at, d.payload).where(*where)
                 .order_by(d.received_at.desc(), d.id.desc()).limit(limit))
        return total, [{"id": int(row.id), "topic": str(row.topic), "reason": str(row.reason), "size": int(row.size),
                        "received_at": float(row.received_at), "payload": bytes(row.payload)}
                       for row in conn.execute(query)]

    def count_results(self, conn: Connection, by: str) -> dict[Any, int]:
        """Result counts grouped by a column: ``device_id`` or ``model_version``."""
        column = results.c[by]
        return {k: int(n) for k, n in conn.execute(sa.select(column, sa.func.count()).group_by(column))}

    def devices_by_model(self, conn: Connection) -> list[tuple[str | None, int | None, str, int]]:
        """(model name, model version, state, devices) as the devices last reported."""
        d = devices.c
        return [(m, v, s, int(n)) for m, v, s, n in conn.execute(
            sa.select(d.model_name, d.model_version, d.state, sa.func.count())
            .group_by(d.model_name, d.model_version, d.state))]

    def running_other_models(self, conn: Connection, name: str) -> set[str]:
        """The devices whose last status named a model other than ``name``: a version number is a model's own,
        so their results at the same number are another model's. Results carry no model name: a device that
        changed models has all its results taken as its last status's model's."""
        d = devices.c
        return set(conn.scalars(sa.select(d.device_id).where(d.model_name.is_not(None), d.model_name != name)))

    def outbox_total(self, conn: Connection) -> int:
        """Results the devices said they still hold (the sum of their last reported outbox depth)."""
        # summed as a float: one device stating 2**63 - 1 overflowed SQLite's integer SUM, and every fleet gauge
        # of /metrics went with it
        total = sa.func.sum(sa.cast(devices.c.outbox_depth, sa.Float))
        return int(conn.execute(sa.select(sa.func.coalesce(total, 0))).scalar_one())

    def device_rows(self, conn: Connection) -> dict[str, Mapping[str, Any]]:
        """Every device's row (status fields), by id."""
        return {str(r["device_id"]): dict(r) for r in conn.execute(sa.select(devices)).mappings()}

    # ----------------------------------------------------------------- model registry

    def add_model(self, conn: Connection, *, name: str, version: int, sha256: str, manifest: Mapping[str, Any],
                  created: float, bundle: bytes | None = None, metrics: Mapping[str, Any] | None = None,
                  state: str = "candidate", weights: bytes | None = None) -> None:
        """Register a model version; :class:`ModelExists` if (name, version) is taken."""
        _check_state(state)
        stmt = (_INSERTS[self.dialect](models).on_conflict_do_nothing(index_elements=["name", "version"])
                .returning(models.c.id))
        row = {"name": name, "version": version, "created": created, "sha256": sha256,
               "manifest": orjson.dumps(dict(manifest)).decode(), "bundle": bundle, "weights": weights,
               "metrics": None if metrics is None else orjson.dumps(dict(metrics)).decode(), "state": state,
               "published_at": created if state == "published" else None}
        if conn.execute(stmt, row).first() is None:  # rowcount is unreliable with RETURNING
            raise ModelExists(f"model {name} version {version} is already registered")

    def set_model_state(self, conn: Connection, name: str, version: int, state: str, *,
                        at: float | None = None) -> bool:
        """Move a model to ``state`` (``published`` also records ``at``); False if there is no such model."""
        _check_state(state)
        values: dict[str, Any] = {"state": state}
        if state == "published":
            values["published_at"] = at
        stmt = models.update().where(models.c.name == name, models.c.version == version).values(values)
        return conn.execute(stmt).rowcount == 1

    def get_model(self, conn: Connection, name: str, version: int | None = None) -> ModelRow | None:
        """One version of a model, or its highest version when ``version`` is None."""
        query = sa.select(*_MODEL_COLUMNS).where(models.c.name == name)
        query = query.where(models.c.version == version) if version is not None else query
        row = conn.execute(query.order_by(models.c.version.desc()).limit(1)).mappings().first()
        return None if row is None else _model_row(row)

    def get_weights(self, conn: Connection, name: str, version: int) -> bytes | None:
        """The training weights stored with a model version (None if there are none)."""
        blob = conn.execute(sa.select(models.c.weights).where(models.c.name == name, models.c.version == version)
                            ).scalar_one_or_none()
        return None if blob is None else bytes(blob)

    def list_models(self, conn: Connection, name: str | None = None) -> list[ModelRow]:
        """Every registered version (without weights), by name then version."""
        query = sa.select(*_MODEL_COLUMNS).order_by(models.c.name, models.c.version)
        if name is not None:
            query = query.where(models.c.name == name)
        return [_model_row(r) for r in conn.execute(query).mappings()]


    # ----------------------------------------------------------------- rollouts and events

    def add_rollout(self, conn: Connection, *, name: str, version: int, previous: int | None,
                    cohort: Sequence[str], min_results: int, tolerance: float, at: float) -> int:
        row = {"model_name": name, "version": version, "previous_version": previous,
               "cohort": orjson.dumps(list(cohort)).decode(), "state": "canary", "min_results": min_results,
               "tolerance": tolerance, "started_at": at}
        return int(conn.execute(rollouts.insert().values(row).returning(rollouts.c.id)).scalar_one())

    def rollouts(self, conn: Connection, name: str, *, state: str | None = None) -> list[RolloutRow]:
        """The rollouts of a model, newest first (``state``: only those in it)."""
        query = sa.select(rollouts).where(rollouts.c.model_name == name).order_by(rollouts.c.id.desc())
        if state is not None:
            query = query.where(rollouts.c.state == state)
        return [RolloutRow(r["id"], r["model_name"], r["version"], r["previous_version"],
                           tuple(orjson.loads(r["cohort"])), r["state"], r["min_results"], r["tolerance"],
                           r["started_at"], r["ended_at"], r["reason"]) for r in conn.execute(query).mappings()]

    def end_rollout(self, conn: Connection, rollout_id: int, state: str, reason: str, at: float) -> bool:
        """Close a canary rollout (promoted or rolled back); False when it was no longer a canary."""
        stmt = (rollouts.update().where(rollouts.c.id == rollout_id, rollouts.c.state == "canary")
                .values(state=state, reason=reason[:2000], ended_at=at))
        return conn.execute(stmt).rowcount == 1

    def add_event(self, conn: Connection, kind: str, name: str | None, version: int | None,
                  detail: Mapping[str, Any], at: float) -> None:
        conn.execute(events.insert().values(ts=at, kind=kind, model_name=name, version=version,
                                            detail=orjson.dumps(dict(detail)).decode()))

    def events(self, conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
        query = sa.select(events).order_by(events.c.id.desc()).limit(limit)
        return [{"ts": r["ts"], "kind": r["kind"], "model": r["model_name"], "version": r["version"],
                 **orjson.loads(r["detail"])} for r in conn.execute(query).mappings()]

    def canary_results(self, conn: Connection, versions: Sequence[int], since: float
                       ) -> list[tuple[str, int, str | None, str | None, float | None, str | None]]:
        """(device, version, label, truth, confidence, value) of the results of ``versions`` received
        since ``since``: what a canary is judged on."""
        r = results.c
        query = sa.select(r.device_id, r.model_version, r.label, r.truth, r.confidence, r.value).where(
            r.model_version.in_(list(versions)), r.received_at >= since).order_by(r.device_id, r.seq)
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]

    def history_of(self, conn: Connection, version: int, devices: Sequence[str], per_device: int
                   ) -> list[tuple[str, int, str | None, str | None, float | None, str | None]]:
        """Each of ``devices``' latest ``per_device`` results on ``version``, whenever received, in each
        device's own order: a canary device's baseline."""
        r = results.c
        rank = sa.func.row_number().over(partition_by=r.device_id, order_by=r.seq.desc()).label("rank")
        inner = (sa.select(r.device_id, r.seq, r.model_version, r.label, r.truth, r.confidence, r.value, rank)
                 .where(r.model_version == version, r.device_id.in_(list(devices))).subquery())
        i = inner.c
        query = (sa.select(i.device_id, i.model_version, i.label, i.truth, i.confidence, i.value)
                 .where(i.rank <= per_device).order_by(i.device_id, i.seq))
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class RolloutRow:
    id: int
    name: str
    version: int
    previous: int | None
    cohort: tuple[str, ...]
    state: str
    min_results: int
    tolerance: float
    started_at: float
    ended_at: float | None
    reason: str | None


def _copy(cur: Any, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    with cur.copy(f"COPY {table} ({_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_PG_TYPES)
        for r in rows:
            copy.write_row(r)


def dead_letter(topic: str, payload: bytes, reason: str, received_at: float, max_bytes: int) -> dict[str, Any]:
    """A dead-letter row: the payload cut to ``max_bytes``, its full size, and why it was refused."""
    return {"topic": topic[:1024], "payload": bytes(payload[:max_bytes]), "size": len(payload),
            "reason": reason[:2000], "received_at": received_at}


def _check_state(state: str) -> None:
    if state not in MODEL_STATES:
        raise ValueError(f"model state must be one of {', '.join(MODEL_STATES)}, got {state!r}")


def _model_row(row: Mapping[Any, Any]) -> ModelRow:
    return ModelRow(
        name=row["name"], version=row["version"], created=row["created"], sha256=row["sha256"],
        manifest=orjson.loads(row["manifest"]), bundle=None if row["bundle"] is None else bytes(row["bundle"]),
        metrics=None if row["metrics"] is None else orjson.loads(row["metrics"]), state=row["state"],
        published_at=row["published_at"],
    )
