"""Settings: file < environment < flags, strict validation with readable errors."""

from __future__ import annotations

import pytest

from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.broker import BrokerURL
from edge_agent.settings.loader import SettingsError, load_settings


def test_broker_url_parsing() -> None:
    b = BrokerURL.parse("mqtts://dev%40a:p%3Ass@broker.example:9999")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.example", 9999, True, "dev@a", "p:ss")
    assert BrokerURL.parse("mqtt://localhost").port == 1883
    assert BrokerURL.parse("mqtts://h").port == 8883
    assert "p:ss" not in str(b)
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(SettingsError):
            BrokerURL.parse(bad)


def test_precedence_file_env_flags(tmp_path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('broker = "mqtt://file:1"\nbatch_max_results = 10\nsim_channels = ["a", "b"]\n')
    env = {"EDGE_AGENT_BROKER": "mqtt://env:2", "EDGE_AGENT_FEATURES": "all"}
    s = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=cfg, environ=env,
                      flags={"broker": "mqtt://flag:3", "device_id": None})
    assert s.broker == "mqtt://flag:3"
    assert s.features == "all"
    assert s.batch_max_results == 10
    assert s.sim_channels == ("a", "b")
    assert s.device_id is None


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("bogus = 1\n", {}, "unknown setting(s) bogus; known: "),
        ("batch_max_result = 1\n", {}, "unknown setting(s) batch_max_result (did you mean batch_max_results?)"),
        ('batch_max_results = "many"\n', {}, "batch_max_results must be int"),
        ("", {"EDGE_AGENT_BATCH_MAX_RESULTS": "x"}, "environment EDGE_AGENT_BATCH_MAX_RESULTS"),
        ('outbox_overflow = "explode"\n', {}, "outbox_overflow must be one of drop_oldest, block"),
        ('broker = "tcp://x"\n', {}, "must start with mqtt:// or mqtts://"),
        ("batch_max_results = 0\n", {}, "batch_max_results must be > 0"),
        ('source = "follow"\n', {}, "needs source_path"),
        ('ca_file = "/no/such/ca.pem"\n', {}, "does not exist"),
        ("broker = \n", {}, "not valid TOML"),
        ('source = "serial"\nsensor_channels = ["t"]\n', {}, "source = 'serial' needs serial_port"),
        ('source = "serial"\nserial_port = "/dev/ttyUSB0"\n', {}, "source = 'serial' needs sensor_channels"),
        ('source = "serial"\nserial_port = "/dev/ttyUSB0"\nsensor_channels = ["t=temp"]\n', {},
         "sensor_channels: 'temp' is no column number"),
        ('source = "serial"\nserial_port = "/dev/ttyUSB0"\nsensor_channels = ["t"]\nserial_format = "xml"\n', {},
         "serial_format must be one of csv, jsonl"),
        ('source = "mqtt"\nsensor_channels = ["t"]\n', {}, "source = 'mqtt' needs mqtt_topics"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["a/#/b"]\n', {}, "'a/#/b' is no topic filter"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_device = "{name}"\n', {},
         "{name} is no topic level"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_device = "{1"\n', {},
         "mqtt_device '{1'"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_device = "{2}"\n', {},
         "reads topic level 2, but the topics of 'z2m/+' have levels 0..1"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_device = "z2m"\n', {},
         "no {N}"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_device = "{1}"\n'
         'device_id = "d"\n', {}, "set one of them"),
        ('source = "mqtt"\nsensor_channels = ["t", "label"]\nmqtt_topics = ["z2m/+"]\n', {},
         "channel name 'label' is reserved"),
        ('source = "mqtt"\nsensor_channels = ["t=a..b"]\nmqtt_topics = ["z2m/+"]\n', {}, "'a..b' is no field path"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nmqtt_broker = "tcp://x"\n', {},
         "mqtt_broker: broker URL 'tcp://x' must start with mqtt://"),
        ('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["z2m/+"]\nsensor_ts_unit = "h"\n', {},
         "sensor_ts_unit must be one of s, ms"),
        # a hostile peer's finding: a traceback (exit 1), an OverflowError, gigabytes for a second of readings
        ("", {"EDGE_AGENT_SIM_SEED": "-1"}, "sim_seed must be >= 0, got -1"),
        ('source = "follow"\nsource_path = "x.csv.gz"\n', {}, "source_path 'x.csv.gz': a followed log is .csv, .jsonl"),
        ('source = "follow"\nsource_path = "x.txt"\n', {}, "source_path 'x.txt': a followed log is .csv, .jsonl"),
        ("", {"EDGE_AGENT_SIM_RATE_HZ": "inf"}, "sim_rate_hz must be at most 10000, got inf"),
        ("sim_rate_hz = 1e9\n", {}, "sim_rate_hz must be at most 10000"),
        ("", {"EDGE_AGENT_MODEL_WAIT_S": "inf"}, "model_wait_s must be at most 1e+09 seconds (about 31 years), got inf"),
        ("", {"EDGE_AGENT_CONNECT_TIMEOUT_S": "inf"}, "connect_timeout_s must be at most 1e+09 seconds"),
        ("status_interval_s = 1e300\n", {}, "status_interval_s must be at most 1e+09 seconds"),
    ],
)
def test_bad_settings_are_refused_readably(tmp_path, text: str, env: dict, message: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError) as err:
        load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=cfg, environ=env)
    assert message in str(err.value)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=tmp_path / "nope.toml", environ={})


