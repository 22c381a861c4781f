"""Sensor sources a real device has: `source = "mqtt"` (Zigbee2MQTT and Tasmota payloads on a real
mosquitto, several devices through one agent) and `source = "serial"` (a pseudo-terminal pair, the
cable pulled and plugged back), through a real `edge-agent run` where it matters."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import db, tables
from cloud_hub.models import lifecycle
from cloud_hub.models.signing import keygen
from cloud_hub.rollout import publish as rollout
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent.mqtt import BrokerURL, MqttLink
from edge_agent.preprocess import PreprocessParams
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import load_settings
from edge_agent.sources import FieldMap, SerialSensor
from tests.helpers import SMALL, Collector, agent_cmd, expected_keys, make_bundle, wait_for
from tests.test_federated import _devices, _query, _updates
from tests.test_hub_cli import ServeProcess

START = 1_796_562_000.0  # 2026-12-06T13:00:00Z
CHANNELS = ("temperature", "humidity")
CLIMATES = (("dry", 35.0), ("damp", 52.0), ("humid", 70.0))


def _climate(devices: tuple[str, ...], seconds: int, seed: int = 0) -> list[dict]:
    """One reading a second per device: humidity by the label (three classes: rounds learn a softmax;
    scikit-learn's binary MLP has one output), which changes every 20 s."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in devices:
        for i in range(seconds):
            label, humidity = CLIMATES[(i // 20) % 3]
            rows.append({"ts": START + i, "device_id": d,
                         "temperature": round(float(21 + np.sin(i / 9) + 0.2 * rng.normal()), 2),
                         "humidity": round(float(humidity + 3 * rng.normal()), 1), "label": label})
    return rows


def _write_log(path: Path, rows: list[dict]) -> Path:
    path.write_text("ts,device_id,temperature,humidity,label\n" + "".join(
        f"{r['ts']:.0f},{r['device_id']},{r['temperature']},{r['humidity']},{r['label']}\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def climate_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreprocessParams]:
    """A model of two channels at one reading a second (4 s windows every 2 s), as a room sensor gives."""
    root = tmp_path_factory.mktemp("climate")
    bundle = make_bundle(_write_log(root / "train.csv", _climate(("c-1", "c-2", "c-3"), 240)), window_s=4, hop_s=2,
                         holdout=("c-3",))
    path = root / "climate.emlb"
    path.write_bytes(bundle.encode())
    return path, PreprocessParams.from_dict(bundle.manifest.preprocess)


def _iso(ts: float, *, offset: bool) -> str:
    t = datetime.fromtimestamp(ts, UTC)
    return t.isoformat() if offset else t.replace(tzinfo=None).isoformat()


def _toml(values: dict) -> str:
    return "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in values.items())


class Agent:
    """`edge-agent run --config FILE` as a real process, its log in a file."""

    def __init__(self, procs, tmp_path: Path, upstream: str, prefix: str, model: Path | None,
                 **config: object) -> None:
        self.log = tmp_path / "agent.log"
        cfg = tmp_path / "agent.toml"
        cfg.write_text(_toml({"broker": upstream, "prefix": prefix, "state_dir": str(tmp_path / "state"),
                              "receipts": False, "batch_max_delay_s": 0.1, "serial_reconnect_s": 0.2,
                              **({} if model is None else {"model": str(model)}), **config}))
        with open(self.log, "wb") as out:
            self.proc = procs.popen(agent_cmd("run", "--config", str(cfg)), stdout=out, stderr=out,
                                    env={**os.environ, "TZ": "UTC"})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, words: str, count: int = 1) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, self.text()
            return self.text().count(words) >= count
        wait_for(seen, timeout=90, what=f"{words!r} in the agent's log")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.text()


class Sensors:
    """Devices publishing to a broker, each message acknowledged (QoS 1, in order)."""

    def __init__(self, url: str, name: str) -> None:
        self.acks: queue.Queue[bool] = queue.Queue()
        self.link = MqttLink(BrokerURL.parse(url), name, on_published=lambda _m, ok, _r: self.acks.put(ok))
        self.link.start()
        self.link.wait_connected(30)

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self.link.publish(topic, payload, c.Delivery(qos=1, retain=False))
        assert all(self.acks.get(timeout=60) for _ in messages)

    def stop(self) -> None:
        self.link.stop()


@pytest.fixture
def collector(shared_broker, prefix: str) -> Iterator[Collector]:
    sub = Collector(shared_broker.url, c.Topics(prefix), f"{prefix}-sub")
    yield sub
    sub.stop()


def test_zigbee2mqtt_devices_on_a_local_broker_through_one_agent(procs, broker, shared_broker, prefix, tmp_path,
                                                                climate_model, collector) -> None:
    """Two Zigbee2MQTT sensors on a broker of their own, results upstream under each friendly name; the
    payloads that are no reading are counted and named with their topic, and the agent goes on."""
    model, params = climate_model
    base = f"{prefix}-z2m"
    rows = _climate(("kitchen", "bedroom"), 60, seed=1)
    agent = Agent(procs, tmp_path, shared_broker.url, prefix, model, source="mqtt", mqtt_broker=broker.url,
                  mqtt_topics=[f"{base}/+"], mqtt_device="{1}", sensor_channels=list(CHANNELS),
                  sensor_ts="last_seen")
    agent.wait_log("reading sensors on")
    messages = [(f"{base}/{r['device_id']}", orjson.dumps({
        "battery": 97, "humidity": r["humidity"], "linkquality": 120, "temperature": r["temperature"],
        "voltage": 2995, "last_seen": _iso(r["ts"], offset=True)})) for r in rows]
    bad = [(f"{base}/kitchen", b'{"temperature": 21.5, "humid'),  # cut off
           (f"{base}/hallway_button", b'{"action":"single","battery":100,"linkquality":87}'),  # no channel
           (f"{base}/living room", messages[0][1]),  # a friendly name that is no device id
           (f"{base}/bedroom", orjson.dumps({"temperature": "warm", "humidity": 40.0,
                                             "last_seen": _iso(START + 30.5, offset=True)}))]
    sensors = Sensors(broker.url, f"{prefix}-z2m")
    sensors.publish(messages[:30] + bad[:2] + messages[30:90] + bad[2:] + messages[90:])
    sensors.stop()
    expected = expected_keys(_write_log(tmp_path / "sent.csv", rows), params)
    assert {d for d, _ in expected} == {"kitchen", "bedroom"}
    assert collector.wait_for(expected, timeout=90) == expected
    agent.wait_log("reading skipped", 4)
    log = agent.text()
    for topic, why in ((f"{base}/kitchen", "bad JSON"), (f"{base}/hallway_button", "no channel field"),
                       (f"{base}/living room", "which is no device id"),
                       (f"{base}/bedroom", "bad number \"warm\" in column 'temperature'")):
        assert any(f"topic {topic}: reading skipped" in ln and why in ln for ln in log.splitlines()), (topic, log)
    agent.stop()


def test_tasmota_devices_on_the_upstream_broker(procs, shared_broker, prefix, tmp_path, climate_model,
                                                collector) -> None:
    """Tasmota's tele/<device>/SENSOR with its local `Time` (no offset) and the sensor's own object, on the
    broker the results go to; device ids made by a template, the other tele topics not read."""
    model, params = climate_model
    base = f"{prefix}-tele"
    rows = _climate(("kitchen", "garage"), 40, seed=2)
    agent = Agent(procs, tmp_path, shared_broker.url, prefix, model, source="mqtt",
                  mqtt_topics=[f"{base}/+/SENSOR"], mqtt_device="tasmota-{1}",
                  sensor_channels=["temperature=BME280.Temperature", "humidity=BME280.Humidity"], sensor_ts="Time")
    agent.wait_log("reading sensors on")
    messages = [(f"{base}/{r['device_id']}/SENSOR", orjson.dumps({
        "Time": _iso(r["ts"], offset=False), "BME280": {"Temperature": r["temperature"], "Humidity": r["humidity"],
                                                        "DewPoint": 9.1, "Pressure": 1013.2}, "TempUnit": "C"}))
        for r in rows]
    state = (f"{base}/kitchen/STATE", b'{"Time":"2026-12-06T13:00:00","Uptime":"0T00:10:00","Heap":25}')
    unplugged = (f"{base}/garage/SENSOR", b'{"Time":"2026-12-06T13:00:05","ANALOG":{"A0":512}}')
    sensors = Sensors(shared_broker.url, f"{prefix}-tasmota")
    sensors.publish([state, *messages[:50], unplugged, *messages[50:]])
    sensors.stop()
    expected = {(f"tasmota-{d}", s) for d, s in expected_keys(_write_log(tmp_path / "sent.csv", rows), params)}
    assert collector.wait_for(expected, timeout=90) == expected
    agent.wait_log("reading skipped")
    log = agent.text()
    assert f"topic {base}/garage/SENSOR: reading skipped (no channel field (BME280.Temperature" in log, log
    assert "STATE" not in log  # not subscribed
    agent.stop()


class Cable:
    """A serial port the test plugs and pulls: a pseudo-terminal pair behind a stable link (like
    /dev/serial/by-id/...); pulling closes both ends, plugging makes a new pair and points the link at it."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master: int | None = None
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing: bytes as a board sends them
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, self.link)
        self.master, self._slave = master, slave

    def pull(self) -> None:
        assert self.master is not None
        os.close(self.master)
        os.close(self._slave)
        self.master = None

    def write(self, data: bytes) -> None:
        assert self.master is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view[:512]):]

    def close(self) -> None:
        if self.master is not None:
            self.pull()


@pytest.fixture
def cable(tmp_path: Path) -> Iterator[Cable]:
    plugged = Cable(tmp_path / "ttyUSB-board")
    yield plugged
    plugged.close()


def _csv_lines(rows: list[dict]) -> bytes:
    return b"".join(f"{r['ts']:.0f},{r['temperature']},{r['humidity']},{r['label']}\r\n".encode() for r in rows)


def test_serial_board_through_a_pulled_cable(procs, shared_broker, prefix, tmp_path, climate_model, collector,
                                             cable) -> None:
    """CSV lines of a board (a header first, as after a reset); the cable pulled and plugged back: the port
    is opened again, a bad line is named by its port and line, and every window of the readings is inferred."""
    model, params = climate_model
    rows = _climate(("board-1",), 60, seed=3)
    agent = Agent(procs, tmp_path, shared_broker.url, prefix, model, source="serial", serial_port=str(cable.link),
                  device_id="board-1", sensor_channels=["temperature=1", "humidity=2"], sensor_ts="0",
                  sensor_label="3")
    agent.wait_log(f"reading {cable.link}")
    cable.write(b"ts,temperature,humidity,label\r\n" + _csv_lines(rows[:30]) + b"1796562030.5,abc,40.0,dry\r\n")
    first = expected_keys(_write_log(tmp_path / "first.csv", rows[:30]), params)
    assert collector.wait_for(first, timeout=90) == first
    cable.pull()
    agent.wait_log(f"serial port {cable.link} lost")
    cable.plug()
    agent.wait_log(f"reading {cable.link} at 115200 baud (again)")
    cable.write(_csv_lines(rows[30:]))
    expected = expected_keys(_write_log(tmp_path / "all.csv", rows), params)
    assert collector.wait_for(expected, timeout=90) == expected
    assert {collector.results[k].truth for k in expected} == {"dry", "damp", "humid"}
    log = agent.text()
    assert f"{cable.link}:32: reading skipped (bad number \"abc\" in column 'temperature')" in log, log
    assert log.count("reading skipped") == 1, log  # the header line is no bad reading
    agent.stop()


def test_serial_readings_without_a_time_keep_their_order_through_a_pull(tmp_path, cable) -> None:
    """Without sensor_ts a reading's time is its arrival: lines that arrive in one read still get
    increasing times (none refused as out of order); a JSON board's fields are found by path; a line
    cut by a pulled cable is counted, and the readings go on once it is plugged back."""
    fields = FieldMap((("temperature", ("env", "t")), ("humidity", ("env", "rh"))), label=("state",))
    stop = threading.Event()
    port = SerialSensor(str(cable.link), fields, "board-2", reconnect_s=0.1, poll_s=0.05, stop_event=stop)
    lines = [orjson.dumps({"env": {"t": 20 + i / 10, "rh": 40 + i}, "state": "dry"}) + b"\n" for i in range(80)]
    chunks = []

    def read() -> None:
        for chunk in port:
            chunks.append(chunk)
            if sum(len(ch.ts) for ch in chunks) >= 80:
                stop.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: port.opened == 1, what="the port open")  # pyserial drops what came before it opened
    cable.write(b"".join(lines[:50]) + lines[50][:7])  # in one write: most of it in one read; then a cut line
    wait_for(lambda: port.partial == lines[50][:7], what="the start of the cut line read")
    cable.pull()
    wait_for(lambda: port.stats.rows_skipped == 1, what="the cut line counted")
    cable.plug()
    wait_for(lambda: port.opened == 2, what="the port opened again")
    cable.write(b"".join(lines[50:]))
    reader.join(60)
    stop.set()
    assert not reader.is_alive()
    ts = np.concatenate([ch.ts for ch in chunks])
    values = np.concatenate([ch.values for ch in chunks])
    assert len(ts) == 80 and (np.diff(ts) > 0).all()
    assert values[:, 1].tolist() == [40 + i for i in range(80)]
    assert set(np.concatenate([ch.labels for ch in chunks]).tolist()) == {"dry"}
    assert port.stats.skipped_by_reason == {"partial line": 1}
    assert str(port.stats.first_errors[0]) == f"{cable.link}:51: the port went away mid-line"


def test_an_unreachable_sensors_broker_is_one_line_and_exit_3(procs, shared_broker, prefix, tmp_path,
                                                              climate_model) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = Agent(procs, tmp_path, shared_broker.url, prefix, climate_model[0], source="mqtt", device_id="d-1",
                  mqtt_broker=f"mqtt://127.0.0.1:{port}", mqtt_topics=["z2m/+"], sensor_channels=list(CHANNELS),
                  connect_timeout_s=2)
    assert agent.proc.wait(120) == 3, agent.text()
    assert "Traceback" not in agent.text()
    assert agent.text().strip().splitlines()[-1] == (
        f"edge-agent: error: no connection to the sensors' broker mqtt://127.0.0.1:{port} within 2 s: connection "
        f"refused (nothing listens on 127.0.0.1:{port})"), agent.text()


def test_missing_pyserial_is_one_line_naming_the_extra(tmp_path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(_toml({"source": "serial", "serial_port": "/dev/ttyUSB0", "device_id": "b-1",
                          "sensor_channels": ["t"], "state_dir": str(tmp_path / "state")}))
    code = ("import sys; sys.modules['serial'] = None; "
            f"sys.argv = ['edge-agent', 'run', '--config', {str(cfg)!r}]; "
            "from edge_agent.device.cli import app; app()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        "edge-agent: error: source = 'serial' needs pyserial: pip install 'edgeml-mqtt[serial]' (on a device " \
        "installed from deploy/agent: pip install pyserial)", done.stderr


@pytest.mark.slow
def test_an_mqtt_device_takes_part_in_a_federated_round(procs, broker, prefix, tmp_path) -> None:
    """`edge-agent run` on MQTT readings with a label field keeps its labelled windows and answers a round
    of `cloud-hub federate` (serve, federate and the agent as real processes); the windows stay home."""
    priv, pub, _ = keygen(tmp_path / "keys" / "hub.pem")
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    train = _write_log(tmp_path / "train.csv", _climate(("c-1", "c-2"), 240))
    assert lifecycle.train_from_logs(engine, [str(train)], holdout=["c-2"], window_s=4, hop_s=2,
                                     config=SMALL).version == 1
    rollout.publish(engine, load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
        "broker": broker.url, "db": url, "prefix": prefix, "client_id": f"{prefix}-cli", "signing_key": str(priv)}))
    engine.dispose()
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    topic = f"{prefix}-sensors/room-1"
    agent = Agent(procs, tmp_path, broker.url, prefix, None, source="mqtt",
                  device_id="room-1", trusted_key=str(pub), receipts=True, status_interval_s=1,
                  mqtt_topics=[topic], sensor_channels=list(CHANNELS), sensor_ts="at", sensor_label="activity")
    agent.wait_log("reading sensors on")
    rows = _climate(("room-1",), 200, seed=5)
    sensors = Sensors(broker.url, f"{prefix}-room")
    sensors.publish([(topic, orjson.dumps({"at": r["ts"], "temperature": r["temperature"], "humidity": r["humidity"],
                                           "activity": r["label"]})) for r in rows])
    sensors.stop()
    wait_for(lambda: _devices(url).get("room-1") == 1, timeout=90, what="room-1 on v1")
    with open(tmp_path / "federate.log", "wb") as out:
        fed = procs.popen([sys.executable, "-m", "cloud_hub", "federate", "--broker", broker.url, "--db", url,
                           "--prefix", prefix, "--client-id", f"{prefix}-fed", "--signing-key", str(priv),
                           "--min-available", "1", "--min-windows", "16", "--rounds", "1", "--deadline", "120",
                           "--tolerance", "1", "--epochs", "2"], stdout=out, stderr=out)
    assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    assert sorted((d, s) for _, d, s, _, _ in _updates(url)) == [("room-1", "accepted"), ("room-1", "evaluated")], \
        (tmp_path / "federate.log").read_text()
    wait_for(lambda: _devices(url).get("room-1") == 2, timeout=90, what="room-1 on the round's v2")
    r = tables.results.c
    assert _query(url, sa.select(sa.func.count()).where(r.features.is_not(None))) == [(0,)]
    agent.stop()
    hub.signal(signal.SIGTERM)


@pytest.mark.parametrize(("name", "source"), [("agent-mqtt.toml", "mqtt"), ("agent-serial.toml", "serial")])
def test_example_sensor_configs_are_valid(tmp_path, name: str, source: str) -> None:
    """deploy/'s examples load as they are (only the TLS files, which must exist and load, swapped for a
    self-signed pair made here)."""
    from tests.test_http_door import self_signed

    cert, key = self_signed(tmp_path)
    tls = {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)}
    s = load_settings(AgentSettings, env_prefix="EDGE_AGENT", environ={}, flags=tls,
                      config=Path(__file__).parent.parent / "deploy" / name)
    assert s.source == source and s.sensor_channels and s.trusted_key and s.broker_url.tls


def test_messages_past_a_full_inbox_are_skipped_counted_and_said(monkeypatch, caplog) -> None:
    """A hostile sensor's finding: paho's thread queued every message without bound, so a sensor (or a peer of the
    sensors' broker) publishing faster than the agent reads grew the agent to its memory limit. Past MAX_INBOX
    waiting messages one is skipped, counted and said in one line; what was waiting is read."""
    import threading

    from edge_agent.mqtt import Message
    from edge_agent.settings.agent import AgentSettings
    from edge_agent.settings.loader import load_settings
    from edge_agent.sources import mqtt_sensor

    monkeypatch.setattr(mqtt_sensor, "MAX_INBOX", 5)
    s = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=None, environ={}, flags={
        "source": "mqtt", "mqtt_topics": ["z/t"], "device_id": "dev1", "sensor_channels": ["t"]})
    stop = threading.Event()
    sensor = mqtt_sensor.MqttSensor.of(s, stop, stop.set)  # idle (the inbox empty): stop
    sensor.poll_s = 0.01
    for k in range(12):  # the agent reads nothing meanwhile
        sensor._on_message(Message("z/t", orjson.dumps({"t": 20.0 + k}), 1, False, 0))
    with caplog.at_level("WARNING"):
        got = [v for ch in sensor for v in ch.by_device()["dev1"][1][:, 0].tolist()]
    assert got == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert sensor.stats.rows_skipped == 7 and sensor.stats.skipped_by_reason == {"inbox full": 7}
    said = [r.getMessage() for r in caplog.records if "inbox" in r.getMessage() or "waiting" in r.getMessage()]
    assert len(said) == 1 and "7 message(s) skipped: 5 were waiting for the agent" in said[0], said


def test_topics_naming_ever_new_devices_are_skipped_past_the_cap(monkeypatch) -> None:
    """A hostile peer's finding: with mqtt_device = "{1}" any peer of the sensors' broker made a device a topic
    (30,000 topics: the agent from 73 to 487 MB, and 43,000 statuses in 10 s). Past MAX_SENSOR_DEVICES a topic
    naming a new device is skipped and said; the devices already read go on."""
    import threading

    from edge_agent.mqtt import Message
    from edge_agent.settings.agent import AgentSettings
    from edge_agent.settings.loader import load_settings
    from edge_agent.sources import mqtt_sensor

    monkeypatch.setattr(mqtt_sensor, "MAX_SENSOR_DEVICES", 5)
    s = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=None, environ={}, flags={
        "source": "mqtt", "mqtt_topics": ["z/+"], "mqtt_device": "{1}", "sensor_channels": ["t"]})
    stop = threading.Event()
    sensor = mqtt_sensor.MqttSensor.of(s, stop, stop.set)  # idle (the inbox empty): stop
    sensor.poll_s = 0.01
    for k in range(3):
        for d in range(8):
            sensor._on_message(Message(f"z/dev{d}", orjson.dumps({"t": 20.0 + k}), 1, False, 0))
    chunks = list(sensor)
    got: dict[str, int] = {}
    for ch in chunks:
        for d, v in ch.by_device().items():
            got[d] = got.get(d, 0) + len(v[0])
    assert got == {f"dev{d}": 3 for d in range(5)}, got
    assert sensor.stats.rows_skipped == 9
    assert [e.reason for e in sensor.stats.first_errors][:1] == [
        "it names a device past the 5 this agent reads ('dev5'): skipped (run another agent for more devices)"]
