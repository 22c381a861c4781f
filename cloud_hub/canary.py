"""Canary rollouts: a version goes to a cohort of devices first, then to the fleet, or back.

``start`` sends the signed bundle retained on each cohort device's own model topic
(``{prefix}/devices/{id}/model``); a device runs that bundle instead of the model topic's while it is
there. ``judge`` compares the cohort's results with the new version against the control's (the other
devices, on the previous version) once the cohort has ``min_results``: by accuracy where results
carry ground truth, by the regressor's mean error, else by the classifier's mean confidence.
``promote`` publishes the version on the model topic and clears the cohort's topics;
``roll_back`` clears them (the cohort returns to the model topic's version) and marks the version
rejected. Every step is recorded in ``events`` and published on ``{prefix}/events``. ``serve`` judges
the open canary every ``canary_check_s`` (:class:`CanaryWatcher`); ``cloud-hub rollout status
--check`` and ``cloud-hub rollback`` do it by hand.

Light on purpose: SQL, numpy, signing and MQTT only (no training stack), so ``serve`` carries it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from cloud_hub import db
from cloud_hub.aggregate import result_errors
from cloud_hub.settings import NO_SIGNING_KEY, HubSettings
from cloud_hub.signing import load_private_key, sign_bundle
from cloud_hub.store import ModelRow, RolloutRow, Store
from edge_agent.contract import MODEL_DELIVERY, RESULTS_DELIVERY, Delivery, decode_bundle
from edge_agent.mqtt import MqttError, MqttLink

log = logging.getLogger(__name__)
EVENTS_DELIVERY = RESULTS_DELIVERY  # QoS 1, not retained
CLEAR = b""  # an empty retained message deletes the retained bundle of a device's model topic


class CanaryError(RuntimeError):
    """Nothing to compare with, an unknown device, a canary already open..."""


# ----------------------------------------------------------------------------- sending


def send(settings: HubSettings, messages: Sequence[tuple[str, bytes, Delivery]], timeout: float = 30.0) -> None:
    """Publish ``messages`` and wait for every PUBACK (the broker has them, retained ones included)."""
    acked: set[int] = set()
    refused: list[str] = []
    changed = threading.Condition()

    def on_published(mid: int, ok: bool, reason: str) -> None:
        # paho calls this holding its outgoing-message lock, which publish() takes too: never publish
        # while holding ``changed`` (a PUBACK arriving during the next publish would deadlock both)
        with changed:
            acked.add(mid)
            if not ok:
                refused.append(reason)
            changed.notify_all()

    link = MqttLink(settings.broker_url, f"{settings.session_id}-rollout-{int(time.time() * 1000)}",
                    tls=settings.tls, on_published=on_published)
    link.start()
    try:
        link.wait_connected(timeout)
        mids = {link.publish(topic, payload, delivery) for topic, payload, delivery in messages}
        with changed:
            if not changed.wait_for(lambda: mids <= acked, timeout):
                raise MqttError(f"no PUBACK within {timeout:g} s for {len(mids - acked)} of {len(messages)} messages")
        if refused:
            raise MqttError(f"the broker refused: {refused[0]}")
    finally:
        link.stop()


def signed_bundle(row: ModelRow, settings: HubSettings, signing_key: str | None, allow_unsigned: bool) -> bytes:
    if row.bundle is None:
        raise CanaryError(f"model {row.name} v{row.version} has no stored bundle")
    bundle = decode_bundle(row.bundle)
    key_path = signing_key or settings.signing_key
    if key_path:
        return sign_bundle(bundle, load_private_key(key_path)).encode()
    if not allow_unsigned:
        raise CanaryError(NO_SIGNING_KEY)
    return bundle.encode()


def _event(settings: HubSettings, store: Store, conn: sa.Connection, kind: str, name: str, version: int,
           detail: dict[str, Any], at: float) -> tuple[str, bytes, Delivery]:
    store.add_event(conn, kind, name, version, detail, at)
    body = {"v": 1, "ts": at, "kind": kind, "model": name, "version": version, **detail}
    return settings.topics.events, orjson.dumps(body), EVENTS_DELIVERY


# ----------------------------------------------------------------------------- the cohort


def choose_cohort(devices: Sequence[str], *, fraction: float | None = None, named: Sequence[str] = (),
                  salt: str = "") -> list[str]:
    """``named`` devices, or a stable ``fraction`` of ``devices`` (at least one, never all): those
    whose hash with ``salt`` (the version) is lowest, so each version picks its own cohort."""
    known = sorted(set(devices))
    if named:
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise CanaryError(f"devices {unknown} are unknown to the hub (`cloud-hub devices` lists them)")
        if set(named) >= set(known):
            raise CanaryError("the cohort holds every device: nothing would keep the running version to compare with")
        return sorted(set(named))
    if fraction is None or not 0 < fraction < 1:
        raise CanaryError(f"the canary fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(known) < 2:
        raise CanaryError(f"a canary needs at least 2 devices (the hub knows {len(known)})")
    n = min(len(known) - 1, max(1, math.ceil(fraction * len(known))))
    return sorted(sorted(known, key=lambda d: hashlib.sha256(f"{salt}/{d}".encode()).digest())[:n])


def parse_canary(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise CanaryError(f"--canary: expected a share like 10% or 0.1, got {text!r}") from None
    if not 0 < value < 1:
        raise CanaryError(f"--canary: the share must be between 0 and 100% (exclusive), got {text!r}")
    return value


# ----------------------------------------------------------------------------- start, judge, act


def start(engine: sa.Engine, settings: HubSettings, row: ModelRow, *, cohort: Sequence[str],
          min_results: int, tolerance: float, signing_key: str | None = None,
          allow_unsigned: bool = False) -> RolloutRow:
    """Send ``row`` to the cohort's own model topics and open the rollout."""
    store = Store(engine)
    with db.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, row.name)
        if store.rollouts(conn, row.name, state="canary"):
            raise CanaryError(f"a canary of {row.name} is open: finish it first (`cloud-hub rollout status`, "
                              "`cloud-hub rollback`)")
    published = [r for r in rows if r.state == "published" and r.version != row.version]
    if not published:
        raise CanaryError(f"no version of {row.name} is on the model topic to compare the canary with: "
                          "publish one to the whole fleet first")
    previous = max(published, key=lambda r: (r.published_at or 0.0, r.version))
    payload = signed_bundle(row, settings, signing_key, allow_unsigned)
    now = time.time()
    with db.transaction(engine) as conn:
        store.add_rollout(conn, name=row.name, version=row.version, previous=previous.version, cohort=cohort,
                          min_results=min_results, tolerance=tolerance, at=now)
        note = _event(settings, store, conn, "canary_started", row.name, row.version,
                      {"cohort": list(cohort), "previous_version": previous.version}, now)
        # inside the transaction: when the broker does not take every message, no rollout is recorded
        send(settings, [*((settings.topics.device_model(d), payload, MODEL_DELIVERY) for d in cohort), note])
        return store.rollouts(conn, row.name, state="canary")[0]


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait", "promote" or "roll_back"
    metric: str  # accuracy, error or confidence
    cohort: float | None
    control: float | None
    cohort_n: int
    control_n: int
    reason: str

    def to_obj(self) -> dict[str, Any]:
        return {"action": self.action, "metric": self.metric, "cohort": self.cohort, "control": self.control,
                "cohort_results": self.cohort_n, "control_results": self.control_n, "reason": self.reason}


