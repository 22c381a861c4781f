"""The two agent jobs: replay recorded logs, and run on a live source until told to stop."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import exits, sources
from edge_agent.device.agent import Agent
from edge_agent.device.errors import AgentError, BadSetting, Interrupted
from edge_agent.mqtt import MqttError
from edge_agent.settings.agent import AgentSettings
from edge_agent.sources.chunk import NotedStats
from edge_agent.sources.merge import ReplayLogs

log = logging.getLogger(__name__)

# Rows a replay parses, windows and infers at once (#27 §4, the watch log with a trusted key). 4,096 held 2.4-3 MB
# less anonymous memory (42.9 vs 45.3-46 MB) for 8 % more CPU in the loop, and was tried: on a full disk with
# drop_oldest (tests/test_disk_full.py) its smaller batches made the outbox wait for rows in flight at almost every
# batch, and half the replays took over 10x as long (8,192: 10 of 10 as usual). Kept at the readers' default.
REPLAY_ROWS = 8192


@dataclass
class ReplayReport:
    devices: int = 0
    readings: int = 0
    windows: int = 0
    published: int = 0  # results stored by the hub (receipted), or acknowledged by the broker without receipts
    already_stored: int = 0  # of those, results the hub had stored before (a replay of the same log): not new
    acknowledged: int = 0  # results the broker acknowledged (PUBACK), re-sends included
    leftovers: int = 0  # results an earlier run left in the outbox (delivered by this one with its own)
    until: str = "hub"
    not_stored: int = 0  # results still in the outbox when the replay ended
    resent: int = 0  # results sent again for want of a receipt
    drain_s: float = 0.0  # seconds spent after the last reading waiting for delivery
    cause: str | None = None  # why results are not stored yet (when not drained)
    seconds: float = 0.0
    skipped_lines: int = 0
    dropped_windows: int = 0
    model_version: int | None = None
    model_swaps: int = 0
    drained: bool = True
    peak_rss_mb: float | None = None  # this process's peak resident memory (Linux VmHWM)
    skipped_examples: list[str] = field(default_factory=list)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # --skip-bad-lines: lines skipped, per reason

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v
                for k in self.__dataclass_fields__ for v in [getattr(self, k)]}


Progress = Callable[[int, int, float], None]  # (readings so far, windows so far, fraction of the logs read)


def replay(settings: AgentSettings, logs: list[str], *, model: str | None, speed: float = 0.0,
           on_error: str = "raise", progress: Progress | None = None,
           drain_timeout: float | None = None) -> ReplayReport:
    """Replay logs through the model into the broker; returns once every result is acknowledged."""
    t0 = time.perf_counter()
    readings = _open_logs(logs, on_error)
    devices = (settings.device_id,) if settings.device_id else ()
    agent = Agent(settings, device_ids=devices)
    report = ReplayReport(leftovers=agent.outbox.depth)
    stop = _install_stop_handlers()
    agent.stop_event = stop
    agent.start()
    try:
        agent.load_model(model, readings.channels)
        if _regression(agent):
            readings.labels_as_numbers()
        readings.index()  # every file read once: what cannot be replayed in time order is refused before any result
        processor = agent.make_processor()
        for chunk in sources.pace(readings, speed):
            processor.process(chunk.by_device(), chunk.source)
            agent.tick()
            if progress is not None:
                progress(processor.stats.readings, processor.stats.windows,
                         min(1.0, readings.released / max(readings.rows, 1)))
            if stop.is_set():
                raise Interrupted(f"interrupted: {agent.outbox.depth} results kept in the outbox "
                                  f"({agent.state_dir}), sent on the next start")
        report.skipped_lines = readings.stats.rows_skipped
        report.skipped_examples = [str(e) for e in readings.stats.first_errors]
        report.skipped_by_reason = dict(readings.stats.skipped_by_reason)
        agent.tick()
        _drain(agent, settings, report, drain_timeout, stop)
        report.published = agent.publisher.stored_results
        report.already_stored = agent.publisher.already_stored
        report.acknowledged = agent.publisher.acked_results
        report.resent = agent.publisher.resent_results
        report.devices = len(processor.stats.devices)
        report.readings = processor.stats.readings
        report.windows = processor.stats.windows
        report.dropped_windows = processor.stats.dropped_windows
        report.model_version = agent.model.bundle.manifest.version if agent.model else None
        report.model_swaps = agent.swaps
    finally:
        agent.close(drain_timeout=0 if stop.is_set() or not report.drained else 5)
        _restore_handlers()
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    return report


def _regression(agent: Agent) -> bool:
    """A regressor's ground truth is a number: its sources read the label column as numbers, so a
    window's truth is the mean of its readings' targets, not the majority text (logs, followed files
    and stdin; the simulated sensor emits classes)."""
    return agent.model is not None and agent.model.bundle.manifest.task == "regression"


def _open_logs(logs: list[str], on_error: str) -> ReplayLogs:
    """The logs' schemas (a header error raises here); the channels must be the same in every file."""
    readings = ReplayLogs(logs, on_error=on_error, rows=REPLAY_ROWS)
    channels = readings.channels
    for path, (other, _) in zip(logs[1:], readings.schemas[1:], strict=True):
        if other != channels:
            raise AgentError(f"{path}: channels {list(other)} differ from {list(channels)} of {logs[0]}")
    return readings


