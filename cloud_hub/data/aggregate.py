"""Aggregation per device, per time bucket and fleet-wide.

Results are bucketed by their window ``start`` (the device's clock when the window began), not by the
time the hub received them, so the results of an agent that was offline for an hour land in the
buckets they belong to when its outbox drains.

Here are the grouped queries; the math they feed is pure and lives in :mod:`cloud_hub.data.summaries`
(:class:`Counts`, :func:`finish`, the quantiles, the one spelling of a score).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.data.summaries import (
    Counts,
    Errors,
    Summary,
    bucket_floor,
    finish,
    group_quantiles,
    quantiles,
    result_errors,
)
from cloud_hub.data.tables import dead_letters, devices, models, results

BUCKETS: dict[str, float] = {"minute": 60.0, "hour": 3600.0}


# --------------------------------------------------------------------------- SQL edge


@dataclass(frozen=True, slots=True)
class DeviceStats:
    summary: Summary
    model_version: int | None  # of the device's latest result, else the one its status reported
    state: str | None
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class VersionStats:
    """The results one model version produced, and the part of them from devices it never trained on."""

    summary: Summary
    held_out: Summary  # results of devices whose data never shaped it: the honest accuracy
    train_devices: tuple[str, ...]  # every device that shaped it (shaped_by); empty when the registry does not say

    def to_obj(self) -> dict[str, Any]:
        return {**self.summary.to_obj(), "held_out": self.held_out.to_obj(), "train_devices": list(self.train_devices)}


@dataclass(frozen=True, slots=True)
class FleetStats:
    fleet: Summary
    devices: dict[str, DeviceStats]
    dead_letters: int
    bucket: str | None = None
    buckets: dict[float, tuple[Summary, dict[str, Summary]]] = field(default_factory=dict)
    versions: dict[int, VersionStats] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {**self.fleet.to_obj(), "dead_letters": self.dead_letters, "devices": {
            d: {**s.summary.to_obj(), "model_version": s.model_version, "state": s.state, "last_seen": s.last_seen}
            for d, s in sorted(self.devices.items())
        }, "model_versions": {str(v): s.to_obj() for v, s in sorted(self.versions.items())}}
        if self.bucket is not None:
            obj["bucket"] = self.bucket
            obj["buckets"] = [{"start": start, **fleet.to_obj(),
                               "devices": {d: s.to_obj() for d, s in sorted(per_device.items())}}
                              for start, (fleet, per_device) in sorted(self.buckets.items())]
        return obj


def _grouped_errors(conn: Connection, where: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The errors of regressors' results with ground truth: (devices, starts, versions, errors)."""
    r = results.c
    rows = conn.execute(sa.select(r.device_id, r.start, r.model_version, r.value, r.truth)
                        .where(*where, r.value.is_not(None), r.truth.is_not(None))).all()
    errors = result_errors([row[3] for row in rows], [row[4] for row in rows])
    ok = ~np.isnan(errors)
    dev = np.asarray([row[0] for row in rows], dtype=object)
    start = np.fromiter((row[1] for row in rows), np.float64, len(rows))
    version = np.fromiter((row[2] for row in rows), np.int64, len(rows))
    return dev[ok], start[ok], version[ok], errors[ok]


def _errors_by(keys: np.ndarray, errors: np.ndarray) -> dict[Any, Errors]:
    out: dict[Any, Errors] = {}
    for key in set(keys.tolist()):
        e = Errors.of(errors[keys == key])
        if e is not None:
            out[key] = e
    return out


def _with_error(summary: Summary, error: Errors | None) -> Summary:
    return summary if error is None else replace(summary, error=error)


def _filters(device: str | None, since: float | None) -> list[Any]:
    where = []
    if device is not None:
        where.append(results.c.device_id == device)
    if since is not None:
        where.append(results.c.start >= since)
    return where


def _grouped_counts(conn: Connection, where: list[Any], bucket_expr: Any = None) -> dict[tuple[str, Any], Counts]:
    """One grouped query: Counts per (device, bucket or None), histogram by label."""
    r = results.c
    keys = [r.device_id, r.label] + ([bucket_expr] if bucket_expr is not None else [])
    query = sa.select(
        *keys, sa.func.count(), sa.func.sum(r.confidence), sa.func.count(r.confidence),
        sa.func.sum(sa.case((sa.and_(r.truth.is_not(None), r.value.is_(None)), 1), else_=0)),  # not a regressor's
        sa.func.sum(sa.case((r.label == r.truth, 1), else_=0)), sa.func.max(r.received_at),
    ).where(*where).group_by(*keys)
    out: dict[tuple[str, Any], Counts] = {}
    for row in conn.execute(query):
        device, label = row[0], row[1]
        key = (device, row[2] if bucket_expr is not None else None)
        n, conf_sum, conf_n, labelled, correct, seen = row[-6:]
        part = Counts(int(n), {label: int(n)} if label is not None else {}, float(conf_sum or 0.0), int(conf_n),
                      int(labelled or 0), int(correct or 0), seen)
        out[key] = out[key].merge(part) if key in out else part
    return out


