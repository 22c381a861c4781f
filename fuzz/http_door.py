"""The hub's HTTP door as a fuzz target (issue 29 §5): any bytes as what a client sends on one connection.

The bytes go through the same pieces ``serve --http`` runs (wsgiref's request parsing, the token
:class:`~cloud_hub.web.http_door.Door`, the dashboard's routes, ``/metrics``, ``/api/fleet`` and the device
pages over a real SQLite database with a few devices in it), in memory rather than over a socket, so that
libFuzzer sees every input's coverage and an input's exception reaches the fuzzer instead of a server
thread's log.

The property: the request is answered (or, for a connection that sends no request line, closed), never
with a 500 (an exception in our code); a 200 only for a request that presented the token (an HTTP/0.9
request, a line without a version, gets a body without a status line: the 401's text unless it presented
the token); the fleet's JSON parses; ``serve``'s own limits hold (request line over 64 KiB: 414); a device's
page (``/devices/<id>``, ``/api/devices/<id>``) answers 200 only for a device the hub knows, and its 404
page has the same markup whatever the id (an id's ``<`` shown unescaped would add to it).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import orjson

from cloud_hub.data import sessions
from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import ResultRow, dead_letter
from cloud_hub.settings import HubSettings
from cloud_hub.web.metrics import HubMetrics
from edge_agent import contract as c

TOKEN = "fuzz-token-0123456789abcdef"
DEVICES = ("dev-a", "dev-b", "dev-c")  # what _fill stores
ANSWERS = {200, 400, 401, 404, 405, 408, 414, 431, 501, 503, 505}  # 503: the page's "database away"
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")
_BARE = re.compile(rb"^<!DOCTYPE HTML>.*<p>Error code: (\d{3})</p>", re.S)  # http.server's answer to HTTP/0.9


class _InMemory(WSGIRequestHandler):
    """wsgiref's handler over the input's bytes instead of a socket."""

    def setup(self) -> None:
        self.connection = None
        self.rfile = io.BytesIO(self.request)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Door:
    """One hub (database, metrics, routes behind a token) answering requests given as bytes."""

    def __init__(self, scratch: Path, token: str | None = TOKEN) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        db = scratch / "hub.sqlite"
        db.unlink(missing_ok=True)
        self.hub = Hub(HubSettings(db=f"sqlite:///{db}", log_interval_s=0))
        _fill(self.hub)
        self.server = WSGIServer(("127.0.0.1", 0), _InMemory, bind_and_activate=False)
        self.server.server_name, self.server.server_port = "fuzz", 9100  # what server_bind would set
        self.server.setup_environ()
        self.server.set_app(HubMetrics(self.hub).wsgi(token))
        self.server.socket.close()  # never bound: the requests come as bytes
        self.path_info: str | None = None
        unknown = self.answer(b"GET /devices/dev-zz HTTP/1.0\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        self.tags_404 = unknown[0].partition(b"\r\n\r\n")[2].count(b"<")  # the 404 page's own markup

    def answer(self, data: bytes) -> tuple[bytes, str | None]:
        """What the door wrote back, and the request's HTTP version (None: there was no request line);
        ``path_info`` is then the path the routes saw (as wsgiref decodes it), or None."""
        handler = _InMemory(data, ("127.0.0.1", 40000), self.server)  # type: ignore[arg-type]  # bytes, not a socket
        written = handler.wfile
        assert isinstance(written, io.BytesIO)
        path = getattr(handler, "path", None)
        self.path_info = None if path is None else unquote(path.split("?", 1)[0], "iso-8859-1")
        return written.getvalue(), getattr(handler, "request_version", None)


def _fill(hub: Hub) -> None:
    """Three devices with results, statuses and a dead letter: the dashboard's tables have rows."""
    now = time.time()
    rows = [ResultRow(f"dev-{d}", s, now - 60 + s, now - 59 + s, 1, "walk", 0.9, None, "walk" if s % 2 else "run",
                      2.0, None, now - 58 + s) for d in "abc" for s in range(20)]
    with sessions.transaction(hub.engine) as conn:
        hub.store.insert_results(conn, rows)
        hub.store.touch_devices(conn, {f"dev-{d}": now for d in "abc"})
        hub.store.apply_statuses(conn, {f"dev-{d}": (c.Status(f"dev-{d}", c.ONLINE, now, "m", 1, drift_psi=0.3), now)
                                        for d in "ab"})
        hub.store.insert_dead_letters(conn, [dead_letter("edge/dev-c/results", b"{", "not JSON", now, 1024)])


def _authorized(data: bytes) -> bool:
    """Whether the request carries the token, as a bearer token or in basic auth (any user name)."""
    if TOKEN.encode() in data:
        return True
    for word in re.findall(rb"[A-Za-z0-9+/]{30,}=*", data):
        try:
            if base64.b64decode(word + b"=" * (-len(word) % 4)).partition(b":")[2] == TOKEN.encode():
                return True
        except binascii.Error:
            continue
    return False


_DOOR: Door | None = None


def target(data: bytes, scratch: Path) -> None:
    global _DOOR
    if _DOOR is None:
        _DOOR = Door(scratch)
    check(_DOOR, data)


def check(door: Door, data: bytes) -> None:
    """The property, for one input: an AssertionError when it is broken."""
    out, version = door.answer(data)
    if version is None:  # no request line: closed without an answer, as http.server does
        assert not out, out[:200]
        return
    m = _STATUS.match(out) or _BARE.match(out)
    if version == "HTTP/0.9" and not _STATUS.match(out):  # answered with the body alone, no status line
        assert m is not None or not out or out.startswith(b"401: ") or _authorized(data), \
            f"an HTTP/0.9 answer without the token: {out[:200]!r}"
        if m is None:
            return
    assert m is not None, f"not an HTTP answer: {out[:400]!r}"
    status = int(m.group(1))
    assert status in ANSWERS, f"answered {status}: {out[:2000]!r}"
    if status == 200:
        assert _authorized(data), "a 200 without the token"
    if len(data.split(b"\n", 1)[0]) > 65536:
        assert status == 414, status
    head, _, body = out.partition(b"\r\n\r\n")
    if status == 200 and b"application/json" in head and body:
        orjson.loads(body)
    path = door.path_info or ""
    for prefix in ("/devices/", "/api/devices/"):
        if path.startswith(prefix):
            device = path[len(prefix):]
            assert status != 200 or device in DEVICES, f"a page for {device!r}, which the hub never heard of"
            if prefix == "/devices/" and status == 404 and b"text/html" in head and body:  # no markup of the id's
                assert body.count(b"<") == door.tags_404, f"{device!r} shown unescaped: {body[-300:]!r}"
