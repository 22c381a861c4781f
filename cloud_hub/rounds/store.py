"""The SQL of federated rounds (tables ``fl_rounds`` and ``fl_updates``; the rest is in :mod:`store`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection

from cloud_hub.data.tables import fl_rounds, fl_updates

COUNTED = ("accepted", "late")  # the updates a round aggregates


@dataclass(frozen=True, slots=True)
class RoundRow:
    id: int
    model_name: str
    base_version: int
    state: str
    participants: tuple[str, ...]
    plan: dict[str, Any]
    opened_at: float
    deadline: float
    closed_at: float | None
    new_version: int | None
    outcome: dict[str, Any]
    reason: str | None


_ROUND_COLUMNS = [c for c in fl_rounds.c if c.name != "announcement"]


def _round(r: Mapping[Any, Any]) -> RoundRow:
    return RoundRow(r["id"], r["model_name"], r["base_version"], r["state"], tuple(orjson.loads(r["participants"])),
                    orjson.loads(r["plan"]), r["opened_at"], r["deadline"], r["closed_at"], r["new_version"],
                    orjson.loads(r["outcome"]) if r["outcome"] else {}, r["reason"])


class RoundStore:
    def next_round_id(self, conn: Connection) -> int:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(fl_rounds.c.id), 0))).scalar_one()) + 1

    def add_round(self, conn: Connection, *, round_id: int, name: str, base_version: int,
                  participants: Sequence[str], plan: Mapping[str, Any], announcement: bytes,
                  opened_at: float, deadline: float) -> None:
        conn.execute(fl_rounds.insert().values(
            id=round_id, model_name=name, base_version=base_version, state="open",
            participants=orjson.dumps(list(participants)).decode(), plan=orjson.dumps(dict(plan)).decode(),
            announcement=announcement, opened_at=opened_at, deadline=deadline))

    def get_round(self, conn: Connection, round_id: int) -> RoundRow | None:
        r = conn.execute(sa.select(*_ROUND_COLUMNS).where(fl_rounds.c.id == round_id)).mappings().first()
        return None if r is None else _round(r)

    def announcement(self, conn: Connection, round_id: int) -> bytes:
        return bytes(conn.execute(sa.select(fl_rounds.c.announcement).where(fl_rounds.c.id == round_id)).scalar_one())

    def rounds(self, conn: Connection, name: str | None = None, *, states: Sequence[str] = (),
               limit: int = 1000) -> list[RoundRow]:
        """Rounds, oldest first (the newest ``limit``)."""
        query = sa.select(*_ROUND_COLUMNS).order_by(fl_rounds.c.id.desc()).limit(limit)
        if name is not None:
            query = query.where(fl_rounds.c.model_name == name)
        if states:
            query = query.where(fl_rounds.c.state.in_(list(states)))
        return [_round(r) for r in reversed(conn.execute(query).mappings().all())]

    def set_round(self, conn: Connection, round_id: int, *, state: str, expect: Sequence[str],
                  closed_at: float | None = None, new_version: int | None = None,
                  outcome: Mapping[str, Any] | None = None, reason: str | None = None) -> bool:
        """Move a round to ``state`` when it is in one of ``expect``; False when it was not."""
        values: dict[str, Any] = {"state": state}
        if closed_at is not None:
            values["closed_at"] = closed_at
        if new_version is not None:
            values["new_version"] = new_version
        if outcome is not None:
            values["outcome"] = orjson.dumps(dict(outcome)).decode()
        if reason is not None:
            values["reason"] = reason[:2000]
        stmt = fl_rounds.update().where(fl_rounds.c.id == round_id, fl_rounds.c.state.in_(list(expect))).values(values)
        return conn.execute(stmt).rowcount == 1

    # ----------------------------------------------------------------- updates

    def add_update(self, conn: Connection, *, round_id: int, update_round: int | None, device_id: str, status: str,
                   reason: str | None, n_examples: int | None, staleness: int | None, size: int, sha256: str,
                   metrics: Mapping[str, Any] | None, payload: bytes | None, at: float) -> None:
        conn.execute(fl_updates.insert().values(
            round_id=round_id, update_round=update_round, device_id=device_id[:64], status=status,
            reason=None if reason is None else reason[:2000], n_examples=n_examples, staleness=staleness,
            bytes=size, sha256=sha256, metrics=None if metrics is None else orjson.dumps(dict(metrics)).decode(),
            payload=payload, received_at=at))

    def counted(self, conn: Connection, round_id: int, statuses: Sequence[str] = COUNTED) -> dict[str, str]:
        """device -> payload sha256 of the updates a round counts (accepted or late; or its evaluations)."""
        u = fl_updates.c
        rows = conn.execute(sa.select(u.device_id, u.sha256).where(u.round_id == round_id,
                                                                     u.status.in_(list(statuses))))
        return {d: s for d, s in rows}

    def prior(self, conn: Connection, device_id: str, update_round: int) -> str | None:
        """The sha256 of the update of ``device_id`` for ``update_round`` already counted (in any round)."""
        u = fl_updates.c
        return conn.execute(sa.select(u.sha256).where(u.device_id == device_id, u.update_round == update_round,
                                                      u.status.in_(COUNTED)).limit(1)).scalar_one_or_none()

    def rounds_since(self, conn: Connection, name: str, after: int, upto: int) -> int:
        """Rounds of model ``name`` with ``after < id <= upto``: how many rounds late an update is
        (other models' rounds in between do not count)."""
        r = fl_rounds.c
        return int(conn.execute(sa.select(sa.func.count()).select_from(fl_rounds)
                                .where(r.model_name == name, r.id > after, r.id <= upto)).scalar_one())

    def count_by_state(self, conn: Connection, name: str) -> dict[str, int]:
        """How many rounds of model ``name`` are in each state (the hub's metrics)."""
        r = fl_rounds.c
        return {str(s): int(n) for s, n in conn.execute(
            sa.select(r.state, sa.func.count()).where(r.model_name == name).group_by(r.state))}

    def seen(self, conn: Connection, sha256: str) -> bool:
        """Whether this exact payload was already judged (a broker's redelivery after the hub restarted)."""
        u = fl_updates.c
        return conn.execute(sa.select(u.id).where(u.sha256 == sha256).limit(1)).first() is not None

    def evaluations(self, conn: Connection, round_id: int) -> dict[str, tuple[int, dict[str, Any]]]:
        """device -> (held-out windows, its scores) of a round's federated evaluation of its candidate."""
        u = fl_updates.c
        rows = conn.execute(sa.select(u.device_id, u.n_examples, u.metrics)
                            .where(u.round_id == round_id, u.status == "evaluated"))
        return {d: (int(n or 0), orjson.loads(m) if m else {}) for d, n, m in rows}

    def payloads(self, conn: Connection, round_id: int, status: str) -> dict[str, bytes]:
        """device -> payload of one kind of a secure round's messages (``advert``, ``shares``, ``masked``,
        ``revealed``): one per device, the first kept."""
        u = fl_updates.c
        rows = conn.execute(sa.select(u.device_id, u.payload).where(u.round_id == round_id, u.status == status)
                            .order_by(u.id))
        out: dict[str, bytes] = {}
        for d, payload in rows:
            out.setdefault(d, bytes(payload))
        return out

    def counted_payloads(self, conn: Connection, round_id: int) -> list[tuple[str, int, bytes]]:
        """(device, staleness, payload) of the updates a round aggregates."""
        u = fl_updates.c
        rows = conn.execute(sa.select(u.device_id, u.staleness, u.payload)
                            .where(u.round_id == round_id, u.status.in_(COUNTED)).order_by(u.id))
        return [(d, int(s or 0), bytes(p)) for d, s, p in rows]

    def updates(self, conn: Connection, round_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Every update of these rounds, without payloads."""
        u = fl_updates.c
        query = (sa.select(u.round_id, u.update_round, u.device_id, u.status, u.reason, u.n_examples, u.staleness,
                           u.bytes, u.metrics, u.received_at)
                 .where(u.round_id.in_(list(round_ids))).order_by(u.id))
        return [{**dict(r), "metrics": orjson.loads(r["metrics"]) if r["metrics"] else None}
                for r in conn.execute(query).mappings()]


def views(conn: Connection, name: str, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Each round as `cloud-hub rounds` and the dashboard show it: participants, updates accepted / late /
    refused (by reason), upload bytes, the devices' own scores and the hold-out's, before and after."""
    store = RoundStore()
    wanted = set(ids)
    rows = [r for r in store.rounds(conn, name) if r.id in wanted]
    updates = store.updates(conn, [r.id for r in rows])
    out = []
    for r in rows:
        mine = [u for u in updates if u["round_id"] == r.id]
        refused: dict[str, int] = {}
        for u in mine:
            if u["status"] == "refused":
                refused[u["reason"]] = refused.get(u["reason"], 0) + 1
        fed = r.outcome.get("federated", {})
        out.append({
            "round": r.id, "model": r.model_name, "base_version": r.base_version, "state": r.state,
            "new_version": r.new_version, "participants": list(r.participants),
            "accepted": sum(u["status"] == "accepted" for u in mine), "late": sum(u["status"] == "late" for u in mine),
            "evaluated": sum(u["status"] == "evaluated" for u in mine),
            "refused": sum(refused.values()), "refusals": refused,
            "upload_bytes": sum(u["bytes"] for u in mine), "announcement_bytes": r.plan.get("announcement_bytes"),
            # the running INT8 model → the round's, scored by the devices on windows they never train on (their
            # evaluation; the FP32 weights' scores beside); without one, the base → their own fine-tuned models
            "device_metric_before": r.outcome.get("evaluation_before", fed.get("metric_before")),
            "device_metric_after": r.outcome.get("evaluation_after", fed.get("metric_after")),
            "device_fp32_before": r.outcome.get("evaluation_fp32_before"),
            "device_fp32_after": r.outcome.get("evaluation_fp32_after"),
            "holdout_before": r.outcome.get("holdout_before"), "holdout_after": r.outcome.get("holdout_after"),
            "holdout_fp32_after": r.outcome.get("holdout_fp32_after"),
            "task": r.plan.get("task"), "opened_at": r.opened_at, "closed_at": r.closed_at, "reason": r.reason,
            # a secure round: the hub holds only the sum of `summed` devices' deltas (masked: those that reached it)
            "secure": "secure" in r.plan, "summed": r.outcome.get("summed"),
            "masked": sum(u["status"] == "masked" for u in mine),
            "threshold": (r.plan.get("secure") or {}).get("threshold"), "dropped": r.outcome.get("dropped"),
            "unopened": r.outcome.get("unopened") or None,  # device -> the senders whose shares it could not open
            "sum_sha256": r.outcome.get("sum_sha256"),
            # differential privacy: its mode, and the epsilon (at delta) the round spent and its model has spent
            "dp": (r.plan.get("dp") or {}).get("mode"), "dp_noise": (r.plan.get("dp") or {}).get("noise"),
            "dp_delta": (r.plan.get("dp") or {}).get("delta"),
            "epsilon": (r.outcome.get("privacy") or {}).get("epsilon"),
            "epsilon_total": (r.outcome.get("privacy") or {}).get("epsilon_total"),
        })
    return out
