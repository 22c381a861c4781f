"""Secure rounds: the hub learns the sum of the devices' deltas and nothing else.

In process first (the devices' answerers and the hub's four steps over a real SQLite database, messages
handed over directly): the sum, devices that stop at each step, the threshold, a hub that restarts. Then with
real processes (`edge-agent run`, `cloud-hub serve`, `cloud-hub federate --secure`, mosquitto): one device
SIGKILLed after it masked, the round published, the hub's database holding no device's update."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

from cloud_hub.data import db, sessions
from cloud_hub.rounds.secure import SecureRound, SecureRoundFailed, Wire
from cloud_hub.rounds.store import RoundStore
from cloud_hub.settings import HubSettings
from edge_agent.contract import rounds as cr
from edge_agent.contract import secagg, secure_codec
from edge_agent.contract.secure_rounds import decode_answer, decode_step, secure_grid
from edge_agent.device.secure import SecureAnswerer
from edge_agent.mqtt import Message

PREFIX = "sec"
TENSORS = {"coef_0": (12, 8), "intercept_0": (8,), "coef_1": (8, 3), "intercept_1": (3,)}


def _plan(devices: Iterable[str], deadline_s: float = 30.0) -> tuple[cr.Announcement, float]:
    devices = tuple(sorted(devices))
    now = time.time()
    plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", devices, now + deadline_s, clip=5.0,
                        trainable=tuple(TENSORS), created=now,
                        secure=cr.SecureParams(threshold=secagg.threshold(len(devices)), peak=63, spread=3.0,
                                               seed=11, bits=secagg.ring_bits(len(devices), 63)))
    return cr.announcement(plan, {k: np.zeros(s, np.float32) for k, s in TENSORS.items()}), now


class Network:
    """The devices and the hub of one secure round, in one process: a step the hub sends reaches its
    device's answerer at once; a device's answer waits in the hub's inbox."""

    def __init__(self, tmp_path: Path, devices: Iterable[str], *, deadline_s: float = 30.0) -> None:
        self.url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
        self.settings = HubSettings(db=self.url, prefix=PREFIX)
        self.engine = db.make_engine(self.url)
        self.ann, now = _plan(devices, deadline_s)
        with sessions.transaction(self.engine) as conn:
            RoundStore().add_round(conn, round_id=1, name="m", base_version=1, participants=self.ann.plan.participants,
                                   plan=self.ann.plan.header(), announcement=self.ann.encode(), opened_at=now,
                                   deadline=self.ann.plan.deadline)
        self.inbox: collections.deque[Message] = collections.deque()
        self.deaf: dict[str, str] = {}  # device -> the first step it no longer hears (it stopped)
        self.trains_after_mask: set[str] = set()  # devices whose training ends once they have the mask step
        self.trained_late: dict[str, np.ndarray] = {}  # their integer vectors
        self.said: list[str] = []
        self.sent: dict[str, list[bytes]] = collections.defaultdict(list)
        self.devices = {d: SecureAnswerer(self.ann.plan, d, lambda payload, d=d: self._answer(d, payload))
                        for d in self.ann.plan.participants}
        self.mid = 0
        self.tamper: Callable[[str, bytes], bytes] = lambda device, payload: payload  # a hostile device's bytes

    def _answer(self, device: str, payload: bytes) -> None:
        payload = self.tamper(device, payload)
        self.sent[device].append(payload)
        self.mid += 1
        self.inbox.append(Message(f"{PREFIX}/devices/{device}/update", payload, 1, False, self.mid))

    def _deliver(self, topic: str, payload: bytes) -> None:
        device = topic.split("/")[-2]
        if not payload:
            return
        step = decode_step(payload, device)
        stopped = self.deaf.get(device)
        if stopped is not None and ["share", "mask", "reveal"].index(step.step) >= ["share", "mask", "reveal"].index(stopped):
            return
        why = self.devices[device].on_step(step)
        assert why is None, why
        if step.step == "mask" and device in self.trains_after_mask:
            answerer = self.devices[device]
            assert answerer.masks is not None and len(answerer.masks[0]) == secure_grid(self.ann.plan).padded
            self.trained_late |= _train(self, [device])

    def _next(self, deadline: float) -> tuple[int, Message | None] | None:
        if self.inbox:
            return 1, self.inbox.popleft()
        return None  # nothing more will come: the step's deadline, at once

    def hub(self) -> SecureRound:
        wire = Wire(send=self._deliver, next=self._next, ack=lambda g, m: None, sign=lambda step: step,
                    say=self.said.append, later=lambda g, m: pytest.fail(f"a plain message: {m.topic}"))
        with sessions.transaction(self.engine, write=False) as conn:
            row = RoundStore().get_round(conn, 1)
        assert row is not None
        return SecureRound(self.settings, self.engine, row, wire)


