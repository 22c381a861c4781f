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

from cloud_hub.data import sessions
from cloud_hub.data.store import ModelRow, RolloutRow, Store
from cloud_hub.data.summaries import result_errors
from cloud_hub.errors import HubError
from cloud_hub.models.signing import load_private_key, sign_bundle
from cloud_hub.rollout import canary_judge as cj
from cloud_hub.rollout.canary_judge import Estimate
from cloud_hub.settings import NO_SIGNING_KEY, HubSettings
from edge_agent import exits
from edge_agent.contract import MODEL_DELIVERY, RESULTS_DELIVERY, Delivery, decode_bundle
from edge_agent.mqtt import ConnectRefused, MqttError, MqttLink

log = logging.getLogger(__name__)
EVENTS_DELIVERY = RESULTS_DELIVERY  # QoS 1, not retained
HISTORY_PER_DEVICE = 10_000  # a cohort device's latest results on the previous version: its own baseline
CLEAR = b""  # an empty retained message deletes the retained bundle of a device's model topic


class CanaryError(HubError, RuntimeError):
    """Nothing to compare with, an unknown device, a canary already open..."""

    exit_code = exits.USAGE


# ----------------------------------------------------------------------------- sending


def send(settings: HubSettings, messages: Sequence[tuple[str, bytes, Delivery]], timeout: float = 30.0,
         began: list[bool] | None = None) -> None:
    """Publish ``messages`` and wait for every PUBACK (the broker has them, retained ones included); ``began``
    gets True once the first is handed to the broker (after that, a failure may have left some there)."""
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
                    tls=settings.tls, keepalive_s=settings.keepalive_s, on_published=on_published)
    link.start()
    try:
        connect(link, settings)
        if began is not None:
            began.append(True)
        mids = {link.publish(topic, payload, delivery) for topic, payload, delivery in messages}
        with changed:
            if not changed.wait_for(lambda: mids <= acked, timeout):
                raise MqttError(f"no PUBACK within {timeout:g} s for {len(mids - acked)} of {len(messages)} messages")
        if refused:
            raise MqttError(f"the broker refused: {refused[0]}")
    finally:
        link.stop()


def connect(link: MqttLink, settings: HubSettings) -> None:
    """Wait up to ``connect_timeout_s`` for the broker, saying after 3 s what is in the way (no silent wait: a
    rollback to a wrong broker said nothing for 30 s, a new operator's finding)."""
    first = min(3.0, settings.connect_timeout_s)
    try:
        link.wait_connected(first)
        return
    except ConnectRefused:
        raise
    except MqttError:
        if first >= settings.connect_timeout_s:
            raise
    log.warning("not connected to %s yet (%s); trying for up to %g s", settings.broker_url,
                link.unreachable_reason(), settings.connect_timeout_s)
    try:
        link.wait_connected(settings.connect_timeout_s - first)
    except ConnectRefused:
        raise
    except MqttError:
        raise MqttError(f"no connection to {settings.broker_url} within {settings.connect_timeout_s:g} s: "
                        f"{link.unreachable_reason()}") from None


def _take_back(settings: HubSettings, row: ModelRow, cohort: Sequence[str]) -> None:
    """A canary whose sending failed or was stopped (Ctrl-C) is recorded nowhere, yet some of its cohort may hold
    it (a new operator's finding: the device ran a version no rollout knew, and neither rollback nor a fleet
    publish took it back): clear the cohort's model topics, or say how to."""
    try:
        send(settings, [(settings.topics.device_model(d), CLEAR, MODEL_DELIVERY) for d in cohort], timeout=5.0)
    except BaseException as exc:  # a second Ctrl-C, the broker gone: say what is left to do
        log.warning("%s v%d may have reached %s, and no canary is recorded (%s): publish it to them again "
                    "(`cloud-hub publish --version %d --devices %s`), then `cloud-hub rollback`", row.name,
                    row.version, ", ".join(cohort), str(exc) or type(exc).__name__, row.version, ",".join(cohort))


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
        hint = f": write {text}% for {text} percent" if not text.endswith("%") and 1 <= value < 100 else ""
        raise CanaryError(f"--canary: the share must be between 0 and 100% (exclusive), as 10% or 0.1, got "
                          f"{text!r}{hint}")
    return value


# ----------------------------------------------------------------------------- start, judge, act


