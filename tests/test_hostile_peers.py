"""What one hostile (or broken) peer can send, and what it must not achieve: a `federate` that crashes at every
restart, a gate passed on a score no device could measure, every honest device refusing a secure round, the
fleet's gauges gone from /metrics, commands and pages that crash on a stored timestamp, an agent stopped by an
announcement. Each case was found by a review that played the hostile device or broker."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa

from cloud_hub.cli.common import utc
from cloud_hub.data import db, sessions, tables
from cloud_hub.data.store import Store
from cloud_hub.rounds.config import FederateConfig
from cloud_hub.rounds.coordinator import Coordinator
from cloud_hub.rounds.judge import scores_unbelievable
from cloud_hub.rounds.secure import SecureRoundFailed
from cloud_hub.rounds.store import RoundStore
from cloud_hub.web.device_page import when
from edge_agent import contract as c
from edge_agent.contract import rounds as cr
from edge_agent.contract import secagg, secure_codec
from edge_agent.contract.secure_rounds import Answer, secure_grid
from edge_agent.contract.wire import ContractError
from tests.test_hub_cli import invoke
from tests.test_secure_rounds import TENSORS, Network, _train


def _round(net: Network) -> tuple[str, str | None]:
    with sessions.transaction(net.engine, write=False) as conn:
        r = RoundStore().get_round(conn, 1)
    assert r is not None
    return r.state, r.reason


def test_a_secure_round_that_failed_before_the_mask_step_finishes_as_failed(tmp_path: Path) -> None:
    """Three devices of four stop before they send their shares: the steps fail, the round is closed, and
    finishing it (then, or after `federate` restarts) marks it failed with the reason. It raised an
    AssertionError instead (no masked answer to sum), and every restart met the same round again."""
    net = Network(tmp_path, [f"d{i}" for i in range(4)])
    net.deaf = {d: "share" for d in ("d1", "d2", "d3")}
    for a in net.devices.values():
        a.advertise()
    hub = net.hub()
    with pytest.raises(SecureRoundFailed, match="sent their shares"):
        hub.collect()
    with pytest.raises(SecureRoundFailed, match=r"only 0 device\(s\) sent their masked update"):
        hub.unmask()
    with sessions.transaction(net.engine) as conn:
        RoundStore().set_round(conn, 1, state="closed", expect=("open",), closed_at=time.time(), reason="secure")
    said: list[str] = []
    coordinator = Coordinator(net.settings, net.engine, FederateConfig(secure=True), signing_key=None,
                              allow_unsigned=True, progress=said.append)
    coordinator._finish(1)
    state, reason = _round(net)
    assert state == "failed" and "sent their masked update" in (reason or ""), (state, reason)
    assert any("round 1: failed" in line for line in said), said


def test_an_advert_with_a_low_order_key_is_refused_and_the_others_sum(tmp_path: Path) -> None:
    """d3 advertises all-zero keys (a low-order point: no peer can agree a secret with it). Every honest
    device refused the round at the share step ("a peer's public key is unusable") and the round failed
    blaming them; the hub now refuses that advert and the three others sum."""
    devices = [f"d{i}" for i in range(4)]
    net = Network(tmp_path, devices)
    net.deaf = {"d3": "share"}
    for d in devices[:3]:
        net.devices[d].advertise()
    net._answer("d3", Answer(1, "m", "d3", "advert", advert=secagg.Advert("d3", bytes(32), bytes(32)),
                             sent=1.0).encode())
    plain = _train(net, devices[:3])
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert got.survivors == devices[:3]
    want = secure_codec.decode(np.sum(list(plain.values()), axis=0), secure_grid(net.ann.plan))
    assert np.array_equal(got.delta["coef_0"], (want["coef_0"] / 3).astype(np.float32))
    u = tables.fl_updates.c
    with net.engine.connect() as conn:
        refused = conn.execute(sa.select(u.device_id, u.reason).where(u.status == "refused")).all()
    assert [(d, "low-order point" in (why or "")) for d, why in refused] == [("d3", True)], refused
    assert secagg.usable_key(secagg.DeviceSecrets("x").advert().s_public)
    assert not secagg.usable_key(b"\x01" + bytes(31)) and not secagg.usable_key(bytes(31))


def _answer(task: str, **scores: float | None) -> tuple[SimpleNamespace, SimpleNamespace]:
    base = {"metric_before": 0.5, "metric_after": 0.6, "int8_before": None, "int8_after": None}
    return SimpleNamespace(plan={"task": task}), SimpleNamespace(**(base | scores))


@pytest.mark.parametrize(("task", "scores", "why"), [
    ("classification", {}, None),
    ("classification", {"int8_before": 0.4, "int8_after": 1.0}, None),
    ("classification", {"int8_before": 0.0, "int8_after": 1e300}, "an accuracy outside [0, 1]"),
    ("classification", {"int8_before": -0.1, "int8_after": 0.5}, "an accuracy outside [0, 1]"),
    ("classification", {"metric_after": 1.5}, "an accuracy outside [0, 1]"),
    ("regression", {"metric_before": 3.0, "metric_after": 2.5, "int8_before": 3.1, "int8_after": 2.6}, None),
    ("regression", {"metric_before": 3.0, "metric_after": 2.5, "int8_before": 3.1, "int8_after": -1.0},
     "a mean error that is negative or not finite"),
    ("regression", {"metric_before": float("inf")}, "a mean error that is negative or not finite"),
])
def test_scores_no_device_could_measure_are_refused(task: str, scores: dict[str, float], why: str | None) -> None:
    """A device-evaluated round is gated on the mean of the devices' INT8 scores: one device stating 1e300
    carried it over every honest device's drop. Each score, the INT8 ones too, must be a possible one."""
    r, u = _answer(task, **scores)
    assert scores_unbelievable(r, u) == why  # type: ignore[arg-type]


