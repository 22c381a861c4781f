"""``cloud-hub serve``: one process that runs the ingest worker, the HTTP door (metrics and the live page),
the canary watcher and the periodic retrain, starts them together and stops them together on a signal."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

from cloud_hub.data.ingest import BrokerUnavailable, Hub, HubStats
from cloud_hub.data.sessions import sqlite_file
from cloud_hub.rollout.autoretrain import AutoRetrainer
from cloud_hub.rollout.canary import CanaryWatcher
from cloud_hub.settings import HubSettings, split_address
from edge_agent import exits
from edge_agent.settings.loader import SettingsError

log = logging.getLogger(__name__)

GC_GEN0 = 10_000
"""The youngest generation's threshold in a serving hub (CPython's default: 700). Each result's row
lives until its batch is committed, so at the default the collector ran every few hundred results, and
went through the older objects (SQLAlchemy's, paho's, the libraries') every tenth or hundredth time: 14 %
of the hub's CPU in ``bench/hub_ingest.py --db`` (3.3 against 2.85 µs a result with the collector off). At 10,000 it
costs as little as off, and the hub's peak memory is the same (103.2 against 103.8 MB in a SQLite run
of 400,000 results: what waits longer for the collector is young cyclic garbage, little of it)."""


def collect_less() -> None:
    """Raise the garbage collector's youngest threshold to :data:`GC_GEN0` (never lower it): for the
    process whose job is ingest (``serve``, and the bench that measures it)."""
    gen0, *older = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0), *older)


def serve(settings: HubSettings, *, stop: threading.Event | None = None,
          on_started: Callable[[Hub], None] | None = None) -> HubStats:
    """Run a hub until SIGTERM/SIGINT (or ``stop`` is set), then flush, commit, ack and disconnect."""
    stop = stop or threading.Event()
    collect_less()
    if settings.http:  # a taken port stops serve before it opens, or creates, the database
        _can_listen(settings.http)
    path = sqlite_file(settings.db)
    if path is not None and not path.exists():  # a first start, or a typo that would store the fleet elsewhere
        log.warning("creating a new database %s: no file was there (check db if the hub ran before)", path.resolve())
    hub = Hub(settings)
    restore = exits.on_stop_signals(lambda *_: stop.set())
    metrics = None
    try:
        # The HTTP door first: a port that is taken stops serve before it connects and stores anything.
        metrics = _serve_metrics(hub, settings.http) if settings.http else None
        if not hub.start(stop=stop):
            return hub.stats
        retrainer = AutoRetrainer(settings, hub.engine)
        retrainer.start()
        watcher = CanaryWatcher(settings, hub.engine)
        watcher.start()
        if on_started is not None:
            on_started(hub)
        while not stop.wait(1.0) and hub.link.fatal is None:
            pass
        retrainer.stop()
        watcher.stop()
        log.info("stopping: flushing %d queued messages", hub.backlog)
        hub.stop()
        if hub.link.fatal is not None:
            raise BrokerUnavailable(hub.link.fatal)
    finally:
        if metrics is not None:
            metrics.stop()
        restore()
    return hub.stats


def _can_listen(address: str) -> None:
    """SettingsError (exit 2, naming ``http``) when nothing can listen on ``address``: asked once, early."""
    import socket

    host, port = split_address(address)
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise SettingsError(f"http {address}: cannot listen ({exc.strerror or exc})", field="http") from exc


def _serve_metrics(hub: Hub, address: str) -> Any:
    """Prometheus metrics on ``address`` (host:port); the hub stops with one line if it cannot listen."""
    from cloud_hub.web.metrics import HubMetrics  # prometheus_client: only when asked for

    host, port = split_address(address)
    metrics = HubMetrics(hub)
    try:
        metrics.serve(host, port)
    except OSError as exc:  # a port taken or an address not of this host: a setting to change
        hub.stop(timeout=1.0, report=False)
        raise SettingsError(f"http {address}: cannot listen ({exc.strerror or exc})", field="http") from exc
    return metrics
