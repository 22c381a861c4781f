"""Federated rounds on the hub: select devices, announce, judge their updates, aggregate, gate, publish.

One :class:`Coordinator` runs the rounds of one model (``cloud-hub federate``). A round:

1. **opens**: the devices that report running the base version are sampled (``fraction``, at least
   ``min_available``), and a signed announcement with the base's FP32 weights goes retained on
   ``{prefix}/rounds/{model}``;
2. **collects** updates from ``{prefix}/devices/+/update`` on a persistent session with manual
   acknowledgements: each is judged (:func:`judge_update`), written to ``fl_updates`` with its verdict,
   committed, and only then acknowledged, so a hub killed mid-round loses no accepted update (the
   broker redelivers what was not acknowledged; a redelivery of a judged payload is recognised by
   its sha256 and counted once);
3. **closes** at ``min_updates`` accepted updates or at the deadline, whichever comes first; late
   answers to the previous rounds (up to ``max_staleness``) count, weighted down (FedBuff);
4. **aggregates** (:mod:`cloud_hub.rounds.fedavg`: clip, example-weighted mean on the FP32 master copy),
   re-quantizes to static INT8 from the activation ranges the devices reported, evaluates on
   hold-out logs when given (else the devices that trained score the INT8 model that would ship, and
   its FP32 weights, against the base on their held-out windows), gates the INT8 model against the
   base, registers the version and, when it passes, signs and publishes it on the model topic.

The round's state lives in ``fl_rounds``: a restarted coordinator resumes an open round (re-publishing
its announcement) or finishes a closed one.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import Store, dead_letter
from cloud_hub.errors import HubError
from cloud_hub.models.lifecycle import LifecycleError
from cloud_hub.rounds import privacy
from cloud_hub.rounds.judge import Verdict, accuracy_outside, answer_metrics, judge_update
from cloud_hub.rounds.secure import SecureRound, SecureRoundFailed, Wire
from cloud_hub.rounds.store import RoundRow, RoundStore
from cloud_hub.settings import NO_SIGNING_KEY, HubSettings
from edge_agent import exits
from edge_agent.contract import ContractError, secagg
from edge_agent.contract.answers import AnswerReceipt
from edge_agent.contract.privacy import DpParams
from edge_agent.contract.rounds import (
    ROUND_DELIVERY,
    UPDATE_DELIVERY,
    Announcement,
    RoundPlan,
    SecureParams,
    SignedHeader,
    Update,
    WeightsRangeError,
    announcement,
    decode_update,
    trainable_names,
)
from edge_agent.mqtt import Message, MqttError, MqttLink

log = logging.getLogger(__name__)


S = TypeVar("S", bound=SignedHeader)
SECURE_PEAK = 63  # the integer grid of secure rounds: [-63, 63] (secure_codec: 10-bit ring up to 8 devices)
SECURE_SPREAD = 3.0


class RoundError(HubError, RuntimeError):
    """No model to federate, no devices to ask, no signing key: an operator's problem, said in one line."""

    exit_code = exits.MODEL


