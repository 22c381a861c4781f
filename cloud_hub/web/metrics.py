"""Prometheus metrics of a hub worker, on ``cloud-hub serve --http HOST:PORT`` (``/metrics``).

Counters come from the worker's own :class:`~cloud_hub.data.ingest.HubStats` (this process since it
started; Prometheus' ``rate()`` and ``increase()`` handle restarts); the fleet gauges are read from
the database at each scrape, so every worker of a ``$share`` group reports the same fleet (devices,
their versions, outboxes and drift; the hub model's canary, rollouts and federated rounds). Names
follow Prometheus' conventions: base units (seconds), ``_total`` for counters, an ``edgeml_``
prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud_hub.data import sessions

if TYPE_CHECKING:
    from cloud_hub.data.ingest import Hub
    from cloud_hub.data.store import RolloutRow
    from cloud_hub.web.http_door import WSGIApp

log = logging.getLogger(__name__)

_COUNTERS = (  # HubStats field, metric name, help
    ("messages", "edgeml_hub_messages", "Result and status messages committed."),
    ("stored", "edgeml_hub_results_stored", "Result rows stored (new)."),
    ("duplicates", "edgeml_hub_results_duplicate", "Result rows received again and ignored (already stored)."),
    ("dead_letters", "edgeml_hub_dead_letters", "Messages refused and kept in the dead-letter table."),
    ("receipts", "edgeml_hub_receipts_sent", "Receipt messages sent to devices after commits."),
    ("rate_limited", "edgeml_hub_rate_limited",
     "Messages dropped unstored because their device was over its limit (device_max_msgs_per_s)."),
    ("batches", "edgeml_hub_transactions", "Transactions committed."),
    ("db_errors", "edgeml_hub_database_errors", "Database writes that failed and were retried."),
    ("unacked", "edgeml_hub_messages_left_for_redelivery",
     "Committed messages not acknowledged because the connection changed (the broker sends them again)."),
)


class HubMetrics:
    """The metrics of one :class:`~cloud_hub.data.ingest.Hub`; :meth:`serve` starts the HTTP endpoint."""

    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        self.commit_seconds = Histogram(
            "edgeml_hub_commit_seconds", "Time to write and commit one batch (retries included).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry)
        self.registry.register(_FleetCollector(hub))
        self.unauthorized = Counter(
            "edgeml_hub_http_unauthorized", "HTTP requests refused (401) for want of the hub's http token.",
            registry=self.registry)
        hub.on_commit = lambda seconds: self.commit_seconds.observe(seconds)
        self.hub = hub
        self._server: Any = None

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` and the dashboard (``/``, ``/api/fleet``) on ``host:port`` in a daemon
        thread, behind the token and TLS of the hub's settings; OSError if the port is taken."""
        from cloud_hub.settings import is_loopback
        from cloud_hub.web.http_door import serve_http

        settings = self.hub.settings
        token, tls = settings.http_token(), settings.http_tls()
        self._server = serve_http(host, port, self.wsgi(token), tls=tls, timeout_s=settings.http_timeout_s)
        url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("metrics on %s/metrics, dashboard on %s/ (%s)", url, url,
                 "token required" if token else "no token: open to whoever reaches the address")
        if token is not None and tls is None and not is_loopback(host):
            log.warning("http: the token crosses the network in clear; set http_cert_file and http_key_file, "
                        "or serve on 127.0.0.1 behind a TLS reverse proxy (docs/operations.md: The HTTP door)")

    def wsgi(self, token: str | None) -> WSGIApp:
        """What the door serves: the dashboard's routes and ``/metrics``, behind ``token`` when there is one."""
        from cloud_hub.web.dashboard import app
        from cloud_hub.web.http_door import Door

        routes = app(make_wsgi_app(self.registry), self.hub)
        return routes if token is None else Door(routes, token, self.unauthorized.inc)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _FleetCollector(Collector):
    """Counters of the hub worker, and the fleet as the database holds it, at each scrape."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        stats = self.hub.stats
        for field, name, help_ in _COUNTERS:
            yield CounterMetricFamily(name, help_, value=getattr(stats, field))
        yield GaugeMetricFamily("edgeml_hub_backlog_messages", "Messages received and not yet committed.",
                                value=self.hub.backlog)
        from cloud_hub.rounds.store import RoundStore

        name = self.hub.settings.model_name
        try:
            with sessions.transaction(self.hub.engine, write=False) as conn:
                by_model = self.hub.store.devices_by_model(conn)
                waiting = self.hub.store.outbox_total(conn)
                drift = {d: r["drift_psi"] for d, r in self.hub.store.device_rows(conn).items()
                         if r["drift_psi"] is not None}
                rollouts = self.hub.store.rollouts(conn, name)
                rounds = RoundStore().count_by_state(conn, name)
        except Exception as exc:  # a scrape must not fail because the database is away for a moment
            log.warning("metrics: fleet gauges skipped: %s", exc)
            return
        devices = GaugeMetricFamily("edgeml_devices", "Devices by their last reported state.", labels=["state"])
        per_state: dict[str, int] = {}
        for _name, _version, state, n in by_model:
            per_state[state] = per_state.get(state, 0) + n
        for state in ("online", "offline"):
            devices.add_metric([state], per_state.pop(state, 0))
        for state, n in sorted(per_state.items()):
            devices.add_metric([state], n)
        yield devices
        models = GaugeMetricFamily("edgeml_devices_by_model", "Devices by the model version they last reported.",
                                   labels=["model", "version", "state"])
        for model, version, state, n in sorted(by_model, key=lambda r: (r[0] or "", r[1] or 0, r[2])):
            models.add_metric([model or "", "" if version is None else str(version), state], n)
        yield models
        yield GaugeMetricFamily("edgeml_device_outbox_results",
                                "Results the devices reported still waiting for a receipt (sum of their last status).",
                                value=waiting)
        psi = GaugeMetricFamily("edgeml_device_drift_psi", "PSI of a device's recent features vs its model's training "
                                "(its last status; edge_agent/drift.py).", labels=["device"])
        for device, value in sorted(drift.items()):
            psi.add_metric([device], value)
        yield psi
        yield from _model_history(name, rollouts, rounds)


def _model_history(name: str, rollouts: list[RolloutRow], rounds: dict[str, int]) -> Iterator[Any]:
    """Canaries and federated rounds of the hub's model (``model_name``), as the database holds them.
    Every outcome is reported, 0 included, so that ``increase()`` sees the first rollback or failed round."""
    canary = GaugeMetricFamily("edgeml_canary_version", "The model version in canary (0: no canary open).",
                               labels=["model"])
    canary.add_metric([name], next((r.version for r in rollouts if r.state == "canary"), 0))
    yield canary
    ended = CounterMetricFamily("edgeml_rollouts", "Rollouts ended, by outcome (the database's history).",
                                labels=["model", "outcome"])
    for outcome in ("promoted", "rolled_back"):
        ended.add_metric([name, outcome], sum(1 for r in rollouts if r.state == outcome))
    yield ended
    running = GaugeMetricFamily("edgeml_rounds_open", "Federated rounds open or closing (not yet finished).",
                                labels=["model"])
    running.add_metric([name], rounds.get("open", 0) + rounds.get("closed", 0))
    yield running
    done = CounterMetricFamily("edgeml_rounds", "Federated rounds finished, by outcome (the database's history): "
                               "published, rejected by the gate, failed.", labels=["model", "outcome"])
    for outcome in ("published", "rejected", "failed"):
        done.add_metric([name, outcome], rounds.get(outcome, 0))
    yield done