def _deltas(devices: Iterable[str], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {d: {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in TENSORS.items()} for d in devices}


def _stats(i: int) -> tuple[dict[str, float], list[list[float]]]:
    return ({"n_examples": 100 + i, "loss_before": 1.0 + i, "loss_after": 0.5, "metric_before": 0.5,
             "metric_after": 0.75, "norm": 1.5}, [[-1.0 - i, 2.0, -3.0, 4.0 + i], [0.0, 1.0, -2.0, 2.0]])


def _train(net: Network, devices: Iterable[str]) -> dict[str, np.ndarray]:
    """Each device's training result handed to its answerer; returns the integer vector each put on the grid
    (read back from what it will mask: the answerer keeps it until it masks)."""
    out = {}
    for i, d in enumerate(sorted(devices)):
        stats, ranges = _stats(i)
        net.devices[d].trained(_deltas([d], seed=i)[d], stats, ranges)
        assert net.devices[d].vectors is not None
        out[d] = net.devices[d].vectors[0]
    return out


def test_the_hub_gets_the_exact_sum_and_no_single_vector(tmp_path) -> None:
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, devices)
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    grid = secure_grid(net.ann.plan)
    want = secure_codec.decode(np.sum(list(plain.values()), axis=0), grid)
    assert got.survivors == devices and got.dropped == [] and got.outcome["summed"] == 5
    assert all(np.array_equal(got.delta[k], (want[k] / 5).astype(np.float32)) for k in TENSORS)
    assert got.stats["n_examples"] == sum(100 + i for i in range(5))
    assert got.stats["loss_before"] == pytest.approx(3.0) and got.stats["metric_after"] == pytest.approx(0.75)
    assert got.ranges[0] == pytest.approx([-3.0, 2.0, -3.0, 6.0])
    # the hub's database: keys, sealed shares, masked vectors, revealed shares; no device's vector
    stored = [p for status in ("advert", "shares", "masked", "revealed") for p in hub._stored(status).values()]
    assert len(stored) == 20
    for d, ints in plain.items():
        ring = secagg.to_ring(ints, hub.delta_session)
        mine = decode_answer(hub._stored("masked")[d])
        masked = secagg.unpack(mine.vectors()[0], mine.size, mine.bits)
        assert np.mean(masked == ring) < 0.01  # uniform noise, not its vector
        assert all(secagg.pack(ring, hub.delta_session.bits) not in p for p in stored)


def test_devices_that_finish_training_after_the_mask_step_mask_with_what_they_made_meanwhile(tmp_path) -> None:
    """A device makes its masks when its peers' shares arrive (the mask step), before it knows the vector they
    hide; three of five finish training after that step: the sum is still the plain sum, bit for bit."""
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    net.trains_after_mask = {"d0", "d2", "d3"}
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, ["d1", "d4"])
    hub = net.hub()
    hub.collect()
    assert sorted(net.trained_late) == ["d0", "d2", "d3"]
    plain |= net.trained_late
    total = np.zeros(secure_grid(net.ann.plan).padded, np.uint32)
    for payload in hub._stored("masked").values():
        masked = decode_answer(payload)
        total = total + secagg.unpack(masked.vectors()[0], masked.size, masked.bits)
    revealed = {d: decode_answer(p).revealed for d, p in hub._stored("revealed").items()}
    keys = {d: decode_answer(p).advert for d, p in hub._stored("advert").items()}
    ints = secagg.unmask(total, hub.delta_session, {d: k for d, k in keys.items() if k is not None}, devices, revealed)
    assert np.array_equal(ints, np.sum([plain[d] for d in devices], axis=0))
    assert hub.unmask().survivors == devices