def _score(rows: Sequence[tuple[Any, ...]], metric: str) -> tuple[float | None, int]:
    """(score, results scored) where higher is better; error is negated."""
    if metric == "accuracy":
        hits = [label == truth for _, _, label, truth, _, value in rows if truth is not None and value is None]
        return (float(np.mean(hits)) if hits else None), len(hits)
    if metric == "error":
        errors = result_errors([r[5] for r in rows], [r[3] for r in rows])
        errors = errors[~np.isnan(errors)]
        return (-float(np.mean(errors)) if errors.size else None), int(errors.size)
    conf = [r[4] for r in rows if r[4] is not None]
    return (float(np.mean(conf)) if conf else None), len(conf)


def _metric(rows: Sequence[tuple[Any, ...]]) -> str:
    if any(r[3] is not None and r[5] is not None for r in rows):
        return "error"
    if any(r[3] is not None for r in rows):
        return "accuracy"
    return "confidence"


def judge(engine: sa.Engine, rollout: RolloutRow) -> Verdict:
    """Whether the cohort has done as well as the control (within the tolerance) over ``min_results``."""
    store = Store(engine)
    versions = [rollout.version] + ([rollout.previous] if rollout.previous is not None else [])
    with db.transaction(engine, write=False) as conn:
        rows = store.canary_results(conn, versions, rollout.started_at)
        cohort_set = set(rollout.cohort)
        cohort = [r for r in rows if r[0] in cohort_set and r[1] == rollout.version]
        control = [r for r in rows if r[0] not in cohort_set and r[1] == rollout.previous]
        metric = _metric(cohort + control)
        c_score, c_n = _score(cohort, metric)
        k_score, k_n = _score(control, metric)
        if k_n < min(rollout.min_results, 20) and rollout.previous is not None:  # few fresh: the version's latest
            control = store.results_of_version(conn, rollout.previous, max(rollout.min_results, 200))
            k_score, k_n = _score(control, metric)
    shown = _shown(metric)
    if c_n < rollout.min_results:
        return Verdict("wait", metric, c_score, k_score, c_n, k_n,
                       f"{c_n} of {rollout.min_results} scored cohort results so far")
    if k_score is None or c_score is None:
        return Verdict("promote", metric, c_score, k_score, c_n, k_n,
                       f"{c_n} cohort results and no control to compare with")
    worse = c_score < k_score - rollout.tolerance
    reason = (f"cohort {metric} {shown(c_score)} over {c_n} results vs control {shown(k_score)} over {k_n} "
              f"(tolerance {rollout.tolerance:g}): {'worse' if worse else 'not worse'}")
    return Verdict("roll_back" if worse else "promote", metric, c_score, k_score, c_n, k_n, reason)


