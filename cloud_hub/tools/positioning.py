"""Phone positioning data: Wi-Fi scans of people walking through an office floor, generated.

No public fingerprint data set can be fetched where this project is built and tested, so this module
writes a physically grounded one, in the column conventions of UJIIndoorLoc (``WAP001`` ... one
RSSI column per access point in dBm, ``+100`` for an access point the scan did not hear) so that a
real UJIIndoorLoc CSV can take its place (:func:`convert_ujiindoorloc`). The target of each scan is
the phone's position ``x;y`` in metres (a label of two numbers: a regressor with two outputs).

The model, and its parameters (:class:`Radio`, :class:`Floor`, :class:`Walks`):

* **Floor plan**: a 60 x 20 m floor, a 4 m corridor along its middle and 10 m rooms on both sides,
  each with a door on the corridor. Access points hang at fixed positions (a jittered grid).
* **Received power** of access point *a* at position *p* (log-distance path loss with walls,
  the multi-wall model of COST 231):
  ``RSSI = P0 - 10 n log10(max(d, 1 m)) - L_wall * walls(a, p) + S_a(p) + F - B + O_phone``, with
  ``P0`` the power at 1 m, ``n`` the path-loss exponent, ``walls`` the walls the straight line
  crosses, ``S_a`` **shadowing**: a Gaussian random field per access point with standard deviation
  ``shadowing_db`` and correlation length ``shadowing_corr_m`` (smoothed white noise), fixed in
  space, so nearby positions see similar deviations; ``F`` **fast fading**, independent per scan
  and access point: ``20 log10 |h|`` with ``h`` Rician (K-factor ``rician_k``); ``B`` the
  **carrier's body**, up to ``body_db`` for an access point behind them
  (``body_db (1 - cos angle) / 2``, the angle between their heading and the access point);
  ``O_phone`` the **phone's offset** (device model and how it is held, ``phone_offset_db``), fixed
  per phone. RSSI is rounded to whole dBm as phones report it.
* **Missing access points**: below ``sensitivity_dbm`` a scan does not hear an access point
  (written ``+100``); an audible one is also missed with probability ``miss_prob`` (beacons lost).
* **People**: each phone is carried by one person who walks from waypoint to waypoint (random
  points in rooms and the corridor; between rooms through the doors and the corridor) at their own
  speed (``speed_m_s`` ± ``speed_sd``), pausing at a waypoint with probability ``pause_prob`` for an
  exponentially distributed time (mean ``pause_mean_s``). Phones scan at ``scan_hz`` with a little
  jitter; the label is the true position at the scan.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NOT_HEARD = 100  # UJIIndoorLoc: an access point the scan did not hear
ABSENT_AS = -110.0  # what "not heard" stands for in the preprocessing: below the weakest signal heard


@dataclass(frozen=True)
class Floor:
    width_m: float = 60.0
    depth_m: float = 20.0
    corridor_m: float = 4.0
    room_width_m: float = 10.0
    access_points: tuple[int, int] = (6, 2)  # a grid of 6 x 2 (one per 100 m²), jittered
    ap_jitter_m: float = 2.0

    @property
    def corridor(self) -> tuple[float, float]:
        mid = self.depth_m / 2
        return mid - self.corridor_m / 2, mid + self.corridor_m / 2

    def walls(self) -> np.ndarray:
        """Wall segments ``[w, 4]`` (x0, y0, x1, y1): the corridor's two sides and the walls between rooms."""
        lo, hi = self.corridor
        segs = [(0.0, lo, self.width_m, lo), (0.0, hi, self.width_m, hi)]
        x = self.room_width_m
        while x < self.width_m - 1e-9:
            segs += [(x, 0.0, x, lo), (x, hi, x, self.depth_m)]
            x += self.room_width_m
        return np.array(segs)

    def rooms(self) -> list[tuple[float, float, float, float]]:
        """Rooms as (x0, y0, x1, y1)."""
        lo, hi = self.corridor
        out = []
        n = int(round(self.width_m / self.room_width_m))
        for i in range(n):
            x0 = i * self.room_width_m
            out += [(x0, 0.0, x0 + self.room_width_m, lo), (x0, hi, x0 + self.room_width_m, self.depth_m)]
        return out


