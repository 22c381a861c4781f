"""The hub's part in a secure round: relay keys and shares, sum what it cannot read, unmask only the sum.

:class:`SecureRound` runs the four steps of :mod:`edge_agent.contract.secagg` for one round the coordinator
opened with ``secure`` in its plan. Each device message (:class:`~edge_agent.contract.secure_rounds.Answer`) is
judged, kept in ``fl_updates`` (status ``advert``, ``shares``, ``masked`` or ``revealed``) and acknowledged after
the commit, as plain updates are; each step (:class:`~edge_agent.contract.secure_rounds.Step`) goes to one device,
signed and retained on its own topic. A step ends when every device expected has answered, or at its deadline
(a quarter of the round for the adverts, half for the shares, the round's deadline for the masked vectors, then
a grace for the reveals). Because every answer is in the database, a coordinator that restarts sends the steps
again from what it holds and goes on.

What the hub holds at the end: public keys, shares sealed for others, masked vectors (each uniform on its
own), the survivors' self-mask seeds and the dropped devices' mask keys, and the sum. It never holds a
device's delta, its statistics, or the seeds that would unmask one vector alone.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import Store, dead_letter
from cloud_hub.rounds.store import RoundRow, RoundStore
from cloud_hub.settings import HubSettings
from edge_agent.contract import secagg, secure_codec
from edge_agent.contract.privacy import sum_limit
from edge_agent.contract.rounds import RoundPlan, decode_announcement
from edge_agent.contract.secure_rounds import (
    STATS_BITS,
    Answer,
    Step,
    decode_answer,
    is_answer,
    secure_grid,
    secure_sessions,
    stats_size,
)
from edge_agent.contract.wire import ContractError
from edge_agent.mqtt import Message

log = logging.getLogger(__name__)

REVEAL_GRACE_S = 5.0  # past the round's deadline, for the reveals
ENOUGH_GRACE_S = 1.0  # once a step has what it needs, this long for the others' answers


class SecureRoundFailed(Exception):
    """Too few devices at a step: the round fails with this reason, and the hub learns no sum; or the sum it
    learned was refused (``summed``: the devices in it and its size, so that its privacy is counted)."""

    def __init__(self, reason: str, summed: tuple[int, int] | None = None) -> None:
        super().__init__(reason)
        self.summed = summed
        self.unopened: dict[str, list[str]] = {}  # device -> the peers it named (their shares did not open)


@dataclass
class Summed:
    """What a secure round yields: the mean of the survivors' deltas and of their statistics."""

    delta: dict[str, np.ndarray]  # the mean delta of the trained tensors (float32)
    stats: dict[str, float]  # means (n_examples, held: sums) of what the devices measured
    ranges: list[list[float]]  # the mean activation ranges, per layer
    survivors: list[str]
    dropped: list[str]
    revealed_by: list[str]
    outcome: dict[str, Any] = field(default_factory=dict)


@dataclass
class Wire:
    """What the coordinator lends a secure round: its link and its judgement of time."""

    send: Callable[[str, bytes], None]  # publish retained, wait for the broker's PUBACK
    next: Callable[[float], tuple[int, Message | None] | None]  # the next message before a deadline
    ack: Callable[[int, Message], None]
    sign: Callable[[Step], Step]
    say: Callable[[str], None]
    later: Callable[[int, Message], None]  # a plain update: judged by the coordinator's own rules
    # publish several retained and wait for all their PUBACKs (a step to every device at once); None: one by one
    send_all: Callable[[list[tuple[str, bytes]]], None] | None = None


