"""How a process reaches the broker: its URL, TLS files, topic prefix, timeouts.

:class:`BrokerSettings` is the part of the settings the agent (:mod:`edge_agent.settings.agent`) and the hub
(:mod:`cloud_hub.settings`) share, and :class:`BrokerURL` and :class:`TLSFiles` are what
:mod:`edge_agent.mqtt` connects with: apart from the loader, which knows no broker, and from either
process's own settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from edge_agent.contract import ContractError, Topics
from edge_agent.settings.loader import SettingsError, seconds, user_path

if TYPE_CHECKING:
    import ssl


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
        """The files exist, can be read, and hold what the TLS handshake will load: a CA file of PEM certificates,
        a certificate and its own key. Loaded here as paho will load them, so that a mistake is one line naming the
        setting (an unreadable CA, a CA that is not PEM, a certificate with another's key had been tracebacks)."""
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is None:
                continue
            path = user_path(name, value)
            if path.is_dir():
                raise SettingsError(f"{name} {value!r} is a directory: give the file", field=name)
            if not path.is_file():
                raise SettingsError(f"{name} {value!r} does not exist", field=name)
            try:
                with path.open("rb") as f:
                    f.read(1)
            except OSError as exc:
                raise SettingsError(f"{name} {value!r} cannot be read: {exc.strerror or exc}", field=name) from None
        if (self.cert_file is None) != (self.key_file is None):
            given = "cert_file" if self.key_file is None else "key_file"
            raise SettingsError(f"{given} is set and {'key_file' if given == 'cert_file' else 'cert_file'} is not: "
                                "a client certificate needs its key (give both, or neither)", field=given)
        import ssl  # what paho's tls_set loads (paho imports ssl anyway)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is not None:  # the system's CAs (no ca_file) are not read here: nothing to check
            try:
                self._load_ca(context)
            except (ssl.SSLError, ValueError) as exc:
                raise SettingsError(f"ca_file {self.ca_file!r} holds no PEM certificate the TLS library can read "
                                    f"({getattr(exc, 'reason', None) or exc})", field="ca_file") from None
        try:
            self._load_certificate(context)
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            why = ("the key is not the certificate's" if reason == "KEY_VALUES_MISMATCH" else
                   "one of them is not a PEM certificate / unencrypted PEM key the TLS library can read")
            raise SettingsError(f"cert_file {self.cert_file!r} and key_file {self.key_file!r}: {why} ({reason})",
                                field="key_file") from None

    def client_context(self) -> ssl.SSLContext:
        """The TLS context paho's ``tls_set`` makes of these files: the CA file's certificates (else the system's)
        and the client certificate. Raises ``ssl.SSLError``/``OSError`` as loading them does."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is None:
            context.load_default_certs()
        else:
            self._load_ca(context)
        self._load_certificate(context)
        return context

    def _load_ca(self, context: ssl.SSLContext) -> None:
        context.load_verify_locations(cafile=str(user_path("ca_file", self.ca_file or "")))

    def _load_certificate(self, context: ssl.SSLContext) -> None:
        if self.cert_file is not None and self.key_file is not None:  # no password prompt: an encrypted key would
            context.load_cert_chain(str(user_path("cert_file", self.cert_file)),  # wait on a terminal a service
                                    str(user_path("key_file", self.key_file)), password=lambda: b"")  # does not have


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
