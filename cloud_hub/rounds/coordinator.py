"""Federated rounds on the hub: select devices, announce, judge their updates, aggregate, gate, publish.

One :class:`Coordinator` runs the rounds of one model (``cloud-hub federate``). A round:

1. **opens**: the devices that report running the base version are sampled (``fraction``, at least
   ``min_available``), and a signed announcement with the base's FP32 weights goes retained on
   ``{prefix}/rounds/{model}`` (:mod:`cloud_hub.rounds.opening`);
2. **collects** updates from ``{prefix}/devices/+/update`` on a persistent session with manual
   acknowledgements: each is judged (:func:`judge_update`), written to ``fl_updates`` with its verdict,
   committed, and only then acknowledged, so a hub killed mid-round loses no accepted update (the
   broker redelivers what was not acknowledged; a redelivery of a judged payload is recognised by
   its sha256 and counted once; :mod:`cloud_hub.rounds.answers`); a secure round collects in four steps
   (:mod:`cloud_hub.rounds.secure`);
3. **closes** at ``min_updates`` accepted updates or at the deadline, whichever comes first; late
   answers to the previous rounds (up to ``max_staleness``) count, weighted down (FedBuff);
4. **aggregates** (:mod:`cloud_hub.rounds.fedavg`: clip, example-weighted mean on the FP32 master copy),
   re-quantizes to static INT8 from the activation ranges the devices reported, evaluates on
   hold-out logs when given (else the devices that trained score the INT8 model that would ship, and
   its FP32 weights, against the base on their held-out windows), gates the INT8 model against the
   base, registers the version and, when it passes, signs and publishes it on the model topic
   (:mod:`cloud_hub.rounds.finish`).

This module holds the loop and the link: the MQTT session (publish and wait for the PUBACK, the inbox, the
acknowledgement on the connection a message came on), the signature, and the phases of a round in order.
The round's state lives in ``fl_rounds``: a restarted coordinator resumes an open round (re-publishing
its announcement) or finishes a closed one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import Store
from cloud_hub.models.lifecycle import LifecycleError
from cloud_hub.rounds import privacy
from cloud_hub.rounds.answers import Answers
from cloud_hub.rounds.config import FederateConfig, RoundError
from cloud_hub.rounds.opening import available_devices, open_round
from cloud_hub.rounds.secure import SecureRound, SecureRoundFailed, Wire
from cloud_hub.rounds.store import RoundRow, RoundStore
from cloud_hub.settings import NO_SIGNING_KEY, HubSettings
from edge_agent import exits
from edge_agent.contract.privacy import DpParams
from edge_agent.contract.round_frames import SignedHeader
from edge_agent.contract.rounds import (
    ROUND_DELIVERY,
    Announcement,
    RoundPlan,
    WeightsRangeError,
    announcement,
)
from edge_agent.mqtt import Message, MqttError, MqttLink

log = logging.getLogger(__name__)

S = TypeVar("S", bound=SignedHeader)
# A round's end (its retained announcement cleared), queued for a device that is away: past this the device
# reads the announcement's deadline itself, if it saw the announcement at all.
CLEAR_EXPIRY_S = 60.0


class Coordinator:
    """Runs federated rounds of ``settings.model_name`` (``cloud-hub federate``)."""

    def __init__(self, settings: HubSettings, engine: sa.Engine, config: FederateConfig, *,
                 signing_key: str | None, allow_unsigned: bool,
                 progress: Callable[[str], None] = lambda line: None) -> None:
        if not signing_key and not allow_unsigned:
            raise RoundError(NO_SIGNING_KEY)
        self.s, self.engine, self.cfg = settings, engine, config
        self.signing_key, self.allow_unsigned = signing_key, allow_unsigned
        self.say = progress
        self.stopped_by: str | None = None  # why run() opened no more rounds before --rounds (the privacy budget)
        self.store, self.rounds = Store(engine), RoundStore()
        # (connection generation, message): packet ids are per connection, so a message is acknowledged only
        # on the connection it came on; after a reconnect the broker sends it again (and it is counted once)
        self._inbox: queue.Queue[tuple[int, Message]] = queue.Queue()
        self._generation = 0
        self._later: list[tuple[int, Message]] = []  # training answers held (unacknowledged) during an evaluation
        self._published: dict[int, str] = {}  # mid -> "ok" or the broker's reason, until _send_all reads it
        self._puback = threading.Condition()  # notified at each PUBACK: a send wakes at once, not at a poll
        self._key: Any = None  # the signing key, loaded at the first signature
        c = config
        self.budget = privacy.Budget(c.dp_noise, c.target_epsilon, c.dp_delta, c.rounds) if c.dp else None
        self._link = MqttLink(
            settings.broker_url, f"{settings.session_id}-federate", tls=settings.tls, clean_start=False,
            session_expiry_s=settings.session_expiry_s, manual_ack=True, keepalive_s=settings.keepalive_s, on_message=lambda m: self._inbox.put((self._generation, m)),
            on_connected=self._on_connected,
            on_published=self._on_published, subscriptions=[(settings.topics.all_updates, 1)], exclusive=True,
        )
        self.answers = Answers(settings, engine, self.store, self._link, refuse_factor=config.refuse_factor,
                               ack=self._ack, say=progress)

    def _on_connected(self, _up: bool) -> None:
        self._generation += 1

    def _ack(self, generation: int, msg: Message) -> None:
        if generation == self._generation:
            self._link.ack(msg.mid, msg.qos)

    def _on_published(self, mid: int, ok: bool, reason: str) -> None:
        with self._puback:
            self._published[mid] = "ok" if ok else reason
            self._puback.notify_all()

    # ----------------------------------------------------------------- the loop

    def run(self) -> list[RoundRow]:
        self._link.start()
        try:
            self._link.wait_connected(self.s.connect_timeout_s)
            self._link.wait_subscribed(self.s.connect_timeout_s)
            done: list[int] = []
            while len(done) < self.cfg.rounds:
                try:
                    done.append(self._one_round())
                except privacy.BudgetSpent as exc:
                    self.say(str(exc))
                    self.stopped_by = str(exc)
                    break
            if self._link.fatal:  # the rounds are done, but another process has our client id: say so
                self.say(f"warning: {self._link.fatal}")
            with sessions.transaction(self.engine, write=False) as conn:
                return [r for r in self.rounds.rounds(conn, self.s.model_name) if r.id in done]
        finally:
            self._link.stop()

    def _one_round(self) -> int:
        with sessions.transaction(self.engine, write=False) as conn:
            pending = self.rounds.rounds(conn, self.s.model_name, states=("open", "closed"))
        if pending:
            r = pending[-1]
            gate = r.plan.get("holdout_logs") or "none (no hold-out log)"
            self.say(f"round {r.id}: resuming ({r.state}, base v{r.base_version}); its gate: hold-out {gate}, "
                     f"tolerance {r.plan.get('tolerance', 0.0):g}")
            if r.state == "open":
                with sessions.transaction(self.engine, write=False) as conn:
                    self._send(self.s.topics.rounds(r.model_name), self.rounds.announcement(conn, r.id),
                               expiry_s=r.deadline - time.time())
                # what it waits for: it said nothing more until the deadline (a new operator's finding)
                self.say(f"round {r.id}: waiting for {r.plan.get('min_updates')} update(s) from "
                         f"{', '.join(r.participants) or 'no device'}, until its deadline in "
                         f"{max(0.0, r.deadline - time.time()):.0f} s")
        else:
            r = self._open()
        if r.state == "open" and "secure" in r.plan:
            self._collect_secure(r)
        elif r.state == "open":
            # resumed: what devices sent while no coordinator listened arrives just after the connect
            self._collect(r, grace_s=1.0 if pending else 0.0)
        return self._finish(r.id)

    def unfinished(self) -> int | None:
        """The model's round a stop leaves open or closed and not yet finished (the next run resumes it)."""
        with sessions.transaction(self.engine, write=False) as conn:
            pending = self.rounds.rounds(conn, self.s.model_name, states=("open", "closed"))
        return pending[-1].id if pending else None

    def _open(self) -> RoundRow:
        return open_round(self.s, self.engine, self.store, self.cfg, self.budget, available=self._available,
                          announce=self._announcement, send=self._send, say=self.say)

    def _available(self, version: int) -> list[str]:
        return available_devices(self.s, self.engine, self.store, self.cfg, version, self.say)

    def _collect(self, r: RoundRow, grace_s: float = 0.0) -> None:
        not_before = time.monotonic() + grace_s
        for got in self._later:  # answers that came while the last round was being evaluated
            self._inbox.put(got)
        self._later = []
        while True:
            with sessions.transaction(self.engine, write=False) as conn:
                fresh = self.rounds.counted(conn, r.id, statuses=("accepted",))  # K counts answers to this round
                counted = self.rounds.counted(conn, r.id)
            if len(fresh) >= int(r.plan["min_updates"]):
                break
            nxt = self._next(r.deadline, not_before)
            if nxt is None:
                break
            if nxt[1] is not None:
                self.answers.receive(nxt[0], nxt[1], r)
        silent = [d for d in r.participants if d not in fresh]
        why = f"{len(counted)} update(s) counted" + ("" if len(fresh) >= int(r.plan["min_updates"]) else
                                                    " at the deadline")
        if silent:
            why += f"; no update from {', '.join(silent)}"
        if not counted:
            why += (" (see the agents' logs: a device answers only an announcement signed by the key it trusts, "
                    "on its prefix, for the version it runs, when it holds --min-windows labelled windows)")
        with sessions.transaction(self.engine) as conn:
            self.rounds.set_round(conn, r.id, state="closed", expect=("open",), closed_at=time.time(), reason=why)
        self._send(self.s.topics.rounds(r.model_name), b"", expiry_s=CLEAR_EXPIRY_S)  # retained: open rounds only
        self.say(f"round {r.id}: closed, {why}")

    def _secure_round(self, r: RoundRow) -> SecureRound:
        wire = Wire(send=self._send, next=self._next, ack=self._ack, sign=self._sign, say=self.say,
                    later=lambda generation, msg: self.answers.receive(generation, msg, r), send_all=self._send_all)
        return SecureRound(self.s, self.engine, r, wire)

    def _collect_secure(self, r: RoundRow) -> None:
        """The four steps of a secure round (cloud_hub/rounds/secure.py), then closed like any round."""
        secure = self._secure_round(r)
        try:
            secure.collect()
            summed, out = sorted(secure.survivors), secure.left_out()
            why = f"secure: {len(summed)} masked update(s) summed ({', '.join(summed)})" + (
                f", {len(out)} left out ({'; '.join(out)})" if out else "")
        except SecureRoundFailed as exc:
            why = f"secure: {exc}"
        finally:
            secure.clear()
        with sessions.transaction(self.engine) as conn:
            self.rounds.set_round(conn, r.id, state="closed", expect=("open",), closed_at=time.time(), reason=why)
        self._send(self.s.topics.rounds(r.model_name), b"", expiry_s=CLEAR_EXPIRY_S)
        self.say(f"round {r.id}: closed, {why}")

    # ----------------------------------------------------------------- the link

    def _announcement(self, plan: RoundPlan, tensors: dict[str, np.ndarray], int8: bytes = b"") -> Announcement:
        """The signed announcement of ``plan`` with ``tensors``; as float32 when they do not fit float16 (65,504)."""
        try:
            return self._signed(announcement(plan, tensors, int8))
        except WeightsRangeError:
            self.say(f"round {plan.round_id}: the weights do not fit float16: announced as float32")
            return self._signed(announcement(replace(plan, weights_dtype="float32"), tensors, int8))

    def _signed(self, ann: Announcement) -> Announcement:
        return replace(ann, plan=self._sign(ann.plan))  # keeps its INT8 model

    def _sign(self, header: S) -> S:
        """``header`` (a round's plan, a secure round's step) signed with the hub's key, loaded once; as it is
        without a key (``--insecure-unsigned``)."""
        if not self.signing_key:
            return header
        from cloud_hub.models.signing import load_private_key, sign_round

        if self._key is None:
            self._key = load_private_key(self.signing_key)
        return sign_round(header, self._key)

    def _send(self, topic: str, payload: bytes, timeout: float = 30.0, expiry_s: float | None = None) -> None:
        """Publish retained and wait for the PUBACK. ``expiry_s``: how long a copy queued for a device that is
        away (its session kept, ``session_expiry_s``) stays worth delivering."""
        self._send_all([(topic, payload)], timeout, expiry_s)

    def _send_all(self, messages: Sequence[tuple[str, bytes]], timeout: float = 30.0,
                  expiry_s: float | None = None) -> None:
        """Publish each (topic, payload) retained, then wait for all their PUBACKs: a secure round's step goes to
        every device at once, not one broker round trip after another."""
        expiry = None if expiry_s is None else max(1.0, expiry_s)
        mids = [(self._link.publish(topic, payload, ROUND_DELIVERY, expiry), topic) for topic, payload in messages]
        until = time.monotonic() + timeout
        with self._puback:
            while not all(mid in self._published for mid, _ in mids):
                self._check_link()
                left = until - time.monotonic()
                if left <= 0:
                    late = [topic for mid, topic in mids if mid not in self._published]
                    for mid, _ in mids:  # the PUBACKs that came: not left to confirm a later publish on a reused mid
                        self._published.pop(mid, None)
                    raise RoundError(f"no PUBACK from {self.s.broker_url} for {', '.join(late)} within {timeout:g} s")
                self._puback.wait(min(left, 0.1))  # woken by each PUBACK; the link checked at least every 0.1 s
            outcomes = [(topic, self._published.pop(mid)) for mid, topic in mids]
        refused = [f"{topic}: {outcome}" for topic, outcome in outcomes if outcome != "ok"]
        if refused:
            raise RoundError(f"the broker refused {'; '.join(refused)}")

    def _next(self, deadline: float, not_before: float = 0.0) -> tuple[int, Message | None] | None:
        """The next (generation, message) before ``deadline``; (0, None) when none came within half a
        second; None once the deadline has passed and the inbox is drained (at most 2 s past it, so a
        device that keeps sending cannot hold a round open)."""
        past = time.time() - deadline
        if past >= 0 and (self._inbox.empty() or past > 2.0) and time.monotonic() >= not_before:
            return None
        self._check_link()
        try:
            return self._inbox.get(timeout=max(0.01, min(0.5, deadline - time.time())))
        except queue.Empty:
            return 0, None

    def _check_link(self) -> None:
        if self._link.fatal:  # another process took our client id (a second federate): stop, say so
            raise MqttError(self._link.fatal)

    # ----------------------------------------------------------------- federated evaluation

    def _evaluate(self, r: RoundRow, candidate: dict[str, np.ndarray], int8: bytes) -> dict[str, Any] | None:
        """Ask the devices that trained in round ``r`` to score its candidate (its FP32 weights and ``int8``, the
        model that would ship) and the base on their held-out windows; :func:`fedavg.evaluation` of their
        answers, or None when none answered by the deadline."""
        with sessions.transaction(self.engine, write=False) as conn:
            # trained on this base (a secure round: those that revealed, alive to the end)
            devices = tuple(sorted(self.rounds.counted(conn, r.id, statuses=("accepted", "revealed"))))
        if not devices:
            self.say(f"round {r.id}: only late updates, from devices that trained an older base: none can evaluate")
            return None
        now = time.time()
        plan = RoundPlan(
            round_id=r.id, model=r.model_name, base_version=r.base_version, base_sha256=str(r.plan["base_sha256"]),
            task=str(r.plan["task"]), participants=devices, deadline=now + min(self.cfg.deadline_s, 60.0),
            min_windows=1, min_updates=len(devices), max_staleness=0, encoding=str(r.plan["encoding"]),
            created=now, kind="evaluate", weights_dtype=self.cfg.weights_dtype)
        payload = self._announcement(plan, candidate, int8).encode()
        topic = self.s.topics.rounds(r.model_name)
        self._send(topic, payload, expiry_s=plan.deadline - now)
        self.say(f"round {r.id}: no hold-out log: asking {', '.join(devices)} to evaluate the candidate (its INT8 "
                 f"model and FP32 weights) on their held-out windows")
        while True:
            with sessions.transaction(self.engine, write=False) as conn:
                answered = self.rounds.counted(conn, r.id, statuses=("evaluated",))
            if set(devices) <= set(answered):
                break
            nxt = self._next(plan.deadline)
            if nxt is None:
                break
            if nxt[1] is not None and not self.answers.receive_evaluation(nxt[0], nxt[1], r, devices):
                self._later.append((nxt[0], nxt[1]))  # a training answer: judged in the next round, acked then
        self._send(topic, b"", expiry_s=CLEAR_EXPIRY_S)
        with sessions.transaction(self.engine, write=False) as conn:
            got = self.rounds.evaluations(conn, r.id)
        from cloud_hub.rounds.fedavg import evaluation  # loaded with round_finish, which calls this

        return evaluation(got)

    # ----------------------------------------------------------------- closing

    def _finish(self, round_id: int) -> int:
        from cloud_hub.rounds.finish import finish

        with sessions.transaction(self.engine, write=False) as conn:
            r = self.rounds.get_round(conn, round_id)
            counted = self.rounds.counted_payloads(conn, round_id)
        assert r is not None
        spent: dict[str, Any] = {}
        try:
            secure = self._secure_round(r) if "secure" in r.plan else None
            summed = secure.unmask() if secure is not None else None
            spent = self._privacy(r, None if secure is None or summed is None else (len(summed.survivors),
                                                                                   secure.grid.padded), counted)
            state, version, outcome, reason = finish(self.engine, self.s, r, counted, signing_key=self.signing_key,
                                                     allow_unsigned=self.allow_unsigned, summed=summed,
                                                     evaluate=lambda tensors, int8: self._evaluate(r, tensors, int8),
                                                     privacy=spent or None)
        except SecureRoundFailed as exc:
            state, version, outcome, reason = "failed", None, {"secure": True}, f"secure: {exc}"
            if exc.unopened:  # who named whom: the round's record of the dispute
                outcome["unopened"] = exc.unopened
            if exc.summed is not None:  # the hub learned the sum before it refused it: spent all the same
                spent = self._privacy(r, exc.summed, counted)
        except (ValueError, KeyError, OSError, LifecycleError) as exc:  # never a round stuck in 'closed'
            state, version, outcome, reason = "failed", None, {}, f"could not finish the round: {exc}"
        except Exception as exc:  # a bug: the round fails with it, or every restart would meet it again
            if isinstance(exc, (exits.Failure, sa.exc.SQLAlchemyError)):
                raise  # a broker or database away: the round stays closed, and the next run finishes it
            log.exception("round %d: could not finish", round_id)
            state, version, outcome, reason = "failed", None, {}, f"could not finish the round: {exc!r}"
        if spent:  # the hub learned the sum: spent, whatever became of the round
            outcome = outcome | {"privacy": spent}
        with sessions.transaction(self.engine) as conn:
            self.rounds.set_round(conn, round_id, state=state, expect=("closed",), new_version=version,
                                  outcome=outcome, reason=reason)
        self.say(f"round {round_id}: {state}" + (f" v{version}" if version else "") + f": {reason}")
        return round_id

    def _privacy(self, r: RoundRow, summed: tuple[int, int] | None, counted: Sequence[Any]) -> dict[str, Any]:
        """What round ``r`` spent (:func:`privacy.record`), now that the hub learned its sum: ``summed`` is a secure
        round's (devices in the sum, coordinates), ``counted`` a central round's updates; {} without dp or sum."""
        if "dp" not in r.plan or (summed is None and not counted):
            return {}
        dp = DpParams.from_obj(r.plan["dp"])
        if dp.mode == "distributed":
            if summed is None:
                return {}
            n, rho = summed[0], privacy.distributed_rho(dp.bound, dp.sigma, summed[0], summed[1])
        else:
            n, rho = len(counted), privacy.central_rho(dp.noise)
        with sessions.transaction(self.engine, write=False) as conn:
            before = privacy.spent(o.outcome or {} for o in self.rounds.rounds(conn, r.model_name) if o.id != r.id)
        return privacy.record(dp, rho, before, n)


__all__: Sequence[str] = ("Coordinator",)
