"""A device's answers to federated rounds, kept until the hub's receipt (:mod:`edge_agent.contract.answers`).

Each answer (a training update, an evaluation) is written to ``state_dir/answers-<model>/`` before it is handed
to MQTT, and sent again until the hub says it committed a verdict on it, as results wait in the outbox for
theirs: a crash before the PUBACK, a broker that forgets everything or a ``federate`` that was not listening
loses nothing. The waits double from ``first_s`` to ``max_s``; each copy expires at the broker once the next one
is due (MQTT 5's message expiry: the ``expiry_s`` of :meth:`PendingAnswers.put` and :meth:`~PendingAnswers.due`), so a ``federate`` that is down, its session
kept, finds one or two copies queued, not one per wait. An answer still unreceipted after ``max_age_s`` (no
``federate`` ran for that long: its round is long over) is dropped and logged. At most ``capacity`` are kept.

Files are written whole (a temporary file, fsync, rename), named ``<round>-<kind>-<sha256>.bin``: the hub names
an answer by the sha256 of its payload. A secure round's answers are not kept: its protocol is live (a device
that restarts has lost its secrets and drops out of the round; a lost masked vector is a dropout).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class PendingAnswers:
    def __init__(self, directory: Path, *, first_s: float = 5.0, max_s: float = 300.0, max_age_s: float = 86_400.0,
                 capacity: int = 32) -> None:
        self.dir, self.first_s, self.max_s, self.max_age_s, self.capacity = directory, first_s, max_s, max_age_s, capacity
        self._due: dict[str, tuple[float, float]] = {}  # file name -> (when it is sent again, the wait after that)
        self._lock = threading.Lock()
        self.resent = 0
        self.first_expiry_s = 2 * first_s  # the first copy may wait at the broker until the first resend, and more
        for path in self._files():  # kept by an earlier run: sent again at once
            self._due[path.name] = (0.0, first_s)

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.glob("*.bin") if p.is_file())
        except OSError:
            return []

    def put(self, round_id: int, kind: str, payload: bytes) -> str:
        """Keep ``payload`` (before it is published); returns its sha256. An OSError (a full disk) is logged: the
        answer is then sent once, as before answers were kept. Its first copy's expiry: :attr:`first_expiry_s`."""
        digest = hashlib.sha256(payload).hexdigest()
        name = f"{round_id:08d}-{kind}-{digest}.bin"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / (name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except OSError as exc:
            log.warning("round %d: cannot keep the %s answer until the hub's receipt (%s): it is sent once", round_id,
                        kind, exc)
            return digest
        with self._lock:
            self._due[name] = (time.monotonic() + self.first_s, min(2 * self.first_s, self.max_s))
        for old in self._files()[:-self.capacity]:
            log.warning("dropping the unreceipted answer %s: more than %d answers wait for receipts", old.name,
                        self.capacity)
            self._forget(old)
        return digest

    def due(self) -> list[tuple[str, bytes, float]]:
        """(file name, payload, expiry_s) of the answers to send again now; their next wait doubles, and the copy
        may wait at the broker until the next one is due (and a first wait more)."""
        now, out = time.monotonic(), []
        with self._lock:
            names = [n for n, (when, _) in self._due.items() if when <= now]
        for name in names:
            path = self.dir / name
            try:
                if time.time() - path.stat().st_mtime > self.max_age_s:
                    log.warning("dropping the answer %s: no receipt from the hub in %.0f h", name, self.max_age_s / 3600)
                    self._forget(path)
                    continue
                payload = path.read_bytes()
            except OSError:
                with self._lock:
                    self._due.pop(name, None)
                continue
            with self._lock:
                wait = self._due.get(name, (0.0, self.first_s))[1]
                self._due[name] = (now + wait, min(2 * wait, self.max_s))
            out.append((name, payload, wait + self.first_s))
        self.resent += len(out)
        return out

    def done(self, digest: str) -> bool:
        """The hub's receipt for the answer whose payload has sha256 ``digest``: forgotten. True if it was held."""
        held = [p for p in self._files() if p.name.endswith(f"-{digest}.bin")]
        for path in held:
            self._forget(path)
        return bool(held)

    def held(self) -> int:
        return len(self._files())

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._due.pop(path.name, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete the receipted answer %s: %s", path, exc)


__all__ = ["PendingAnswers"]
