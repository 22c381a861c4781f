"""Publishing signed bundles on the retained model topic, and the rollout view."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import ModelRow, Store
from cloud_hub.models.lifecycle import LifecycleError, on_topic
from cloud_hub.models.signing import load_private_key, sign_bundle
from cloud_hub.rollout.canary import connect
from cloud_hub.settings import NO_SIGNING_KEY, HubSettings
from edge_agent import exits
from edge_agent.contract import MODEL_DELIVERY, Bundle, decode_bundle
from edge_agent.mqtt import MqttError, MqttLink

log = logging.getLogger(__name__)


class PublishRefused(LifecycleError):
    """What the operator must do first: end the open canary, give a signing key (exit 2, as a canary's publish
    says it; a LifecycleError still, which auto-publish and a round's finish catch)."""

    exit_code = exits.USAGE


def pick(store: Store, conn: sa.Connection, name: str, version: int | None, *, force: bool) -> ModelRow:
    """The version to publish: the one asked for, else the newest that passed its gate."""
    if version is not None:
        row = store.get_model(conn, name, version)
        if row is None:
            raise LifecycleError(f"model {name} v{version} is not registered")
        if row.state == "rejected" and not force:
            # a canary rolled back rejects its version, whose gate had passed (it said "failed its gate (...: pass)")
            back = next((r for r in store.rollouts(conn, name, state="rolled_back") if r.version == version), None)
            gate = (row.metrics or {}).get("gate")
            raise LifecycleError(f"model {name} v{version} " + (
                f"is rejected: its canary was rolled back ({back.reason}; `cloud-hub rollout status`)" if back else
                f"failed its gate ({gate})" if gate else "is rejected (a canary rolled back: `cloud-hub rollout status` says why)")
                + "; use --force to publish it anyway")
        return row
    rows = [r for r in store.list_models(conn, name) if r.state in ("publishable", "published")]
    if not rows:
        why = ""
        last = store.get_model(conn, name)
        if last is not None and last.state == "rejected":
            gate = (last.metrics or {}).get("gate")
            why = f": v{last.version} is rejected{f' ({gate})' if gate else ''}; `--version {last.version} --force` publishes it"
        raise LifecycleError(f"no publishable version of model {name!r}{why}; run `cloud-hub train` or `retrain`")
    return rows[-1]


def publish(engine: sa.Engine, settings: HubSettings, *, version: int | None = None,
            signing_key: str | None = None, allow_unsigned: bool = False, force: bool = False,
            timeout: float = 30.0) -> Bundle:
    """Sign the bundle and publish it retained on the model topic; waits for the broker's PUBACK."""
    store = Store(engine)
    with sessions.transaction(engine, write=False) as conn:
        row = pick(store, conn, settings.model_name, version, force=force)
        open_ = store.rollouts(conn, settings.model_name, state="canary")
    if open_:  # the fleet would move under it: its judge compares with a version the fleet no longer runs, and a
        # rollback would send the cohort to the version the rollout names, not the one just published
        c = open_[0]
        raise PublishRefused(f"a canary of {c.name} v{c.version} is open (against v{c.previous}): end it first "
                             "(`cloud-hub rollback`, or let `serve` judge it: `cloud-hub rollout status`)")
    if row.bundle is None:
        raise LifecycleError(f"model {row.name} v{row.version} has no stored bundle")
    bundle = decode_bundle(row.bundle)
    key_path = signing_key or settings.signing_key
    if key_path:
        bundle = sign_bundle(bundle, load_private_key(key_path))
    elif not allow_unsigned:  # a setting missing: exit 2, as a canary's publish says it
        raise PublishRefused(NO_SIGNING_KEY)
    acked = threading.Event()
    outcome: list[str] = []

    def on_published(_mid: int, ok: bool, reason: str) -> None:
        outcome.append("ok" if ok else reason)
        acked.set()

    link = MqttLink(settings.broker_url, f"{settings.session_id}-publish-{int(time.time())}", tls=settings.tls,
                    keepalive_s=settings.keepalive_s, on_published=on_published)
    link.start()
    try:
        connect(link, settings)
        link.publish(settings.topics.model(row.name), bundle.encode(), MODEL_DELIVERY)
        if not acked.wait(timeout):
            raise MqttError(f"no PUBACK for the model within {timeout:g} s")
        if outcome[0] != "ok":
            raise MqttError(f"broker refused the model: {outcome[0]}")
    finally:
        link.stop()
    with sessions.transaction(engine) as conn:
        store.set_model_state(conn, row.name, row.version, "published", at=time.time())
    return bundle


def rollout(engine: sa.Engine, name: str | None = None) -> list[dict[str, Any]]:
    """Every version with its metrics, and how many devices report running it (online / in total)."""
    store = Store(engine)
    with sessions.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, name)
        running = store.devices_by_model(conn)
    counts: dict[tuple[str | None, int | None], dict[str, int]] = {}
    for model_name, model_version, state, n in running:
        entry = counts.setdefault((model_name, model_version), {"online": 0, "total": 0})
        entry["total"] += n
        if state == "online":
            entry["online"] += n
    topic_version = {}
    for model_name in {r.name for r in rows}:
        live = on_topic([r for r in rows if r.name == model_name])
        if live is not None:
            topic_version[model_name] = live.version
    out = []
    for r in rows:
        metrics = r.metrics or {}
        c = counts.get((r.name, r.version), {"online": 0, "total": 0})
        out.append({
            "name": r.name, "version": r.version, "state": r.state, "created": r.created,
            "published_at": r.published_at, "on_topic": topic_version.get(r.name) == r.version,
            "int8": _brief(metrics.get("int8")), "fp32": _brief(metrics.get("fp32")),
            "gate": metrics.get("gate"), "devices_online": c["online"], "devices": c["total"],
            "holdout_devices": r.manifest.get("training", {}).get("holdout_devices", []),
            "evaluated_on": metrics.get("evaluated_on"),  # where the figures came from, when not hold-out devices
        })
    return out


def _brief(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if not m:
        return None
    keys = ("accuracy", "mae", "mean_error", "median_error", "p90_error", "outputs", "bytes", "latency_ms")
    return {k: m[k] for k in keys if k in m}
