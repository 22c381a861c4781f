"""Secure aggregation's arithmetic and secrets (edge_agent/contract/secagg.py), the protocol run in process:
the unmasked sum is the plain sum bit for bit, with and without devices that drop, and the hub learns
nothing with fewer answers than the threshold."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pytest

from edge_agent.contract import secagg as sa

N_VALUES = 5000


def _session(devices: list[str], t: int | None = None, peak: int = 127) -> sa.Session:
    return sa.Session(b"watch/round 7", tuple(sorted(devices)), t or sa.threshold(len(devices)),
                      sa.ring_bits(len(devices), peak))


def _protocol(xs: dict[str, np.ndarray], session: sa.Session, *, gone_before_shares: Collection[str] = (),
              gone_before_mask: Collection[str] = (), gone_after_mask: Collection[str] = (),
              answering: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Every step as the devices and the hub run it; returns (the hub's unmasked sum, the survivors)."""
    secrets = {d: sa.DeviceSecrets(d) for d in session.participants}
    adverts = {d: s.advert() for d, s in secrets.items()}  # step 1: everyone advertises
    sharing = [d for d in session.participants if d not in gone_before_shares]
    sealed, own = {}, {}
    for d in sharing:  # step 2: shares for every peer that advertised
        sealed[d], own[d] = sa.seal_shares(session, secrets[d], adverts)
    u2 = {d: adverts[d] for d in sharing}  # the hub relays the shares of those who sent them
    held: dict[str, dict[str, tuple[int, int]]] = {}
    for v in sharing:
        held[v] = {u: sa.open_shares(session, secrets[v], adverts[u], sealed[u][v]) for u in sharing if u != v}
        held[v][v] = own[v]
    masked = {d: sa.mask(xs[d], session, secrets[d], u2) for d in sharing if d not in gone_before_mask}
    survivors = sorted(masked)  # step 3: the hub sums what reached it
    total = np.zeros(N_VALUES, np.uint32)
    for y in masked.values():
        total = total + y
    dropped = sorted(set(sharing) - set(survivors))
    answerers = [d for d in survivors if d not in gone_after_mask][:answering]
    answers = {v: sa.reveal(session, held[v], survivors, dropped) for v in answerers}  # step 4
    return sa.unmask(total, session, u2, survivors, answers), survivors


@pytest.fixture
def xs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(26)
    return {f"dev-{i}": rng.integers(-127, 128, N_VALUES) for i in range(8)}


def test_the_unmasked_sum_is_the_plain_sum_bit_for_bit(xs) -> None:
    session = _session(list(xs))
    got, survivors = _protocol(xs, session)
    assert survivors == sorted(xs)
    plain = np.sum(list(xs.values()), axis=0)
    assert got.dtype == np.int64 and np.array_equal(got, plain)


def test_the_ring_holds_the_extremes_exactly() -> None:
    """Every device at +peak (or -peak): the sum fills the ring's range and still comes back exact."""
    devices = [f"d{i}" for i in range(8)]
    for sign in (1, -1):
        xs = {d: np.full(N_VALUES, sign * 127) for d in devices}
        got, _ = _protocol(xs, _session(devices))
        assert np.all(got == sign * 127 * 8)
    with pytest.raises(ValueError, match="ring"):
        sa.ring_bits(1 << 20, 1 << 20)


def test_a_masked_vector_alone_is_noise(xs) -> None:
    """What the hub receives from one device: uniform over the ring, uncorrelated with its vector."""
    session = _session(list(xs))
    secrets = {d: sa.DeviceSecrets(d) for d in session.participants}
    adverts = {d: s.advert() for d, s in secrets.items()}
    d = session.participants[0]
    y = sa.mask(xs[d], session, secrets[d], adverts)
    assert y.max() > 0.9 * (1 << session.bits) and abs(np.corrcoef(y, xs[d])[0, 1]) < 0.05
    assert not np.array_equal(sa.from_ring(y, session), xs[d])


def test_a_third_of_the_devices_stop_after_masking_and_the_sum_of_all_comes_back(xs) -> None:
    """Their vectors reached the hub; the five others' answers (the threshold) rebuild their self masks."""
    session = _session(list(xs))
    gone = session.participants[:3]
    got, survivors = _protocol(xs, session, gone_after_mask=gone)
    assert len(survivors) == 8 and np.array_equal(got, np.sum(list(xs.values()), axis=0))


