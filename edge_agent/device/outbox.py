"""The durable on-device outbox: results are written here before they are published.

A row goes pending -> sent (the broker's PUBACK) -> receipted by the hub (deleted). The broker's
PUBACK only says the broker has the message, and a broker keeps queued messages in memory between
autosaves; so a sent row stays here, with a time ``due`` at which it is sent again unless the hub's
receipt (its word that the row is committed) deletes it first. The wait doubles with each attempt
(bounded), so a hub that is down for hours does not get every row queued again every few seconds.
A crash, a reboot, a broker that forgets everything or a hub outage loses nothing: whatever is
still here is sent again, and the hub ignores duplicates by key. (Without a hub, ``receipts=False``
in the publisher deletes rows at the PUBACK.)

* SQLite in WAL mode with ``synchronous=NORMAL``: a committed row survives a crash of the agent
  process; on sudden power loss the last transaction may be lost (set ``durable=True`` for FULL
  sync at the cost of an fsync per transaction).
* The key (device_id, seq) is unique: re-producing a result that is still pending is a no-op.
* Bounded: at most ``max_rows`` rows, pending and unreceipted alike. Overflow policy
  ``drop_oldest`` deletes the oldest rows that are not in flight to make room and counts them
  (reported in the device status: never silent); ``block`` makes :meth:`put` wait until receipts
  have freed room (back-pressure on the source).
* A full disk (SQLITE_FULL) is survived, not corrupting anything: a failed transaction is rolled
  back by SQLite and nothing of it stays. The outbox keeps a reserve file (``outbox.reserve``,
  4 MiB) that it deletes when the disk is full, so that SQLite can still checkpoint its WAL, delete
  receipted rows and drop old ones; from then on (until the reserve can be made again: space came
  back) new results go only into the pages the file already has and the disk's room above half the
  reserve: ``drop_oldest`` drops the oldest
  rows not in flight to make room (counted as dropped, as for ``max_rows``), ``block`` waits for
  receipts to free room or for space to come back. Results that cannot be kept either way are
  counted (:attr:`Outbox.unstored`), never raised to the pipeline. SQLite's automatic checkpoint is
  replaced by the outbox's own (after about 1 MiB written), so that a failed COMMIT always means
  the transaction did not happen. The disk's side of this (the reserve, the checkpoints, the room
  left) is :class:`~edge_agent.device.disk_room.DiskRoom`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.device.disk_room import RESERVE_BYTES, DiskRoom, is_disk_full
from edge_agent.settings.loader import SettingsError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL,
    due REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS binding (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# ``due`` is NULL while a row is pending (never sent, or taken for sending again) and the time to send
# it again once the broker acknowledged it; ``attempts`` counts those acknowledgements.
_UPGRADE = ("ALTER TABLE outbox ADD COLUMN due REAL",
            "ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
_INDEX = "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due) WHERE due IS NOT NULL"
_MAX_DOUBLINGS = 20
_CHUNK = 500  # ids or seqs per statement (SQLite allows 32,766 parameters)
_ROW_BYTES = 96  # what a row costs in pages beyond its payload (record header, the two indexes), roughly
_FULL_WAIT_S = 1.0  # block on a full disk: look again this often (a receipt wakes it at once)


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class OutboxFull(RuntimeError):
    """``block`` policy: no room appeared before the timeout."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    device_id: str
    seq: int
    created: float
    payload: bytes


