"""The HTTP door of `cloud-hub serve --http` (issue 29, section 5): loopback by default, a public address only
with a token, the token as bearer or basic auth (compared in constant time), 401s counted and logged at most
once a minute, TLS from a certificate, and handlers that neither crash nor hang on hostile requests, checked
against a real `serve` process and a real mosquitto."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import http.client
import ipaddress
import logging
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.settings import ENV_PREFIX, HubSettings, split_address
from cloud_hub.tools.local_broker import LocalBroker, free_port, port_open
from cloud_hub.web.http_door import Door, presented
from edge_agent import exits
from edge_agent.settings.loader import SettingsError, load_settings
from tests.helpers import wait_for
from tests.test_hub_cli import ServeProcess

TOKEN = "s3cret-token-0123456789abcdef"


def settings(**flags: object) -> HubSettings:
    return load_settings(HubSettings, env_prefix=ENV_PREFIX, flags=flags, environ={})


def token_file(tmp_path: Path, text: str = TOKEN + "\n") -> str:
    path = tmp_path / "http.token"
    path.write_text(text)
    return str(path)


def basic(token: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


# ----------------------------------------------------------------------------------------- settings, at start

def test_a_bare_port_binds_loopback_and_a_public_address_needs_a_token_or_an_explicit_opt_out(tmp_path) -> None:
    assert split_address("9100") == ("127.0.0.1", 9100)
    assert split_address("[::1]:9100") == ("::1", 9100)
    settings(http="9100")  # loopback, no token: fine
    settings(http="localhost:9100")
    with pytest.raises(SettingsError, match=r"--http: http 0\.0\.0\.0:9100 is not a loopback address.*http_token_file"):
        settings(http="0.0.0.0:9100")
    with pytest.raises(SettingsError, match="not a loopback address"):
        settings(http="hub.example.com:9100")  # a name may resolve anywhere: public
    settings(http="0.0.0.0:9100", http_token_file=token_file(tmp_path))
    settings(http="0.0.0.0:9100", http_insecure=True)


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"), ("", "is empty"), ("  \n", "is empty"), ("short", "fewer than 16"),
    ("two words-0123456789abc", "one token"), ("tok\x01en-0123456789abcdef", "one token"),
    ("tökén-0123456789abcdef", "cannot be read"), ("dir", "cannot be read"),
])
def test_a_token_file_that_is_missing_unreadable_empty_or_weak_is_refused_naming_it(
        tmp_path, content: str | None, needle: str) -> None:
    path = tmp_path / "http.token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match=f"--http-token-file: http_token_file .*{needle}"):
        settings(http="9100", http_token_file=str(path))


def test_serve_refuses_a_public_address_without_a_token_in_one_line_exit_2(tmp_path) -> None:
    port = free_port()
    res = subprocess.run([sys.executable, "-m", "cloud_hub", "serve", "--db", f"sqlite:///{tmp_path / 'h.sqlite'}",
                          "--http", f"0.0.0.0:{port}"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    err = res.stderr.strip()
    assert res.returncode == exits.USAGE and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--http: http 0.0.0.0:{port} is not a loopback address" in err and "http_insecure" in err, err
    assert not port_open("127.0.0.1", port)


# ----------------------------------------------------------------------------------------- the door itself

def _call(door: Door, authorization: str | None) -> str:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/fleet", "REMOTE_ADDR": "10.0.0.9"}
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    status: list[str] = []
    b"".join(door(environ, lambda s, headers: status.append(s)))
    return status[0]


def test_the_door_lets_in_the_token_as_bearer_or_basic_password_only_and_logs_refusals_once_a_minute(caplog) -> None:
    def inside(environ, start_response):
        start_response("200 OK", [])
        return [b"fleet"]

    refused: list[int] = []
    door = Door(inside, TOKEN, lambda: refused.append(1))
    assert _call(door, f"Bearer {TOKEN}") == "200 OK"
    assert _call(door, f"bearer  {TOKEN} ") == "200 OK"
    assert _call(door, basic(TOKEN)) == "200 OK"
    caplog.set_level(logging.WARNING, logger="cloud_hub.web.http_door")
    for auth in (None, f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", basic(TOKEN[:-1]), f"Token {TOKEN}",
                 "Basic !!!not-base64", "Basic " + base64.b64encode(TOKEN.encode()).decode(), "Bearer",
                 f"Bearer {TOKEN}\u00e9", "Basic " + base64.b64encode(b":").decode()):
        assert _call(door, auth) == "401 Unauthorized", auth
    assert len(refused) == 10
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "10.0.0.9" in lines[0], lines  # 10 refusals in a minute: one line
    assert presented({"HTTP_AUTHORIZATION": basic("pw:with:colons")}) == b"pw:with:colons"


# ----------------------------------------------------------------------------------------- against serve

def start_serve(procs, broker: LocalBroker, prefix: str, tmp_path: Path, **env: str) -> tuple[ServeProcess, int]:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve.log",
                       env={"CLOUD_HUB_HTTP": f"127.0.0.1:{port}", **env})
    hub.wait_started()
    wait_for(lambda: port_open("127.0.0.1", port) or hub.proc.poll() is not None, what="the HTTP door")
    assert hub.proc.poll() is None, hub.log.read_text()
    return hub, port


def get(port: int, path: str, authorization: str | None = None,
        tls: ssl.SSLContext | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        conn.request("GET", path, headers={} if authorization is None else {"Authorization": authorization})
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def unauthorized_total(port: int, tls: ssl.SSLContext | None = None) -> float:
    status, _, body = get(port, "/metrics", f"Bearer {TOKEN}", tls)
    assert status == 200, body
    return next(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                if s.name == "edgeml_hub_http_unauthorized_total")


@pytest.mark.slow
def test_serve_answers_only_with_the_token_and_counts_each_401(procs, broker: LocalBroker, prefix: str,
                                                               tmp_path: Path) -> None:
    hub, port = start_serve(procs, broker, prefix, tmp_path, CLOUD_HUB_HTTP_TOKEN_FILE=token_file(tmp_path))
    refused = 0
    for path in ("/", "/api/fleet", "/metrics", "/nope", "/devices/dev-1", "/api/devices/dev-1"):
        for auth in (None, "Bearer wrong-token-0123456789", basic("wrong")):
            status, resp, body = get(port, path, auth)
            assert status == 401 and b"fleet" not in body and b"edgeml_" not in body, (path, auth, body)
            assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")  # a browser prompts
            refused += 1
    assert unauthorized_total(port) == refused
    status, _, body = get(port, "/api/fleet", f"Bearer {TOKEN}")
    assert status == 200 and b'"devices"' in body
    status, _, body = get(port, "/", basic(TOKEN))
    assert status == 200 and b"edgeml fleet" in body
    assert get(port, "/nope", f"Bearer {TOKEN}")[0] == 404
    status, _, body = get(port, "/devices/dev-1", f"Bearer {TOKEN}")  # the door let it in: the page answers
    assert status == 404 and b"no device &#x27;dev-1&#x27; on this hub" in body, body
    assert unauthorized_total(port) == refused  # the authorized requests were not counted
    assert "refused" in hub.log.read_text()
    assert hub.signal(signal.SIGTERM) == 0


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as an operator would make with openssl."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeml hub")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_certificate_that_does_not_load_is_refused_at_start(tmp_path) -> None:
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    settings(http="9100", http_cert_file=str(cert), http_key_file=str(key))
    with pytest.raises(SettingsError, match="go together"):
        settings(http="9100", http_cert_file=str(cert))
    with pytest.raises(SettingsError, match="--http-cert-file: http_cert_file .* cannot be loaded"):
        settings(http="9100", http_cert_file=str(key), http_key_file=str(key))  # a key is no certificate
    with pytest.raises(SettingsError, match="cannot be loaded"):
        settings(http="9100", http_cert_file=str(other_cert), http_key_file=str(key))  # not this key's
    with pytest.raises(SettingsError, match="No such file"):
        settings(http="9100", http_cert_file=str(tmp_path / "nope.crt"), http_key_file=str(key))


@pytest.mark.slow
def test_serve_over_tls_with_a_certificate_and_a_stalled_handshake_blocks_no_one(procs, broker: LocalBroker,
                                                                                 prefix: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    hub, port = start_serve(procs, broker, prefix, tmp_path, CLOUD_HUB_HTTP_TOKEN_FILE=token_file(tmp_path),
                            CLOUD_HUB_HTTP_CERT_FILE=str(cert), CLOUD_HUB_HTTP_KEY_FILE=str(key))
    client = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # connects, never says hello
        status, _, body = get(port, "/api/fleet", f"Bearer {TOKEN}", client)
        assert status == 200 and b'"devices"' in body
    assert get(port, "/metrics", None, client)[0] == 401
    assert unauthorized_total(port, client) == 1
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust this certificate
        get(port, "/metrics", f"Bearer {TOKEN}", ssl.create_default_context())
    assert b"edgeml_" not in raw(port, b"GET /metrics HTTP/1.0\r\n" + AUTH + b"\r\n")  # plain HTTP: a hang-up
    assert get(port, "/api/fleet", f"Bearer {TOKEN}", client)[0] == 200
    assert "Traceback" not in hub.log.read_text()
    assert hub.signal(signal.SIGTERM) == 0


# ----------------------------------------------------------------------------------------- hostile clients

def raw(port: int, request: bytes) -> bytes:
    """Send ``request``, say we are done (half-close), read until the server closes; a reset counts as closed."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:  # reset, broken pipe, not connected: it hung up (we sent more than it reads)
            if isinstance(exc, TimeoutError):  # a hang is what this must catch
                raise
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    if reply.startswith(b"HTTP/1."):
        return int(reply.split(b" ", 2)[1])
    found = re.search(rb"Error code: (\d+)", reply)  # a request line it cannot parse: the HTTP/0.9 way, no headers
    assert found, reply[:200]
    return int(found[1])


AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()

HOSTILE = {  # request -> the status it must get
    b"GET /../../etc/passwd HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /%00%ff%2e%2e/metrics HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /\xff\xfe\x00 HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET http://evil.example/api/fleet HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /devices/%3Cscript%3E HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /devices/" + b"a" * 60_000 + b" HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /api/devices/..%2F..%2Fetc HTTP/1.1\r\n" + AUTH + b"\r\n": 404,
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n": 414,
    b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n": 431,
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n": 431,
    b"BREW /metrics HTTP/1.1\r\n" + AUTH + b"\r\n": 405,
    b"POST /api/fleet HTTP/1.1\r\n" + AUTH + b"Content-Length: 5\r\n\r\nhello": 405,
    b"GET / HTTP/1.1 extra\r\n\r\n": 400,
    b"GET / HTTP/9.9\r\n\r\n": 505,
    b"GET / HTTP/1.1\r\nAuthorization: Basic \xff\xfe\r\n\r\n": 401,
    b"GET / HTTP/1.1\r\nAuthorization: Bearer " + b"t" * 60_000 + b"\r\n\r\n": 401,
}


@pytest.mark.slow
def test_hostile_requests_get_an_answer_and_serve_keeps_answering(procs, broker: LocalBroker, prefix: str,
                                                                  tmp_path: Path) -> None:
    hub, port = start_serve(procs, broker, prefix, tmp_path, CLOUD_HUB_HTTP_TOKEN_FILE=token_file(tmp_path),
                            CLOUD_HUB_HTTP_TIMEOUT_S="2")
    stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled.sendall(b"GET /api/fl")  # half a request line, then nothing
    for request, expected in HOSTILE.items():
        assert status_of(raw(port, request)) == expected, request[:80]
    for _ in range(3):  # a huge body, never read: an answer or a hang-up, and the next request is served
        reply = raw(port, b"PUT / HTTP/1.1\r\n" + AUTH + b"Content-Length: 50000000\r\n\r\n" + b"z" * 4_000_000)
        assert reply == b"" or status_of(reply) == 405
    for reply in (raw(port, b""), raw(port, b"\r\n"), raw(port, b"\x16\x03\x01\x02\x00garbage")):
        assert reply == b"" or status_of(reply) == 400  # nothing or junk: a 400 or a close, never a crash
    rng = random.Random(29)
    pieces = [b"GET", b"HEAD", b"/", b"/metrics", b"/api/fleet", b" ", b"\r\n", b":", AUTH, b"%", b"\x00", b"\xff",
              b"HTTP/1.1", b"HTTP/1.0", b"Host: x", b"Content-Length: -1", b"Authorization: Basic ", b"?token="]
    for _ in range(300):  # seeded random requests built from the parts a parser cares about
        request = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        if rng.random() < 0.5:
            request = b"GET /api/fleet HTTP/1.1\r\n" + request + b"\r\n\r\n"
        reply = raw(port, request)
        assert reply == b"" or 200 <= status_of(reply) < 600, (request, reply[:200])
    status, _, body = get(port, "/api/fleet", f"Bearer {TOKEN}")  # the stalled client still there
    assert status == 200 and b'"devices"' in body
    stalled.settimeout(30)
    assert stalled.recv(100) == b""  # dropped by the server after http_timeout_s
    stalled.close()
    assert hub.proc.poll() is None and "Traceback" not in hub.log.read_text()
    holder = socket.create_connection(("127.0.0.1", port), timeout=30)
    holder.sendall(b"GET /")  # a client mid-request does not hold serve's stop up
    assert hub.signal(signal.SIGTERM) == 0
    holder.close()


def test_the_shipped_hub_config_listens_on_loopback_and_its_commented_door_settings_are_real_settings() -> None:
    import tomllib

    text = (Path(__file__).parent.parent / "deploy" / "hub.toml").read_text()
    shipped = tomllib.loads(text)
    assert split_address(shipped["http"])[0] == "127.0.0.1"
    commented = tomllib.loads("\n".join(line[2:] for line in text.splitlines()
                                        if line.startswith("# http") and " = " in line))
    assert {"http", "http_token_file", "http_cert_file", "http_key_file"} <= set(commented)
    assert set(commented) <= {f.name for f in dataclasses.fields(HubSettings)}
