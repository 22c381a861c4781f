"""A TCP proxy that breaks the links through it on demand: the network at its worst, for the suite.

Clients connect to the proxy's port; each connection (a *link*) is paired with one to the real broker
and bytes are pumped both ways by two threads. On demand the proxy:

* **swallows and resets**: the next chunk of bytes in one direction is dropped (a PUBLISH, a PUBACK or
  a receipt lost on the way) and both sockets are reset (RST, no FIN);
* **stalls**: holds every byte for a while, then delivers it;
* **delays**: adds latency to every chunk;
* **blackholes**: drops every byte from now on, both ways, and closes nothing: a half-open link that
  only MQTT's keepalive can detect (the broker's close of its side is not passed on either);
* **refuses** new connections while ``refusing`` is set (closes them at once): the network is down.

Every spawned thread is a daemon that ends with its sockets; :meth:`FaultProxy.stop` closes them all.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 65536


@dataclass
class Link:
    """One client connection and its twin to the broker."""

    client: socket.socket
    upstream: socket.socket
    opened: float = field(default_factory=time.monotonic)
    reset_next: str | None = None  # "up" (client -> broker) or "down": drop the next chunk that way, then reset
    reset_packet: int | None = None  # ...only a chunk that starts with this MQTT packet type (3: PUBLISH, 4: PUBACK)
    blackholed: bool = False
    closed: bool = False
    swallowed: int = 0  # bytes dropped
    forwarded: int = 0
    down: int = 0  # of which broker -> client
    client_id: str | None = None  # from the CONNECT packet, once it went through


def connect_client_id(data: bytes) -> str | None:
    """The client id of an MQTT CONNECT packet at the start of ``data`` (v3.1.1 or v5), else None."""
    try:
        if data[0] >> 4 != 1:
            return None
        i = 1
        while data[i] & 0x80:  # remaining length
            i += 1
        i += 1
        name_len = int.from_bytes(data[i:i + 2], "big")
        i += 2 + name_len
        level = data[i]
        i += 1 + 1 + 2  # level, flags, keepalive
        if level == 5:  # properties: a variable byte integer length, then that many bytes
            length, shift = 0, 0
            while True:
                b = data[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            i += length
        id_len = int.from_bytes(data[i:i + 2], "big")
        return data[i + 2:i + 2 + id_len].decode()
    except (IndexError, UnicodeDecodeError):
        return None


class FaultProxy:
    """Listen on a free loopback port and forward to ``upstream`` (host, port), breaking links on demand."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.links: list[Link] = []
        self.latency_s = 0.0
        self._stall_until = 0.0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.resets = 0
        self.refusing = False  # while set, a new client connection is closed at once (the network is down)
        self._accepting = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)

    def start(self) -> FaultProxy:
        self._accepting.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.close()
        with self._lock:
            links = list(self.links)
        for link in links:
            self._close(link, reset=False)
        self._accepting.join(5)

    # ---------------------------------------------------------------- faults

    def open_links(self) -> list[Link]:
        with self._lock:
            return [link for link in self.links if not link.closed]

    def link_of(self, client_id_prefix: str) -> Link | None:
        """The open link of the client whose id starts with ``client_id_prefix`` (the newest one)."""
        found = [link for link in self.open_links() if (link.client_id or "").startswith(client_id_prefix)]
        return found[-1] if found else None

    def reset(self, link: Link, direction: str, packet: int | None = None) -> None:
        """Drop the next chunk ``direction`` ("up": client -> broker, "down") on ``link``, then reset it;
        with ``packet``, the next chunk that starts with an MQTT packet of that type (3: a PUBLISH, such as
        a result or a receipt; 4: a PUBACK)."""
        link.reset_packet = packet
        link.reset_next = direction

    def reset_now(self, link: Link) -> None:
        """Reset ``link`` at once (whatever is in the kernel's buffers is lost with it)."""
        self._close(link, reset=True)

    def stall(self, seconds: float) -> None:
        """Hold every byte on every link for ``seconds``, then deliver it in order."""
        self._stall_until = time.monotonic() + seconds

    def blackhole(self, link: Link) -> None:
        """From now on ``link`` drops everything both ways and closes nothing (a half-open connection)."""
        link.blackholed = True

    def chaos(self, rng: random.Random, stop: threading.Event, *, every_s: tuple[float, float] = (0.3, 1.2),
              stall_s: float = 0.8) -> threading.Thread:
        """A thread that, until ``stop``, picks a fault at random every ``every_s`` seconds: a reset after a
        swallowed chunk (either way), an immediate reset, or a stall of every link."""

        def run() -> None:
            while not stop.wait(rng.uniform(*every_s)):
                links = self.open_links()
                kind = rng.choice(("swallow-up", "swallow-down", "reset", "stall"))
                if kind == "stall":
                    self.stall(stall_s)
                elif links:
                    link = rng.choice(links)
                    if kind == "reset":
                        self.reset_now(link)
                    else:
                        self.reset(link, kind.split("-")[1])

        thread = threading.Thread(target=run, name="faultproxy-chaos", daemon=True)
        thread.start()
        return thread

    # ---------------------------------------------------------------- plumbing

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(client, upstream)
            with self._lock:
                self.links.append(link)
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(link, src, dst, way), name=f"faultproxy-{way}",
                                 daemon=True).start()

    def _pump(self, link: Link, src: socket.socket, dst: socket.socket, way: str) -> None:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:  # the peer closed (or we did): pass the close on, unless the link is a black hole
                if not link.blackholed:
                    self._close(link, reset=False)
                return
            if link.client_id is None and way == "up":
                link.client_id = connect_client_id(data)
            if link.blackholed:
                link.swallowed += len(data)
                continue
            if link.reset_next == way and (link.reset_packet is None or data[0] >> 4 == link.reset_packet):
                link.swallowed += len(data)
                self._close(link, reset=True)
                return
            while (wait := self._stall_until - time.monotonic()) > 0:
                time.sleep(min(wait, 0.05))
            if self.latency_s:
                time.sleep(self.latency_s)
            try:
                dst.sendall(data)
            except OSError:
                self._close(link, reset=False)
                return
            link.forwarded += len(data)
            if way == "down":
                link.down += len(data)

    def _close(self, link: Link, *, reset: bool) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
            if reset:
                self.resets += 1
        for s in (link.client, link.upstream):
            try:
                if reset:  # RST, not FIN: the peer sees "connection reset by peer"
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # SHUT_RD wakes our other pump, blocked in recv on this socket (close() alone would not).
                s.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