def start(engine: sa.Engine, settings: HubSettings, row: ModelRow, *, cohort: Sequence[str],
          min_results: int, tolerance: float, signing_key: str | None = None,
          allow_unsigned: bool = False) -> RolloutRow:
    """Send ``row`` to the cohort's own model topics and open the rollout."""
    store = Store(engine)
    with sessions.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, row.name)
        if store.rollouts(conn, row.name, state="canary"):
            raise CanaryError(f"a canary of {row.name} is open: finish it first (`cloud-hub rollout status`, "
                              "`cloud-hub rollback`)")
    # imported here: serve judges canaries without loading the lifecycle
    from cloud_hub.models.lifecycle import on_topic

    live = on_topic(rows)
    if live is not None and live.version == row.version:  # it compared v14 with v13, which no device ran any more
        raise CanaryError(f"{row.name} v{row.version} is the version on the model topic: the fleet runs it already. "
                          "A canary tries a newer version against it (train or retrain one, or name it with "
                          "--version)")
    published = [r for r in rows if r.state == "published" and r.version != row.version]
    if not published:
        raise CanaryError(f"no version of {row.name} is on the model topic to compare the canary with: "
                          "publish one to the whole fleet first")
    previous = max(published, key=lambda r: (r.published_at or 0.0, r.version))
    payload = signed_bundle(row, settings, signing_key, allow_unsigned)
    now = time.time()
    began: list[bool] = []
    try:
        with sessions.transaction(engine) as conn:
            store.add_rollout(conn, name=row.name, version=row.version, previous=previous.version, cohort=cohort,
                              min_results=min_results, tolerance=tolerance, at=now)
            note = _event(settings, store, conn, "canary_started", row.name, row.version,
                          {"cohort": list(cohort), "previous_version": previous.version}, now)
            # inside the transaction: when the broker does not take every message, no rollout is recorded, and
            # the cohort's topics are cleared again
            send(settings, [*((settings.topics.device_model(d), payload, MODEL_DELIVERY) for d in cohort), note],
                 began=began)
            started = store.rollouts(conn, row.name, state="canary")[0]
    except BaseException:  # not committed: no rollout; what reached the broker is taken back
        if began:
            _take_back(settings, row, cohort)
        raise
    return started


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait", "promote", "roll_back" or "hold" (undecided at the limit, kept open)
    metric: str  # accuracy, error or confidence
    estimate: Estimate | None  # cohort minus previous version, with its always-valid interval
    cohort_n: int
    control_n: int
    control: float | None  # the control fleet's mean score now (shown beside the estimate)
    reason: str
    deciding: str  # what would decide it
    shift: float | None = None  # without ground truth: the cohort's predicted-class shift vs its history

    def to_obj(self) -> dict[str, Any]:
        return {"action": self.action, "metric": self.metric, "cohort_results": self.cohort_n,
                "control_results": self.control_n, "control": self.control, "reason": self.reason,
                "deciding": self.deciding, "class_shift": self.shift,
                **({"estimate": self.estimate.to_obj()} if self.estimate is not None else {"estimate": None})}


Row = tuple[Any, ...]  # (device, version, label, truth, confidence, value), in each device's own order


def _scores(rows: Sequence[Row], metric: str) -> cj.Series:
    """Higher is better: a hit, a regressor's error (negated later, relative to its reference), a confidence."""
    if metric == "accuracy":
        kept = [(r[0], float(r[2] == r[3])) for r in rows if r[3] is not None and r[5] is None]
    elif metric == "error":
        errors = result_errors([r[5] for r in rows], [r[3] for r in rows])
        kept = [(r[0], float(e)) for r, e in zip(rows, errors, strict=True) if not np.isnan(e)]
    else:
        kept = [(r[0], float(r[4])) for r in rows if r[4] is not None]
    return cj.Series.of([k[0] for k in kept], [k[1] for k in kept])


def _metric(rows: Sequence[Row], task: str | None) -> str:
    """By the model's ``task``: its results' ground truth where one of its kind carries it (a regressor's
    error, a classifier's hit), else their confidence. A row of the other kind is not this model's (one lying
    device's regression result switched a classifier's judge to errors, where none of its results scored: the
    canary waited for ever). A manifest that does not say its task: the results say it."""
    if task is None:
        task = "regression" if any(r[3] is not None and r[5] is not None for r in rows) else "classification"
    regression = task == "regression"
    if any(r[3] is not None and (r[5] is not None) == regression for r in rows):
        return "error" if regression else "accuracy"
    return "confidence"


