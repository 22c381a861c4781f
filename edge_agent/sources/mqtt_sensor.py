"""``source = "mqtt"``: readings that sensors publish to a local broker (Zigbee2MQTT, Tasmota, ESPHome, Shelly).

The subscription is an :class:`MqttLink` of its own (the broker may be another one than the hub's);
paho's thread only puts each message, with its arrival time, on a queue. The iterator takes what has
arrived, names each message's device from its topic (``mqtt_device``, a template on the topic's
levels) or after ``device_id``, and hands it to :class:`SensorFeed`: a payload that is no reading is
counted and named with its topic, never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from edge_agent.contract import valid_id
from edge_agent.mqtt import Message, MqttError, MqttLink
from edge_agent.settings.agent import AgentSettings, device_template
from edge_agent.settings.broker import BrokerURL, TLSFiles
from edge_agent.sources.chunk import BAD_VALUE, ReadingChunk
from edge_agent.sources.fields import FieldMap, SensorFeed

log = logging.getLogger(__name__)

_BATCH = 4096  # messages judged at once at most
MAX_SENSOR_DEVICES = 1000
"""Devices one agent reads from its topics (``mqtt_device``) at most; a topic naming a device past them is skipped
and said: any peer of the sensors' broker could otherwise make devices without end (each costs the agent its
windows, drift meters and statuses: 30,000 of them took it from 73 to 487 MB, a hostile peer's finding)."""
MAX_INBOX = 20_000
"""Messages waiting for the agent at most: past them a message is skipped, counted and said (``inbox full``).
A sensor, or a peer of the sensors' broker, that publishes faster than the agent reads (a sensor set to 10 kHz, a
flood) grew the queue without end, to the agent's memory limit; a full inbox holds about 20 s of a 1 kHz sensor."""
INBOX_FULL = "inbox full"


class DeviceNames:
    """A device id from a topic: ``mqtt_device``'s parts (literal text, or the topic's level N)."""

    def __init__(self, parts: Sequence[tuple[str, int | None]]) -> None:
        self.parts = tuple(parts)

    def __call__(self, topic: str) -> str:
        levels = topic.split("/")
        out = []
        for text, level in self.parts:
            if level is None:
                out.append(text)
            elif level < len(levels):
                out.append(levels[level])
            else:
                raise ValueError(f"the topic has no level {level}")
        device = "".join(out)
        if not valid_id(device):
            raise ValueError(f"it names the device {device[:70]!r}, which is no device id: use 1-64 of "
                             "A-Z a-z 0-9 _ . : - (rename the device, or change mqtt_device)")
        return device