def test_tls_files_that_cannot_serve_are_one_line_naming_the_setting(tmp_path) -> None:
    """A new operator's findings: a CA file that is not PEM and a certificate with another's key were tracebacks
    (exit 1) at the first connection, a directory given as ca_file "did not exist", and an encrypted key would
    have waited for a password on a terminal a service does not have. Each is now refused with the setting
    named, where it came from (here the environment), before anything connects."""
    from cryptography.hazmat.primitives import serialization

    from tests.test_http_door import self_signed

    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    locked = tmp_path / "locked.key"
    locked.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))

    def refused(env: dict[str, str]) -> str:
        with pytest.raises(SettingsError) as err:
            load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=None, environ=env)
        assert "\n" not in str(err.value)
        return str(err.value)

    ok = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=None, environ={
        "EDGE_AGENT_CA_FILE": str(cert), "EDGE_AGENT_CERT_FILE": str(cert), "EDGE_AGENT_KEY_FILE": str(key)})
    assert ok.key_file == str(key)
    assert refused({"EDGE_AGENT_CA_FILE": str(tmp_path)}).startswith(
        f"environment EDGE_AGENT_CA_FILE: ca_file '{tmp_path}' is a directory")
    assert refused({"EDGE_AGENT_CA_FILE": str(garbage)}).startswith(
        f"environment EDGE_AGENT_CA_FILE: ca_file '{garbage}' holds no PEM certificate")
    assert "the key is not the certificate's (KEY_VALUES_MISMATCH)" in refused(
        {"EDGE_AGENT_CERT_FILE": str(other_cert), "EDGE_AGENT_KEY_FILE": str(key)})
    assert "not a PEM certificate / unencrypted PEM key" in refused(
        {"EDGE_AGENT_CERT_FILE": str(cert), "EDGE_AGENT_KEY_FILE": str(locked)})
    assert refused({"EDGE_AGENT_CERT_FILE": str(cert)}).startswith(
        "environment EDGE_AGENT_CERT_FILE: cert_file is set and key_file is not")


def test_sensor_settings_name_their_origin(tmp_path) -> None:
    """A mistake in a sensor key says where the bad value came from, like every other key."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text('source = "mqtt"\nsensor_channels = ["t"]\nmqtt_topics = ["tele/+/SENSOR"]\n')
    env = {"EDGE_AGENT_MQTT_DEVICE": "tasmota-{3}"}
    with pytest.raises(SettingsError, match=r"^environment EDGE_AGENT_MQTT_DEVICE: mqtt_device 'tasmota-\{3\}': reads"):
        load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=cfg, environ=env)
    ok = load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=cfg, environ={
        "EDGE_AGENT_MQTT_DEVICE": "tasmota-{1}", "EDGE_AGENT_SENSOR_CHANNELS": "t=BME280.Temperature,h=BME280.Humidity"})
    assert ok.mqtt_device == "tasmota-{1}" and ok.sensor_channels == ("t=BME280.Temperature", "h=BME280.Humidity")


@pytest.mark.parametrize(("env", "message"), [
    ({"CLOUD_HUB_CONNECT_TIMEOUT_S": "inf"}, "connect_timeout_s must be at most 1e+09 seconds (about 31 years), got inf"),
    ({"CLOUD_HUB_HTTP_TIMEOUT_S": "1e300"}, "http_timeout_s must be at most 1e+09 seconds"),
    ({"CLOUD_HUB_CANARY_CHECK_S": "1e300"}, "canary_check_s must be at most 1e+09 seconds"),
    ({"CLOUD_HUB_BATCH_LINGER_MS": "1e12"}, "batch_linger_ms must be at most 60000 (a minute)"),
])
def test_a_hubs_time_settings_past_any_wait_are_refused(env: dict, message: str) -> None:
    """A hostile peer's finding: connect_timeout_s = inf was an OverflowError traceback at start,
    http_timeout_s = 1e300 an HTTP door that answered nothing, canary_check_s = 1e300 a judge thread dead at
    its first wait."""
    from cloud_hub.settings import HubSettings

    with pytest.raises(SettingsError) as err:
        load_settings(HubSettings, env_prefix="CLOUD_HUB", environ=env)
    assert message in str(err.value)