def test_a_device_that_stops_after_masking_and_one_that_stops_before(tmp_path) -> None:
    """d1's vector reached the hub and it never reveals: its self mask comes from the others' shares, its
    vector is in the sum. d3 sent its shares but never masked: its pairwise masks come out, it is not in the sum."""
    devices = [f"d{i}" for i in range(6)]
    net = Network(tmp_path, devices)
    net.deaf = {"d1": "reveal", "d3": "mask"}
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, [d for d in devices if d != "d3"])
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert got.survivors == ["d0", "d1", "d2", "d4", "d5"] and got.dropped == ["d3"]
    assert got.revealed_by == ["d0", "d2", "d4", "d5"]
    want = secure_codec.decode(np.sum(list(plain.values()), axis=0), secure_grid(net.ann.plan))
    assert all(np.array_equal(got.delta[k], (want[k] / 5).astype(np.float32)) for k in TENSORS)


@pytest.mark.parametrize("answering", [3, 2])
def test_the_round_needs_the_threshold_of_reveals(tmp_path, answering: int) -> None:
    """Five devices, threshold 3: three reveals give the sum; two leave it hidden and the round fails."""
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    net.deaf = {d: "reveal" for d in devices[answering:]}
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, devices)
    hub = net.hub()
    if answering < 3:
        with pytest.raises(SecureRoundFailed, match="only 2 device.s. revealed their shares .the threshold is 3"):
            hub.collect()
        return
    hub.collect()
    assert np.array_equal(hub.unmask().delta["coef_0"], (secure_codec.decode(
        np.sum(list(plain.values()), axis=0), secure_grid(net.ann.plan))["coef_0"] / 5).astype(np.float32))


def test_a_hub_that_restarts_goes_on_from_what_it_stored(tmp_path) -> None:
    """The first hub stops after the shares (nothing more comes before its deadline); a second one, with the
    same database, sends the steps again and sums."""
    devices = [f"d{i}" for i in range(4)]
    net = Network(tmp_path, devices)
    for a in net.devices.values():
        a.advertise()
    first = net.hub()
    adverts = first._step("advert", set(devices), time.time())
    assert sorted(adverts) == devices
    plain = _train(net, devices)
    second = net.hub()  # the same stored answers: the steps sent again are answered once
    second.collect()
    got = second.unmask()
    assert got.survivors == devices
    want = secure_codec.decode(np.sum(list(plain.values()), axis=0), secure_grid(net.ann.plan))
    assert np.array_equal(got.delta["coef_1"], (want["coef_1"] / 4).astype(np.float32))


def test_a_second_answer_to_a_step_is_refused_before_and_after_a_restart(tmp_path) -> None:
    """d0 sends a second advert (other bytes) during the advert step, and again once a hub restarted mid-step:
    both refused, the first kept; the round sums all four. (The hub keeps who answered in memory while a step runs,
    read back from the database when a step starts.)"""
    import sqlalchemy as sa

    from cloud_hub.data import tables
    from edge_agent.contract.secure_rounds import Answer

    devices = [f"d{i}" for i in range(4)]
    net = Network(tmp_path, devices)
    again = lambda sent: Answer(1, "m", "d0", "advert", advert=net.devices["d0"].me.advert(), sent=sent).encode()  # noqa: E731
    net.devices["d0"].advertise()
    net.devices["d1"].advertise()
    net._answer("d0", again(1.0))
    first = net.hub()  # it stops (nothing more comes) with two adverts of four
    assert first._step("advert", set(devices), time.time()) == {"d0", "d1"}
    net._answer("d0", again(2.0))
    net.devices["d2"].advertise()
    net.devices["d3"].advertise()
    plain = _train(net, devices)
    second = net.hub()
    second.collect()
    assert np.array_equal(second.unmask().delta["coef_0"], (secure_codec.decode(
        np.sum(list(plain.values()), axis=0), secure_grid(net.ann.plan))["coef_0"] / 4).astype(np.float32))
    u = tables.fl_updates.c
    with net.engine.connect() as conn:
        refused = conn.execute(sa.select(u.device_id, u.reason).where(u.status == "refused").order_by(u.id)).all()
    assert [tuple(r) for r in refused] == [("d0", "a second advert answer")] * 2