def _merge(counts: Iterable[Counts]) -> Counts:
    total = Counts()
    for c in counts:
        total = total.merge(c)
    return total


def fleet_stats(conn: Connection, *, device: str | None = None, since: float | None = None,
                bucket: str | None = None) -> FleetStats:
    """Per-device and fleet-wide summaries (and per bucket when ``bucket`` is minute or hour)."""
    where = _filters(device, since)
    r = results.c
    per_device = {d: c for (d, _), c in _grouped_counts(conn, where).items()}
    lat_rows = conn.execute(sa.select(r.device_id, r.start, r.latency_ms).where(*where)).all()
    dev_ids = [row[0] for row in lat_rows]
    starts = np.fromiter((row[1] for row in lat_rows), np.float64, len(lat_rows))
    latency = np.fromiter((row[2] for row in lat_rows), np.float64, len(lat_rows))
    dev_q = group_quantiles(dev_ids, latency)

    dev_rows = conn.execute(sa.select(devices.c.device_id, devices.c.state, devices.c.last_seen,
                                      devices.c.model_version)
                            .where(*([devices.c.device_id == device] if device is not None else []))).all()
    latest = _latest_model_versions(conn, where)
    e_dev, e_start, e_version, errors = _grouped_errors(conn, where)
    dev_err = _errors_by(e_dev, errors)
    out: dict[str, DeviceStats] = {}
    known = {row[0]: row for row in dev_rows}
    for d in sorted(set(known) | set(per_device)):
        row = known.get(d)
        out[d] = DeviceStats(
            summary=_with_error(finish(per_device.get(d, Counts()), dev_q.get(d, (None, None))), dev_err.get(d)),
            model_version=latest.get(d, row[3] if row else None), state=row[1] if row else None,
            last_seen=row[2] if row else None,
        )
    fleet = _with_error(finish(_merge(per_device.values()), quantiles(latency)), Errors.of(errors))
    # "seen" means what each device's row means: the hub last heard from one (a duplicate or a status
    # counts), not the newest stored row (after a replay of duplicates that read minutes ago)
    heard = [t for t in (fleet.last_seen, *(d.last_seen for d in out.values())) if t is not None]
    fleet = replace(fleet, last_seen=max(heard)) if heard else fleet

    dl = sa.select(sa.func.count()).select_from(dead_letters)
    if since is not None:
        dl = dl.where(dead_letters.c.received_at >= since)
    n_dead = int(conn.execute(dl).scalar_one())

    buckets: dict[float, tuple[Summary, dict[str, Summary]]] = {}
    if bucket is not None:
        width = BUCKETS[bucket]
        expr = sa.func.floor(r.start / sa.literal_column(repr(width))) * sa.literal_column(repr(width))
        grouped = _grouped_counts(conn, where, expr)
        b_starts = bucket_floor(starts, width)
        pair_q = group_quantiles([f"{d}\0{b!r}" for d, b in zip(dev_ids, b_starts.tolist(), strict=True)], latency)
        fleet_q = group_quantiles(b_starts.tolist(), latency)
        e_bucket = bucket_floor(e_start, width)
        bucket_err = _errors_by(e_bucket, errors)
        pair_err = _errors_by(np.asarray([f"{d}\0{b!r}" for d, b in zip(e_dev.tolist(), e_bucket.tolist(), strict=True)],
                                         dtype=object), errors)
        for b in sorted({float(b) for _, b in grouped}):
            devs = {d: _with_error(finish(c, pair_q.get(f"{d}\0{b!r}", (None, None))), pair_err.get(f"{d}\0{b!r}"))
                    for (d, bb), c in grouped.items() if float(bb) == b}
            totals = _merge(c for (_, bb), c in grouped.items() if float(bb) == b)
            buckets[b] = (_with_error(finish(totals, fleet_q.get(b, (None, None))), bucket_err.get(b)), devs)
    return FleetStats(fleet, out, n_dead, bucket, buckets, version_stats(conn, where, (e_dev, e_version, errors)))


