"""A device's answer to a round is kept until the hub's receipt (issue #26 §4), as results wait in the outbox.

Unit: the pending answers (kept whole, sent again on a doubling wait, forgotten at the receipt, bounded) and the
receipt's contract. Real processes: `federate` is SIGKILLed with a round open and the broker restarts forgetting
everything (sessions, queued and retained messages); the device then trains and sends its update to a broker where
no one listens. The restarted `federate` resumes the round and gets the update only because the device sends it
again: counted once, the round published, the device's copy dropped at the receipt."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import tables
from edge_agent.contract import ContractError
from edge_agent.contract.answers import AnswerReceipt, decode_answer_receipt
from edge_agent.device.answers import PendingAnswers
from tests.test_delivery_e2e import forgetful_broker  # noqa: F401 - a fixture
from tests.test_federated import Fleet, _query


def test_pending_answers_are_kept_sent_again_on_a_doubling_wait_and_dropped_at_the_receipt(
        tmp_path, monkeypatch) -> None:
    import edge_agent.device.answers as answers

    clock = [1000.0]
    monkeypatch.setattr(answers.time, "monotonic", lambda: clock[0])
    pending = PendingAnswers(tmp_path / "answers", first_s=5, max_s=20, capacity=3)
    digest = pending.put(7, "train", b"update-7")
    assert digest == hashlib.sha256(b"update-7").hexdigest() and pending.held() == 1
    assert pending.due() == []  # just sent: not again at once
    waits, expiries = [], []
    for _ in range(5):
        before = clock[0]
        while not (sent := pending.due()):
            clock[0] += 1
        assert [p for _, p, _ in sent] == [b"update-7"]
        waits.append(clock[0] - before)
        expiries.append(sent[0][2])
    assert waits == [5, 10, 20, 20, 20]  # doubling, up to max_s
    # each copy may wait at the broker until the next is due (and a first wait more): one or two queued, not one
    # per wait, while a federate with a kept session is down
    assert pending.first_expiry_s == 10 and expiries == [15, 25, 25, 25, 25]
    assert not pending.done("0" * 64) and pending.held() == 1
    assert pending.done(digest) and pending.held() == 0
    # a restarted device sends what it kept at once
    pending.put(8, "train", b"update-8")
    again = PendingAnswers(tmp_path / "answers")
    assert [p for _, p, _ in again.due()] == [b"update-8"]
    for i in range(9, 13):  # bounded: the oldest go first
        pending.put(i, "evaluate", f"e{i}".encode())
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "answers").glob("*.bin")) == ["00000010", "00000011",
                                                                                         "00000012"]


def test_the_answer_receipt_contract() -> None:
    r = AnswerReceipt("dev-1", 3, "ab" * 32, "duplicate")
    assert decode_answer_receipt(r.encode()) == r
    for bad in (b"{}", orjson.dumps({"v": 1, "device_id": "dev-1", "round": 3, "sha256": "ab" * 32, "verdict": "ok"}),
                orjson.dumps({"v": 1, "device_id": "dev/1", "round": 3, "sha256": "ab" * 32, "verdict": "late"}),
                orjson.dumps({"v": 1, "device_id": "dev-1", "round": 3, "sha256": "ab", "verdict": "late"}), b"[1]"):
        with pytest.raises(ContractError):
            decode_answer_receipt(bad)


@pytest.mark.slow
def test_an_update_sent_where_no_one_listened_is_sent_again_and_counted_once(
        procs, forgetful_broker, prefix, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    device = "ua-1"
    fleet = Fleet(procs, forgetful_broker, prefix, tmp_path, devices=(device,), partial=(device,))
    agent_log = tmp_path / f"{device}.log"
    fed = fleet.federate("--rounds", "1", "--deadline", "150", "--tolerance", "1", "--json")
    fleet.check(lambda: "not answering yet" in agent_log.read_text(), "the device saw round 1 (too few windows)")
    fed.send_signal(signal.SIGKILL)
    fed.wait(30)
    connects = agent_log.read_text().count("edge_agent.mqtt: connected to")
    forgetful_broker.kill()  # sessions, queued and retained messages: gone, federate's subscription with them
    forgetful_broker.start()
    # Back on the new broker before it trains: an update paho still held while reconnecting would reach the next
    # federate directly, and the test would not see it sent again (a race it once lost under load).
    fleet.check(lambda: agent_log.read_text().count("edge_agent.mqtt: connected to") > connects,
                "the device back on the restarted broker")
    with open(fleet.logs[device], "a") as f:  # its windows arrive: it trains and sends, and no one listens
        f.writelines(fleet.rest[device])
    fleet.check(lambda: "sent" in agent_log.read_text().split("trained on", 1)[-1], "the device's update sent",
                timeout=180)
    kept = lambda: sorted((tmp_path / device).glob("answers-*/*.bin"))  # noqa: E731
    assert len(kept()) == 1, "the update is kept until the hub's receipt"
    fed = fleet.federate("--rounds", "1", "--deadline", "150", "--tolerance", "1", "--json", log="federate2.log")
    assert fed.wait(300) == 0, (tmp_path / "federate2.log").read_text()
    out = (tmp_path / "federate2.log").read_text()
    view = orjson.loads(out.strip().splitlines()[-1])["rounds"][0]
    assert (view["round"], view["state"], view["accepted"]) == (1, "published", 1), out
    assert "sent again" in agent_log.read_text()
    u = tables.fl_updates.c
    rows = _query(fleet.url, sa.select(u.status).where(u.device_id == device, u.round_id == 1))
    assert sorted(s for (s,) in rows) == ["accepted", "evaluated"], rows  # once each: copies are duplicates
    fleet.check(lambda: not kept(), "the device's copies dropped at the hub's receipts")
    fleet.stop()


def test_a_round_verdict_that_only_counts_more_windows_is_the_same_verdict() -> None:
    """A new operator's finding: waiting to join a round, each agent logged "round 12: 1378 labelled windows (746
    new)...: not answering yet" once per window (120 lines a minute), its repeat filter comparing the text with
    its counts. The learner says a verdict again when its words change, its counts at most once a minute."""
    from edge_agent.device import learner

    a = "round 12: 1378 labelled windows (746 new) of the 100000 (100000 new) asked: not answering yet"
    b = "round 12: 1379 labelled windows (747 new) of the 100000 (100000 new) asked: not answering yet"
    repeats = learner.Repeats(every_s=60.0)
    assert repeats.say(a, 0.0) and not repeats.say(b, 1.0) and not repeats.say(a, 59.0)  # counts: once a minute
    assert repeats.say(b, 60.5)
    assert repeats.say("round 12: the announcement is for v3, and this device runs v2", 61.0)  # other words: at once
    assert repeats.say(a.replace("round 12", "round 13"), 62.0)  # a new round: at once
    assert learner.Learner.__init__.__code__.co_names.count("Repeats") == 1  # the learner says through it