def rules(settings: HubSettings, rollout: RolloutRow, metric: str) -> cj.Rules:
    """The judge's rules for ``rollout``: its own minimum and tolerance (a regressor's from the settings)."""
    tolerance = settings.canary_error_tolerance if metric == "error" else rollout.tolerance
    return cj.Rules(tolerance=tolerance, alpha=settings.canary_alpha, min_results=rollout.min_results,
                    max_results=max(settings.canary_max_results, rollout.min_results), max_s=settings.canary_max_s,
                    on_undecided=settings.canary_on_undecided)


def judge(engine: sa.Engine, rollout: RolloutRow, settings: HubSettings, now: float | None = None) -> Verdict:
    """Whether the cohort does worse on the canary than on the previous version, with stated error rates
    (:mod:`cloud_hub.rollout.canary_judge`): each cohort device against its own history, the control fleet for
    a device that has none."""
    store = Store(engine)
    cohort_set = set(rollout.cohort)
    with sessions.transaction(engine, write=False) as conn:
        fresh = store.canary_results(conn, [rollout.version, *([rollout.previous] if rollout.previous else [])],
                                     rollout.started_at)
        history = ([] if rollout.previous is None else
                   store.history_of(conn, rollout.previous, rollout.cohort, HISTORY_PER_DEVICE))
        others = store.running_other_models(conn, rollout.name)
        model = store.get_model(conn, rollout.name, rollout.version)
    cohort_rows = [r for r in fresh if r[0] in cohort_set and r[1] == rollout.version]
    # the control: the devices of this model on its previous version (another model's version 1 is not ours)
    control_rows = [r for r in fresh if r[0] not in cohort_set and r[1] == rollout.previous and r[0] not in others]
    metric = _metric(cohort_rows + control_rows + history, None if model is None else model.manifest.get("task"))
    cohort, baseline, control = (_scores(cohort_rows, metric), _scores(history, metric),
                                 _scores(control_rows, metric))
    if metric == "error":
        cohort, baseline, control = cj.relative_errors(cohort, baseline, control)
    rule = rules(settings, rollout, metric)
    est = cj.estimate(cohort, baseline, control, rule)
    elapsed = (time.time() if now is None else now) - rollout.started_at
    decision = cj.decide(est, rule, elapsed_s=elapsed, metric=metric)
    shift = None
    if metric == "confidence":
        shift = cj.histogram_shift([r[2] for r in cohort_rows if r[2] is not None],
                                   [r[2] for r in history if r[2] is not None])
    return Verdict(decision.action, metric, est, len(cohort), len(control),
                   float(control.score.mean()) if len(control) else None, decision.reason, decision.deciding, shift)


def promote(engine: sa.Engine, settings: HubSettings, rollout: RolloutRow, reason: str, *,
            signing_key: str | None = None, allow_unsigned: bool = False) -> None:
    """The version goes on the model topic for the whole fleet; the cohort's own topics are cleared."""
    store = Store(engine)
    with sessions.transaction(engine, write=False) as conn:
        row = store.get_model(conn, rollout.name, rollout.version)
    assert row is not None
    payload = signed_bundle(row, settings, signing_key, allow_unsigned)
    now = time.time()
    with sessions.transaction(engine) as conn:
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
    with sessions.transaction(engine) as conn:
        if not store.end_rollout(conn, rollout.id, "rolled_back", reason, now):
            return
        store.set_model_state(conn, rollout.name, rollout.version, "rejected")
        note = _event(settings, store, conn, "rolled_back", rollout.name, rollout.version,
                      {"reason": reason, "by": by, "cohort": list(rollout.cohort),
                       "back_to": rollout.previous}, now)
        send(settings, [*((settings.topics.device_model(d), CLEAR, MODEL_DELIVERY) for d in rollout.cohort), note])
    log.warning("canary v%d rolled back (%s): %s", rollout.version, by, reason)


def cohort_not_running(engine: sa.Engine, rollout: RolloutRow, now: float | None = None) -> list[str]:
    """Each cohort device that does not report running the canary's version, with what the hub knows of it (a
    new operator's finding: a canary signed with a key the devices do not trust waited for ever, and `rollout
    status` said only that the cohort had sent no scored result; the device's refusal was in `devices`)."""
    now = time.time() if now is None else now
    with sessions.transaction(engine, write=False) as conn:
        rows = Store(engine).device_rows(conn)
    out = []
    for d in rollout.cohort:
        row = rows.get(d)
        if row is None:
            out.append(f"{d}: the hub has no status from it")
        elif row["model_name"] != rollout.name or row["model_version"] != rollout.version:
            runs = f"runs {row['model_name']} v{row['model_version']}" if row["model_version"] else "runs no model"
            seen = f"{row['state']}, last seen {max(now - float(row['last_seen']), 0):.0f} s ago"
            error = f"; its last error: {row['last_error']}" if row["last_error"] else ""
            out.append(f"{d}: {runs}, not v{rollout.version} ({seen}){error}")
    return out


