"""Retraining while ``serve`` runs: after N new labelled windows, or on a schedule.

Each round is ``cloud-hub retrain`` (warm start, hold-out gate); a version that passes the gate is
published when ``auto_publish`` is on and a signing key is configured. Rows are counted from the
moment ``serve`` started (a restarted hub does not retrain at once on old data).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa

from cloud_hub.data.store import Store
from cloud_hub.settings import HubSettings

if TYPE_CHECKING:
    from cloud_hub.models import (
        lifecycle,  # The training stack (scikit-learn, skl2onnx, onnx quantization) is imported on the first retrain,
    )
# not at start: a `serve` worker that never retrains does not carry it (~60 MB of RSS).

log = logging.getLogger(__name__)


class AutoRetrainer:
    """A background thread that decides when to retrain; :meth:`check` is one decision."""

    def __init__(self, settings: HubSettings, engine: sa.Engine, *, check_s: float = 5.0) -> None:
        self.settings = settings
        self.engine = engine
        self.check_s = check_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auto-retrain", daemon=True)
        self.store = Store(engine)
        self._watermark = self._max_labelled_id()
        self._last = time.monotonic()
        self.rounds = 0

    @property
    def enabled(self) -> bool:
        return self.settings.retrain_every_n > 0 or self.settings.retrain_interval_s > 0

    def _max_labelled_id(self) -> int:
        with self.engine.connect() as conn:
            return self.store.max_labelled_id(conn)

    def new_labelled(self) -> int:
        with self.engine.connect() as conn:
            return self.store.count_labelled_after(conn, self._watermark)

    def check(self) -> lifecycle.Outcome | None:
        """Retrain if due; returns the outcome of the round, or None."""
        s = self.settings
        fresh = self.new_labelled()
        due_n = s.retrain_every_n > 0 and fresh >= s.retrain_every_n
        due_t = s.retrain_interval_s > 0 and fresh > 0 and time.monotonic() - self._last >= s.retrain_interval_s
        if not (due_n or due_t):
            return None
        self._watermark = self._max_labelled_id()
        self._last = time.monotonic()
        self.rounds += 1
        from cloud_hub.models import lifecycle
        from cloud_hub.rollout import publish as rollout
        try:
            outcome = lifecycle.retrain(self.engine, name=s.model_name, tolerance=s.retrain_tolerance)
        except lifecycle.LifecycleError as exc:
            log.warning("auto-retrain skipped: %s", exc)
            return None
        log.info("auto-retrain after %d new labelled windows: v%d %s (%s)", fresh, outcome.version,
                 outcome.state, outcome.gate)
        if outcome.state == "publishable" and s.auto_publish:
            if not s.signing_key:
                log.warning("auto_publish is on but no signing_key is configured: v%d not published", outcome.version)
            else:
                try:
                    rollout.publish(self.engine, s, version=outcome.version)
                except lifecycle.LifecycleError as exc:  # e.g. a canary is open: v stays publishable, said why
                    log.warning("auto_publish: v%d not published: %s (`cloud-hub publish --version %d` later)",
                                outcome.version, exc, outcome.version)
                    return outcome
                log.info("auto-published v%d", outcome.version)
        return outcome

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.check()
            except Exception:  # the outer loop of a background job: log and keep serving
                log.exception("auto-retrain failed")