def test_one_device_stating_a_huge_outbox_keeps_the_fleet_gauges(tmp_path: Path) -> None:
    """SQLite's integer SUM overflowed on one status with outbox_depth 2**63 - 1, and /metrics dropped every
    fleet gauge at every scrape."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    statuses = {d: c.decode_status(c.Status(d, "online", 1.0, outbox_depth=n).encode(), d)
                for d, n in (("evil", 2**63 - 1), ("good", 3))}  # what the hub's decoder lets through
    with sessions.transaction(engine) as conn:
        Store(engine).apply_statuses(conn, {d: (s, 1.0) for d, s in statuses.items()})
    with sessions.transaction(engine, write=False) as conn:
        assert Store(engine).outbox_total(conn) == pytest.approx(2**63 + 2, rel=1e-9)
    engine.dispose()


def test_a_result_dated_past_year_9999_is_shown_not_crashed_on(tmp_path: Path) -> None:
    """A device's result with start 1e20 s: `stats --bucket` exited 1 with a traceback and the device's page
    answered 500 (datetime cannot hold it)."""
    assert utc(1e20) == "1e+20 s (out of range)" and when(-1e20) == "-1e+20 s (out of range)"
    assert utc(0.0) == "1970-01-01 00:00:00" and when(0.0) == "1970-01-01 00:00:00 UTC"
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    store = Store(engine)
    rows = [("evil", 1, 1e20, 1e20, 1, "walk", 0.9, None, None, 1.0, None, 99.0),
            ("good", 1, 1_700_000_000.0, 1_700_000_002.0, 1, "walk", 0.9, None, None, 1.0, None, 99.0)]
    with sessions.transaction(engine) as conn:
        store.insert_results(conn, rows)
        store.touch_devices(conn, {"evil": 99.0, "good": 99.0})
    engine.dispose()
    code, out, err = invoke("stats", "--db", url, "--bucket", "hour")
    assert code == 0, err
    assert "1e+20 s (out of range)" in out and "2023-11-14 22:00 " in out, out


def test_a_secure_announcement_whose_participants_are_not_sorted_is_refused_by_the_decoder() -> None:
    """The devices' Shamir points follow the participants' order: unsorted or repeated, the agent raised
    outside its checks and stopped (a signed announcement from a buggy hub, or any from a hostile broker
    when unsigned rounds are allowed)."""
    now = time.time()
    for participants in (("d2", "d1", "d3"), ("d1", "d1", "d3")):
        plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", participants, now + 30, clip=5.0,
                            trainable=tuple(TENSORS), created=now,
                            secure=cr.SecureParams(threshold=2, peak=63, spread=3.0, seed=11,
                                                   bits=secagg.ring_bits(3, 63)))
        payload = cr.announcement(plan, {k: np.zeros(s, np.float32) for k, s in TENSORS.items()}).encode()
        with pytest.raises(ContractError, match="participants of a secure round must be sorted and distinct"):
            cr.decode_announcement(payload)


def test_a_broker_away_while_a_round_finishes_leaves_it_to_the_next_run(tmp_path: Path, monkeypatch) -> None:
    """The catch-all that fails a round on a bug must not fail it on a broker or a database away: the round
    stays closed (its version may be registered already) and the next `federate` finishes it."""
    from cloud_hub.rounds import finish as finish_module
    from edge_agent.mqtt import MqttError
    from tests.helpers import offline_coordinator

    coordinator, engine, _url = offline_coordinator(tmp_path, monkeypatch, FederateConfig(rounds=1), ("a", "b"))
    r = coordinator._open()
    with sessions.transaction(engine) as conn:
        RoundStore().set_round(conn, r.id, state="closed", expect=("open",), closed_at=time.time(), reason="test")

    def away(*_a: object, **_k: object) -> None:
        raise MqttError("no PUBACK for the model within 30 s")

    monkeypatch.setattr(finish_module, "finish", away)
    with pytest.raises(MqttError):
        coordinator._finish(r.id)
    with sessions.transaction(engine, write=False) as conn:
        row = RoundStore().get_round(conn, r.id)
    assert row is not None and row.state == "closed", row
    engine.dispose()
