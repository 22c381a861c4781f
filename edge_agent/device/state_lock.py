"""One agent per state directory: the outbox, the model and the session file of a state dir belong to the
process that holds its lock.

Two agents on one state dir (a second ``edge-agent run`` under the same config, two replays left on the
default state dir of one broker and prefix) shared the outbox: each counted its depth from what it had
written itself (one reported -3 results), each waited for the other's receipts, and with one device id
both knocked each other off the broker. The second is now refused at start (exit 2) with the folder and
the pid of the first.

The lock is ``flock`` on ``agent.lock`` in the folder: the kernel drops it when the holder exits however it
ends (SIGKILL, a power cut's reboot), so a stale file never blocks a restart. The file keeps the holder's
pid for the message; it is not removed at exit (removing it would race with a starting agent).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from edge_agent import exits

LOCK_FILE = "agent.lock"
log = logging.getLogger(__name__)


class StateDirInUse(exits.Failure, RuntimeError):
    """Another running agent holds the state dir."""

    exit_code = exits.USAGE


class StateLock:
    """Holds ``state/agent.lock`` until :meth:`release` (or the process's end)."""

    def __init__(self, state: Path) -> None:
        self.path = state / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirInUse(f"state dir {state} is in use by another edge-agent (pid {holder}): give each "
                                "agent its own --state-dir (state_dir, EDGE_AGENT_STATE_DIR)") from None
        except OSError as exc:  # no locks here (NFS without a lock manager: ENOLCK): run, and say what is lost
            log.warning("cannot lock %s (%s): a second agent on this state dir would not be stopped", self.path,
                        exc.strerror or exc)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