def _drain(agent: Agent, settings: AgentSettings, report: ReplayReport, timeout: float | None,
           stop: threading.Event) -> None:
    """Wait until every result is receipted (or acknowledged by the broker with ``--until broker``)."""
    report.until = "hub" if settings.receipts else "broker"
    t_drain = time.perf_counter()
    try:
        report.drained = agent.publisher.wait_drained(timeout, stop=stop, unreachable_s=settings.connect_timeout_s)
    except MqttError as exc:
        raise MqttError(f"{exc}; {agent.outbox.depth} results stay in the outbox ({agent.state_dir}) "
                        "and go out on the next start") from exc
    report.drain_s = time.perf_counter() - t_drain
    if not report.drained:
        report.cause = _why_not_stored(agent, settings)
    report.not_stored = agent.outbox.depth
    if stop.is_set():
        raise Interrupted(f"interrupted while waiting for acknowledgements: {agent.outbox.depth} results "
                          f"kept in the outbox ({agent.state_dir}), sent on the next start")


def _why_not_stored(agent: Agent, settings: AgentSettings) -> str:
    if agent.publisher.refused:
        return f"the broker refused {agent.publisher.refused} results: {agent.publisher.last_error}"
    if not agent.link.connected:
        return f"not connected to {settings.broker_url}: {agent.link.unreachable_reason()}"
    if settings.receipts:
        return (f"connected to {settings.broker_url}, but no hub receipted them: is `cloud-hub serve` running "
                f"on this broker with prefix {settings.prefix!r}?")
    return f"connected to {settings.broker_url}, waiting for its acknowledgements"


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since exec (getrusage would include the parent's
    memory at fork time), or None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def live_source(settings: AgentSettings, stop: threading.Event, idle: Callable[[], None] = lambda: None
                ) -> tuple[Iterable[Any], tuple[str, ...]]:
    s = settings
    src: Iterable[Any]
    if s.source == "simulated":
        # Live readings carry wall-clock time, so result keys (window start in ms) never repeat.
        src = sources.SimulatedSensor(s.device_id or "sim-0", s.sim_channels, s.sim_rate_hz, s.sim_seed,
                                      start_ts=round(time.time(), 2), stop_event=stop)
        return src, tuple(s.sim_channels)
    if s.source == "stdin":  # a malformed line is skipped and named (NotedStats): one must not stop a device
        src = sources.JsonLinesStream(sys.stdin.buffer, name="<stdin>", channels=s.sim_channels, on_error="skip",
                                      noted=True, stop=stop, idle=idle)
        return src, tuple(s.sim_channels)
    if s.source == "mqtt":
        mqtt = sources.MqttSensor.of(s, stop, idle)
        mqtt.start(s.connect_timeout_s)
        return mqtt, mqtt.channels
    if s.source == "serial":
        port = sources.SerialSensor.of(s, stop, idle)
        return port, port.channels
    assert s.source_path is not None
    def wait(seconds: float) -> None:  # between polls of a quiet file the agent still does its housekeeping
        idle()
        stop.wait(seconds)

    follow = _followed(s.source_path, stop, wait)
    return follow, tuple(follow.channels or ())