def test_a_device_refuses_a_hub_that_lies(tmp_path) -> None:
    """Its own advert replaced, a peer the plan never selected, a reveal naming one device twice."""
    from dataclasses import replace

    from edge_agent.contract.secure_rounds import Step

    net = Network(tmp_path, ["a", "b", "c"])
    a = net.devices["a"]
    a.advertise()
    others = [net.devices[d].me.advert() for d in ("b", "c")]
    forged = secagg.DeviceSecrets("a").advert()
    assert "does not hold this device's keys" in a.on_step(Step(1, "m", "a", "share", adverts=(forged, *others)))
    stranger = secagg.DeviceSecrets("zz").advert()
    assert "did not select" in a.on_step(Step(1, "m", "a", "share", adverts=(a.me.advert(), *others, stranger)))
    assert a.on_step(Step(1, "m", "a", "share", adverts=(a.me.advert(), *others))) is None
    assert "shares" in a.done
    step = Step(1, "m", "a", "reveal", survivors=("a", "b"), dropped=("b",))
    assert "before it had its peers' shares" in a.on_step(step)
    assert "not this round's" in a.on_step(replace(step, round_id=2))


def _garbles_shares_for(net: Network, sender: str, peers: Iterable[str]) -> None:
    """``sender`` seals shares that do not open for ``peers`` (one bit of each flipped), sound ones for the rest."""
    from dataclasses import replace

    from edge_agent.contract.secure_rounds import Answer

    def tamper(device: str, payload: bytes) -> bytes:
        a = decode_answer(payload)
        if device != sender or a.step != "shares":
            return payload
        bad = {p: bytes([s[0] ^ 1]) + s[1:] if p in peers else s for p, s in a.sealed.items()}
        return Answer.encode(replace(a, sealed=bad))

    net.tamper = tamper


def _names_in_its_masked_answer(net: Network, device: str, peers: tuple[str, ...]) -> None:
    """``device``'s masked answer names ``peers`` as sealing it shares that do not open (whether they did or not)."""
    from dataclasses import replace

    def tamper(sender: str, payload: bytes) -> bytes:
        a = decode_answer(payload)
        return replace(a, unopened=peers).encode() if sender == device and a.step == "masked" else payload

    net.tamper = tamper


def _disputed(tmp_path: Path, garbled_for: list[str], deaf: dict[str, str] | None = None
              ) -> tuple[Network, dict[str, np.ndarray]]:
    """Five devices, threshold 3, advertised and trained; d2 seals shares that do not open for ``garbled_for``."""
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    _garbles_shares_for(net, "d2", garbled_for)
    net.deaf = deaf or {}
    for a in net.devices.values():
        a.advertise()
    return net, _train(net, [d for d in devices if (deaf or {}).get(d) not in ("share", "mask")])


def _the_survivors_mean(net: Network, got, plain: dict[str, np.ndarray]) -> bool:
    """Whether a round's published delta is the mean of its survivors' vectors, bit for bit."""
    want = secure_codec.decode(np.sum([plain[d] for d in got.survivors], axis=0), secure_grid(net.ann.plan))
    return all(np.array_equal(got.delta[k], (want[k] / len(got.survivors)).astype(np.float32)) for k in TENSORS)


def test_shares_that_do_not_open_leave_their_sender_out_and_name_both(tmp_path) -> None:
    """A hostile device's finding: d2 sealed shares for d0 that do not open; d0 refused the mask step, so did
    not mask, and the hub named d0 (honest) as missing. Now d0 masks all the same and names d2 in its masked
    answer: the round sums the other four exactly, d2 left out as if it had dropped, and the hub says who named
    whom."""
    net, plain = _disputed(tmp_path, ["d0"])
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert net.devices["d0"].unopened == ("d2",) and decode_answer(hub._stored("masked")["d0"]).unopened == ("d2",)
    assert got.survivors == ["d0", "d1", "d3", "d4"] and got.dropped == ["d2"]
    assert got.outcome["unopened"] == {"d0": ["d2"]} and got.outcome["summed"] == 4
    assert hub.left_out() == ["d2: its shares did not open for d0"]
    assert _the_survivors_mean(net, got, plain)
    assert net.said == ["round 1: d0 says the shares d2 sealed for it do not open: d2 left out of the sum (one of the "
                        "two is faulty)"]