@dataclass(frozen=True)
class Radio:
    p0_dbm: float = -35.0  # received power at 1 m
    exponent: float = 2.2  # path-loss exponent (open office, line of sight inside a room)
    wall_db: float = 5.0  # per wall crossed
    shadowing_db: float = 5.0
    shadowing_corr_m: float = 5.0
    rician_k: float = 2.0  # fast fading: Rician, K = power of the direct path / scattered power
    body_db: float = 6.0  # the carrier's body, for an access point straight behind them
    phone_offset_db: float = 6.0
    sensitivity_dbm: float = -92.0
    miss_prob: float = 0.05


@dataclass(frozen=True)
class Walks:
    speed_m_s: float = 1.4
    speed_sd: float = 0.15
    pause_prob: float = 0.6
    pause_mean_s: float = 10.0
    scan_hz: float = 1.0
    scan_jitter_s: float = 0.05


@dataclass(frozen=True)
class Scenario:
    floor: Floor = field(default_factory=Floor)
    radio: Radio = field(default_factory=Radio)
    walks: Walks = field(default_factory=Walks)

    @property
    def channels(self) -> tuple[str, ...]:
        nx, ny = self.floor.access_points
        return tuple(f"WAP{i + 1:03d}" for i in range(nx * ny))


class Building:
    """A floor with its access points and their shadowing fields (one seed, fixed for every phone)."""

    def __init__(self, scenario: Scenario, seed: int):
        self.s = scenario
        rng = np.random.default_rng(seed)
        f = scenario.floor
        nx, ny = f.access_points
        gx = (np.arange(nx) + 0.5) * f.width_m / nx
        gy = (np.arange(ny) + 0.5) * f.depth_m / ny
        ap = np.array([(x, y) for y in gy for x in gx])
        ap += rng.uniform(-f.ap_jitter_m, f.ap_jitter_m, ap.shape)
        self.aps = np.clip(ap, 0.5, [f.width_m - 0.5, f.depth_m - 0.5])
        self.walls = f.walls()
        self._grid_step = 0.5
        self._fields = np.stack([self._field(rng) for _ in range(len(self.aps))])  # (a, gx, gy)

    def _field(self, rng: np.random.Generator) -> np.ndarray:
        """Shadowing on a 0.5 m grid: white noise smoothed with a Gaussian of the correlation length
        (by FFT, wrapped around a margin), scaled to ``shadowing_db``."""
        f, r = self.s.floor, self.s.radio
        step = self._grid_step
        pad = int(3 * r.shadowing_corr_m / step)
        nx, ny = int(f.width_m / step) + 1 + 2 * pad, int(f.depth_m / step) + 1 + 2 * pad
        noise = rng.standard_normal((nx, ny))
        kx, ky = np.fft.fftfreq(nx, d=step), np.fft.fftfreq(ny, d=step)
        sigma = r.shadowing_corr_m / 2.0
        kernel = np.exp(-2 * (math.pi * sigma) ** 2 * (kx[:, None] ** 2 + ky[None, :] ** 2))
        smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * kernel))[pad:-pad, pad:-pad]
        return smooth / (smooth.std() or 1.0) * r.shadowing_db

    def shadowing(self, pos: np.ndarray) -> np.ndarray:
        """(n, a) shadowing at positions ``pos`` (n, 2), bilinear on the grid."""
        g = pos / self._grid_step
        i0 = np.clip(np.floor(g).astype(int), 0, np.array(self._fields.shape[1:]) - 2)
        t = np.clip(g - i0, 0.0, 1.0)
        f = self._fields
        a = f[:, i0[:, 0], i0[:, 1]] * (1 - t[:, 0]) * (1 - t[:, 1]) + f[:, i0[:, 0] + 1, i0[:, 1]] * t[:, 0] * (1 - t[:, 1])
        b = f[:, i0[:, 0], i0[:, 1] + 1] * (1 - t[:, 0]) * t[:, 1] + f[:, i0[:, 0] + 1, i0[:, 1] + 1] * t[:, 0] * t[:, 1]
        return (a + b).T

    def walls_crossed(self, pos: np.ndarray) -> np.ndarray:
        """(n, a) number of walls the line from each access point to each position crosses."""
        p = pos[:, None, None, :]  # (n, 1, 1, 2)
        q = self.aps[None, :, None, :]  # (1, a, 1, 2)
        w0, w1 = self.walls[None, None, :, :2], self.walls[None, None, :, 2:]  # (1, 1, w, 2)

        def side(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.sign((a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0]))

        cross = (side(p, q, w0) * side(p, q, w1) < 0) & (side(w0, w1, p) * side(w0, w1, q) < 0)
        return cross.sum(axis=2)

    def rssi(self, pos: np.ndarray, heading: np.ndarray, offset_db: float, rng: np.random.Generator) -> np.ndarray:
        """(n, a) scans at positions ``pos`` of a carrier facing ``heading`` (n, 2 unit vectors): whole
        dBm, ``NOT_HEARD`` where the scan missed the AP."""
        r = self.s.radio
        to_ap = self.aps[None, :, :] - pos[:, None, :]
        d = np.maximum(np.linalg.norm(to_ap, axis=2), 1.0)
        facing = np.einsum("nak,nk->na", to_ap, heading) / d  # cos of the angle between heading and the AP
        k = r.rician_k
        h = math.sqrt(k / (k + 1)) + math.sqrt(1 / (2 * (k + 1))) * (rng.standard_normal(d.shape)
                                                                        + 1j * rng.standard_normal(d.shape))
        power = (r.p0_dbm - 10 * r.exponent * np.log10(d) - r.wall_db * self.walls_crossed(pos)
                 + self.shadowing(pos) + 20 * np.log10(np.abs(h) + 1e-6) - r.body_db * (1 - facing) / 2
                 + offset_db)
        heard = (power >= r.sensitivity_dbm) & (rng.random(d.shape) >= r.miss_prob)
        return np.where(heard, np.round(power), NOT_HEARD).astype(np.int64)


