"""The edge agent's settings: :class:`AgentSettings` (keys of its TOML file = field names) and their checks.

The parsers of the sensor keys (``sensor_channels``, the field paths, ``mqtt_topics``, ``mqtt_device``) are
here too: ``validate`` refuses a bad one before anything starts, and :mod:`edge_agent.sources` reads the
same keys with them. Apart from the loader (:mod:`edge_agent.settings.loader`) and the broker part
(:mod:`edge_agent.settings.broker`) that the hub shares: nothing here is the hub's.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.contract import valid_id
from edge_agent.settings.broker import BrokerSettings, BrokerURL
from edge_agent.settings.loader import LOG_LEVELS, SettingsError, choice, positive, seconds, user_path

OUTBOX_POLICIES = ("drop_oldest", "block")
FEATURE_MODES = ("off", "sampled", "all")
SOURCES = ("simulated", "stdin", "follow", "mqtt", "serial")
SERIAL_FORMATS = ("csv", "jsonl")
TS_UNITS = ("s", "ms")
_RECORD_KEYS = ("ts", "device_id", "label")  # a reading's own keys: no channel may be called so


def field_path(name: str, text: str, *, columns: bool) -> tuple[str, ...]:
    """Where a value sits in a sensor's reading: keys separated by dots (``BME280.Temperature``; a number
    picks an item of a list), or in a CSV line the column's number (0 = the first)."""
    text = text.strip()
    if columns:
        if not text.isdigit():
            raise SettingsError(f"{name}: {text!r} is no column number (0 = the first column of a CSV line)",
                                field=name)
        return (str(int(text)),)
    parts = tuple(p.strip() for p in text.split("."))
    if not all(parts):
        raise SettingsError(f"{name}: {text!r} is no field path (keys separated by dots, e.g. BME280.Temperature)",
                            field=name)
    return parts