class MqttSensor:
    """Readings from topic filters of a broker, as chunks; ends when ``stop_event`` is set.

    ``device`` names every reading (one device), or ``names`` makes a device id of each topic.
    ``idle`` runs while no message arrives (the agent's housekeeping).
    """

    def __init__(self, broker: BrokerURL, filters: Sequence[str], fields: FieldMap, *, device: str | None = None,
                 names: DeviceNames | None = None, client_id: str | None = None, tls: TLSFiles | None = None,
                 qos: int = 1, keepalive_s: int = 30, poll_s: float = 0.2, stop_event: threading.Event | None = None,
                 idle: Callable[[], None] = lambda: None) -> None:
        if (device is None) == (names is None):
            raise ValueError("give device or names")
        self.broker, self.filters = broker, tuple(filters)
        self.device, self.names = device, names
        self._devices: set[str] = set()  # named by the topics so far (at most MAX_SENSOR_DEVICES)
        self.source = f"mqtt {broker}"
        self.feed = SensorFeed(self.source, fields)
        self.parser, self.stats = self.feed.parser, self.feed.stats
        self.poll_s, self.idle = poll_s, idle
        self.stop_event = stop_event or threading.Event()
        self._inbox: queue.SimpleQueue[tuple[Message, float]] = queue.SimpleQueue()
        self._overflow = [0, 0]  # messages skipped for a full inbox: (by paho's thread, as said by the iterator)
        self.link = MqttLink(broker, client_id or f"edge-agent-sensors-{uuid.uuid4().hex[:8]}", tls=tls,
                             keepalive_s=keepalive_s, on_message=self._on_message,
                             subscriptions=[(f, qos) for f in self.filters])

    @classmethod
    def of(cls, s: AgentSettings, stop: threading.Event, idle: Callable[[], None]) -> MqttSensor:
        """The source the settings describe (``mqtt_*`` and ``sensor_*`` keys)."""
        same = s.mqtt_broker is None
        broker = s.broker_url if same else BrokerURL.parse(s.mqtt_broker or "")
        names = None if s.mqtt_device is None else DeviceNames(device_template(s.mqtt_device, s.mqtt_topics))
        own = s.client_id or (f"edge-agent-{s.device_id}" if s.device_id else None)
        return cls(broker, s.mqtt_topics, FieldMap.of(s), device=s.device_id if names is None else None,
                   names=names, client_id=f"{own}-sensors" if own else None, tls=s.tls if same else None,
                   keepalive_s=s.keepalive_s, stop_event=stop, idle=idle)

    @property
    def channels(self) -> tuple[str, ...]:
        return self.feed.channels

    @property
    def has_labels(self) -> bool:
        return self.feed.has_labels

    def _on_message(self, msg: Message) -> None:  # paho's thread: hand on (or count one the inbox has no room for)
        if self._inbox.qsize() >= MAX_INBOX:
            self._overflow[0] += 1
            return
        self._inbox.put((msg, time.time()))

    def _say_overflow(self, topic: str) -> None:
        skipped = self._overflow[0] - self._overflow[1]
        if skipped:
            self._overflow[1] += skipped
            self.stats.note(f"topic {topic}", INBOX_FULL, f"{skipped} message(s) skipped: {MAX_INBOX:,} were waiting "
                            "for the agent, which reads slower than the sensors publish (check their rate, or who else "
                            "publishes on these topics)", count=skipped)

    def start(self, timeout: float) -> None:
        """Connect and subscribe (MqttError, exit 3, when the broker cannot be reached within ``timeout``)."""
        self.link.start()
        deadline = time.monotonic() + timeout
        while not self.link.connected_within(0.2):  # SIGTERM/SIGINT end the wait: the iteration ends at once
            if self.stop_event.is_set():
                return
            if time.monotonic() > deadline:
                raise MqttError(f"no connection to the sensors' broker {self.broker} within {timeout:g} s: "
                                f"{self.link.unreachable_reason()}")
        self.link.wait_subscribed(timeout)
        log.info("reading sensors on %s: %s", self.broker, ", ".join(self.filters))

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.link.stop()

    def _device(self, topic: str) -> str | None:
        if self.names is None:
            return self.device
        try:
            device = self.names(topic)
        except ValueError as exc:
            self.feed.reject(f"topic {topic}", BAD_VALUE, str(exc))
            return None
        if device not in self._devices:
            if len(self._devices) >= MAX_SENSOR_DEVICES:
                self.feed.reject(f"topic {topic}", BAD_VALUE, f"it names a device past the {MAX_SENSOR_DEVICES} this "
                                 f"agent reads ({device[:70]!r}): skipped (run another agent for more devices)")
                return None
            self._devices.add(device)
        return device

    def __iter__(self) -> Iterator[ReadingChunk]:
        try:
            while not self.stop_event.is_set():
                try:
                    first = self._inbox.get(timeout=self.poll_s)
                except queue.Empty:
                    self.idle()
                    continue
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                lines = []
                for msg, arrival in batch:
                    device = self._device(msg.topic)
                    if device is not None:
                        lines.append(self.feed.take(f"topic {msg.topic}", msg.payload, device, arrival))
                self._say_overflow(batch[-1][0].topic)
                yield from self.feed.chunks(b"".join(lines))
        finally:
            self.close()