class Outbox:
    """Thread-safe durable queue of encoded results (one SQLite connection, one lock)."""

    def __init__(self, path: str | Path, *, max_rows: int = 200_000, overflow: str = "drop_oldest",
                 durable: bool = False, resend_after_s: float = 60.0, resend_max_s: float = 300.0,
                 reserve_bytes: int = RESERVE_BYTES) -> None:
        if overflow not in ("drop_oldest", "block"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.overflow = overflow
        self.resend_after_s = resend_after_s
        self.resend_max_s = max(resend_max_s, resend_after_s)
        self.unstored = 0  # results this process could not keep at all (a full disk), counted, never raised
        self.on_wait: Callable[[], None] | None = None  # called about every second while put waits on a full disk
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:  # a read-only or unreadable file, not a database: the operator's to fix
            raise SettingsError(f"cannot open the outbox {self.path}: {exc} (check the file and its folder: the "
                                "agent must read and write both)", field="state_dir") from None
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # ours: a COMMIT's error then means it did not happen
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._lock = threading.Lock()
        self._disk = DiskRoom(self._db, self.path, reserve_bytes)

        def prepare() -> None:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would COMMIT first
                self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
            if "due" not in columns:  # an outbox written before receipts: every row is pending
                for statement in _UPGRADE:
                    self._db.execute(statement)
            self._db.execute(_INDEX)
            # A new process sends every row again, unreceipted ones included: the broker may have lost them.
            self._db.execute("UPDATE outbox SET due = NULL WHERE due IS NOT NULL")

        self._write(prepare)
        if not self._disk.make_reserve():
            self._disk.full = f"no room for the reserve file {self._disk.reserve}"
        self._room = threading.Condition(self._lock)
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        # Rows with id <= floor and no ``due`` are held or in flight in the publisher: overflow never
        # drops those (it drops the oldest unsent rows above the floor or unreceipted rows). Raised by
        # pending(hold=True) under the lock: a put on another thread sees it before the rows go out.
        self.floor = 0
        self.dropped = self._meta("dropped")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def full(self) -> str | None:
        """A full disk: the reason, while new results go only into pages the file has (see the module doc)."""
        return self._disk.full

    @property
    def depth(self) -> int:
        """Results written and not yet receipted by the hub (pending and sent alike)."""
        return self._depth

    def bind(self, target: str) -> str | None:
        """Tie the rows to where they go (broker and prefix). Returns the other target when rows made
        for it are still here (the caller refuses to send them elsewhere), else None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM binding WHERE key = 'target'").fetchone()
            if row is not None and row[0] != target and self._depth > 0:
                return str(row[0])
            self._write(lambda: self._db.execute("INSERT OR REPLACE INTO binding VALUES ('target', ?)", (target,)))
            return None

    def depth_of(self, device_id: str) -> int:
        """Rows of one device (a replay of many devices shares one outbox)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE device_id = ?", (device_id,)).fetchone()[0])

    def wait_empty(self, timeout: float) -> bool:
        """Block until no row is left (every one receipted) or ``timeout`` passes; True if empty."""
        with self._lock:
            return self._room.wait_for(lambda: self._depth <= 0, timeout)

    def put(self, device_id: str, rows: Sequence[tuple[int, bytes]], *, timeout: float | None = None) -> int:
        """Store results ``(seq, payload)`` of one device in one transaction; returns how many were new."""
        return self.put_many([(device_id, seq, payload) for seq, payload in rows], timeout=timeout)

    def put_many(self, rows: Sequence[tuple[str, int, bytes]], *, timeout: float | None = None) -> int:
        """Store results ``(device_id, seq, payload)`` in one transaction; returns how many were new.

        On a full disk ``drop_oldest`` drops the oldest rows not in flight to make room and tries again;
        what still does not fit is counted in :attr:`unstored` (0 returned, nothing raised). ``block``
        waits, calling :attr:`on_wait` about every second, until receipts free room or space comes back
        (:class:`OutboxFull` after ``timeout``)."""
        if not rows:
            return 0
        now = time.time()
        need = sum(len(payload) + _ROW_BYTES for _, _, payload in rows)
        deadline = None if timeout is None else time.monotonic() + timeout
        drops, waits, retried = 0, 0, False
        while True:
            with self._lock:
                if self.overflow == "block" and not self._room.wait_for(
                    lambda: self._depth + len(rows) <= max(self.max_rows, len(rows)), _left(deadline)
                ):
                    raise OutboxFull(f"outbox holds {self._depth} results (max {self.max_rows})")
                disk = self._disk
                if disk.full is not None:
                    disk.recover()
                if disk.full is None or disk.room_bytes() >= need:
                    try:
                        return self._insert(rows, now, need)
                    except sqlite3.OperationalError as exc:
                        if not is_disk_full(exc):
                            raise
                        disk.relieve(exc)
                    if not retried and disk.room_bytes() >= need:  # once more, in the reserve's room
                        retried = True
                        continue
                if self.overflow == "drop_oldest":
                    if drops < 4 and self._drop_for(need << drops):
                        drops += 1
                        continue
                    if waits < 2 and self._depth > 0:  # rows in flight become droppable once acknowledged
                        waits += 1
                        self._room.wait(_FULL_WAIT_S)
                        continue
                    self.unstored += len(rows)
                    return 0
                left = _left(deadline)
                if left is not None and left <= 0:
                    raise OutboxFull(f"the disk of {self.path.parent} is full ({self.full})")
                self._room.wait(_FULL_WAIT_S if left is None else min(_FULL_WAIT_S, left))
            if self.on_wait is not None:  # outside the lock: it may read the outbox
                self.on_wait()

    def _insert(self, rows: Sequence[tuple[str, int, bytes]], now: float, need: int) -> int:
        """put_many's transaction (lock held): the rows, and the room ``max_rows`` leaves (drop_oldest)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox (device_id, seq, created, payload) VALUES (?, ?, ?, ?)",
                [(device_id, seq, now, payload) for device_id, seq, payload in rows],
            )
            added = self._db.total_changes - before
            excess = self._depth + added - self.max_rows
            if excess > 0:  # only reachable with drop_oldest
                before = self._db.total_changes
                self._db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE id > ? OR due IS NOT NULL "
                    "ORDER BY id LIMIT ?)",
                    (self.floor, excess),
                )
                excess = self._db.total_changes - before
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped + excess,))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL)
                self._db.execute("ROLLBACK")
            raise
        self.dropped += max(excess, 0)
        self._depth += added - max(excess, 0)  # may exceed max_rows by what is in flight
        self._disk.wrote(need)
        return added

    # ----------------------------------------------------------------- a full disk (lock held)

    def _drop_for(self, need: int) -> bool:
        """drop_oldest on a full disk: delete the oldest rows not in flight until the file's free pages hold
        about ``need`` bytes, counted as dropped; False when nothing could be dropped."""
        want = max(need - self._disk.room_bytes(), 1)
        ids: list[int] = []
        freed = 0
        for row_id, size in self._db.execute(
                "SELECT id, length(payload) FROM outbox WHERE id > ? OR due IS NOT NULL ORDER BY id", (self.floor,)):
            if freed >= want:
                break
            ids.append(row_id)
            freed += size + _ROW_BYTES
        if not ids:
            return False
        chunks = [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
        gone = 0

        def drop() -> None:
            nonlocal gone
            before = self._db.total_changes
            for c in chunks:
                self._db.execute(f"DELETE FROM outbox WHERE id IN ({_marks(len(c))})", c)
            gone = self._db.total_changes - before
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped + gone,))

        try:
            self._write(drop)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            return False
        self.dropped += gone
        self._depth -= gone
        self._disk.checkpoint()  # the WAL is written over from its start: no new room needed for it
        return gone > 0

    def check_space(self) -> None:
        """While the disk is full (:attr:`full`): look whether space came back (at most once a second)."""
        if self._disk.full is not None:
            with self._lock:
                self._disk.recover()

    def pending(self, after_id: int, limit: int, *, hold: bool = False) -> list[OutboxRow]:
        """OutboxRow rows with id > ``after_id``, oldest first; ``hold``: the caller sends them, so
        overflow must not drop them (the floor rises to the last one, in the same locked step)."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, device_id, seq, created, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            rows = [OutboxRow(*row) for row in cur]
            if hold and rows:
                self.floor = max(self.floor, rows[-1].id)
            return rows

    def delete(self, ids: Sequence[int]) -> int:
        """Forget rows by id (delivered without receipts, or unsendable); returns how many were here."""
        return self._remove("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def confirm(self, device_id: str, seqs: Sequence[int]) -> int:
        """Forget the rows the hub has committed (a receipt); returns how many were still here."""
        params = [[device_id, *seqs[i:i + _CHUNK]] for i in range(0, len(seqs), _CHUNK)]
        return self._remove(lambda p: f"DELETE FROM outbox WHERE device_id = ? AND seq IN ({_marks(len(p) - 1)})",
                            params)

    def confirm_runs(self, device_id: str, runs: Sequence[tuple[int, int, int]]) -> int:
        """:meth:`confirm` of a receipt's runs ``(first, step, count)``: one ranged DELETE a run, whatever its
        count. Expanding them first cost a core for 30 s on 200 forged receipts of a million seqs each (a hostile
        peer's finding); a range costs what the outbox holds in it."""
        return self._remove("DELETE FROM outbox WHERE device_id = ? AND seq BETWEEN ? AND ? AND (seq - ?) % ? = 0",
                            [(device_id, first, first + step * (count - 1), first, step) for first, step, count in runs])

    def _remove(self, sql: str | Callable[[list[object]], str], params: Sequence[Sequence[object]]) -> int:
        if not params:
            return 0
        with self._lock:
            if isinstance(sql, str):
                removed = self._write(lambda: self._db.executemany(sql, params))
            else:
                removed = self._write(lambda: [self._db.execute(sql(list(p)), p) for p in params])
            self._depth -= removed
            self._room.notify_all()
            return removed

    def mark_sent(self, ids: Sequence[int], now: float | None = None) -> int:
        """The broker acknowledged these rows: send them again at ``due`` unless a receipt comes first."""
        if not ids:
            return 0
        now = time.time() if now is None else now
        head = (f"UPDATE outbox SET attempts = attempts + 1, due = ? + MIN(?, ? * (1 << MIN(attempts, {_MAX_DOUBLINGS}))) "
                "WHERE due IS NULL AND id IN ")
        chunks = [list(ids[i:i + _CHUNK]) for i in range(0, len(ids), _CHUNK)]
        with self._lock:
            return self._write(lambda: [self._db.execute(f"{head}({_marks(len(c))})",
                                                         [now, self.resend_max_s, self.resend_after_s, *c])
                                        for c in chunks])

    def take_due(self, limit: int, now: float | None = None) -> list[OutboxRow]:
        """Unreceipted rows whose time to be sent again has come (oldest first), made pending again."""
        now = time.time() if now is None else now
        with self._lock:
            rows = [OutboxRow(*r) for r in self._db.execute(
                "SELECT id, device_id, seq, created, payload FROM outbox WHERE due IS NOT NULL AND due <= ? "
                "ORDER BY due, id LIMIT ?", (now, limit))]
            if rows:
                self._write(lambda: self._db.executemany("UPDATE outbox SET due = NULL WHERE id = ?",
                                                         [(r.id,) for r in rows]))
            return rows

    def resend_all(self) -> int:
        """Make every unreceipted row due now (after a reconnect: the broker may have lost them)."""
        with self._lock:
            return self._write(lambda: self._db.execute("UPDATE outbox SET due = 0 WHERE due IS NOT NULL"))

    def unreceipted(self) -> int:
        """Rows the broker acknowledged that still wait for their receipt."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE due IS NOT NULL").fetchone()[0])

    def _write(self, statement: Callable[[], object]) -> int:
        """Run one statement in its own transaction (lock held); returns the rows it changed. On a full
        disk the reserve's room is given to SQLite and the statement tried once more."""
        for attempt in (1, 2):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                statement()
                changed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                if attempt == 2 or not is_disk_full(exc):
                    raise
                self._disk.relieve(exc)
                continue
            self._disk.wrote(4096 + changed * _ROW_BYTES)
            return changed
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._db.close()
