"""The outbox's room on a full disk: the reserve file, the WAL's checkpoints, the room left for new rows.

:class:`DiskRoom` is what :class:`~edge_agent.device.outbox.Outbox` knows about the disk under it (the
rules are in the outbox's module doc): a reserve file (``outbox.reserve``) deleted when the disk is full, so
that SQLite can still checkpoint its WAL and delete rows; :attr:`DiskRoom.full`, the reason, while new rows
go only into the pages the file has and the disk's room above half the reserve; and the checkpoints that
replace SQLite's automatic one, so that a failed COMMIT always means the transaction did not happen. Apart
from the outbox because it changes with the disk's rules, not with the rows'. Every method is called with
the outbox's lock held, on the outbox's connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from pathlib import Path

RESERVE_BYTES = 4 << 20  # the reserve file: room for a checkpoint and the deletes on a full disk
_CHECKPOINT_BYTES = 1 << 20  # about this much written to the WAL between checkpoints (SQLite's own: ~4 MiB)
_RESERVE_RETRY_S = 1.0  # a full disk: try to make the reserve again (space came back?) this often


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL or an OSError ENOSPC/EDQUOT: the device's disk (or quota) is full."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskRoom:
    """The room of the outbox at ``path`` (its SQLite connection ``db``) and its reserve file."""

    def __init__(self, db: sqlite3.Connection, path: Path, reserve_bytes: int = RESERVE_BYTES) -> None:
        self._db = db
        self.path = path
        self.reserve = path.with_name(path.stem + ".reserve")
        self.reserve_bytes = reserve_bytes
        self._page = int(db.execute("PRAGMA page_size").fetchone()[0])
        self.full: str | None = None  # a full disk: the reason
        self._next_reserve = 0.0
        self._wal_bytes = 0  # written to the WAL since the last checkpoint (an estimate)

    def free_bytes(self) -> int:
        """Room in the pages the file already has (what deleted rows left)."""
        return int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * self._page

    def disk_free(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def room_bytes(self) -> int:
        """Room for new rows while the disk is full: the file's free pages, and the disk's free space above
        half the reserve (the rest stays for checkpoints and deletes)."""
        return self.free_bytes() + max(self.disk_free() - self.reserve_bytes // 2, 0)

    def relieve(self, exc: BaseException) -> None:
        """The disk is full: free the reserve's room so that SQLite can checkpoint (its WAL is then written
        over from its start, in the room it has), and keep new rows in the pages the file has from now on."""
        if self.full is None:
            self.full = str(exc) or type(exc).__name__
        self._next_reserve = time.monotonic() + _RESERVE_RETRY_S
        with contextlib.suppress(OSError):  # FileNotFoundError: already given
            self.reserve.unlink()
        self.checkpoint()

    def recover(self) -> None:
        """While the disk is full: has space come back? Yes once the disk has room for the reserve twice
        over and the reserve is made again."""
        now = time.monotonic()
        if now < self._next_reserve:
            return
        self._next_reserve = now + _RESERVE_RETRY_S
        # Room for the reserve and as much again: else the room the outbox kept for itself would end
        # the state at once, and the next rows would fill the disk again.
        if self.disk_free() >= 2 * self.reserve_bytes and self.checkpoint() and self.make_reserve():
            self.full = None

    def make_reserve(self) -> bool:
        """Make the reserve file (allocated, not sparse); False when the disk has no room for it."""
        if self.reserve_bytes <= 0:
            return True
        try:
            if self.reserve.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    block = bytes(64 << 10)
                    for _ in range(0, self.reserve_bytes, len(block)):
                        os.write(fd, block)
            finally:
                os.close(fd)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve.unlink()
            return False

    def checkpoint(self) -> bool:
        """Copy the WAL into the file (its room is then written over from the start); True if complete."""
        try:
            busy, frames, done = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            return False
        complete = not busy and frames == done
        if complete:
            self._wal_bytes = 0
        return bool(complete)

    def wrote(self, n: int) -> None:
        """About ``n`` bytes went to the WAL: a checkpoint once about 1 MiB has."""
        self._wal_bytes += n
        if self._wal_bytes >= _CHECKPOINT_BYTES:
            self.checkpoint()
