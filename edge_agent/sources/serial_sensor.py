"""``source = "serial"``: CSV or JSON lines a board prints on a serial port, through a pulled cable and back.

pyserial is an optional extra (``pip install 'edgeml-mqtt[serial]'``), imported when the source is
made. A port that is not there yet, or goes away (the cable pulled: the read fails), is opened again
every ``reconnect_s`` seconds, and the agent's housekeeping goes on meanwhile; the line cut by the
pull is counted as skipped. Each line goes through :class:`SensorFeed`, named ``port:line`` (lines
counted since the port was opened) when it is no reading.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import SettingsError
from edge_agent.sources.chunk import ReadingChunk
from edge_agent.sources.fields import FieldMap, SensorFeed

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 16  # a "line" longer than this is noise on the wire (a wrong baud rate): dropped
_SAY_S = 60.0  # how often a port that stays away is mentioned


def pyserial() -> Any:
    """The ``serial`` module, or a one-line hint naming the extra to install (exit 2)."""
    try:
        import serial
    except ImportError:
        raise SettingsError("source = 'serial' needs pyserial: pip install 'edgeml-mqtt[serial]' (on a device "
                            "installed from deploy/agent: pip install pyserial)",
                            field="source") from None
    return serial


class SerialSensor:
    """Lines of a serial port as chunks of one device's readings; ends when ``stop_event`` is set."""

    def __init__(self, port: str, fields: FieldMap, device: str, *, baud: int = 115200, reconnect_s: float = 1.0,
                 poll_s: float = 0.2, stop_event: threading.Event | None = None,
                 idle: Callable[[], None] = lambda: None) -> None:
        self.serial = pyserial()
        self.port, self.device, self.baud = port, device, baud
        self.reconnect_s, self.poll_s, self.idle = reconnect_s, poll_s, idle
        self.stop_event = stop_event or threading.Event()
        self.feed = SensorFeed(port, fields)
        self.parser, self.stats = self.feed.parser, self.feed.stats
        self.opened = 0  # times the port was opened: 2 after one reconnect
        self._tty: Any = None
        self._buf = b""
        self._line = 0  # lines read since the port was opened
        self._said = 0.0

    @classmethod
    def of(cls, s: AgentSettings, stop: threading.Event, idle: Callable[[], None]) -> SerialSensor:
        """The source the settings describe (``serial_*`` and ``sensor_*`` keys)."""
        assert s.serial_port is not None and s.device_id is not None
        return cls(s.serial_port, FieldMap.of(s, csv=s.serial_format == "csv"), s.device_id, baud=s.serial_baud,
                   reconnect_s=s.serial_reconnect_s, stop_event=stop, idle=idle)

    @property
    def channels(self) -> tuple[str, ...]:
        return self.feed.channels

    @property
    def has_labels(self) -> bool:
        return self.feed.has_labels

    @property
    def partial(self) -> bytes:
        """What was read of a line whose end has not come yet."""
        return self._buf

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._tty is not None:
            self._tty.close()
            self._tty = None

    def _open(self) -> bool:
        try:
            self._tty = self.serial.Serial(self.port, self.baud, timeout=self.poll_s)
        except (self.serial.SerialException, OSError, ValueError) as exc:
            now = time.monotonic()
            if now >= self._said:
                self._said = now + _SAY_S
                log.warning("serial port %s cannot be opened (%s); trying again every %g s", self.port, exc,
                            self.reconnect_s)
            return False
        self.opened += 1
        self._buf, self._line, self._said = b"", 0, 0.0
        log.info("reading %s at %d baud%s", self.port, self.baud, " (again)" if self.opened > 1 else "")
        return True

    def _lost(self, exc: BaseException) -> None:
        """The port went away (cable pulled, board reset): what was read of a line is lost."""
        log.warning("serial port %s lost (%s); opening it again every %g s", self.port, exc, self.reconnect_s)
        if self._buf.strip():
            self.feed.reject(f"{self.port}:{self._line + 1}", "partial line", "the port went away mid-line")
        self.close()
        self._buf = b""

    def _wait(self) -> None:
        self.idle()
        self.stop_event.wait(self.reconnect_s)

    def __iter__(self) -> Iterator[ReadingChunk]:
        try:
            while not self.stop_event.is_set():
                if self._tty is None and not self._open():
                    self._wait()
                    continue
                try:
                    data = self._tty.read(max(1, self._tty.in_waiting))
                except (self.serial.SerialException, OSError) as exc:
                    self._lost(exc)
                    self._wait()
                    continue
                if not data:
                    self.idle()
                    continue
                yield from self.feed.chunks(self._lines(data, time.time()))
        finally:
            self.close()

    def _lines(self, data: bytes, arrival: float) -> bytes:
        """The records of the complete lines in ``data`` (and the partial line kept before it)."""
        *complete, self._buf = (self._buf + data).split(b"\n")
        if len(self._buf) > _MAX_LINE:
            self.feed.reject(f"{self.port}:{self._line + 1}", "line too long", f"no newline in {_MAX_LINE} bytes")
            self._buf = b""
        out = []
        for raw in complete:
            self._line += 1
            raw = raw.rstrip(b"\r")
            if raw.strip():
                out.append(self.feed.take(f"{self.port}:{self._line}", raw, self.device, arrival))
        return b"".join(out)
