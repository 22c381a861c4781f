"""How a process reaches the broker: its URL, TLS files, topic prefix, timeouts.

:class:`BrokerSettings` is the part of the settings the agent (:mod:`edge_agent.settings.agent`) and the hub
(:mod:`cloud_hub.settings`) share, and :class:`BrokerURL` and :class:`TLSFiles` are what
:mod:`edge_agent.mqtt` connects with: apart from the loader, which knows no broker, and from either
process's own settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from edge_agent.contract import ContractError, Topics
from edge_agent.settings.loader import SettingsError, seconds, user_path


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (TLS; port 8883 by default)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # "mqtt://[": an unclosed IPv6 bracket
            raise SettingsError(f"broker URL {url!r} is not a URL: {exc}") from exc
        if parts.scheme not in ("mqtt", "mqtts"):
            raise SettingsError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise SettingsError(f"broker URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise SettingsError(f"broker URL {url!r} must not have a path, query or fragment")
        try:
            port = parts.port
        except ValueError as exc:
            raise SettingsError(f"broker URL {url!r} has an invalid port") from exc
        if port == 0:  # not "the default": a typo would otherwise connect to 1883 silently
            raise SettingsError(f"broker URL {url!r} has an invalid port")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname, port=port or (8883 if tls else 1883), tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:  # never print the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """CA bundle and optional client certificate for ``mqtts://`` brokers."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def check(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not user_path(name, value).is_file():
                raise SettingsError(f"{name} {value!r} does not exist", field=name)
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingsError("cert_file and key_file go together")


@dataclass(frozen=True)
class BrokerSettings:
    """How a process reaches the broker: the part of the settings the agent and the hub share."""

    broker: str = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    prefix: str = "edgeml"
    connect_timeout_s: float = 30.0  # give up (exit 3, saying why) when the broker is unreachable this long
    # MQTT keepalive: with nothing from the broker for this long the link pings, and drops the link when the
    # ping goes unanswered as long again; a half-open link (a NAT or a cable that went away without a word)
    # is noticed within 1-2 keepalives, and the broker drops a silent client after 1.5.
    keepalive_s: int = 30

    def validate_broker(self) -> None:
        try:
            BrokerURL.parse(self.broker)
        except SettingsError as exc:
            raise SettingsError(str(exc), field="broker") from None
        self.tls.check()
        seconds("connect_timeout_s", self.connect_timeout_s)
        if not 1 <= self.keepalive_s <= 65535:  # MQTT's two-byte field; 0 would turn keepalive off
            raise SettingsError(f"keepalive_s must be in 1..65535 seconds, got {self.keepalive_s}", field="keepalive_s")

    @property
    def broker_url(self) -> BrokerURL:
        return BrokerURL.parse(self.broker)

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(self.ca_file, self.cert_file, self.key_file)

    @property
    def topics(self) -> Topics:
        try:
            return Topics(self.prefix)
        except ContractError as exc:
            raise SettingsError(exc.reason) from exc