def _followed(path: str, stop: threading.Event, wait: Callable[[float], None]) -> sources.FollowFile:
    """The followed file once it has its header line: until then the agent waits (a logger that has not started
    yet), saying after 3 s and every 30 s what it waits for. A malformed line later is skipped and named
    (:class:`~edge_agent.sources.chunk.NotedStats`): restarting on it would only meet it again."""
    started, said = time.monotonic(), 0.0
    while True:
        follow = sources.FollowFile(path, stop_event=stop, sleep=wait, on_error="skip", noted=True)
        if follow.channels is not None:
            return follow
        follow.close()
        if stop.is_set():
            raise _StoppedWaiting(path)
        now = time.monotonic()
        if now - started >= 3.0 and now - said >= 30.0:
            said = now
            what = "no header line yet (ts,device_id,<channels>[,label])" if Path(path).exists() else "no such file yet"
            log.warning("waiting for %s: %s", path, what)
        wait(0.5)


class _StoppedWaiting(Exception):
    """SIGTERM/SIGINT while ``run`` waited for its followed file: it stops as it would later (exit 0)."""


def run(settings: AgentSettings, *, model: str | None = None, drain_timeout: float = 10.0) -> dict[str, Any]:
    """The long-running agent: live source until SIGTERM/SIGINT or the source ends, then drain."""
    many = settings.source == "mqtt" and settings.mqtt_device is not None  # each device named by its topic
    if not settings.device_id and not many:
        raise BadSetting("run needs device_id (in the config file, EDGE_AGENT_DEVICE_ID or --device-id)")
    stop = _install_stop_handlers()
    agent = Agent(settings, device_ids=(settings.device_id,) if settings.device_id else ())
    agent.stop_event = stop
    agent.start()
    try:
        readings = windows = skipped = dropped = 0
        try:
            source, channels = live_source(settings, stop, idle=agent.tick)
        except _StoppedWaiting:  # stopped before the source was there: a stop like any other (exit 0)
            source = None
        if source is not None:
            agent.load_model(model or settings.model, channels)
            parser = getattr(source, "parser", None)
            if _regression(agent) and parser is not None:
                parser.numeric_labels = True
            processor = agent.make_processor()
            processor.one_device = True  # a live agent: another device's readings are skipped and said
            for chunk in _until(source, stop):
                processor.process(chunk.by_device(), chunk.source)
                agent.tick()
            agent.tick()
            readings, windows, dropped = processor.stats.readings, processor.stats.windows, processor.stats.dropped_windows
            read = getattr(source, "stats", None)
            if isinstance(read, NotedStats):  # what it skipped since it last said so
                read.final()
                skipped = read.rows_skipped
            skipped += sum(processor.other_devices.values()) + processor.other_devices_more
    finally:
        drained = agent.close(drain_timeout=drain_timeout)
        _restore_handlers()
    return {"readings": readings, "windows": windows, "dropped_windows": dropped, "skipped": skipped,
            "drained": drained, "outbox_depth": agent.outbox.depth}


def _until(chunks: Iterable[Any], stop: threading.Event) -> Iterator[Any]:
    for chunk in chunks:
        yield chunk
        if stop.is_set():
            return


_restore: list[Callable[[], None]] = []


def _install_stop_handlers() -> threading.Event:
    """SIGTERM/SIGINT set a stop flag: the current chunk finishes, the outbox drains, then exit."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():  # second signal: give up draining
            raise KeyboardInterrupt
        log.info("signal %d: finishing the current batch and draining the outbox", signum)
        stop.set()

    _restore.append(exits.on_stop_signals(handler))
    return stop


def _restore_handlers() -> None:
    while _restore:
        _restore.pop()()