def version_stats(conn: Connection, where: list[Any],
                  errors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[int, VersionStats]:
    """Per model version: all its results, and those of the devices whose data never shaped it
    (:func:`shaped_by`: its training devices, every round's participants, its parents')."""
    grouped = _grouped_counts(conn, where, results.c.model_version)
    if errors is None:
        e_dev, _, e_version, e = _grouped_errors(conn, where)
    else:
        e_dev, e_version, e = errors
    manifests = {(str(name), int(version)): orjson.loads(manifest) for name, version, manifest
                 in conn.execute(sa.select(models.c.name, models.c.version, models.c.manifest))}
    trained: dict[int, set[str]] = {}
    for (_name, version), devices_of in shaped_by(manifests).items():
        trained.setdefault(version, set()).update(devices_of)
    out: dict[int, VersionStats] = {}
    for version in sorted({int(v) for _, v in grouped}):
        mine = {d: c for (d, v), c in grouped.items() if int(v) == version}
        train = trained.get(version, set())
        of_version = e_version == version
        held = of_version & ~np.isin(e_dev, list(train))
        out[version] = VersionStats(_with_error(finish(_merge(mine.values())), Errors.of(e[of_version])),
                                    _with_error(finish(_merge(c for d, c in mine.items() if d not in train)),
                                                Errors.of(e[held])),
                                    tuple(sorted(train)))
    return out


def shaped_by(manifests: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[tuple[str, int], frozenset[str]]:
    """Per (name, version), every device whose data shaped the version: none of them is held out for it.

    A manifest written since it was recorded says so itself (``training.shaped_by``). An older one is read
    as its ``train_devices`` (a federated one copied its base's), its round's participants (``devices``)
    and, through ``parent_version``, whatever shaped the version it started from: a federated manifest
    kept only its last round's participants, and a retrain is warm-started from its parent."""
    out: dict[tuple[str, int], frozenset[str]] = {}
    for name, version in sorted(manifests, key=lambda k: k[1]):  # a parent is older than its child
        training = manifests[(name, version)].get("training") or {}
        if "shaped_by" in training:
            out[(name, version)] = frozenset(str(d) for d in training["shaped_by"])
            continue
        devices_of = {str(d) for key in ("train_devices", "devices") for d in training.get(key) or ()}
        parent = training.get("parent_version")
        if isinstance(parent, int) and parent < version:
            devices_of |= out.get((name, parent), frozenset())
        out[(name, version)] = frozenset(devices_of)
    return out


def _latest_model_versions(conn: Connection, where: list[Any]) -> dict[str, int]:
    """The model version of each device's latest result (highest seq)."""
    r = results.c
    top = sa.select(r.device_id, sa.func.max(r.seq).label("seq")).where(*where).group_by(r.device_id).subquery()
    query = sa.select(r.device_id, r.model_version).join_from(
        results, top, sa.and_(r.device_id == top.c.device_id, r.seq == top.c.seq))
    return {d: int(v) for d, v in conn.execute(query)}


def device_list(conn: Connection) -> list[Mapping[str, Any]]:
    """Every device with its status fields and result count, ordered by id."""
    counts = (sa.select(results.c.device_id, sa.func.count().label("results"))
              .group_by(results.c.device_id).subquery())
    query = (sa.select(devices, sa.func.coalesce(counts.c.results, 0).label("results"))
             .join_from(devices, counts, devices.c.device_id == counts.c.device_id, isouter=True)
             .order_by(devices.c.device_id))
    return [{str(k): v for k, v in row.items()} for row in conn.execute(query).mappings()]


def dashboard_view(conn: Connection, now: float, *, minutes: int = 30) -> dict[str, Any]:
    """The live page's data: every device (status, results, accuracy or error over the last hour),
    results and accuracy per minute of the hub's clock over the last ``minutes``, dead letters."""
    r = results.c
    recent = [r.received_at >= now - 3600]
    counts = {d: c for (d, _), c in _grouped_counts(conn, recent).items()}
    e_dev, _, _, errors = _grouped_errors(conn, recent)
    dev_err = _errors_by(e_dev, errors)
    rows = []
    for d in device_list(conn):
        c = counts.get(d["device_id"])
        err = dev_err.get(d["device_id"])
        rows.append({"device_id": d["device_id"], "state": d["state"], "model_version": d["model_version"],
                     "outbox_depth": d["outbox_depth"], "last_seen": d["last_seen"], "results": d["results"],
                     "drift_psi": d["drift_psi"], "mean_confidence": d["mean_confidence"],
                     "accuracy": c.correct / c.labelled if c is not None and c.labelled else None,
                     "error": None if err is None else err.to_obj()})
    minute = sa.func.floor(r.received_at / 60.0) * 60.0
    per_minute = conn.execute(
        sa.select(minute, sa.func.count(),
                  sa.func.sum(sa.case((sa.and_(r.truth.is_not(None), r.value.is_(None)), 1), else_=0)),
                  sa.func.sum(sa.case((r.label == r.truth, 1), else_=0)))
        .where(r.received_at >= now - 60 * minutes).group_by(minute).order_by(minute)).all()
    n_dead = int(conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar_one())
    latest = conn.execute(sa.select(dead_letters.c.received_at, dead_letters.c.reason)
                          .order_by(dead_letters.c.id.desc()).limit(5)).all()
    return {
        "devices": rows, "results": sum(d["results"] for d in rows),
        "minutes": [{"start": float(m), "results": int(n), "accuracy": (int(ok or 0) / int(lab)) if lab else None}
                    for m, n, lab, ok in per_minute],
        "dead_letters": {"count": n_dead, "latest": [{"at": at, "reason": reason} for at, reason in latest]},
    }