def test_shares_that_open_for_too_few_survivors_fail_the_round_naming_their_sender(tmp_path) -> None:
    """d2's shares open only for d4: its mask key cannot be rebuilt from one survivor (threshold 3), so the
    round fails naming d2 and who said so, not the honest devices."""
    net, _ = _disputed(tmp_path, ["d0", "d1", "d3"])
    hub = net.hub()
    with pytest.raises(SecureRoundFailed, match=r"^d2's shares did not open for d0, d1, d3: its mask key cannot be "
                       r"rebuilt from the 1 survivor\(s\) that hold them \(the threshold is 3\)"):
        hub.collect()


def test_with_a_device_left_out_the_hub_waits_for_reveals_that_hold_its_shares(tmp_path) -> None:
    """A review's finding: the reveal step ended 1 s after the threshold of reveals, but d0 (which named d2) holds no
    share of d2's mask key: with d0, d1, d3 revealed, 2 of 3 shares, and the round failed "2 shares, the threshold
    is 3", naming no one. The hub now waits for reveals holding the threshold of each left-out device's shares: d4's
    reveal, later than the grace, is taken (it is handed over only to a hub that still waits past the grace)."""
    from cloud_hub.rounds import secure

    net, plain = _disputed(tmp_path, ["d0"])
    late: list[Message] = []

    def next_late(deadline: float) -> tuple[int, Message | None] | None:
        for m in [m for m in net.inbox if m.topic.endswith("/d4/update") and decode_answer(m.payload).step == "reveal"]:
            net.inbox.remove(m)
            late.append(m)
        if net.inbox:
            return 1, net.inbox.popleft()
        if late and deadline > time.time() + secure.ENOUGH_GRACE_S + 1:  # still waiting past the grace
            return 1, late.pop()
        return None

    net._next = next_late  # type: ignore[method-assign]
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert got.survivors == ["d0", "d1", "d3", "d4"] and got.revealed_by == ["d0", "d1", "d3", "d4"]
    assert _the_survivors_mean(net, got, plain)


def test_with_a_device_left_out_too_few_reveals_holding_its_shares_fail_naming_it(tmp_path) -> None:
    """The same round with d4 stopped before its reveal (a dropout the threshold tolerates without a dispute): the
    round fails naming d2's mask key and who could not open its shares, at collect and when finished."""
    net, _ = _disputed(tmp_path, ["d0"], deaf={"d4": "reveal"})
    why = r"^d2's mask key: 2 of the devices that revealed hold its shares \(the threshold is 3; they did not open for d0\)"
    with pytest.raises(SecureRoundFailed, match=why):
        net.hub().collect()
    with pytest.raises(SecureRoundFailed, match=why):
        net.hub().unmask()


def test_a_failed_dispute_keeps_its_reason_when_the_round_is_finished(tmp_path) -> None:
    """The helper's finding: the coordinator finishes a round with a new SecureRound's unmask(), which said "only 0
    device(s) revealed their shares (missing: d0, d1, d2, d3, d4)" and dropped the claims. It gives collect()'s
    reason now, and the claims with it."""
    net, _ = _disputed(tmp_path, ["d0", "d1", "d3"])
    with pytest.raises(SecureRoundFailed) as closed:
        net.hub().collect()
    with pytest.raises(SecureRoundFailed) as finished:
        net.hub().unmask()
    assert str(finished.value) == str(closed.value) and str(closed.value).startswith("d2's shares did not open for")
    assert finished.value.unopened == {"d0": ["d2"], "d1": ["d2"], "d3": ["d2"]}