def channel_specs(specs: Sequence[str], *, columns: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``sensor_channels``: each ``name`` or ``name=path``; ``name`` alone is read from the field of that
    name (JSON) or from the column at its place in the list (CSV)."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for i, spec in enumerate(specs):
        name, eq, path = (x.strip() for x in spec.partition("="))
        if not name or name in _RECORD_KEYS or name in dict(out):
            why = "repeated" if name in dict(out) else f"reserved ({', '.join(_RECORD_KEYS)})" if name else "empty"
            raise SettingsError(f"sensor_channels: channel name {name!r} is {why}", field="sensor_channels")
        out.append((name, field_path("sensor_channels", path if eq else (str(i) if columns else name),
                                     columns=columns)))
    return tuple(out)


def topic_filter(text: str) -> str:
    """An MQTT topic filter: ``+`` is one whole level, ``#`` the rest of the topic (last level only)."""
    levels = text.split("/")
    if (not text or "\0" in text or "#" in levels[:-1]
            or any(len(lv) > 1 and ("+" in lv or "#" in lv) for lv in levels)):
        raise SettingsError(f"mqtt_topics: {text!r} is no topic filter (+ stands for one whole level, "
                            "# for the rest of the topic, at the end)", field="mqtt_topics")
    return text


def device_template(template: str, filters: Sequence[str]) -> tuple[tuple[str, int | None], ...]:
    """``mqtt_device``: text with ``{N}`` for the topic's level N (0 = the first), e.g. ``{1}`` on
    ``zigbee2mqtt/+`` or ``tasmota-{1}`` on ``tele/+/SENSOR``; the parts are (literal, level or None)."""
    def bad(why: str) -> SettingsError:
        return SettingsError(f"mqtt_device {template!r}: {why}", field="mqtt_device")

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise bad(f"{exc} (write {{{{ and }}}} for a brace)") from None
    parts: list[tuple[str, int | None]] = []
    for literal, name, spec, conversion in parsed:
        parts.append((literal, None))
        if name is not None:
            if not name.isdigit() or spec or conversion:
                raise bad(f"{{{name}}} is no topic level: write {{0}}, {{1}}, ... (0 = the topic's first level)")
            parts.append(("", int(name)))
    levels = [lv for _, lv in parts if lv is not None]
    if not levels:
        raise bad("no {N}: every topic would give the same device id (for one device, set device_id instead)")
    for f in filters:
        n = len(f.split("/")) - (2 if f.startswith("$share/") else 0)  # the topics have no $share/<group>/
        if "#" not in f and max(levels) >= n:
            raise bad(f"reads topic level {max(levels)}, but the topics of {f!r} have levels 0..{n - 1}")
    return tuple(parts)


SIM_RATE_MAX_HZ = 10_000.0  # the simulated sensor's readings a second, at most


@dataclass(frozen=True)
class AgentSettings(BrokerSettings):
    """Everything an edge agent process needs (keys of its TOML file = field names)."""

    client_id: str | None = None  # default: edge-agent-<device_id>
    device_id: str | None = None  # replay: default is each log's own device ids
    # outbox.sqlite and the active model live here; default: ~/.local/state/edge-agent/<host>-<port>-<prefix>,
    # one folder per broker and prefix, so results only ever go where they were made for.
    state_dir: str | None = None
    model_name: str = "default"
    model: str | None = None  # a bundle file (.emlb) or an .onnx with a manifest beside it
    model_wait_s: float = 120.0
    trusted_key: str | None = None  # Ed25519 public key (PEM) that must have signed model bundles
    insecure_allow_unsigned: bool = False  # development only: accept unsigned bundles
    source: str = "simulated"
    source_path: str | None = None  # for source = "follow"
    # source = "mqtt" or "serial" (docs/sources.md): which fields of a reading are the channels, its time, its label
    sensor_channels: tuple[str, ...] = ()  # "name" or "name=path" (JSON: keys.with.dots; CSV: a column number)
    sensor_ts: str | None = None  # the field of the reading's time (seconds or ISO 8601); default: its arrival time
    sensor_ts_unit: str = "s"  # a number in sensor_ts counts seconds (s) or milliseconds (ms)
    sensor_label: str | None = None  # the field of its label (what federated rounds learn from)
    mqtt_broker: str | None = None  # the local broker the sensors publish to; default: broker
    mqtt_topics: tuple[str, ...] = ()  # topic filters, e.g. zigbee2mqtt/+
    mqtt_device: str | None = None  # device id from the topic's levels, e.g. "{1}"; default: device_id for all
    serial_port: str | None = None  # e.g. /dev/ttyUSB0 or a /dev/serial/by-id/ link
    serial_baud: int = 115200
    serial_format: str = "csv"  # csv (values separated by commas) or jsonl (a JSON object a line)
    serial_reconnect_s: float = 1.0  # a port that went away is opened again every this many seconds
    sim_rate_hz: float = 50.0
    sim_seed: int = 0
    sim_channels: tuple[str, ...] = ("ax", "ay", "az", "wx", "wy", "wz")
    batch_max_results: int = 100
    batch_max_delay_s: float = 0.5
    max_inflight: int = 20  # MQTT messages (batches) in flight
    outbox_max: int = 200_000  # results kept on the device while the broker is unreachable
    outbox_overflow: str = "drop_oldest"
    receipts: bool = True  # keep each result until the hub's commit receipt; false: until the broker's PUBACK
    # A sent result without a receipt goes out again after this (doubling)... Not shorter: receipts wait behind
    # a model bundle on the device's link (a fleet-wide switch: 10-25 s at 10,000 devices, docs/scale.md), and
    # resending then doubles the fleet's load. A reconnect resends at once anyway.
    resend_after_s: float = 60.0
    resend_max_s: float = 300.0  # ...up to this wait between attempts
    # How long the broker keeps a device's session (its subscriptions, what was published for it) after a
    # disconnect: a reconnect within it does not download the retained model again. 0: clean sessions.
    session_expiry_s: int = 86_400
    features: str = "off"  # send model inputs for retraining: off, sampled or all
    features_sample: float = 0.1
    intra_op_threads: int = 1
    status_interval_s: float = 10.0
    log_level: str = "INFO"
    metrics_port: int | None = None  # serve Prometheus metrics on http://metrics_host:PORT/metrics (needs prometheus_client)
    metrics_host: str = "127.0.0.1"
    # Federated rounds: keep the newest labelled windows' features in the state dir and answer the hub's
    # rounds with an INT8 weight delta trained on them (the windows never leave the device).
    federated: bool = True
    learn_windows: int = 4000  # at most this many labelled windows kept (the oldest go first)
    # Secure rounds: keep the integer vectors this device masked (its contribution before the masks) in the
    # state dir, the last 5 rounds, to audit what it gave: they never leave the device.
    secure_audit: bool = False

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        url = self.broker_url
        return Path("~/.local/state/edge-agent").expanduser() / f"{url.host}-{url.port}-{self.prefix}"

    @property
    def delivery_target(self) -> str:
        """Where this agent's results go: the broker (without password) and the topic prefix."""
        return f"{self.broker_url} prefix {self.prefix}"

    def validate(self) -> None:
        self.validate_broker()
        _ = self.topics
        for name in ("state_dir", "model", "trusted_key", "source_path"):
            if getattr(self, name) is not None:
                user_path(name, getattr(self, name))
        if self.device_id is not None and not valid_id(self.device_id):
            raise SettingsError(f"device_id {self.device_id!r} is not valid: use 1-64 of A-Z a-z 0-9 _ . : -")
        choice("log_level", self.log_level.upper(), LOG_LEVELS, raw=self.log_level)
        choice("outbox_overflow", self.outbox_overflow, OUTBOX_POLICIES)
        choice("features", self.features, FEATURE_MODES)
        choice("source", self.source, SOURCES)
        for name in ("batch_max_results", "max_inflight", "outbox_max", "intra_op_threads", "sim_rate_hz",
                     "learn_windows"):
            positive(name, getattr(self, name))
        for name in ("resend_after_s", "resend_max_s"):
            seconds(name, getattr(self, name))
        for name in ("batch_max_delay_s", "model_wait_s", "status_interval_s"):
            seconds(name, getattr(self, name), zero_ok=True)
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:  # MQTT 5's four-byte Session Expiry Interval
            raise SettingsError(f"session_expiry_s must be in 0..4294967295 seconds, got {self.session_expiry_s}",
                                field="session_expiry_s")
        if not 0.0 <= self.features_sample <= 1.0:
            raise SettingsError(f"features_sample must be in [0, 1], got {self.features_sample}")
        if self.source == "follow" and not self.source_path:
            raise SettingsError("source = 'follow' needs source_path")
        if self.source == "follow" and not str(self.source_path).lower().endswith((".csv", ".jsonl", ".ndjson")):
            # a .gz cannot grow line by line; another name has no format (a traceback and exit 5 before)
            raise SettingsError(f"source_path {self.source_path!r}: a followed log is .csv, .jsonl or .ndjson "
                                "(not compressed)", field="source_path")
        if self.source in ("mqtt", "serial"):
            self.validate_sensor()
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise SettingsError(f"metrics_port must be in 1-65535, got {self.metrics_port}")
        if self.batch_max_results > 10_000:
            raise SettingsError("batch_max_results must be at most 10000")
        if self.sim_rate_hz > SIM_RATE_MAX_HZ:  # inf overflowed, 1e9 took gigabytes for one second's readings
            raise SettingsError(f"sim_rate_hz must be at most {SIM_RATE_MAX_HZ:g}, got {self.sim_rate_hz!r}",
                                field="sim_rate_hz")
        if self.sim_seed < 0:  # numpy's generator refuses it (a traceback)
            raise SettingsError(f"sim_seed must be >= 0, got {self.sim_seed}", field="sim_seed")

    def validate_sensor(self) -> None:
        """The keys of ``source = "mqtt"`` and ``"serial"``: each mistake named before anything starts."""
        src = self.source
        if src == "mqtt":
            if self.mqtt_broker is not None:
                try:
                    BrokerURL.parse(self.mqtt_broker)
                except SettingsError as exc:
                    raise SettingsError(f"mqtt_broker: {exc}", field="mqtt_broker") from None
            if not self.mqtt_topics:
                raise SettingsError("source = 'mqtt' needs mqtt_topics (topic filters, e.g. ['zigbee2mqtt/+'])",
                                    field="mqtt_topics")
            filters = [topic_filter(f) for f in self.mqtt_topics]
            if self.mqtt_device is not None:
                device_template(self.mqtt_device, filters)
                if self.device_id is not None:
                    raise SettingsError("mqtt_device names each device from its topic, device_id names every "
                                        "reading after one device: set one of them", field="mqtt_device")
        else:
            if not self.serial_port:
                raise SettingsError("source = 'serial' needs serial_port (e.g. /dev/ttyUSB0)", field="serial_port")
            user_path("serial_port", self.serial_port)
            choice("serial_format", self.serial_format, SERIAL_FORMATS)
            positive("serial_baud", self.serial_baud)
            seconds("serial_reconnect_s", self.serial_reconnect_s)
        if not self.sensor_channels:
            raise SettingsError(f"source = '{src}' needs sensor_channels (the channels the model reads: "
                                "name or name=path)", field="sensor_channels")
        columns = src == "serial" and self.serial_format == "csv"
        channel_specs(self.sensor_channels, columns=columns)
        for name in ("sensor_ts", "sensor_label"):
            if getattr(self, name) is not None:
                field_path(name, getattr(self, name), columns=columns)
        choice("sensor_ts_unit", self.sensor_ts_unit, TS_UNITS)
