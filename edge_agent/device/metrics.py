"""Prometheus metrics of an agent, on ``metrics_port`` (``http://metrics_host:PORT/metrics``).

Optional: ``prometheus_client`` is not a device dependency (``pip install './deploy/agent[agent-metrics]'``
from a clone, ``'edgeml-agent[agent-metrics]'`` published);
an agent told to serve metrics without it stops at start with one line saying so. Counters are this
process's since it started; names follow Prometheus' conventions (``_total``, base units).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from edge_agent.drift import MIN_WINDOWS
from edge_agent.settings.loader import SettingsError


class Agent(Protocol):
    """What the metrics read from an agent (:class:`edge_agent.device.agent.Agent` is one)."""

    processor: Any
    outbox: Any
    swaps: int
    model: Any
    learner: Any
    drift: Any

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class AgentMetrics:
    """The metrics of one :class:`~edge_agent.device.agent.Agent`; :meth:`observe_inference` is the pipeline's hook."""

    def __init__(self, agent: Agent) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError:
            raise SettingsError("metrics_port needs prometheus_client, which the device install leaves out: "
                                "pip install './deploy/agent[agent-metrics]' from a clone of the repository, or pip install "
                                "'edgeml-agent[agent-metrics]'", field="metrics_port") from None
        self.agent = agent
        self.registry = CollectorRegistry()
        self.inference = Histogram("edgeml_agent_inference_seconds",
                                   "Inference time per window: a batch's onnxruntime time over its windows (one observation a batch).",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(agent))
        self._server: Any = None

    def observe_inference(self, latency_ms: float) -> None:
        self.inference.observe(latency_ms / 1000.0)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise SettingsError(f"metrics_port {port}: cannot listen on {host} ({exc.strerror or exc})",
                                field="metrics_port") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Collector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a = self.agent
        stats = a.processor.stats if a.processor is not None else None
        for field, name, help_ in (
            ("readings", "edgeml_agent_readings", "Readings read from the source."),
            ("windows", "edgeml_agent_windows", "Windows inferred."),
            ("new_results", "edgeml_agent_results", "Results put in the outbox."),
            ("dropped_windows", "edgeml_agent_windows_dropped", "Windows dropped for missing data."),
        ):
            yield CounterMetricFamily(name, help_, value=getattr(stats, field) if stats is not None else 0)
        yield GaugeMetricFamily("edgeml_agent_outbox_results", "Results in the outbox, not yet receipted.",
                                value=a.outbox.depth)
        yield CounterMetricFamily("edgeml_agent_results_unstored",
                                  "Results the outbox could not keep: the state dir's disk was full.",
                                  value=a.outbox.unstored)
        yield GaugeMetricFamily("edgeml_agent_results_dropped",
                                "Results dropped to make room (outbox_overflow=drop_oldest: outbox_max or a "
                                "full disk), since the outbox was made.", value=a.outbox.dropped)
        yield GaugeMetricFamily("edgeml_agent_disk_full", "1 while the state dir's disk is full.",
                                value=int(a.outbox.full is not None))
        yield CounterMetricFamily("edgeml_agent_model_swaps", "Models swapped in while running.", value=a.swaps)
        m = a.model.bundle.manifest if a.model is not None else None
        version = GaugeMetricFamily("edgeml_agent_model_version", "The model version serving.", labels=["model"])
        if m is not None:
            version.add_metric([m.name], m.version)
        yield version
        if a.learner is not None:  # federated rounds (edge_agent/device/learner.py)
            yield GaugeMetricFamily("edgeml_agent_labelled_windows", "Labelled windows kept for federated rounds.",
                                    value=len(a.learner.store.y))
            yield CounterMetricFamily("edgeml_agent_round_updates", "Federated round updates sent.",
                                      value=a.learner.sent)
        drift = GaugeMetricFamily("edgeml_agent_drift_psi", "PSI of a device's recent features vs the training's "
                                  f"(from {MIN_WINDOWS} windows on).", labels=["device"])
        meters = a.drift
        if meters is not None:
            for device in list(meters.meters):
                psi = meters.psi(device)
                if psi is not None:
                    drift.add_metric([device], psi)
        yield drift