def test_devices_that_stop_before_masking_leave_the_sum_of_the_others(xs) -> None:
    """Their shares went out, their vectors never came: the hub rebuilds their mask keys and takes their pairwise
    masks out of the survivors' sum."""
    session = _session(list(xs))
    gone = [session.participants[1], session.participants[6]]
    got, survivors = _protocol(xs, session, gone_before_mask=gone, gone_after_mask=[session.participants[0]])
    assert survivors == sorted(set(xs) - set(gone))
    assert np.array_equal(got, np.sum([xs[d] for d in survivors], axis=0))
    # and one that never sent its shares: not in anyone's masks
    got, survivors = _protocol(xs, session, gone_before_shares=[session.participants[3]])
    assert np.array_equal(got, np.sum([xs[d] for d in survivors], axis=0)) and len(survivors) == 7


def test_the_threshold_both_ways(xs) -> None:
    """t answers rebuild the sum; t - 1 leave it hidden (the round fails), whoever they are."""
    session = _session(list(xs))
    t = session.threshold
    assert t == 5
    got, _ = _protocol(xs, session, answering=t)
    assert np.array_equal(got, np.sum(list(xs.values()), axis=0))
    with pytest.raises(sa.SecAggError, match="threshold is 5"):
        _protocol(xs, session, answering=t - 1)


def test_fewer_shares_than_the_threshold_say_nothing_and_more_say_the_same() -> None:
    secret = bytes(range(32))
    shares = dict(enumerate(sa.split(secret, 8, 5), start=1))
    assert sa.combine({x: shares[x] for x in (1, 3, 4, 7, 8)}, 5) == secret
    assert sa.combine(shares, 5) == secret
    with pytest.raises(sa.SecAggError):
        sa.combine({x: shares[x] for x in (1, 2, 3, 4)}, 5)
    # four shares fit any secret: for each candidate there is a polynomial through them
    other = sa.split(secret, 8, 5)
    assert other != list(shares.values())  # fresh randomness each time


def test_a_device_never_reveals_both_secrets_of_one_device() -> None:
    session = _session([f"d{i}" for i in range(5)])
    held = {d: (1, 2) for d in session.participants}
    with pytest.raises(sa.SecAggError, match="both secrets"):
        sa.reveal(session, held, ["d0", "d1", "d2"], ["d2"])
    with pytest.raises(sa.SecAggError, match="fewer than the threshold"):
        sa.reveal(session, held, ["d0", "d1"], ["d2"])
    with pytest.raises(sa.SecAggError, match="outside the round"):
        sa.reveal(session, held, ["d0", "d1", "d2"], ["x9"])
    assert sa.reveal(session, held, ["d0", "d1", "d2"], ["d3"]) == {
        "d0": ("b", 2), "d1": ("b", 2), "d2": ("b", 2), "d3": ("s", 1)}


def test_shares_read_only_by_their_receiver_and_a_tampered_one_is_refused() -> None:
    session = _session(["a", "b", "c"])
    secrets = {d: sa.DeviceSecrets(d) for d in session.participants}
    adverts = {d: s.advert() for d, s in secrets.items()}
    sealed, _ = sa.seal_shares(session, secrets["a"], adverts)
    assert sa.open_shares(session, secrets["b"], adverts["a"], sealed["b"])
    with pytest.raises(sa.SecAggError, match="do not decrypt"):
        sa.open_shares(session, secrets["c"], adverts["a"], sealed["b"])  # c cannot read b's
    bad = bytearray(sealed["b"])
    bad[-1] ^= 1
    with pytest.raises(sa.SecAggError, match="do not decrypt"):
        sa.open_shares(session, secrets["b"], adverts["a"], bytes(bad))
    other_round = sa.Session(b"watch/round 8", session.participants, session.threshold, session.bits)
    with pytest.raises(sa.SecAggError, match="do not decrypt"):
        sa.open_shares(other_round, secrets["b"], adverts["a"], sealed["b"])


def test_masks_differ_between_rounds_with_the_same_keys() -> None:
    a, b = sa.DeviceSecrets("a"), sa.DeviceSecrets("b")
    r7, r8 = (sa.Session(f"m/round {r}".encode(), ("a", "b"), 2, 11) for r in (7, 8))
    seeds = {sa.pair_seed(r, a.s, "a", "b", b.advert().s_public) for r in (r7, r8)}
    assert len(seeds) == 2
    assert sa.pair_seed(r7, b.s, "b", "a", a.advert().s_public) in seeds  # both ends derive the same


@pytest.mark.parametrize("bits", [2, 10, 11, 17, 32])
def test_packed_vectors_round_trip_at_their_bit_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    r = rng.integers(0, 1 << bits, 1001, dtype=np.uint64).astype(np.uint32)
    data = sa.pack(r, bits)
    assert len(data) == sa.packed_size(1001, bits) == bits * 126
    assert np.array_equal(sa.unpack(data, 1001, bits), r)
    with pytest.raises(sa.ContractError, match="bytes, not"):
        sa.unpack(data[:-1], 1001, bits)


# --------------------------------------------------------------------------- the integer grid (secure_codec)

