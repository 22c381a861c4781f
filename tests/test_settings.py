"""Settings: file < environment < flags, strict validation with readable errors."""

from __future__ import annotations

import pytest

from edge_agent.settings import AgentSettings, BrokerURL, SettingsError, load_settings


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
        ("bogus = 1\n", {}, "unknown setting(s) bogus"),
        ('batch_max_results = "many"\n', {}, "batch_max_results must be int"),
        ("", {"EDGE_AGENT_BATCH_MAX_RESULTS": "x"}, "environment EDGE_AGENT_BATCH_MAX_RESULTS"),
        ('outbox_overflow = "explode"\n', {}, "outbox_overflow must be one of drop_oldest, block"),
        ('broker = "tcp://x"\n', {}, "must start with mqtt:// or mqtts://"),
        ("batch_max_results = 0\n", {}, "batch_max_results must be > 0"),
        ('source = "follow"\n', {}, "needs source_path"),
        ('ca_file = "/no/such/ca.pem"\n', {}, "does not exist"),
        ("broker = \n", {}, "not valid TOML"),
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