def test_a_device_naming_several_peers_is_left_out_itself(tmp_path) -> None:
    """The helper's finding: d0 named three honest peers and stayed in a sum of seven of ten (its weight 1/7 for
    1/10). A device that names several peers is left out and its claims are not followed: one hostile device keeps
    at most one honest peer out while it stays in."""
    devices = [f"d{i}" for i in range(6)]
    net = Network(tmp_path, devices)
    _names_in_its_masked_answer(net, "d0", ("d1", "d2", "d3"))
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, devices)
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert got.survivors == ["d1", "d2", "d3", "d4", "d5"] and got.dropped == ["d0"]
    assert _the_survivors_mean(net, got, plain)
    assert net.said == ["round 1: d0 says the shares of d1, d2, d3 sealed for it do not open: d0 left out of the sum "
                        "(a device may name one peer)"]
    assert hub.left_out() == ["d0: it named 3 peers"]


def test_a_masked_answer_after_the_reveals_does_not_change_the_survivors_after_a_restart(tmp_path) -> None:
    """The helper's finding: a first hub asked d0-d3 for their reveals (d4 had not masked); d4 then masked naming d2,
    and a restarted hub took that answer, made d2 dropped, asked for an s-share of d2 the devices never give (each
    reveals once) and failed with "1 shares, the threshold is 3". Once reveals are stored, the survivors stand."""
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    net.trains_after_mask = set()
    for a in net.devices.values():
        a.advertise()
    plain = _train(net, devices[:4])
    net.hub().collect()
    assert set(net.hub()._answered("revealed")) == {"d0", "d1", "d2", "d3"}
    _names_in_its_masked_answer(net, "d4", ("d2",))
    _train(net, ["d4"])  # its masked answer now waits in the hub's inbox
    second = net.hub()
    second.collect()
    got = second.unmask()
    assert got.survivors == ["d0", "d1", "d2", "d3"] and got.dropped == ["d4"]
    assert _the_survivors_mean(net, got, plain)
    assert "d4" not in second._answered("masked")


def test_a_masked_answer_naming_a_device_outside_the_round_is_refused(tmp_path) -> None:
    """A device cannot leave out a device that sent no shares, nor itself (the decoder refuses that)."""
    from dataclasses import replace

    from edge_agent.contract.wire import ContractError

    devices = [f"d{i}" for i in range(4)]
    net = Network(tmp_path, devices)
    net.deaf = {"d3": "share"}  # it advertised, then stopped: no shares from it
    _names_in_its_masked_answer(net, "d1", ("d3",))
    for a in net.devices.values():
        a.advertise()
    _train(net, devices[:3])
    hub = net.hub()
    with pytest.raises(SecureRoundFailed):
        hub.collect()  # d1 refused: two masked of three senders, threshold 3
    assert any("refused a secure answer from d1: names ['d3'] as sealing it shares, not senders" in s for s in net.said)
    masked = decode_answer(net.sent["d1"][-1])
    with pytest.raises(ContractError, match="names the device itself"):
        decode_answer(replace(masked, unopened=("d1",)).encode(), "d1")


# --------------------------------------------------------------------------- real processes

SECURE_DEVICES = ("sa-1", "sa-2", "sa-3", "sa-4", "sa-5")


