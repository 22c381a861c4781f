"""What one device may send the hub, so that no device can slow the others down.

Every message the hub receives waits in one queue for the decoder and the writer. A device that floods
(a bug, a replay loop, a hostile client with a device's credentials) would put every other device's
results behind its own: measured before these limits, one client publishing 200,000 one-result messages
made four devices' replay 13.7x slower. So each device has a token bucket of messages (results and
statuses alike), checked on the network thread before anything else is done with the message: a message
over the device's rate is acknowledged and dropped there, for the cost of reading its topic. The hub
sends no receipt for it, so an honest device keeps it in its outbox and sends it again later (nothing is
lost); a flooder's messages cost the hub next to nothing.

The other limits a device meets are the contract's (a results message is at most 1 MiB and 10,000
results, a status 16 KiB; past them: a dead letter with the reason) and the broker's (``max_packet_size``
in ``mosquitto.conf``); a federated round counts one update per device (``rounds/judge.py``, ``rounds/answers.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud_hub.data.store import dead_letter
from edge_agent.contract import ContractError, Topics


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    dropped: int = 0  # since the last report


class DeviceLimiter:
    """Per-device token buckets: ``rate`` messages a second, bursts of up to ``burst``.

    :meth:`admit` runs on the MQTT network thread; :meth:`report` on the writer's. The dictionary of
    buckets is bounded: past ``max_devices`` the fullest buckets (devices quiet long enough to have
    refilled) are forgotten, which loses nothing since a forgotten device starts again with a full bucket.
    """

    def __init__(self, rate: float, burst: float, *, max_devices: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_devices = max_devices
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.dropped_total = 0
        self.dropped_by_device: dict[str, int] = {}  # since the start, for the dashboard

    def admit(self, device: str) -> bool:
        """True when ``device`` may send this message now; False: drop it (counted)."""
        now = self._clock()
        bucket = self._buckets.get(device)
        if bucket is None:
            with self._lock:  # report() iterates over the buckets
                if len(self._buckets) >= self.max_devices:
                    self._forget_full(now)
                bucket = self._buckets[device] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        with self._lock:
            bucket.dropped += 1
            self.dropped_total += 1
            self.dropped_by_device[device] = self.dropped_by_device.get(device, 0) + 1
        return False

    def most_dropped(self, n: int = 10) -> dict[str, int]:
        """The ``n`` devices with the most messages dropped since the start, most first."""
        with self._lock:
            return dict(sorted(self.dropped_by_device.items(), key=lambda kv: -kv[1])[:n])

    def report(self) -> dict[str, int]:
        """The devices that had messages dropped since the last report: device -> how many."""
        out = {}
        with self._lock:
            for device, bucket in self._buckets.items():
                if bucket.dropped:
                    out[device] = bucket.dropped
                    bucket.dropped = 0
        return out

    def _forget_full(self, now: float) -> None:
        """(Under the lock.) Forget the devices whose bucket has refilled, else the older half."""
        full = [d for d, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst]
        for device in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[device]


class Admission:
    """The hub's door for one message, on the network thread: whose is it, and may it come in?

    A topic that names no device is let through (the decoder dead-letters it with the contract's reason).
    :meth:`dead_letters` says, at most every ``report_s`` seconds, which devices were over their limit.
    """

    def __init__(self, topics: Topics, rate: float, burst: float, *, report_s: float = 10.0,
                 max_bytes: int = 64 << 10) -> None:
        self.topics = topics
        self.limiter = DeviceLimiter(rate, burst)
        self.report_s = report_s
        self._max_bytes = max_bytes
        self._devices: dict[str, str | None] = {}  # topic -> device id (network thread only)
        self._next_report = 0.0

    def admit(self, topic: str) -> bool:
        device = self._devices.get(topic, "")
        if device == "":
            try:
                device = self.topics.parse(topic)[1]
            except ContractError:
                device = None
            if len(self._devices) >= 100_000:
                self._devices.clear()
            self._devices[topic] = device
        return device is None or self.limiter.admit(device)

    def dead_letters(self, now: float, monotonic: float | None = None) -> list[dict[str, Any]]:
        """One dead letter per device that had messages dropped since the last report (if it is time)."""
        t = time.monotonic() if monotonic is None else monotonic
        if t < self._next_report:
            return []
        dropped = self.limiter.report()
        if not dropped:
            return []
        self._next_report = t + self.report_s
        lim = self.limiter
        return [dead_letter(self.topics.results(device), b"", f"device {device} over its limit of {lim.rate:g} "
                            f"messages/s (bursts of {lim.burst:g}): {n:,} messages dropped unstored (it keeps "
                            "them and sends them again)", now, self._max_bytes)
                for device, n in sorted(dropped.items())]
