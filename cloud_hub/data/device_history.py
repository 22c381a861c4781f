"""One device's history, for its page on the live dashboard (:mod:`cloud_hub.web.device_page`).

The versions it ran come from its stored results, not its statuses: the hub keeps only a device's last
status (``devices``), while every result names the model version that produced it. A *run* is a stretch of
consecutive results (by ``seq``, the device's own order) from one version, so a canary's v2 followed by a
rollback to v1 reads v1, v2, v1 rather than two merged rows. Two clocks are kept apart: ``start`` is the
device's (when the window began), ``received_at`` the hub's (when it stored the result).

Drift is what the device's last status said (PSI and mean confidence, ``edge_agent/drift.py``): the hub keeps
no history of it in SQL.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.data.tables import devices, results

MAX_RUNS = 50  # the latest runs shown; a device that flipped versions more often keeps its newest ones
VALUE_ROWS = 5000  # a regressor's histogram: its latest results
VALUE_BINS = 10
MAX_OUTPUTS = 4  # histograms drawn for a regressor with more outputs: the first ones


def version_runs(conn: Connection, device_id: str, *, limit: int = MAX_RUNS) -> list[dict[str, Any]]:
    """The device's model versions in the order it ran them: per run, its results, ``seq`` range, first and
    last window start (device clock) and receipt (hub clock), accuracy and mean confidence; oldest first."""
    r = results.c
    changed = sa.case((r.model_version == sa.func.lag(r.model_version).over(order_by=r.seq), 0), else_=1)
    flagged = (sa.select(r.seq, r.model_version, r.start, r.received_at, r.confidence,
                         sa.case((sa.and_(r.truth.is_not(None), r.value.is_(None)), 1), else_=0).label("labelled"),
                         sa.case((r.label == r.truth, 1), else_=0).label("correct"), changed.label("changed"))
               .where(r.device_id == device_id).subquery())
    f = flagged.c
    numbered = sa.select(flagged, sa.func.sum(f.changed).over(order_by=f.seq).label("run")).subquery()
    n = numbered.c
    query = (sa.select(n.run, sa.func.min(n.model_version), sa.func.count(), sa.func.min(n.seq), sa.func.max(n.seq),
                       sa.func.min(n.start), sa.func.max(n.start), sa.func.min(n.received_at),
                       sa.func.max(n.received_at), sa.func.sum(n.labelled), sa.func.sum(n.correct),
                       sa.func.avg(n.confidence))
             .group_by(n.run).order_by(n.run.desc()).limit(limit))
    runs = []
    for _, version, count, seq0, seq1, start0, start1, recv0, recv1, labelled, correct, conf in conn.execute(query):
        runs.append({"version": int(version), "results": int(count), "seq": [int(seq0), int(seq1)],
                     "start": [float(start0), float(start1)], "received": [float(recv0), float(recv1)],
                     "accuracy": int(correct or 0) / int(labelled) if labelled else None,
                     "mean_confidence": None if conf is None else float(conf)})
    return runs[::-1]


def class_histogram(conn: Connection, device_id: str) -> dict[str, Any]:
    """How often the device predicted each class, in all and per model version (most frequent first)."""
    r = results.c
    rows = conn.execute(sa.select(r.model_version, r.label, sa.func.count())
                        .where(r.device_id == device_id, r.label.is_not(None))
                        .group_by(r.model_version, r.label)).all()
    total: Counter[str] = Counter()
    per_version: dict[int, Counter[str]] = {}
    for version, label, count in rows:
        total[str(label)] += int(count)
        per_version.setdefault(int(version), Counter())[str(label)] += int(count)
    return {"classes": dict(total.most_common()),
            "by_version": {v: dict(c.most_common()) for v, c in sorted(per_version.items())}}


def value_histogram(conn: Connection, device_id: str, *, rows: int = VALUE_ROWS,
                    bins: int = VALUE_BINS) -> dict[str, Any] | None:
    """A regressor's outputs over its latest ``rows`` results: per output (the first few), ``bins`` equal
    bins between its smallest and largest value; None when the device sent no values."""
    r = results.c
    stored = conn.execute(sa.select(r.value).where(r.device_id == device_id, r.value.is_not(None))
                          .order_by(r.seq.desc()).limit(rows)).scalars().all()
    vectors: list[list[float]] = []
    for text in stored:
        try:
            v = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        if isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            vectors.append([float(x) for x in v])
    if not vectors:
        return None
    width = Counter(len(v) for v in vectors).most_common(1)[0][0]  # one model's outputs: one width
    values = np.asarray([v for v in vectors if len(v) == width], dtype=np.float64)
    outputs = []
    for i in range(min(width, MAX_OUTPUTS)):
        column = values[:, i][np.isfinite(values[:, i])]
        if column.size == 0:
            continue
        with np.errstate(over="ignore"):  # a range past a float's (values of +-1.7e308): numpy's bins overflowed
            span = float(column.max()) - float(column.min())
        scale = 1.0 if np.isfinite(span) else float(np.max(np.abs(column)))  # then in units of the largest value
        counts, edges = np.histogram(column / scale, bins=bins)
        outputs.append({"output": i, "edges": (edges * scale).tolist(), "counts": counts.tolist()})
    return {"results": int(values.shape[0]), "of_latest": rows, "outputs": outputs, "width": width}


def device_history(conn: Connection, device_id: str) -> dict[str, Any] | None:
    """What the device's page shows, or None when the hub never heard of ``device_id``."""
    status = conn.execute(sa.select(devices).where(devices.c.device_id == device_id)).mappings().first()
    runs = version_runs(conn, device_id)
    if status is None and not runs:
        return None
    count = int(conn.execute(sa.select(sa.func.count()).select_from(results)
                             .where(results.c.device_id == device_id)).scalar_one())
    return {"device_id": device_id, "status": None if status is None else {str(k): v for k, v in status.items()},
            "results": count, "runs": runs, **class_histogram(conn, device_id),
            "values": value_histogram(conn, device_id),
            "drift": {"psi": None if status is None else status["drift_psi"],
                      "mean_confidence": None if status is None else status["mean_confidence"],
                      "reported_at": None if status is None else status["status_ts"]}}