@pytest.mark.slow
def test_a_secure_round_survives_a_device_killed_after_masking(procs, broker, prefix, tmp_path) -> None:
    """Five agents, threshold 3, with differential privacy (each adds its share of the noise before it masks).
    sa-2 is SIGKILLed once its masked update is stored; sa-5 trains last (its log comes late), so the hub asks
    for the reveals only after the kill. The round is published, its sum is the sum of what the five masked
    (their audit copies: vector and noise) bit for bit, the model is the base plus their mean, the noise is
    there at its planned size, the epsilon is stated, and the hub's database and logs hold no device's vector,
    noised or not, and no plain update."""
    import hashlib
    import signal

    import orjson
    import sqlalchemy as sa

    from cloud_hub.data import tables
    from cloud_hub.models import weights
    from cloud_hub.rounds.fedavg import mlp_tensors
    from edge_agent.contract.round_updates import decode_update
    from tests.test_federated import Fleet, _devices, _query

    fleet = Fleet(procs, broker, prefix, tmp_path, devices=SECURE_DEVICES, partial=("sa-5",),
                  agent_env={"EDGE_AGENT_SECURE_AUDIT": "1"})
    fed = fleet.federate("--secure", "--dp-noise", "0.5", "--rounds", "1", "--deadline", "120", "--tolerance", "1",
                         "--json")
    u = tables.fl_updates.c

    def stored(status: str) -> set[str]:
        return {d for (d,) in _query(fleet.url, sa.select(u.device_id).where(u.status == status))}

    fleet.check(lambda: "sa-2" in stored("masked"), "sa-2's masked update at the hub", timeout=180)
    assert "sa-5" not in stored("masked") and not stored("revealed")
    fleet.killed.add("sa-2")
    fleet.agents["sa-2"].send_signal(signal.SIGKILL)
    fleet.agents["sa-2"].wait(30)
    with open(fleet.logs["sa-5"], "a") as f:  # sa-5's windows arrive: it trains, masks, and the reveals begin
        f.writelines(fleet.rest["sa-5"])
    assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    out = (tmp_path / "federate.log").read_text()
    view = orjson.loads(out.strip().splitlines()[-1])["rounds"][0]
    assert (view["state"], view["new_version"], view["secure"], view["summed"]) == ("published", 2, True, 5), out
    assert stored("revealed") == set(SECURE_DEVICES) - {"sa-2"} and stored("masked") == set(SECURE_DEVICES)

    # what each device masked, from its own audit copy: the hub's sum is theirs, bit for bit
    plain, noise = {}, {}
    for d in SECURE_DEVICES:
        (copy,) = (tmp_path / d).glob("secure-*.npz")
        with np.load(copy) as z:
            plain[d], noise[d] = z["delta"].astype(np.int64), z["noise"].astype(np.int64)
    total = np.sum(list(plain.values()), axis=0)
    fr = tables.fl_rounds.c
    (outcome,) = _query(fleet.url, sa.select(fr.outcome).where(fr.id == 1))[0]
    outcome = orjson.loads(outcome)
    assert outcome["sum_sha256"] == hashlib.sha256(total.astype("<i8").tobytes()).hexdigest()

    # the published model is the base plus the mean of the survivors' deltas: their clean vectors plus their
    # noise, which is there at the plan's size (sigma a device), and stated as an epsilon
    m = tables.models.c
    blobs = dict(_query(fleet.url, sa.select(m.version, m.weights)))
    base, new = mlp_tensors(weights.from_bytes(blobs[1])), mlp_tensors(weights.from_bytes(blobs[2]))
    ann = cr.decode_announcement(_query(fleet.url, sa.select(fr.announcement).where(fr.id == 1))[0][0])
    assert ann.plan.dp is not None and ann.plan.dp.mode == "distributed"
    clean = np.sum([plain[d] - noise[d] for d in SECURE_DEVICES], axis=0)
    mean = secure_codec.decode(clean + np.sum(list(noise.values()), axis=0), secure_grid(ann.plan))
    for name in ann.plan.trainable:
        assert np.allclose(new[name], base[name] + mean[name] / 5, atol=1e-5), name
    for d in SECURE_DEVICES:
        assert float(noise[d].std()) == pytest.approx(ann.plan.dp.sigma, rel=0.1), d
    spent = outcome["privacy"]
    assert (spent["mode"], spent["devices"], spent["rounds"]) == ("distributed", 5, 1) and spent["epsilon"] > 0
    assert view["dp"] == "distributed" and view["epsilon_total"] == spent["epsilon_total"]
    (manifest,) = _query(fleet.url, sa.select(m.manifest).where(m.version == 2))[0]
    assert orjson.loads(manifest)["training"]["privacy"]["epsilon_total"] == spent["epsilon_total"]

    # the hub's database and logs: no device's vector, no plain update, every masked vector unlike its source
    payloads = [bytes(p) for (p,) in _query(fleet.url, sa.select(u.payload).where(u.payload.is_not(None)))]
    assert len(payloads) == 5 + 5 + 5 + 4
    session = ann.plan.secure
    assert session is not None
    for p in payloads:
        with pytest.raises(cr.ContractError):
            decode_update(p)
    logs = b"".join(f.read_bytes() for f in (tmp_path / "federate.log", tmp_path / "hub.log"))
    for d, ints in plain.items():
        ring = ints & ((1 << session.bits) - 1)
        packed = secagg.pack(ring.astype(np.uint32), session.bits)
        assert not any(packed in p for p in payloads) and packed not in logs
        unnoised = secagg.pack(((ints - noise[d]) & ((1 << session.bits) - 1)).astype(np.uint32), session.bits)
        assert not any(unnoised in p for p in payloads) and unnoised not in logs
        mine = decode_answer(next(p for p in payloads if decode_answer(p).step == "masked"
                                  and decode_answer(p).device_id == d))
        assert np.mean(secagg.unpack(mine.vectors()[0], mine.size, mine.bits) == ring) < 0.01
    fleet.check(lambda: all(_devices(fleet.url).get(d) == 2 for d in SECURE_DEVICES if d != "sa-2"),
                "the four living devices on v2")
    fleet.stop()