SPECS = [("coef_0", (99, 64)), ("intercept_0", (64,)), ("coef_1", (64, 5)), ("intercept_1", (5,))]


def _delta(rng: np.random.Generator, norm: float) -> dict[str, np.ndarray]:
    d = {name: rng.normal(size=shape) * (10.0 if name.startswith("intercept") else 1.0) for name, shape in SPECS}
    total = np.sqrt(sum((v ** 2).sum() for v in d.values()))
    return {k: (v * norm / total).astype(np.float32) for k, v in d.items()}


def test_the_grid_turns_the_sum_of_integers_back_into_the_sum_of_deltas() -> None:
    """Eight deltas (uneven: the intercepts ten times the weights), encoded, added as integers, decoded: the
    sum within a few percent, the integers within the peak."""
    from edge_agent.contract import secure_codec as sc

    rng = np.random.default_rng(1)
    grid = sc.grid_for(SPECS, clip=10.0, seed=7)
    deltas = [_delta(rng, norm) for norm in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)]
    ints = [sc.encode(d, grid, rng) for d in deltas]
    assert sum(held for _, held in ints) < 0.005 * 8 * grid.padded  # past 3x their expected size: rare
    assert all(np.abs(v).max() <= grid.peak for v, _ in ints)
    assert len(ints[0][0]) == grid.padded and grid.padded % sc.BLOCK == 0
    got = sc.decode(np.sum([v for v, _ in ints], axis=0), grid)
    for name, _ in SPECS:
        want = np.sum([d[name] for d in deltas], axis=0)
        assert got[name].shape == want.shape and got[name].dtype == np.float32
    flat = lambda t: np.concatenate([t[n].ravel() for n, _ in SPECS])  # noqa: E731
    want = flat({n: np.sum([d[n] for d in deltas], axis=0) for n, _ in SPECS})
    assert np.linalg.norm(flat(got) - want) / np.linalg.norm(want) < 0.06


def test_the_grid_clips_to_the_round_norm_and_counts_what_it_holds() -> None:
    from edge_agent.contract import secure_codec as sc

    rng = np.random.default_rng(2)
    grid = sc.grid_for(SPECS, clip=1.0)
    big = _delta(rng, 50.0)
    v, _ = sc.encode(big, grid, rng)
    back = sc.decode(v, grid)
    norm = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in back.values()))
    assert 0.9 < norm < 1.1  # clipped to 1, not 50
    spike = {n: np.zeros(s, np.float32) for n, s in SPECS}
    spike["coef_0"][0, 0] = 1.0  # all the norm in one value: the rotation spreads it, a few coordinates held
    _, held = sc.encode(spike, sc.grid_for(SPECS, clip=1.0, spread=0.5), rng)
    assert held > 0
    with pytest.raises(ValueError, match="NaN"):
        sc.encode({**spike, "coef_1": np.full((64, 5), np.nan, np.float32)}, grid, rng)
    with pytest.raises(ValueError, match="values for a grid"):
        sc.encode({n: np.zeros(s) for n, s in SPECS[:2]} | {"coef_1": np.zeros((64, 4)), "intercept_1": np.zeros(5)},
                  grid, rng)