def _route(floor: Floor, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Points from ``a`` to ``b`` that stay inside: through the doors and along the corridor."""
    lo, hi = floor.corridor
    mid = (lo + hi) / 2

    def room_of(p: np.ndarray) -> int | None:
        if lo <= p[1] <= hi:
            return None
        return int(p[0] // floor.room_width_m) * 2 + (1 if p[1] > hi else 0)

    def door(p: np.ndarray) -> np.ndarray:
        x = (math.floor(p[0] / floor.room_width_m) + 0.5) * floor.room_width_m
        return np.array([x, hi if p[1] > hi else lo])

    ra, rb = room_of(a), room_of(b)
    if ra is not None and ra == rb:
        return [b]
    pts = []
    if ra is not None:
        pts += [door(a), np.array([door(a)[0], mid])]
    if rb is not None:
        pts += [np.array([door(b)[0], mid]), door(b)]
    return [*pts, b]


def _waypoint(floor: Floor, rng: np.random.Generator) -> np.ndarray:
    lo, hi = floor.corridor
    if rng.random() < 0.25:  # the corridor
        return np.array([rng.uniform(1.0, floor.width_m - 1.0), rng.uniform(lo + 0.5, hi - 0.5)])
    x0, y0, x1, y1 = floor.rooms()[rng.integers(len(floor.rooms()))]
    return np.array([rng.uniform(x0 + 0.7, x1 - 0.7), rng.uniform(y0 + 0.7, y1 - 0.7)])


def walk(scenario: Scenario, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One person's scan times (s from 0), positions (n, 2) and headings (n, 2 unit vectors; while
    pausing, the last one) over ``seconds``."""
    w, floor = scenario.walks, scenario.floor
    speed = max(0.6, rng.normal(w.speed_m_s, w.speed_sd))
    knots_t, knots_p = [0.0], [_waypoint(floor, rng)]
    while knots_t[-1] < seconds + 1.0:
        here = knots_p[-1]
        for p in _route(floor, here, _waypoint(floor, rng)):
            knots_t.append(knots_t[-1] + float(np.linalg.norm(p - knots_p[-1])) / speed)
            knots_p.append(p)
        if rng.random() < w.pause_prob:
            knots_t.append(knots_t[-1] + float(rng.exponential(w.pause_mean_s)))
            knots_p.append(knots_p[-1])
    kt, kp = np.array(knots_t), np.array(knots_p)
    n = int(seconds * w.scan_hz)
    t = np.arange(n) / w.scan_hz + rng.uniform(-w.scan_jitter_s, w.scan_jitter_s, n)
    t[0] = max(t[0], 0.0)
    pos = np.column_stack([np.interp(t, kt, kp[:, 0]), np.interp(t, kt, kp[:, 1])])
    legs = np.diff(kp, axis=0)
    length = np.linalg.norm(legs, axis=1)
    moving = np.flatnonzero(length > 1e-9)
    # the heading of the last leg that moved at or before each scan
    leg = np.clip(np.searchsorted(kt, t, side="right") - 1, 0, len(legs) - 1)
    last_moving = np.maximum.accumulate(np.where(length > 1e-9, np.arange(len(legs)), -1))[leg]
    last_moving = np.where(last_moving < 0, moving[0] if moving.size else 0, last_moving)
    heading = legs[last_moving] / np.maximum(length[last_moving], 1e-9)[:, None]
    return t, pos, heading


def write_positioning_log(path: str | Path, *, phones: Sequence[str] = ("phone-01", "phone-02", "phone-03"),
                          seconds: float = 600.0, seed: int = 0, start_ts: float = 0.0,
                          scenario: Scenario | None = None, building_seed: int = 0) -> int:
    """Write ``ts,device_id,WAP001..,label`` CSV (label ``x;y`` in metres), sorted by ts; returns the
    number of scans. The building (access points, shadowing) depends on ``building_seed`` only, so
    logs written with other seeds (other phones, other days) are of the same floor."""
    scenario = scenario or Scenario()
    building = Building(scenario, building_seed)
    rows = []
    for i, phone in enumerate(phones):
        rng = np.random.default_rng([seed, i])
        t, pos, heading = walk(scenario, seconds, rng)
        offset = float(rng.normal(0.0, scenario.radio.phone_offset_db))
        rssi = building.rssi(pos, heading, offset, rng)
        for k in range(len(t)):
            rows.append((start_ts + float(t[k]), phone, rssi[k], pos[k]))
    rows.sort(key=lambda r: r[0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(["ts", "device_id", *scenario.channels, "label"]) + "\n")
        for ts, phone, rssi_row, p in rows:
            f.write(f"{ts:.3f},{phone}," + ",".join(map(str, rssi_row.tolist())) + f",{p[0]:.2f};{p[1]:.2f}\n")
    return len(rows)


# --------------------------------------------------------------------------- a real UJIIndoorLoc file


def convert_ujiindoorloc(src: str | Path, out: str | Path, *, building: int | None = None,
                         floor: int | None = None) -> int:
    """Rewrite a UJIIndoorLoc CSV (``WAP001..WAP520, LONGITUDE, LATITUDE, FLOOR, BUILDINGID, ...,
    PHONEID, TIMESTAMP``) as a log of this project: one device per ``PHONEID``, the scans of each
    phone in time order (scans in the same second a millisecond apart, as the log reader wants
    increasing times), the label ``x;y`` in metres from the south-west corner of the kept scans
    (UJIIndoorLoc's coordinates are metres; subtracting the corner keeps them exact in float32).
    Returns the number of scans written."""
    with open(src, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        need = ["LONGITUDE", "LATITUDE", "FLOOR", "BUILDINGID", "PHONEID", "TIMESTAMP"]
        missing = [c for c in need if c not in header]
        waps = [i for i, c in enumerate(header) if c.startswith("WAP")]
        if missing or not waps:
            raise ValueError(f"{src}: not a UJIIndoorLoc CSV (missing columns {missing or ['WAP001...']})")
        col = {c: header.index(c) for c in need}
        kept = []
        for lineno, row in enumerate(reader, 2):
            try:
                if building is not None and int(row[col["BUILDINGID"]]) != building:
                    continue
                if floor is not None and int(row[col["FLOOR"]]) != floor:
                    continue
                kept.append((int(row[col["PHONEID"]]), float(row[col["TIMESTAMP"]]), float(row[col["LONGITUDE"]]),
                             float(row[col["LATITUDE"]]), [row[i] for i in waps]))
            except (ValueError, IndexError):
                raise ValueError(f"{src}:{lineno}: not a UJIIndoorLoc row") from None
    if not kept:
        raise ValueError(f"{src}: no scan of building {building} floor {floor}")
    x0, y0 = min(k[2] for k in kept), min(k[3] for k in kept)
    kept.sort(key=lambda k: (k[0], k[1]))
    rows: list[tuple[float, str, list[str], float, float]] = []
    last: dict[int, float] = {}
    for phone, ts, x, y, values in kept:
        ts = max(ts, last.get(phone, -math.inf) + 0.001)
        last[phone] = ts
        rows.append((ts, f"phone-{phone:02d}", values, x - x0, y - y0))
    rows.sort(key=lambda r: r[0])
    with open(out, "w") as f:
        f.write(",".join(["ts", "device_id", *(header[i] for i in waps), "label"]) + "\n")
        for ts, name, values, x, y in rows:
            f.write(f"{ts:.3f},{name}," + ",".join(values) + f",{x:.2f};{y:.2f}\n")
    return len(rows)