class SecureRound:
    def __init__(self, settings: HubSettings, engine: sa.Engine, r: RoundRow, wire: Wire) -> None:
        self.s, self.engine, self.r, self.wire = settings, engine, r, wire
        self.rounds, self.store = RoundStore(), Store(engine)
        with sessions.transaction(engine, write=False) as conn:
            self.plan: RoundPlan = decode_announcement(self.rounds.announcement(conn, r.id)).plan
        assert self.plan.secure is not None
        self.delta_session, self.stats_session = secure_sessions(self.plan)
        self.grid = secure_grid(self.plan)
        self.t = self.plan.secure.threshold
        self.phase = "advert"
        self.expect: set[str] = set(self.plan.participants)
        self.survivors: set[str] = set()  # the reveal step's: whose masked vectors it sums, who dropped
        self.dropped: set[str] = set()
        self.masked: set[str] = set()  # whose masked vectors the hub took (survivors, and those left out of the sum)
        self.named: dict[str, tuple[str, ...]] = {}  # device -> the peers it named (their shares did not open)
        # who answered the current step: read from the database when it starts, then kept as answers are committed
        # (one coordinator writes a round: federate's client id is exclusive)
        self.answered: set[str] = set()

    # ----------------------------------------------------------------- the steps

    def collect(self) -> None:
        """The four steps; SecureRoundFailed when too few devices take part in one."""
        span = self.r.deadline - self.r.opened_at
        advertised = self._step("advert", set(self.plan.participants), self.r.opened_at + 0.25 * span)
        self._enough(advertised, "advertised their keys")
        keys = {d: decode_answer(p).advert for d, p in self._stored("advert").items() if d in advertised}
        listed = tuple(a for _, a in sorted(keys.items()) if a is not None)
        self._tell([Step(self.r.id, self.plan.model, d, "share", adverts=listed) for d in sorted(advertised)])
        shared = self._step("shares", advertised, self.r.opened_at + 0.5 * span)
        self._enough(shared, "sent their shares")
        sealed = {d: decode_answer(p).sealed for d, p in self._stored("shares").items() if d in shared}
        senders = tuple(sorted(shared))
        self._tell([Step(self.r.id, self.plan.model, v, "mask", senders=senders,
                         sealed={u: sealed[u][v] for u in senders if u != v}) for v in senders])
        if self._answered("revealed"):  # a restart after the reveal step went out: its survivors stand (a masked
            masked = self._answered("masked") & set(senders)  # answer taken now would need reveals already sent)
            self.phase = "masked"
        else:
            masked = self._step("masked", set(senders), self.r.deadline,
                                enough=int(self.r.plan.get("min_updates") or 0))
        self._enough(masked, "sent their masked update")
        named = self.named = self._named(masked)
        survivors, dropped = _sides(named, masked, senders)
        self._say_disputes(named)
        self._disputes(named, survivors, dropped)
        self.survivors, self.dropped, self.masked = set(survivors), set(dropped), set(masked)
        self._tell([Step(self.r.id, self.plan.model, v, "reveal", survivors=survivors, dropped=dropped)
                    for v in survivors])
        # the threshold of reveals, and of them the threshold holding each left-out device's shares
        revealed = self._step("revealed", set(survivors), max(time.time(), self.r.deadline) + REVEAL_GRACE_S,
                              enough=self.t, ready=lambda got: self._rebuildable(got, named, dropped) is None)
        self._enough(revealed, "revealed their shares")
        self._rebuilt(revealed, named, dropped)

    def clear(self) -> None:
        """No step is left retained for anyone once the round is over."""
        self._send([(self.s.topics.round_step(d), b"") for d in self.plan.participants])

    def left_out(self) -> list[str]:
        """Each device whose masked vector the hub took and left out of the sum, with why (after :meth:`collect`)."""
        out = []
        for d in sorted(self.dropped & self.masked):
            if len(self.named.get(d, ())) > 1:
                out.append(f"{d}: it named {len(self.named[d])} peers")
            else:
                out.append(f"{d}: its shares did not open for {', '.join(v for v, us in self.named.items() if d in us)}")
        return out

    def _named(self, masked: set[str]) -> dict[str, tuple[str, ...]]:
        """Device -> the senders whose sealed shares it said did not open (its stored masked answer's
        ``unopened``), for the devices in ``masked`` that named any."""
        return {d: a.unopened for d, p in self._stored("masked").items()
                if d in masked and (a := decode_answer(p)).unopened}

    def _say_disputes(self, named: dict[str, tuple[str, ...]]) -> None:
        """Who named whom, and who is left out for it (the hub cannot tell which of two is faulty: it cannot open
        shares sealed for a device)."""
        for device, senders in sorted(named.items()):
            if len(senders) == 1:
                self.wire.say(f"round {self.r.id}: {device} says the shares {senders[0]} sealed for it do not open: "
                              f"{senders[0]} left out of the sum (one of the two is faulty)")
            else:
                self.wire.say(f"round {self.r.id}: {device} says the shares of {', '.join(senders)} sealed for it do "
                              f"not open: {device} left out of the sum (a device may name one peer)")

    def _short_of_holders(self, among: Iterable[str], named: dict[str, tuple[str, ...]], dropped: Sequence[str]
                          ) -> tuple[str, int, list[str]] | None:
        """The first dropped device whose shares fewer than the threshold of ``among`` hold (the others named it),
        with how many do and who named it; None when each has enough holders for its mask key."""
        among = list(among)
        for u in dropped:
            holders = sum(1 for v in among if u not in named.get(v, ()))
            if holders < self.t:
                return u, holders, sorted(v for v, us in named.items() if u in us)
        return None

    def _rebuildable(self, revealed: set[str], named: dict[str, tuple[str, ...]], dropped: Sequence[str]) -> str | None:
        """Why the revealing devices cannot rebuild some dropped device's mask key, or None."""
        if (short := self._short_of_holders(revealed, named, dropped)) is None:
            return None
        u, holders, said = short
        return (f"{u}'s mask key: {holders} of the devices that revealed hold its shares (the threshold is {self.t}; "
                f"they did not open for {', '.join(said)}): the sum stays hidden")

    def _rebuilt(self, revealed: set[str], named: dict[str, tuple[str, ...]], dropped: Sequence[str]) -> None:
        if named and (why := self._rebuildable(revealed, named, dropped)) is not None:
            raise SecureRoundFailed(why)

    def _disputes(self, named: dict[str, tuple[str, ...]], survivors: tuple[str, ...], dropped: tuple[str, ...]) -> None:
        """Fail the round when the devices left out for naming or being named leave fewer survivors than the
        threshold, or fewer survivors holding a dropped device's shares than its mask key needs."""
        if not named:
            return
        if len(survivors) < self.t:
            raise SecureRoundFailed(f"only {len(survivors)} masked update(s) can be summed once the devices that named "
                                    f"peers whose shares do not open, or were named, are left out (the threshold is "
                                    f"{self.t}; left out: {', '.join(sorted(_left_out(named)))}): the sum stays hidden")
        if (short := self._short_of_holders(survivors, named, dropped)) is not None:
            u, holders, said = short
            raise SecureRoundFailed(f"{u}'s shares did not open for {', '.join(said)}: its mask key cannot be rebuilt "
                                    f"from the {holders} survivor(s) that hold them (the threshold is {self.t}): the "
                                    "sum stays hidden")

    def _enough(self, got: set[str], what: str) -> None:
        if len(got) < self.t:
            missing = sorted(self.expect - set(got))
            raise SecureRoundFailed(f"only {len(got)} device(s) {what} (the threshold is {self.t}; missing: "
                                    f"{', '.join(missing) or 'none'}): the sum stays hidden")

    def _tell(self, steps: list[Step]) -> None:
        self._send([(self.s.topics.round_step(step.device_id), self.wire.sign(step).encode()) for step in steps])

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        if self.wire.send_all is not None:
            self.wire.send_all(messages)
        else:
            for topic, payload in messages:
                self.wire.send(topic, payload)

    def _stored(self, status: str) -> dict[str, bytes]:
        with sessions.transaction(self.engine, write=False) as conn:
            return self.rounds.payloads(conn, self.r.id, status)

    def _answered(self, status: str) -> set[str]:
        """The devices whose answer of one kind is stored (not the answers: a masked one is 400 kB)."""
        with sessions.transaction(self.engine, write=False) as conn:
            return set(self.rounds.counted(conn, self.r.id, statuses=(status,)))

    def _step(self, status: str, expect: set[str], until: float, enough: int = 0,
              ready: Callable[[set[str]], bool] | None = None) -> set[str]:
        """The devices that answered one step (those stored before a restart included), once every expected device has
        answered, or ``ENOUGH_GRACE_S`` after ``enough`` of them have (the reveals: the threshold is all the
        sum needs; the masked updates: the round's --min-updates) and ``ready`` says they are enough (the reveals
        of a round with left-out devices: the threshold of them holding each one's shares), or at ``until``."""
        self.phase, self.expect = status, expect
        self.answered = self._answered(status)
        shortened = False
        while True:
            got = self.answered & expect
            if got >= expect:
                return got
            if enough and len(got) >= enough and (ready is None or ready(got)) and not shortened:
                until, shortened = min(until, time.time() + ENOUGH_GRACE_S), True
            nxt = self.wire.next(until)
            if nxt is None:
                if expect - got:
                    self.wire.say(f"round {self.r.id}: no {status} answer from {', '.join(sorted(expect - got))}")
                return got
            generation, msg = nxt
            if msg is not None:
                self.receive(generation, msg)

    # ----------------------------------------------------------------- one message

    def receive(self, generation: int, msg: Message) -> None:
        """Judge, keep and acknowledge one message of the update topics while this round runs."""
        if not is_answer(msg.payload):
            self.wire.later(generation, msg)
            return
        digest = hashlib.sha256(msg.payload).hexdigest()
        device = msg.topic.split("/")[-2]
        status = None
        with sessions.transaction(self.engine) as conn:
            if not self.rounds.seen(conn, digest):
                status, reason, answer = self._judge(msg.payload, device)
                self.rounds.add_update(conn, round_id=self.r.id, update_round=None if answer is None else answer.round_id,
                                       device_id=device, status=status, reason=reason, n_examples=None, staleness=0,
                                       size=len(msg.payload), sha256=digest, metrics=None,
                                       payload=msg.payload if status != "refused" else None, at=time.time())
                if reason is not None and reason.startswith("malformed"):
                    self.store.insert_dead_letters(conn, [dead_letter(msg.topic, msg.payload, reason, time.time(),
                                                                      self.s.dead_letter_max_bytes)])
                if status == "refused":
                    self.wire.say(f"round {self.r.id}: refused a secure answer from {device}: {reason}")
        if status == self.phase:  # committed
            self.answered.add(device)
        self.wire.ack(generation, msg)  # after the commit: an answer the hub had not stored comes again

    def _judge(self, payload: bytes, device: str) -> tuple[str, str | None, Answer | None]:
        try:
            a = decode_answer(payload, device)
        except ContractError as exc:
            return "refused", f"malformed: {exc.reason}", None
        except Exception as exc:  # never stop federate on a device's bytes
            return "refused", f"malformed ({type(exc).__name__}: {exc})", None
        status = "revealed" if a.step == "reveal" else a.step
        if a.round_id != self.r.id or a.model != self.plan.model:
            return "refused", f"an answer for round {a.round_id} of {a.model} during secure round {self.r.id}", a
        if device not in self.plan.participants:
            return "refused", f"{device} was not selected for round {self.r.id}", a
        if status != self.phase:
            return "refused", f"a {a.step} answer during the {self.phase} step", a
        if device not in self.expect:
            return "refused", f"{device} is not asked for a {a.step} answer (it missed an earlier step)", a
        if device in self.answered:
            return "refused", f"a second {a.step} answer", a
        why = self._unsound(a)
        return ("refused", why, a) if why else (status, None, a)

    def _unsound(self, a: Answer) -> str | None:
        if a.step == "advert" and a.advert is not None and not (
                secagg.usable_key(a.advert.c_public) and secagg.usable_key(a.advert.s_public)):
            return "an advert whose public keys no peer can agree a secret with (a low-order point)"
        if a.step == "shares":
            want = self.expect - {a.device_id}
            if set(a.sealed) != want:
                return f"shares for {sorted(a.sealed)}, the devices that advertised are {sorted(want)}"
        if a.step == "masked":
            n_stats = stats_size(self.plan)
            if (a.size, a.bits, a.stats) != (self.grid.padded, self.delta_session.bits, n_stats):
                return (f"masked vectors of {a.size} x {a.bits} bits and {a.stats} statistics, the round's are "
                        f"{self.grid.padded} x {self.delta_session.bits} bits and {n_stats}")
            if not set(a.unopened) <= self.expect - {a.device_id}:
                return f"names {sorted(set(a.unopened) - self.expect)} as sealing it shares, not senders of this round"
        if a.step == "reveal":
            for device, (kind, _share) in a.revealed.items():
                if (kind == "b" and device not in self.survivors) or (kind == "s" and device not in self.dropped):
                    return f"revealed a {kind} share of {device}, which the reveal step did not ask for"
        return None

    # ----------------------------------------------------------------- the sum

    def unmask(self) -> Summed:
        """The mean of the survivors' deltas and statistics, from the stored answers."""
        adverts = {d: decode_answer(p).advert for d, p in self._stored("advert").items()}
        senders = set(self._stored("shares"))
        masked = {d: decode_answer(p) for d, p in self._stored("masked").items()}
        named = {d: a.unopened for d, a in masked.items() if a.unopened}
        revealed = {d: decode_answer(p).revealed for d, p in self._stored("revealed").items()}
        # a round whose steps failed is finished here too (closed, then finished: after a restart as well), with
        # the reason collect() gave
        try:
            self.expect = senders
            self._enough(set(masked), "sent their masked update")
            sides = _sides(named, set(masked), senders)
            self._disputes(named, *sides)
            self.expect = set(sides[0])
            self._enough(set(revealed), "revealed their shares")
            self._rebuilt(set(revealed), named, sides[1])
        except SecureRoundFailed as exc:
            exc.unopened = {d: list(us) for d, us in sorted(named.items())}
            raise
        masked = {d: a for d, a in masked.items() if d in sides[0]}  # the left out as if they had dropped
        survivors = sorted(masked)
        keys = {d: a for d, a in adverts.items() if d in senders and a is not None}
        total = np.zeros(self.grid.padded, np.uint32)
        stats_total: np.ndarray | None = None
        for a in masked.values():
            delta_bytes, stats_bytes = a.vectors()
            total = total + secagg.unpack(delta_bytes, a.size, a.bits)
            s = secagg.unpack(stats_bytes, a.stats, STATS_BITS)
            stats_total = s if stats_total is None else stats_total + s
        assert stats_total is not None  # at least the threshold (2 or more) masked: checked above
        try:
            ints = secagg.unmask(total, self.delta_session, keys, survivors, revealed)
            stat_ints = secagg.unmask(stats_total, self.stats_session, keys, survivors, revealed)
        except secagg.SecAggError as exc:
            raise SecureRoundFailed(f"cannot unmask the sum: {exc.reason}") from None
        n = len(survivors)
        assert self.plan.secure is not None
        sigma = self.plan.dp.sigma if self.plan.dp is not None else 0.0
        limit = sum_limit(n, self.plan.secure.peak, sigma)  # the grid, and the noise's far tail
        if int(np.abs(ints).max(initial=0)) > limit:
            raise SecureRoundFailed(f"the unmasked sum leaves the grid (|value| over {limit:,}): "
                                    "a device sent values off the grid or masked with other keys",
                                    summed=(n, self.grid.padded))
        summed = secure_codec.decode(ints, self.grid)
        stats, ranges = secure_codec.decode_stats(stat_ints, n)
        if (why := _impossible(stats, ranges, self.plan.task)) is not None:
            raise SecureRoundFailed(f"the unmasked statistics are impossible ({why}): a device sent statistics it "
                                    "cannot have", summed=(n, self.grid.padded))
        dropped = sorted(senders - set(masked))
        upload = sum(len(p) for status in ("advert", "shares", "masked", "revealed") for p in self._stored(status).values())
        federated = {"examples": int(stats["n_examples"]), "metric_before": stats["metric_before"],
                     "metric_after": stats["metric_after"], "loss_before": stats["loss_before"],
                     "loss_after": stats["loss_after"]}
        return Summed({k: (v / n).astype(np.float32) for k, v in summed.items()}, stats, ranges, survivors,
                      dropped, sorted(revealed),
                      {"secure": True, "summed": n, "survivors": survivors, "dropped": dropped, "threshold": self.t,
                       "revealed_by": sorted(revealed), "held": int(stats.get("held", 0)), "upload_bytes": upload,
                       "unopened": {d: list(us) for d, us in sorted(named.items())},
                       "federated": federated,
                       # the sum the hub learned (int64, little-endian), as a digest: an audit compares it with
                       # what the devices masked (secure_audit) without the hub keeping the vector itself
                       "sum_sha256": hashlib.sha256(np.asarray(ints, "<i8").tobytes()).hexdigest()})