def _shown(metric: str) -> Any:
    if metric == "accuracy":
        return lambda x: f"{100 * x:.1f}%"
    if metric == "error":
        return lambda x: f"{-x:.3g}"
    return lambda x: f"{x:.3f}"


def promote(engine: sa.Engine, settings: HubSettings, rollout: RolloutRow, reason: str, *,
            signing_key: str | None = None, allow_unsigned: bool = False) -> None:
    """The version goes on the model topic for the whole fleet; the cohort's own topics are cleared."""
    store = Store(engine)
    with db.transaction(engine, write=False) as conn:
        row = store.get_model(conn, rollout.name, rollout.version)
    assert row is not None
    payload = signed_bundle(row, settings, signing_key, allow_unsigned)
    now = time.time()
    with db.transaction(engine) as conn:
        if not store.end_rollout(conn, rollout.id, "promoted", reason, now):
            return
        store.set_model_state(conn, rollout.name, rollout.version, "published", at=now)
        note = _event(settings, store, conn, "promoted", rollout.name, rollout.version, {"reason": reason}, now)
        # the model topic first: a cohort device that loses its own bundle falls back to the new version
        send(settings, [(settings.topics.model(rollout.name), payload, MODEL_DELIVERY)])
        send(settings, [*((settings.topics.device_model(d), CLEAR, MODEL_DELIVERY) for d in rollout.cohort), note])
    log.info("canary v%d promoted: %s", rollout.version, reason)


def roll_back(engine: sa.Engine, settings: HubSettings, rollout: RolloutRow, reason: str, *, by: str) -> None:
    """The cohort returns to the model topic's version; the canary version is marked rejected."""
    store = Store(engine)
    now = time.time()
    with db.transaction(engine) as conn:
        if not store.end_rollout(conn, rollout.id, "rolled_back", reason, now):
            return
        store.set_model_state(conn, rollout.name, rollout.version, "rejected")
        note = _event(settings, store, conn, "rolled_back", rollout.name, rollout.version,
                      {"reason": reason, "by": by, "cohort": list(rollout.cohort),
                       "back_to": rollout.previous}, now)
        send(settings, [*((settings.topics.device_model(d), CLEAR, MODEL_DELIVERY) for d in rollout.cohort), note])
    log.warning("canary v%d rolled back (%s): %s", rollout.version, by, reason)


def check(engine: sa.Engine, settings: HubSettings, name: str) -> tuple[RolloutRow, Verdict] | None:
    """Judge the open canary of ``name`` and act on the verdict; None when no canary is open."""
    with db.transaction(engine, write=False) as conn:
        open_ = Store(engine).rollouts(conn, name, state="canary")
    if not open_:
        return None
    verdict = judge(engine, open_[0])
    if verdict.action == "promote":
        promote(engine, settings, open_[0], verdict.reason)
    elif verdict.action == "roll_back":
        roll_back(engine, settings, open_[0], verdict.reason, by="automatic")
    return open_[0], verdict


class CanaryWatcher:
    """``serve``'s thread that judges the open canary every ``canary_check_s``."""

    def __init__(self, settings: HubSettings, engine: sa.Engine) -> None:
        self.settings, self.engine = settings, engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)

    def start(self) -> None:
        if self.settings.canary_check_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.canary_check_s):
            try:
                check(self.engine, self.settings, self.settings.model_name)
            except Exception as exc:  # keep serving: log it and try again at the next check
                log.error("canary check failed: %s", db.first_line(exc))
