"""Hub settings: one validated object per hub process (a TOML file's top-level keys = field names).

Loaded with :func:`edge_agent.settings.loader.load_settings` (defaults < TOML file < environment
``CLOUD_HUB_<FIELD>`` < command-line flags), so the hub and the agent share one loader and one set
of error messages.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.contract import ContractError, check_id
from edge_agent.settings.broker import BrokerSettings
from edge_agent.settings.loader import LOG_LEVELS, SettingsError, choice, positive, seconds, user_path

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

ENV_PREFIX = "CLOUD_HUB"
MAX_BATCH = 100_000
MIN_TOKEN = 16  # characters of an HTTP token: a guessable one is no door
ON_UNDECIDED = ("rollback", "promote", "hold")  # what an undecided canary does at its limit
# What every command that publishes (publish, canary, federate) says when it has nothing to sign with.
NO_SIGNING_KEY = ("no signing key: pass --signing-key (make one with `cloud-hub keygen`), "
                  "or --insecure-unsigned for development brokers")


@dataclass(frozen=True)
class HubSettings(BrokerSettings):
    """Everything a hub process needs (broker, TLS files and prefix come from BrokerSettings)."""

    db: str = "sqlite:///hub.sqlite"  # any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db
    auto_migrate: bool = False  # serve upgrades a database whose schema is behind (else: refuse, say how)
    # Names the persistent session: stable across restarts, unique per hub. Default: cloud-hub-<host>-<hash of
    # db and prefix>, so two hubs on one broker never share a session by accident (that knocks both off).
    client_id: str | None = None
    share_group: str | None = None  # subscribe through $share/<group>/... so several hubs split the fleet
    session_expiry_s: int = 86_400  # the broker keeps our session (and queues results) this long
    connect_timeout_s: float = 10.0  # `serve` gives up (exit 3) if the first connection takes longer
    batch_max: int = 5_000  # result rows per transaction
    batch_max_delay_s: float = 0.2  # longest time spent collecting one batch while messages keep coming
    # A batch that drained the queue waits this long after its first message for more before it is written:
    # a busy hub then commits, receipts and acknowledges groups (docs/configuration.md). 0 = write at once.
    # 10: at 1,000 devices x 1 result/s a sixth less CPU than 5, receipts p99 ~40 ms (bench/fleet.py --linger)
    batch_linger_ms: float = 10.0
    receipts: bool = True  # after each commit, tell devices which results are stored (they keep them until then)
    dead_letter_max_bytes: int = 64 << 10  # raw payload bytes kept per dead letter
    # What one device may send (cloud_hub/data/limits.py): messages a second, results and statuses alike, in
    # bursts of up to device_burst. Past it a message is acknowledged and dropped unstored (no receipt: the
    # device sends it again later), and a dead letter names the device every 10 s. 0 = no limit.
    device_max_msgs_per_s: float = 200.0
    device_burst: int = 2_000
    log_interval_s: float = 10.0  # a stats line this often; 0 = never
    # The HTTP door of serve (docs/operations.md: The HTTP door): PORT (on 127.0.0.1) or HOST:PORT answers /, /api/fleet
    # and /metrics; None = no HTTP server. A non-loopback host needs http_token_file (bearer, or basic auth's
    # password), unless http_insecure says another layer guards it. TLS with http_cert_file + http_key_file (PEM).
    http: str | None = None
    http_token_file: str | None = None
    http_cert_file: str | None = None
    http_key_file: str | None = None
    http_insecure: bool = False
    http_timeout_s: float = 10.0  # a client silent this long mid-request (or mid-handshake) is dropped
    log_level: str = "INFO"
    # Model lifecycle (used by the retraining/rollout commands).
    model_name: str = "default"
    signing_key: str | None = None  # Ed25519 private key (PEM) that signs published bundles
    retrain_every_n: int = 0  # retrain after this many new labelled results; 0 = never automatically
    retrain_tolerance: float = 0.0  # a candidate may be this much worse than the running model
    retrain_interval_s: float = 0.0  # also retrain this often while serve runs (if new labelled data); 0 = never
    auto_publish: bool = False  # publish a retrained version that passed its gate (needs signing_key)
    # Canary rollouts (cloud-hub publish --canary): serve judges the open one this often (0 = only by hand),
    # after this many scored results from the cohort, allowing it to be this much worse than the control
    # (accuracy as a fraction, a regressor's mean error in its unit, or mean confidence).
    canary_check_s: float = 5.0
    canary_min_results: int = 50
    canary_tolerance: float = 0.02
    # The judge (cloud_hub/rollout/canary_judge.py, README: Canary rollouts): a regressor may have this fraction more
    # error than on the previous version; each wrong decision has at most this chance over every check
    # together; past this many cohort results or seconds (0: no time limit) an undecided canary is rolled
    # back, promoted or held open, as on_undecided says.
    canary_error_tolerance: float = 0.05
    canary_alpha: float = 0.05
    canary_max_results: int = 40_000
    canary_max_s: float = 0.0
    canary_on_undecided: str = "promote"

    def validate(self) -> None:
        self.validate_broker()
        _ = self.topics
        try:
            check_id(self.session_id, "client id")
            if self.share_group is not None:
                check_id(self.share_group, "share group")
            check_id(self.model_name, "model name")
        except ContractError as exc:
            raise SettingsError(exc.reason) from exc
        db_url(self.db)
        choice("log_level", self.log_level.upper(), LOG_LEVELS, raw=self.log_level)
        choice("canary_on_undecided", self.canary_on_undecided, ON_UNDECIDED)
        if not 0 < self.canary_alpha < 0.5:
            raise SettingsError(f"canary_alpha must be between 0 and 0.5, got {self.canary_alpha}",
                                field="canary_alpha")
        if self.canary_max_results < self.canary_min_results:
            raise SettingsError(f"canary_max_results ({self.canary_max_results}) must be at least "
                                f"canary_min_results ({self.canary_min_results})", field="canary_max_results")
        for name in ("batch_max", "dead_letter_max_bytes", "canary_min_results", "canary_max_results"):
            positive(name, getattr(self, name))
        for name in ("device_max_msgs_per_s", "device_burst", "session_expiry_s", "retrain_every_n",
                     "retrain_tolerance", "canary_tolerance", "canary_error_tolerance"):
            positive(name, getattr(self, name), zero_ok=True)
        seconds("connect_timeout_s", self.connect_timeout_s)
        for name in ("batch_max_delay_s", "log_interval_s", "retrain_interval_s", "canary_check_s", "canary_max_s"):
            seconds(name, getattr(self, name), zero_ok=True)
        positive("batch_linger_ms", self.batch_linger_ms, zero_ok=True)
        if not self.batch_linger_ms <= 60_000:  # every result would wait for it before its receipt
            raise SettingsError(f"batch_linger_ms must be at most 60000 (a minute), got {self.batch_linger_ms!r}",
                                field="batch_linger_ms")
        if not self.canary_tolerance < 1:  # 5 meant 5 points: 500, and a canary that could never roll back
            raise SettingsError(f"canary_tolerance is a fraction (0.02 = 2 accuracy points), got "
                                f"{self.canary_tolerance:g}", field="canary_tolerance")
        seconds("http_timeout_s", self.http_timeout_s)
        if self.http is not None:
            self.http_door_check()
        if self.batch_max > MAX_BATCH:
            raise SettingsError(f"batch_max must be at most {MAX_BATCH}, got {self.batch_max}")
        if self.session_expiry_s > 0xFFFFFFFF:
            raise SettingsError("session_expiry_s must fit in 32 bits (MQTT 5)")

    def signing_key_check(self) -> None:
        """For the commands that sign (serve's promotions, publish, export, federate): a ``signing_key`` that is not
        a file is refused at start, not when the first canary is promoted hours later (what is in it:
        ``cloud_hub.models.signing.load_private_key``, which ``settings_from(signs=True)`` calls next). Only those
        check it: a config shared with commands that only read must not need the key on every machine."""
        if self.signing_key is not None:
            key = user_path("signing_key", self.signing_key)
            if not key.is_file():
                raise SettingsError(f"signing_key {str(key)!r} {'is not a file' if key.exists() else 'does not exist'}"
                                    " (make a key pair with `cloud-hub keygen`)", field="signing_key")

    def http_door_check(self) -> None:
        """The HTTP door's settings, at start: a token and certificate that load, and no public address left open."""
        host, _port = split_address(self.http or "")
        token = self.http_token()
        self.http_tls()
        if token is None and not self.http_insecure and not is_loopback(host):
            raise SettingsError(
                f"http {self.http} is not a loopback address and http_token_file is not set: anyone reaching the "
                "port would see every device; set http_token_file (docs/operations.md: The HTTP door), or "
                "http_insecure = true if a proxy or firewall guards it", field="http")

    def http_token(self) -> str | None:
        """The token of ``http_token_file`` (its one line, surrounding blanks stripped), or None."""
        if self.http_token_file is None:
            return None
        path = user_path("http_token_file", self.http_token_file)
        try:
            token = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise SettingsError(f"http_token_file {str(path)!r} does not exist", field="http_token_file") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, not ASCII
            raise SettingsError(f"http_token_file {str(path)!r} cannot be read: {exc}",
                                field="http_token_file") from None
        if not token:
            raise SettingsError(f"http_token_file {str(path)!r} is empty", field="http_token_file")
        if not token.isprintable() or any(ch.isspace() for ch in token):
            raise SettingsError(f"http_token_file {str(path)!r} must hold one token (printable, no spaces)",
                                field="http_token_file")
        if len(token) < MIN_TOKEN:
            raise SettingsError(f"http_token_file {str(path)!r} holds {len(token)} characters, fewer than "
                                f"{MIN_TOKEN} (make one with `openssl rand -hex 32`)", field="http_token_file")
        return token

    def http_tls(self) -> ssl.SSLContext | None:
        """The server's TLS context from ``http_cert_file`` and ``http_key_file``, or None (plain HTTP)."""
        if self.http_cert_file is None and self.http_key_file is None:
            return None
        if self.http_cert_file is None or self.http_key_file is None:
            raise SettingsError("http_cert_file and http_key_file go together", field="http_cert_file")
        cert = user_path("http_cert_file", self.http_cert_file)
        key = user_path("http_key_file", self.http_key_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:  # missing, unreadable, not PEM, a key of another certificate
            raise SettingsError(f"http_cert_file {str(cert)!r} / http_key_file {str(key)!r} cannot be loaded: "
                                f"{getattr(exc, 'strerror', None) or exc}", field="http_cert_file") from None
        return context

    @property
    def session_id(self) -> str:
        """The MQTT client id: ``client_id``, or one derived from this host, the database and the prefix."""
        if self.client_id is not None:
            return self.client_id
        digest = hashlib.sha256(f"{self.db}\n{self.prefix}".encode()).hexdigest()[:8]
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
        return f"cloud-hub-{host}-{digest}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` of the HTTP endpoint, or a bare port on 127.0.0.1; a SettingsError naming ``http`` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep:
        host = "127.0.0.1"  # the safe default: only this machine (a reverse proxy, ssh -L) reaches it
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # not "²"
        raise SettingsError(f"http must be PORT or HOST:PORT, e.g. 9100 or 10.0.0.5:9100, got {address!r}",
                            field="http")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Only this machine can connect to ``host`` (a name other than localhost counts as public)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_driver(parsed: URL, exc: BaseException) -> str:
    """What to say of a database URL whose driver cannot be loaded."""
    hint = ""
    if parsed.get_backend_name() in ("postgres", "postgresql"):  # postgres:// is Heroku's; psycopg2 is not ours
        hint = "; for PostgreSQL write postgresql+psycopg://USER@HOST:PORT/DB (the postgres extra installs psycopg)"
    return f"db {parsed.render_as_string(hide_password=True)!r}: no driver ({exc}){hint}"


def db_url(url: str) -> str:
    """Check that ``url`` is an SQLAlchemy database URL; return it unchanged."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # "9://:.": make_url's int() of the port raises ValueError
        raise SettingsError(f"db {url!r} is not a database URL (e.g. sqlite:///hub.sqlite, "
                            "postgresql+psycopg://user@host/db)", field="db") from exc
    if parsed.drivername.startswith("sqlite") and parsed.host:  # sqlite://hub.sqlite: a host, no file
        raise SettingsError(f"db {url!r}: a SQLite URL takes three slashes before a relative path "
                            f"(sqlite:///{parsed.host}{'/' + parsed.database if parsed.database else ''}) "
                            "and four before an absolute one (sqlite:////var/lib/hub.sqlite)", field="db")
    try:  # the driver, now: later its error could not say where the URL came from
        parsed.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        raise SettingsError(no_driver(parsed, exc), field="db") from None
    if parsed.drivername.startswith("sqlite") and parsed.database:
        user_path("db", parsed.database)  # sqlite:///~nosuchuser/hub.sqlite
    return url