def unsigned_promotion(settings: HubSettings, rollout: RolloutRow) -> str | None:
    """Why this hub could not promote ``rollout`` (no signing key), with the fix; None when it can."""
    if settings.signing_key:
        return None
    return (f"canary {rollout.name} v{rollout.version} cannot be promoted by this hub: it has no signing key. "
            "Give `cloud-hub serve` --signing-key PATH (or signing_key in its config, CLOUD_HUB_SIGNING_KEY); "
            "`cloud-hub rollout status --check --signing-key PATH` promotes it by hand")


def check(engine: sa.Engine, settings: HubSettings, name: str, now: float | None = None
          ) -> tuple[RolloutRow, Verdict] | None:
    """Judge the open canary of ``name`` and act on the verdict; None when no canary is open.
    A promotion this hub cannot sign raises :class:`CanaryError` saying how to fix it."""
    with sessions.transaction(engine, write=False) as conn:
        open_ = Store(engine).rollouts(conn, name, state="canary")
    if not open_:
        return None
    verdict = judge(engine, open_[0], settings, now)
    if verdict.action == "promote":
        blocked = unsigned_promotion(settings, open_[0])
        if blocked:
            raise CanaryError(f"{blocked} (verdict: {verdict.reason})")
        promote(engine, settings, open_[0], verdict.reason)
    elif verdict.action == "roll_back":
        roll_back(engine, settings, open_[0], verdict.reason, by="automatic")
    return open_[0], verdict


class CanaryWatcher:
    """``serve``'s thread that judges the open canary every ``canary_check_s``."""

    REPEAT_S = 300.0  # the same complaint is logged again only this often
    NOTE_S = 60.0  # an undecided canary's estimate is logged this often

    def __init__(self, settings: HubSettings, engine: sa.Engine) -> None:
        self.settings, self.engine = settings, engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._said: dict[str, float] = {}
        self._next_note = 0.0

    def start(self) -> None:
        self._warn_unsigned()
        if self.settings.canary_check_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _warn_unsigned(self) -> None:
        """At start: an open canary this hub could never promote is said at once, not at its verdict."""
        try:
            with sessions.transaction(self.engine, write=False) as conn:
                open_ = Store(self.engine).rollouts(conn, self.settings.model_name, state="canary")
        except Exception as exc:  # the ingest path reports an unreachable database itself
            log.debug("canary: cannot read rollouts at start: %s", sessions.first_line(exc))
            return
        blocked = open_ and unsigned_promotion(self.settings, open_[0])
        if blocked:
            self._say(logging.WARNING, blocked)

    def _say(self, level: int, message: str, key: str | None = None) -> None:
        now, key = time.monotonic(), key or message
        if now - self._said.get(key, -math.inf) >= self.REPEAT_S:
            self._said[key] = now
            log.log(level, "%s", message)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.canary_check_s):
            self.check_once()

    def check_once(self) -> None:
        """One check: act on the verdict, say what blocks it (once per cause), never raise."""
        try:
            done = check(self.engine, self.settings, self.settings.model_name)
            if done is not None and done[1].action == "wait" and time.monotonic() >= self._next_note:
                self._next_note = time.monotonic() + self.NOTE_S
                log.info("canary v%d: %s; to decide: %s", done[0].version, done[1].reason, done[1].deciding)
            if done is not None and done[1].action == "hold":
                self._say(logging.WARNING, f"canary v{done[0].version} {done[1].reason}: held open "
                          "(`cloud-hub rollback` ends it, `rollout status --check` judges it again)")
        except CanaryError as exc:  # said once per cause, not once per verdict (its figures change)
            self._say(logging.ERROR, f"canary: {exc}", key=exc.args[0].split(" (verdict: ")[0])
        except Exception as exc:  # keep serving: log it and try again at the next check
            self._say(logging.ERROR, f"canary check failed: {sessions.first_line(exc)}")
