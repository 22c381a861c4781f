"""The HTTP door of ``cloud-hub serve --http``: who may come in, and a server no client can jam.

The dashboard and ``/metrics`` show every device id, version and accuracy, so the door is shut by
default: a bare port binds 127.0.0.1, and a public address needs a token (``http_token_file``,
checked in :mod:`cloud_hub.settings`). The token comes as ``Authorization: Bearer <token>``
(Prometheus ``authorization.credentials_file``, curl) or as basic auth's password, whatever the user
name (a browser prompts for it on the 401's ``WWW-Authenticate: Basic``; Prometheus ``basic_auth``).
Compared with :func:`hmac.compare_digest`, so the time taken says nothing about how much matched.
A refusal is counted (``edgeml_hub_http_unauthorized_total``) and logged at most once a minute: a
scanner must not flood the log.

The server answers each connection in its own thread with a socket timeout, and does the TLS
handshake there too (``ssl`` on the listening socket would handshake in the accept loop, where one
client that connects and stays silent blocks everyone).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cloud_hub.data import sessions

log = logging.getLogger(__name__)
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REALM = "edgeml hub"
LOG_EVERY_S = 60.0  # at most one line about refused requests this often


def presented(environ: dict[str, Any]) -> bytes | None:
    """The token a request presents: a bearer token, or basic auth's password; None without one."""
    scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode("latin-1", "replace")  # wsgiref decodes latin-1
    if scheme.lower() == "basic":
        try:
            user_pass = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = user_pass.partition(b":")
        return password if sep else None
    return None


class Door:
    """WSGI middleware: the wrapped app only sees requests that present ``token``."""

    def __init__(self, app: WSGIApp, token: str, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.token = token.encode("ascii")
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._refused_since_log = 0
        self._next_log = 0.0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = presented(environ)
        if given is not None and hmac.compare_digest(given, self.token):
            return self.app(environ, start_response)
        self.refused(environ, "wrong credentials" if given is not None else "no credentials")
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
                                            ("Cache-Control", "no-store")])
        return [b"401: send the hub's http token as 'Authorization: Bearer <token>' or as basic auth's password\n"]

    def refused(self, environ: dict[str, Any], why: str) -> None:
        self.on_refused()
        now = time.monotonic()
        with self._lock:
            self._refused_since_log += 1
            if now < self._next_log:
                return
            count, self._refused_since_log, self._next_log = self._refused_since_log, 0, now + LOG_EVERY_S
        log.warning("http: refused %d request(s) without valid credentials since the last such line (latest: %s, "
                    "%s %.80r from %s)", count, why, environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                    environ.get("REMOTE_ADDR"))


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection (daemon: serve's stop never waits for a stalled client)."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None
    timeout_s = 10.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.timeout_s)  # a client that stops talking is dropped, its thread freed
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        tls_sock = self.tls.wrap_socket(request, server_side=True)  # the handshake, in this thread
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            tls_sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up, times out or fails the handshake: one debug line, not a traceback."""
        exc = sys.exc_info()[1]
        log.debug("http: connection from %s ended: %s: %s", client_address, type(exc).__name__, exc)


def serve_http(host: str, port: int, app: WSGIApp, *, tls: ssl.SSLContext | None, timeout_s: float) -> _Server:
    """Start the server in a daemon thread; OSError when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # [::1]:9100
    server_class: type[_Server] = type("HubHTTPServer", (_Server,),
                                       {"tls": tls, "timeout_s": timeout_s, "address_family": family})
    server: _Server = make_server(host, port, app, server_class=server_class, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="hub-http", daemon=True).start()
    return server


def error_answer(exc: BaseException) -> tuple[str, str]:
    """A page's (HTTP status, error text) for ``exc``: 503 while the database is away (a reload may do); 500
    for the hub's own fault, logged with its traceback (a lying device's figures once made the judge divide
    by zero, shown as "database unavailable")."""
    if sessions.is_database_error(exc):
        return "503 Service Unavailable", f"database unavailable: {sessions.first_line(exc)}"
    log.error("a page's figures failed: %s", sessions.first_line(exc), exc_info=exc)
    return "500 Internal Server Error", f"hub error (its log has the traceback): {sessions.first_line(exc)}"
