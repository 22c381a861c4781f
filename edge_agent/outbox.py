"""The durable on-device outbox: results are written here before they are published.

A row leaves the outbox only when the broker acknowledged (PUBACK) the message that carried it, so
a crash, a reboot or a broker outage loses nothing: whatever is still here is sent again.

* SQLite in WAL mode with ``synchronous=NORMAL``: a committed row survives a crash of the agent
  process; on sudden power loss the last transaction may be lost (set ``durable=True`` for FULL
  sync at the cost of an fsync per transaction).
* The key (device_id, seq) is unique: re-producing a result that is still pending is a no-op.
* Bounded: at most ``max_rows`` pending rows. Overflow policy ``drop_oldest`` deletes the oldest
  pending rows to make room and counts them (reported in the device status: never silent);
  ``block`` makes :meth:`put` wait until the publisher has freed room (back-pressure on the source).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxFull(RuntimeError):
    """``block`` policy: no room appeared before the timeout."""


@dataclass(frozen=True, slots=True)
class Pending:
    id: int
    device_id: str
    seq: int
    created: float
    payload: bytes


class Outbox:
    """Thread-safe durable queue of encoded results (one SQLite connection, one lock)."""

    def __init__(self, path: str | Path, *, max_rows: int = 200_000, overflow: str = "drop_oldest",
                 durable: bool = False) -> None:
        if overflow not in ("drop_oldest", "block"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.overflow = overflow
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        # Rows with id <= floor are being sent (set by the publisher): overflow drops the oldest rows
        # above it, so what it counts as dropped really never left the device.
        self.floor = 0
        self.dropped = self._meta("dropped")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def depth(self) -> int:
        """Results written and not yet acknowledged by the broker."""
        return self._depth

    def put(self, device_id: str, rows: Sequence[tuple[int, bytes]], *, timeout: float | None = None) -> int:
        """Store results ``(seq, payload)`` of one device in one transaction; returns how many were new."""
        if not rows:
            return 0
        now = time.time()
        with self._lock:
            if self.overflow == "block" and not self._room.wait_for(
                lambda: self._depth + len(rows) <= max(self.max_rows, len(rows)), timeout
            ):
                raise OutboxFull(f"outbox holds {self._depth} results (max {self.max_rows})")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox (device_id, seq, created, payload) VALUES (?, ?, ?, ?)",
                    [(device_id, seq, now, payload) for seq, payload in rows],
                )
                added = self._db.total_changes - before
                excess = self._depth + added - self.max_rows
                if excess > 0:  # only reachable with drop_oldest
                    before = self._db.total_changes
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE id > ? ORDER BY id LIMIT ?)",
                        (self.floor, excess),
                    )
                    excess = self._db.total_changes - before
                    self.dropped += excess
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += added - max(excess, 0)  # may exceed max_rows by what is in flight
            return added

    def pending(self, after_id: int, limit: int) -> list[Pending]:
        """Pending rows with id > ``after_id``, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, device_id, seq, created, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            return [Pending(*row) for row in cur]

    def delete(self, ids: Sequence[int]) -> None:
        """Forget acknowledged rows."""
        if not ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth -= removed
            self._room.notify_all()

    def close(self) -> None:
        with self._lock:
            self._db.close()