@pytest.mark.slow
def test_a_secure_round_resumes_after_federate_is_killed(procs, broker, prefix, tmp_path) -> None:
    """federate is SIGKILLed while it waits for the masked vectors (sa-4's windows have not come yet); sa-4
    masks while no coordinator listens (the broker keeps it for federate's session); a second federate resumes
    the round from what the first one stored and publishes the sum of all four."""
    import signal

    import orjson
    import sqlalchemy as sa

    from cloud_hub.data import tables
    from tests.test_federated import Fleet, _query

    devices = SECURE_DEVICES[:4]
    fleet = Fleet(procs, broker, prefix, tmp_path, devices=devices, partial=("sa-4",))
    fed = fleet.federate("--secure", "--rounds", "1", "--deadline", "300", "--tolerance", "1")
    u = tables.fl_updates.c

    def stored(status: str) -> set[str]:
        return {d for (d,) in _query(fleet.url, sa.select(u.device_id).where(u.status == status))}

    fleet.check(lambda: stored("masked") == set(devices[:3]), "three masked updates at the hub", timeout=180)
    fed.send_signal(signal.SIGKILL)
    fed.wait(30)
    with open(fleet.logs["sa-4"], "a") as f:
        f.writelines(fleet.rest["sa-4"])
    fleet.check(lambda: "secure masked sent" in (tmp_path / "sa-4.log").read_text(), "sa-4's masked update",
                timeout=180)
    again = fleet.federate("--rounds", "1", "--deadline", "300", "--json", log="federate2.log")
    assert again.wait(300) == 0, (tmp_path / "federate2.log").read_text()
    out = (tmp_path / "federate2.log").read_text()
    view = orjson.loads(out.strip().splitlines()[-1])["rounds"][0]
    assert (view["state"], view["new_version"], view["secure"], view["summed"]) == ("published", 2, True, 4), out
    assert stored("masked") == set(devices) and len(stored("revealed")) >= 3
    refused = _query(fleet.url, sa.select(u.device_id, u.reason).where(u.status == "refused"))
    assert refused == [], refused  # the steps sent again were answered once: no second answer
    fleet.stop()


@pytest.mark.parametrize("lie", ["accuracy", "loss", "ranges"])
def test_statistics_no_data_can_give_fail_the_round_naming_them(tmp_path, lie: str) -> None:
    """A hostile device's finding: one device of five stating accuracies of +-1e5 made the round's unmasked mean
    accuracy 2,000,000 %, and its ranges the INT8 ranges, unrefused. A sum no devices' data can give now fails the
    round with what it cannot be."""
    devices = [f"d{i}" for i in range(5)]
    net = Network(tmp_path, devices)
    for a in net.devices.values():
        a.advertise()
    for i, d in enumerate(devices):
        stats, ranges = _stats(i)
        if d == "d4" and lie == "accuracy":
            stats = {**stats, "metric_after": 1e5}
        elif d == "d4" and lie == "loss":
            stats = {**stats, "loss_after": -1e5}
        elif d == "d4":
            ranges = [[1e5, -1e5, 1e5, -1e5] for _ in ranges]
        net.devices[d].trained(_deltas([d], seed=i)[d], stats, ranges)
    hub = net.hub()
    hub.collect()
    want = {"accuracy": r"mean metric_after 2000\d+(\.\d+)? outside \[0, 1\]", "loss": r"mean loss_after -\d+.* below 0",
            "ranges": r"layer 0's mean activation range .* is inverted"}[lie]
    with pytest.raises(SecureRoundFailed, match=rf"the unmasked statistics are impossible \({want}\)"):
        hub.unmask()
