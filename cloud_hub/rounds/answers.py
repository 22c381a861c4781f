"""The hub's desk for the devices' answers to a round: judge, commit, acknowledge, then receipt.

Each answer that arrives on ``{prefix}/devices/+/update`` is judged (a training answer by
:func:`~cloud_hub.rounds.judge.judge_update`, an evaluation answer by the rules of the round being evaluated),
written to ``fl_updates`` with its verdict and committed; only then is the MQTT message acknowledged (a hub killed
before the commit gets it again from the broker) and the device told, on ``{prefix}/devices/{id}/answered``, that
its answer is kept (:class:`~edge_agent.contract.answers.AnswerReceipt`: it stops sending it again). A copy of
an answer already judged is recognised by its sha256, judged a duplicate, acknowledged and receipted again.

The coordinator (:mod:`cloud_hub.rounds.coordinator`) owns the loop that takes messages from its inbox, and
lends this desk its link and its acknowledgement (a message is acknowledged only on the connection it came on).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import Store, dead_letter
from cloud_hub.rounds.judge import Verdict, answer_metrics, judge_update, scores_unbelievable
from cloud_hub.rounds.store import RoundRow, RoundStore
from cloud_hub.settings import HubSettings
from edge_agent.contract import ContractError
from edge_agent.contract.answers import AnswerReceipt
from edge_agent.contract.round_updates import UPDATE_DELIVERY, Update, decode_update
from edge_agent.mqtt import Message, MqttError, MqttLink

log = logging.getLogger(__name__)


class Answers:
    """Judges, records, acknowledges and receipts the answers of one coordinator's rounds."""

    def __init__(self, settings: HubSettings, engine: sa.Engine, store: Store, link: MqttLink, *,
                 refuse_factor: float, ack: Callable[[int, Message], None], say: Callable[[str], None]) -> None:
        self.s, self.engine, self.store, self.link = settings, engine, store, link
        self.rounds = RoundStore()
        self.refuse_factor, self.ack, self.say = refuse_factor, ack, say

    def receive(self, generation: int, msg: Message, r: RoundRow) -> None:
        """A training answer while round ``r`` collects (an answer to an earlier round may count, late)."""
        digest = hashlib.sha256(msg.payload).hexdigest()
        device = msg.topic.split("/")[-2]
        with sessions.transaction(self.engine) as conn:
            if self.rounds.seen(conn, digest):
                verdict = Verdict("duplicate", round_id=r.id)
            else:
                verdict = judge_update(msg.payload, device, current=r,
                                       rounds=lambda i: self.rounds.get_round(conn, i),
                                       prior=lambda d, i: self.rounds.prior(conn, d, i), digest=digest,
                                       refuse_factor=self.refuse_factor,
                                       rounds_since=lambda m, a, b: self.rounds.rounds_since(conn, m, a, b))
            if verdict.status != "duplicate":
                self._record(conn, msg, device, digest, verdict)
        self.ack(generation, msg)  # after the commit: an update the hub had not stored is redelivered
        self._receipt(device, verdict, digest)
        if verdict.status == "refused":
            self.say(f"round {r.id}: refused an update from {device}: {verdict.reason}")
        elif verdict.status != "duplicate":
            self.say(f"round {r.id}: {verdict.status} the update of {device} "
                     f"({len(msg.payload):,} bytes{', ' + str(verdict.staleness) + ' round(s) late' if verdict.staleness else ''})")

    def receive_evaluation(self, generation: int, msg: Message, r: RoundRow, devices: tuple[str, ...]) -> bool:
        """An answer while round ``r``'s candidate is being evaluated by ``devices``; False, and nothing done, for a
        training answer (a late one: the caller holds it, unacknowledged, for the next round to judge)."""
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
            return False
        with sessions.transaction(self.engine) as conn:
            if self.rounds.seen(conn, digest):
                verdict = Verdict("duplicate", round_id=r.id)
            else:
                if u is None:
                    verdict = Verdict("refused", f"malformed: {malformed}", r.id)
                else:
                    verdict = _evaluation_verdict(
                        u, r, devices, self.rounds.counted(conn, r.id, statuses=("evaluated",)))
                    verdict.update = u
                self._record(conn, msg, device, digest, verdict)
        self.ack(generation, msg)
        self._receipt(device, verdict, digest)
        if verdict.status == "refused":
            self.say(f"round {r.id}: refused an answer from {device}: {verdict.reason}")
        return True

    def _receipt(self, device: str, v: Verdict, digest: str) -> None:
        """Tell ``device`` its answer's verdict is committed (it stops sending it again); not waited for: a lost
        receipt means one more copy, judged a duplicate and receipted again."""
        try:
            self.link.publish(self.s.topics.answered(device),
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
    if (unbelievable := scores_unbelievable(r, u)) is not None:
        return Verdict("refused", unbelievable, r.id)
    return Verdict("evaluated", None, r.id)