def test_the_rotation_is_the_walsh_hadamard_transform_older_devices_compute() -> None:
    """The transform as two 64 x 64 matrix products is the normalized Walsh-Hadamard transform of 4,096 values
    (the butterflies devices and hubs computed before: a device and a hub of either kind agree), its own inverse."""
    from edge_agent.contract import secure_codec as sc

    def butterflies(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        rows, n = x.shape
        h = 1
        while h < n:
            y = x.reshape(rows, n // (2 * h), 2, h)
            a = y[:, :, 0, :].copy()
            y[:, :, 0, :] += y[:, :, 1, :]
            y[:, :, 1, :] = a - y[:, :, 1, :]
            h *= 2
        return x / np.sqrt(n)

    x = np.random.default_rng(4).normal(size=(3, sc.BLOCK))
    assert np.allclose(sc._fwht(x), butterflies(x), rtol=0, atol=1e-12)
    assert np.allclose(sc._fwht(x.astype(np.float32)), butterflies(x), rtol=0, atol=1e-5)
    assert np.allclose(sc._fwht(sc._fwht(x)), x, rtol=0, atol=1e-12)


def test_stochastic_rounding_keeps_the_mean() -> None:
    """Rounded many times, a delta's mean is the delta: no bias from the grid."""
    from edge_agent.contract import secure_codec as sc

    rng = np.random.default_rng(3)
    grid = sc.grid_for(SPECS, clip=10.0, peak=7)  # a coarse grid: bias would show
    d = _delta(rng, 5.0)
    runs = 400
    total = np.sum([sc.encode(d, grid, rng)[0] for _ in range(runs)], axis=0)
    back = sc.decode(total, grid)
    err = np.sqrt(sum(float(((back[n] / runs - d[n]) ** 2).sum()) for n, _ in SPECS))
    one = sc.decode(sc.encode(d, grid, rng)[0], grid)
    err1 = np.sqrt(sum(float(((one[n] - d[n]) ** 2).sum()) for n, _ in SPECS))
    assert err < err1 / 10  # the error of one rounding shrinks like 1/sqrt(runs): 1/20 here


# --------------------------------------------------------------------------- the wire (secure_rounds)


def test_steps_and_answers_round_trip_and_refuse_what_the_contract_does_not_say() -> None:
    from edge_agent.contract import secure_rounds as sr

    session = _session(["a", "b", "c"])
    secrets = {d: sa.DeviceSecrets(d) for d in session.participants}
    adverts = tuple(s.advert() for s in secrets.values())
    sealed, _ = sa.seal_shares(session, secrets["a"], {a.device_id: a for a in adverts})
    steps = [sr.Step(7, "watch", "b", "share", adverts=adverts),
             sr.Step(7, "watch", "b", "mask", sealed={"a": sealed["b"]}, senders=("a", "b", "c")),
             sr.Step(7, "watch", "b", "reveal", survivors=("a", "b"), dropped=("c",))]
    for step in steps:
        assert sr.decode_step(step.encode(), "b") == step
    with pytest.raises(sa.ContractError, match="topic"):
        sr.decode_step(steps[0].encode(), "c")
    ring = np.arange(10, dtype=np.uint32)
    body = sa.pack(ring, 11) + sa.pack(ring, sr.STATS_BITS)
    answers = [sr.Answer(7, "watch", "a", "advert", advert=adverts[0], sent=1.5),
               sr.Answer(7, "watch", "a", "shares", sealed=sealed, sent=2.0),
               sr.Answer(7, "watch", "a", "masked", size=10, bits=11, stats=10, body=body),
               sr.Answer(7, "watch", "a", "reveal", revealed={"a": ("b", 12345), "c": ("s", 2 ** 520)})]
    for answer in answers:
        payload = answer.encode()
        assert sr.is_answer(payload) and sr.decode_answer(payload, "a") == answer
    back = sr.decode_answer(answers[2].encode())
    assert all(np.array_equal(sa.unpack(v, 10, b), ring) for v, b in zip(back.vectors(), (11, sr.STATS_BITS),
                                                                           strict=True))
    bad = [answers[2].encode()[:-1],  # a vector cut short
           answers[3].encode().replace(b'"3039"', b'"-3039"'),  # a share that is not hex
           sr.Answer(7, "watch", "a", "shares", sealed={"a": sealed["b"]}).encode()]  # shares for itself
    for payload in bad:
        with pytest.raises(sa.ContractError):
            sr.decode_answer(payload)


def test_a_secure_plan_is_signed_with_its_numbers_and_read_back() -> None:
    from dataclasses import replace

    from edge_agent.contract import rounds as cr

    plan = cr.RoundPlan(3, "watch", 1, "0" * 64, "classification", ("a", "b", "c"), 100.0, trainable=("coef_0",),
                        secure=cr.SecureParams(threshold=2, peak=63, spread=3.0, seed=99, bits=10))
    ann = cr.announcement(plan, {"coef_0": np.zeros((2, 2), np.float32)})
    got = cr.decode_announcement(ann.encode())
    assert got.plan.secure == plan.secure and b'"secure"' in got.plan.signing_bytes()
    plain = cr.decode_announcement(cr.announcement(replace(plan, secure=None), ann.weights).encode())
    assert plain.plan.secure is None and b"secure" not in plain.plan.signing_bytes()
    too_high = cr.announcement(replace(plan, secure=replace(plan.secure, threshold=4)), ann.weights).encode()
    with pytest.raises(sa.ContractError, match="threshold"):
        cr.decode_announcement(too_high)


@pytest.mark.parametrize("payload", [
    # found by fuzzing (bench/fuzz.py secure_step / secure_answer): the kind read before the keys were checked
    b'EMLT\x00\x00\x00\x86{"v":1,"round":7,"model":"m","device_id":"d1","steq":"reveal","key_id":null,'
    b'"signature":null,"survivors":["d1","d2"],"dropped":["d3"]}',
    b'EMLS\x00\x00\x00\x68{"v":1,"round":7,"model":"m","device_id":"d1","spep":"masked","sent":1.0,"size":16,'
    b'"stats":16,"bits":10}',
])
def test_a_secure_message_without_its_kind_is_the_contracts_error(payload: bytes) -> None:
    from edge_agent.contract import secure_rounds as sr

    decode = sr.decode_step if payload.startswith(sr.STEP_MAGIC) else sr.decode_answer
    with pytest.raises(sa.ContractError, match="step must be one of"):
        decode(payload)