def _left_out(named: dict[str, tuple[str, ...]]) -> set[str]:
    """Who is left out of the sum for ``named`` (device -> the peers it names as sealing it shares that do not
    open): the one peer a device names, and a device that names several (its claims not followed: an honest device
    names several only when several peers are faulty at once, and a hostile one would otherwise empty the sum). So
    one hostile device keeps at most one honest peer out while it stays in."""
    return {d if len(us) > 1 else us[0] for d, us in named.items()}


def _sides(named: dict[str, tuple[str, ...]], masked: set[str], senders: tuple[str, ...] | set[str]
           ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(survivors, dropped) of the reveal step: the devices whose masked vectors are summed, and every other
    sender (its pairwise masks come off with its key)."""
    survivors = tuple(sorted(masked - _left_out(named)))
    return survivors, tuple(sorted(set(senders) - set(survivors)))


def _impossible(stats: dict[str, float], ranges: list[list[float]], task: str) -> str | None:
    """What the devices' summed statistics cannot be, whatever their data: a mean accuracy outside [0, 1], a
    negative mean loss or error, an activation range whose low is over its high (a hostile device's finding: one
    device of five stating accuracies of 1e5 made the round's 'accuracy' 2,000,000 %, unrefused)."""
    slack = 1e-6  # fixed point
    for name in ("metric_before", "metric_after"):
        x = stats[name]
        if task == "classification" and not -slack <= x <= 1 + slack:
            return f"mean {name} {x:.6g} outside [0, 1]"
        if task != "classification" and x < -slack:
            return f"mean {name} {x:.6g} below 0"
    for name in ("loss_before", "loss_after"):
        if stats[name] < -slack:
            return f"mean {name} {stats[name]:.6g} below 0"
    for i, (in_lo, in_hi, out_lo, out_hi) in enumerate(ranges):
        if in_lo > in_hi + slack or out_lo > out_hi + slack:
            return f"layer {i}'s mean activation range [{in_lo:.6g}, {in_hi:.6g}, {out_lo:.6g}, {out_hi:.6g}] is inverted"
    return None