@dataclass(frozen=True)
class FederateConfig:
    rounds: int = 5
    fraction: float = 1.0  # share of the available devices asked each round
    min_available: int = 1  # wait (up to wait_devices_s) until this many devices run the base version
    wait_devices_s: float = 60.0
    min_updates: int | None = None  # K: close once this many updates counted (default: every participant)
    deadline_s: float = 60.0
    # Local training (SGD, momentum 0.9): chosen by bench/federated_watch.py --study on s01-s08 only
    epochs: int = 5
    lr: float = 0.03
    batch: int = 64
    mu: float = 0.0
    clip: float = 10.0
    refuse_factor: float = 3.0  # an update whose norm is over refuse_factor x clip is refused, not clipped
    train_layers: int | None = None  # the last k layers; None = all
    min_windows: int = 32  # a device answers when it holds this many labelled windows...
    min_new: int = 0  # ...with this many new since it last answered
    max_staleness: int = 1
    encoding: str = "int8"
    budget_s: float = 60.0
    tolerance: float = 0.0  # the gate: the candidate may be this much worse on the hold-out
    holdout_logs: tuple[str, ...] = ()
    aggregate: str = "fedavg"  # or "trimmed-mean" (fedavg.RULES): how the hub combines the round's updates
    secure: bool = False  # secure aggregation: the hub learns only the sum of the devices' deltas
    threshold: int | None = None  # secure: devices that must reveal their shares (default: a majority)
    # differential privacy (cloud_hub/rounds/privacy.py): distributed noise with secure, central without
    dp_noise: float | None = None  # the noise multiplier; None with a target_epsilon: calibrated to it
    target_epsilon: float | None = None  # the model's budget: no round opens that would spend past it
    dp_delta: float = 1e-5
    # the announcement's weights (train and evaluate rounds): float16 halves the bytes down (the devices train
    # from the rounded base, and their deltas are against it: bench/federated_watch.py --fp16, docs)
    weights_dtype: str = "float16"
    seed: int = 0

    @property
    def dp(self) -> bool:
        return self.dp_noise is not None or self.target_epsilon is not None


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
        self.store, self.rounds = Store(engine), RoundStore()
        # (connection generation, message): packet ids are per connection, so a message is acknowledged only
        # on the connection it came on; after a reconnect the broker sends it again (and it is counted once)
        self._inbox: queue.Queue[tuple[int, Message]] = queue.Queue()
        self._generation = 0
        self._later: list[tuple[int, Message]] = []  # training answers held (unacknowledged) during an evaluation
        self._published: dict[int, str] = {}
        self._key: Any = None  # the signing key, loaded at the first signature
        c = config
        self.budget = privacy.Budget(c.dp_noise, c.target_epsilon, c.dp_delta, c.rounds) if c.dp else None
        self._link = MqttLink(
            settings.broker_url, f"{settings.session_id}-federate", tls=settings.tls, clean_start=False,
            session_expiry_s=settings.session_expiry_s, manual_ack=True, keepalive_s=settings.keepalive_s, on_message=lambda m: self._inbox.put((self._generation, m)),
            on_connected=self._on_connected,
            on_published=self._on_published, subscriptions=[(settings.topics.all_updates, 1)], exclusive=True,
        )

    def _on_connected(self, _up: bool) -> None:
        self._generation += 1

    def _ack(self, generation: int, msg: Message) -> None:
        if generation == self._generation:
            self._link.ack(msg.mid, msg.qos)

    def _on_published(self, mid: int, ok: bool, reason: str) -> None:
        self._published[mid] = "ok" if ok else reason

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
                    break
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
                    self._send(self.s.topics.rounds(r.model_name), self.rounds.announcement(conn, r.id))
        else:
            r = self._open()
        if r.state == "open" and "secure" in r.plan:
            self._collect_secure(r)
        elif r.state == "open":
            # resumed: what devices sent while no coordinator listened arrives just after the connect
            self._collect(r, grace_s=1.0 if pending else 0.0)
        return self._finish(r.id)

    def _open(self) -> RoundRow:
        from cloud_hub.models import weights
        from cloud_hub.models.lifecycle import current_model
        from cloud_hub.rounds import fedavg

        name = self.s.model_name
        with sessions.transaction(self.engine, write=False) as conn:
            rows = self.store.list_models(conn, name)
        if not rows:
            raise RoundError(f"no model {name!r} to federate: run `cloud-hub train` and `publish` first")
        base = current_model(rows, name)
        if (base.manifest.get("preprocess") or {}).get("forecast"):
            raise RoundError(f"{name} v{base.version} forecasts (train --forecast): federated rounds do not train "
                             "forecasts yet (the devices would learn levels, not changes); retrain it with "
                             "`cloud-hub train` on logs instead")
        self._no_canary(name)
        devices = self._available(base.version)
        rng = random.Random(f"{self.cfg.seed}/{base.version}/{time.time_ns()}")
        k = max(1, round(self.cfg.fraction * len(devices)))
        chosen = sorted(rng.sample(devices, min(k, len(devices))))
        secure = self._secure_params(chosen, rng)
        with sessions.transaction(self.engine, write=False) as conn:
            blob = self.store.get_weights(conn, name, base.version)
            round_id = self.rounds.next_round_id(conn)
        if blob is None:
            raise RoundError(f"model {name} v{base.version} has no stored FP32 weights to start a round from")
        tensors = fedavg.mlp_tensors(weights.from_bytes(blob))
        n_layers = sum(1 for t in tensors if t.startswith("coef_"))
        trainable = trainable_names(n_layers, self.cfg.train_layers)
        dp, spent_text = None, ""
        if self.budget is not None:
            before = self._spent()  # one read of the model's rounds for the check and the line
            spent_text = self.budget.spent_text(before)
            try:
                secure, dp = self.budget.plan(before, secure, [(k, tensors[k].shape) for k in trainable],
                                              self.cfg.clip, len(chosen))
            except ValueError as exc:  # a ring past 32 bits
                raise RoundError(f"differential privacy at this noise: {exc}; fewer devices or less noise") from None
        now = time.time()
        c = self.cfg
        plan = RoundPlan(
            round_id=round_id, model=name, base_version=base.version, base_sha256=base.sha256,
            task=str(base.manifest["task"]), participants=tuple(chosen), deadline=now + c.deadline_s,
            epochs=c.epochs, lr=c.lr, batch=c.batch, mu=c.mu, alpha=_alpha(blob, c.batch), clip=c.clip,
            min_windows=c.min_windows, min_new=c.min_new, min_updates=min(c.min_updates or len(chosen), len(chosen)),
            max_staleness=0 if dp else c.max_staleness, encoding=c.encoding, budget_s=c.budget_s, created=now,
            trainable=trainable, secure=secure, dp=dp, weights_dtype=c.weights_dtype,
        )
        ann = self._announcement(plan, tensors)
        payload = ann.encode()
        with sessions.transaction(self.engine) as conn:
            self.rounds.add_round(conn, round_id=round_id, name=name, base_version=base.version, participants=chosen,
                                  plan=ann.plan.header() | {  # and the hub's own part: its gate, its rule
                                      "announcement_bytes": len(payload), "tolerance": c.tolerance,
                                      "holdout_logs": [str(Path(p).resolve()) for p in c.holdout_logs],
                                      "aggregate": c.aggregate}
                                  | ({"dp_seed": secrets.randbits(63)} if dp and dp.mode == "central" else {}),
                                  announcement=payload, opened_at=now, deadline=plan.deadline)
        self._send(self.s.topics.rounds(name), payload)
        self.say(f"round {round_id}: v{base.version} to {len(chosen)} of {len(devices)} devices "
                 + (f"(secure: the hub learns only the sum, once {secure.threshold} of them reveal their shares) "
                    if secure else "")
                 + (f"(differential privacy, {dp.mode} noise x{dp.noise:.3g}; {spent_text}) "
                    if dp else "")
                 +
                 f"({', '.join(chosen)}; the announcement with the base's FP32 weights: {len(payload) / 1e6:.2f} MB), "
                 f"closes at {plan.min_updates} updates or in "
                 f"{c.deadline_s:g} s")
        with sessions.transaction(self.engine, write=False) as conn:
            row = self.rounds.get_round(conn, round_id)
        assert row is not None
        return row

    def _secure_params(self, chosen: list[str], rng: random.Random) -> SecureParams | None:
        """A secure round's numbers for ``chosen``, or None for a plain round; RoundError when it cannot be secure."""
        if not self.cfg.secure:
            return None
        if len(chosen) < 3:
            raise RoundError(f"a secure round needs at least 3 devices (its sum would give away a device's update); "
                             f"{len(chosen)} available: lower --fraction or wait for more devices")
        if self.cfg.aggregate != "fedavg":
            raise RoundError(f"--aggregate {self.cfg.aggregate} reads each update, which a secure round hides: "
                             "use one or the other")
        t = self.cfg.threshold or secagg.threshold(len(chosen))
        if not len(chosen) // 2 < t <= len(chosen):
            raise RoundError(f"--threshold {t} for {len(chosen)} devices: it must be a majority (over "
                             f"{len(chosen) // 2}) and at most {len(chosen)}")
        if self.cfg.min_updates is not None and self.cfg.min_updates < t:
            raise RoundError(f"--min-updates {self.cfg.min_updates} is under the threshold {t}: a secure round "
                             "needs that many masked updates to reveal its sum")
        return SecureParams(threshold=t, peak=SECURE_PEAK, spread=SECURE_SPREAD, seed=rng.randrange(1 << 62),
                            bits=secagg.ring_bits(len(chosen), SECURE_PEAK))

    def _available(self, version: int) -> list[str]:
        """Online devices whose last status (as ``serve`` recorded it) says they run ``version``: a device
        whose last status is offline (its goodbye, or its last will) or that runs another version is
        never asked. Waits (up to wait_devices_s) for min_available of them, and for the last round's
        participants to swap to it: a round started the moment the first device swapped would leave the
        others out. What it waits for is said, naming the devices of the model it cannot ask and why."""
        with sessions.transaction(self.engine, write=False) as conn:
            last = self.rounds.rounds(conn, self.s.model_name, limit=1)
        expected = set(last[-1].participants) if last else set()
        start = time.monotonic()
        until, said = start + self.cfg.wait_devices_s, False

        def few(items: list[str], then: str = "") -> list[str]:  # a fleet's worth of names stays one line
            more = [f"{len(items) - 5} more"] if len(items) > 5 else []
            return [", ".join(items[:5] + more) + then] if items else []

        while True:
            with sessions.transaction(self.engine, write=False) as conn:
                rows = self.store.device_rows(conn)
            mine = {d: r for d, r in rows.items() if r["model_name"] == self.s.model_name}
            online = {d for d, r in mine.items() if r["state"] == "online"}
            found = sorted(d for d in online if mine[d]["model_version"] == version)
            lagging = sorted((expected & online) - set(found))
            if len(found) >= self.cfg.min_available and not lagging:
                return found
            others = "; ".join(few([f"{d} on v{mine[d]['model_version']}" for d in sorted(online - set(found))])
                               + few(sorted(set(mine) - online), " offline"))
            if not said and time.monotonic() - start > 3.0:
                said = True
                self.say(f"waiting up to {self.cfg.wait_devices_s:g} s for {max(self.cfg.min_available, len(expected))}"
                         f" device(s) to report running {self.s.model_name} v{version} (now {len(found)}"
                         + (f"; {others}" if others else "") + ")")
            if time.monotonic() >= until:
                if len(found) >= self.cfg.min_available:
                    self.say(f"going on without {', '.join(lagging)}: not on v{version} after "
                             f"{self.cfg.wait_devices_s:g} s")
                    return found
                raise RoundError(f"only {len(found)} device(s) report running {self.s.model_name} v{version} "
                                 f"(need {self.cfg.min_available}) after {self.cfg.wait_devices_s:g} s"
                                 + (f"; {others}" if others else f"; no device of {self.s.model_name} has reported")
                                 + f": are the agents and `cloud-hub serve` running on {self.s.broker_url}?")
            time.sleep(0.2)

    def _spent(self) -> tuple[float, int, int]:
        """What this model's rounds have spent (:func:`privacy.spent`)."""
        with sessions.transaction(self.engine, write=False) as conn:
            return privacy.spent(r.outcome or {} for r in self.rounds.rounds(conn, self.s.model_name))

    def _no_canary(self, name: str) -> None:
        with sessions.transaction(self.engine, write=False) as conn:
            canaries = self.store.rollouts(conn, name, state="canary")
        if canaries:
            raise RoundError(f"a canary rollout of {name} v{canaries[0].version} is open: rounds would train "
                             "beside it and its promotion would replace their model; let `serve` finish it or "
                             "`cloud-hub rollback`, then federate")

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

    def _send(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        mid = self._link.publish(topic, payload, ROUND_DELIVERY)
        until = time.monotonic() + timeout
        while mid not in self._published:
            self._check_link()
            if time.monotonic() > until:
                raise RoundError(f"no PUBACK from {self.s.broker_url} for {topic} within {timeout:g} s")
            time.sleep(0.01)
        outcome = self._published.pop(mid)
        if outcome != "ok":
            raise RoundError(f"the broker refused {topic}: {outcome}")

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
                self._receive(nxt[0], nxt[1], r)
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
        self._send(self.s.topics.rounds(r.model_name), b"")  # the retained announcement is for open rounds only
        self.say(f"round {r.id}: closed, {why}")

    def _secure_round(self, r: RoundRow) -> SecureRound:
        wire = Wire(send=self._send, next=self._next, ack=self._ack, sign=self._sign, say=self.say,
                    later=lambda generation, msg: self._receive(generation, msg, r))
        return SecureRound(self.s, self.engine, r, wire)

    def _collect_secure(self, r: RoundRow) -> None:
        """The four steps of a secure round (cloud_hub/rounds/secure.py), then closed like any round."""
        secure = self._secure_round(r)
        try:
            secure.collect()
            with sessions.transaction(self.engine, write=False) as conn:
                masked = sorted(self.rounds.payloads(conn, r.id, "masked"))
            why = f"secure: {len(masked)} masked update(s) summed ({', '.join(masked)})"
        except SecureRoundFailed as exc:
            why = f"secure: {exc}"
        finally:
            secure.clear()
        with sessions.transaction(self.engine) as conn:
            self.rounds.set_round(conn, r.id, state="closed", expect=("open",), closed_at=time.time(), reason=why)
        self._send(self.s.topics.rounds(r.model_name), b"")
        self.say(f"round {r.id}: closed, {why}")

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

    def _receive(self, generation: int, msg: Message, r: RoundRow) -> None:
        digest = hashlib.sha256(msg.payload).hexdigest()
        device = msg.topic.split("/")[-2]
        with sessions.transaction(self.engine) as conn:
            if self.rounds.seen(conn, digest):
                verdict = Verdict("duplicate", round_id=r.id)
            else:
                verdict = judge_update(msg.payload, device, current=r,
                                       rounds=lambda i: self.rounds.get_round(conn, i),
                                       prior=lambda d, i: self.rounds.prior(conn, d, i), digest=digest,
                                       refuse_factor=self.cfg.refuse_factor,
                                       rounds_since=lambda m, a, b: self.rounds.rounds_since(conn, m, a, b))
            if verdict.status != "duplicate":
                self._record(conn, msg, device, digest, verdict)
        self._ack(generation, msg)  # after the commit: an update the hub had not stored is redelivered
        self._receipt(device, verdict, digest)
        if verdict.status == "refused":
            self.say(f"round {r.id}: refused an update from {device}: {verdict.reason}")
        elif verdict.status != "duplicate":
            self.say(f"round {r.id}: {verdict.status} the update of {device} "
                     f"({len(msg.payload):,} bytes{', ' + str(verdict.staleness) + ' round(s) late' if verdict.staleness else ''})")

    def _receipt(self, device: str, v: Verdict, digest: str) -> None:
        """Tell ``device`` its answer's verdict is committed (it stops sending it again); not waited for: a lost
        receipt means one more copy, judged a duplicate and receipted again."""
        try:
            self._link.publish(self.s.topics.answered(device),
                               AnswerReceipt(device, v.round_id or 0, digest, v.status).encode(), UPDATE_DELIVERY)
        except (ContractError, MqttError) as exc:
            log.warning("no receipt for %s's answer: %s", device, exc)

    def _record(self, conn: sa.Connection, msg: Message, device: str, digest: str, v: Verdict) -> None:
        u = v.update
        metrics = None if u is None else answer_metrics(u)
        counted = v.status in ("accepted", "late")  # kept whole: the round aggregates them
        self.rounds.add_update(conn, round_id=v.round_id, update_round=None if u is None else u.round_id,
                               device_id=device, status=v.status, reason=v.reason,
                               n_examples=None if u is None else u.n_examples, staleness=v.staleness,
                               size=len(msg.payload), sha256=digest, metrics=metrics,
                               payload=msg.payload if counted else None, at=time.time())
        if v.reason is not None and v.reason.startswith("malformed"):
            self.store.insert_dead_letters(conn, [dead_letter(msg.topic, msg.payload, v.reason, time.time(),
                                                              self.s.dead_letter_max_bytes)])

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
        self._send(topic, payload)
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
            if nxt[1] is not None:
                self._receive_evaluation(nxt[0], nxt[1], r, devices)
        self._send(topic, b"")
        with sessions.transaction(self.engine, write=False) as conn:
            got = self.rounds.evaluations(conn, r.id)
        from cloud_hub.rounds.fedavg import evaluation  # loaded with round_finish, which calls this

        return evaluation(got)

    def _receive_evaluation(self, generation: int, msg: Message, r: RoundRow, devices: tuple[str, ...]) -> None:
        digest = hashlib.sha256(msg.payload).hexdigest()
        device = msg.topic.split("/")[-2]
        try:
            u: Update | None = decode_update(msg.payload, device)
            malformed = None
        except ContractError as exc:
            u, malformed = None, exc.reason
        except Exception as exc:  # as in judge_update: refuse and acknowledge, never stop federate
            u, malformed = None, f"{type(exc).__name__}: {exc}"
        if u is not None and u.kind == "train":  # a late answer: judged in the next round, acknowledged then
            self._later.append((generation, msg))
            return
        with sessions.transaction(self.engine) as conn:
            if self.rounds.seen(conn, digest):
                verdict = Verdict("duplicate", round_id=r.id)
            else:
                if u is None:
                    verdict = Verdict("refused", f"malformed: {malformed}", r.id)
                else:
                    verdict = self._evaluation_verdict(
                        u, r, devices, self.rounds.counted(conn, r.id, statuses=("evaluated",)))
                    verdict.update = u
                self._record(conn, msg, device, digest, verdict)
        self._ack(generation, msg)
        self._receipt(device, verdict, digest)
        if verdict.status == "refused":
            self.say(f"round {r.id}: refused an answer from {device}: {verdict.reason}")

    @staticmethod
    def _evaluation_verdict(u: Update, r: RoundRow, devices: tuple[str, ...], answered: dict[str, str]) -> Verdict:
        if u.kind != "evaluate" or u.round_id != r.id:
            return Verdict("refused", f"round {u.round_id} ({u.kind}) arrived while round {r.id} is being evaluated",
                           r.id)
        if u.device_id not in devices:
            return Verdict("refused", f"{u.device_id} was not asked to evaluate round {r.id}", r.id)
        if u.device_id in answered:
            return Verdict("refused", "a second evaluation in the same round", r.id)
        if u.base_version != r.base_version:
            return Verdict("refused", f"base version v{u.base_version}, round {r.id} trains v{r.base_version}", r.id)
        if accuracy_outside(r, u):
            return Verdict("refused", "an accuracy outside [0, 1]", r.id)
        return Verdict("evaluated", None, r.id)

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
            if exc.summed is not None:  # the hub learned the sum before it refused it: spent all the same
                spent = self._privacy(r, exc.summed, counted)
        except (ValueError, KeyError, OSError, LifecycleError) as exc:  # never a round stuck in 'closed'
            state, version, outcome, reason = "failed", None, {}, f"could not finish the round: {exc}"
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


def _alpha(blob: bytes, batch: int) -> float:
    """The base's L2 penalty at the same strength per example: scikit-learn divides it by the batch size."""
    from cloud_hub.models import weights
    mlp = weights.from_bytes(blob).steps[-1][1]
    central = mlp.batch_size if isinstance(mlp.batch_size, int) else 200
    return float(mlp.alpha) * batch / max(1, central)


__all__: Sequence[str] = ("Coordinator", "FederateConfig", "RoundError")
