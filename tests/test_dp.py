"""Differential privacy of federated rounds: the device's noise and rounding, the hub's accountant and budget, a
central round's noise and ranges, and a distributed round's sum (in process; the real-process round with a device
killed after masking is in tests/test_secure_rounds.py)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import orjson
import pytest
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import sessions
from cloud_hub.data.store import Store
from cloud_hub.models import weights
from cloud_hub.rounds import fedavg, privacy
from cloud_hub.rounds.config import FederateConfig
from cloud_hub.rounds.finish import finish
from cloud_hub.rounds.store import RoundStore
from edge_agent import exits
from edge_agent.contract import ContractError, decode_bundle, secagg, secure_codec
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract.privacy import (
    DpParams,
    conditional_round,
    discrete_gaussian,
    rounding_bound,
    sum_limit,
)
from edge_agent.contract.secure_rounds import secure_grid
from tests.helpers import offline_coordinator
from tests.test_federate_aggregate import _update
from tests.test_secure_rounds import TENSORS, Network, _deltas, _stats


@pytest.mark.parametrize("sigma", [0.7, 3.5, 40.0])
def test_the_discrete_gaussian_has_its_variance_and_its_shape(sigma: float) -> None:
    x = discrete_gaussian(sigma, 200_000, np.random.default_rng(1))
    assert x.dtype == np.int64
    # the discrete Gaussian's own variance (a sum over the integers), not sigma^2 exactly at small sigma
    k = np.arange(-int(20 * sigma) - 5, int(20 * sigma) + 6)
    p = np.exp(-(k.astype(float) ** 2) / (2 * sigma * sigma))
    p /= p.sum()
    var = float(np.sum(p * k * k))
    assert abs(float(x.mean())) < 4 * math.sqrt(var / x.size)
    assert float(x.var()) == pytest.approx(var, rel=0.02)
    for v in (0, 1, -1, round(sigma)):  # the mass at a few points, within 5 standard errors
        want = float(p[k == v][0])
        assert abs(float(np.mean(x == v)) - want) < 5 * math.sqrt(want * (1 - want) / x.size) + 1e-4, v


def test_conditional_rounding_is_unbiased_and_keeps_the_bound() -> None:
    rng = np.random.default_rng(2)
    d = 4096
    w = rng.normal(0, 1, d)
    w *= 30.0 / np.linalg.norm(w)  # norm 30 grid steps
    bound = rounding_bound(30.0, d)
    draws = np.stack([conditional_round(w, bound, rng) for _ in range(300)])
    assert float(np.sqrt((draws.astype(float) ** 2).sum(axis=1)).max()) <= bound
    assert np.abs(draws.mean(axis=0) - w).max() < 0.2  # each coordinate's mean: its value
    assert set(np.unique(draws - np.floor(w)).tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="no rounding within the L2 bound"):
        conditional_round(w * 3, bound, rng)


def test_the_accountant_is_dp_accounting_and_the_calibration_spends_the_target() -> None:
    # rho-zCDP of a Gaussian of noise z: the same epsilon as dp-accounting's own Gaussian event
    for z in (0.8, 2.0, 7.0):
        gauss = RdpAccountant()
        gauss.compose(dp_accounting.GaussianDpEvent(z), 10)
        assert privacy.epsilon(10 * privacy.central_rho(z), 1e-5) == pytest.approx(gauss.get_epsilon(1e-5), rel=1e-6)
    for target in (1.0, 4.0, 8.0):
        rho = privacy.rho_for(target, 1e-5)
        assert privacy.epsilon(rho, 1e-5) == pytest.approx(target, rel=1e-6)
        assert privacy.epsilon(rho * 1.01, 1e-5) > target
    # a distributed round of n devices each with sigma: the sum's noise is sigma sqrt(n)
    assert privacy.distributed_rho(100.0, 50.0, 4, 8192) == pytest.approx(100.0 ** 2 / (4 * 50.0 ** 2) / 2)


def test_the_budget_calibrates_the_noise_and_stops_at_the_target() -> None:
    budget = privacy.Budget(None, 4.0, 1e-5, rounds=5)
    before = (0.0, 0, 0)
    spent = []
    for _ in range(5):
        _secure, dp = budget.plan(before, None, [("coef_0", (4, 3))], 1.0, 8)
        assert dp.mode == "central"
        spent.append(privacy.central_rho(dp.noise))
        before = (before[0] + spent[-1], before[1] + 1, 0)
    assert privacy.epsilon(sum(spent), 1e-5) == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(privacy.BudgetSpent, match=r"privacy budget: epsilon 4 \(delta 1e-05\) spent in 5 round"):
        budget.plan(before, None, [("coef_0", (4, 3))], 1.0, 8)
    # a given noise (--dp-noise) on a spent budget: stopped before the round's shape is known (before waiting
    # for devices)
    with pytest.raises(privacy.BudgetSpent, match="of a target 1: no more rounds"):
        privacy.Budget(2.0, 1.0, 1e-5, rounds=1).check((privacy.rho_for(1.0, 1e-5), 9, 0))
    # a new federate on the spent budget: what is left (rounding's crumbs) would take a noise past what devices
    # accept; it opened a round at noise x4.75e7 that every device refused
    for left in (0.0, 1e-12, 1e-15):
        with pytest.raises(privacy.BudgetSpent, match="of a target 4: no more rounds"):
            privacy.Budget(None, 4.0, 1e-5, rounds=5).plan(
                (privacy.rho_for(4.0, 1e-5) - left, 5, 0), None, [("coef_0", (4, 3))], 1.0, 8)
    # a given noise: rounds open until the next would pass the target
    fixed = privacy.Budget(2.0, 1.0, 1e-5, rounds=100)
    before, n = (0.0, 0, 0), 0
    while True:
        try:
            fixed.plan(before, None, [("coef_0", (4, 3))], 1.0, 8)
        except privacy.BudgetSpent:
            break
        before, n = (before[0] + privacy.central_rho(2.0), n + 1, 0), n + 1
    assert privacy.epsilon(n * privacy.central_rho(2.0), 1e-5) <= 1.0 < privacy.epsilon((n + 1) * privacy.central_rho(2.0), 1e-5)


def test_a_distributed_plan_widens_the_ring_and_the_contract_checks_it() -> None:
    secure = cr.SecureParams(threshold=3, peak=63, spread=3.0, seed=5, bits=secagg.ring_bits(5, 63))
    specs = [(k, s) for k, s in TENSORS.items()]
    wider, dp = privacy.Budget(1.5, None, 1e-5, rounds=1).plan((0.0, 0, 0), secure, specs, 5.0, 5)
    assert wider is not None and dp.mode == "distributed"
    grid = secure_codec.grid_for(specs, 5.0, peak=63, spread=3.0, seed=5)
    assert dp.bound == pytest.approx(grid.dp_bound()) and dp.bound >= 5.0 / grid.step
    assert dp.sigma == pytest.approx(1.5 * dp.bound / math.sqrt(3))  # the threshold's sum has noise 1.5 x bound
    assert (1 << (wider.bits - 1)) > sum_limit(5, 63, dp.sigma) and wider.bits > secure.bits
    # at the threshold's sum (the least noise it may have) the round spends what noise x1.5 spends
    assert privacy.distributed_rho(dp.bound, dp.sigma, 3, grid.padded) == pytest.approx(privacy.central_rho(1.5))
    now = 1e9
    plan = cr.RoundPlan(1, "m", 1, "a" * 64, "classification", ("a", "b", "c", "d", "e"), now + 30, clip=5.0,
                        trainable=tuple(TENSORS), created=now, secure=wider, dp=dp)
    ann = cr.announcement(plan, {k: np.zeros(s, np.float32) for k, s in TENSORS.items()})
    assert cr.decode_announcement(ann.encode()).plan.dp == dp
    import dataclasses

    plain = dataclasses.replace(ann, plan=dataclasses.replace(ann.plan, secure=None))
    with pytest.raises(ContractError, match="distributed noise with secure aggregation only"):
        cr.decode_announcement(plain.encode())
    bad = dataclasses.replace(ann, plan=dataclasses.replace(ann.plan, dp=DpParams("distributed", 1.0, 1e-5, 0.0, 9.0)))
    with pytest.raises(ContractError, match="positive sigma and bound"):
        cr.decode_announcement(bad.encode())


def _dp_network(tmp_path, monkeypatch, devices: list[str], threshold: int) -> tuple[Network, DpParams]:
    """The in-process secure round of tests/test_secure_rounds.py, its plan with distributed DP (noise x1.0)."""
    import dataclasses

    import tests.test_secure_rounds as sr

    n = len(devices)
    secure = cr.SecureParams(threshold=threshold, peak=63, spread=3.0, seed=11, bits=secagg.ring_bits(n, 63))
    wider, dp = privacy.Budget(1.0, None, 1e-5, rounds=1).plan((0.0, 0, 0), secure, list(TENSORS.items()), 5.0, n)
    original = sr._plan

    def plan_with_dp(devs, deadline_s=30.0):
        ann, now = original(devs, deadline_s)
        return dataclasses.replace(ann, plan=dataclasses.replace(ann.plan, secure=wider, dp=dp)), now

    monkeypatch.setattr(sr, "_plan", plan_with_dp)
    net = Network(tmp_path, devices)
    for a in net.devices.values():
        a.advertise()
    return net, dp


def test_a_distributed_round_sums_noised_vectors_and_the_hub_sees_no_measurement(tmp_path, monkeypatch) -> None:
    """Six devices, one stops after masking: the hub's sum is the survivors' noised vectors, bit for bit; the noise in
    it has the planned size; the statistics the devices measured never leave them (zeros summed)."""
    devices = [f"d{i}" for i in range(6)]
    net, dp = _dp_network(tmp_path, monkeypatch, devices, threshold=4)
    net.deaf = {"d2": "reveal"}
    noised, noise = {}, {}
    for i, d in enumerate(devices):
        stats, ranges = _stats(i)
        big = {k: v * 100 for k, v in _deltas([d], seed=i)[d].items()}  # past the clip: clipped to it
        net.devices[d].trained(big, stats, ranges)
        noised[d], noise[d] = net.devices[d].vectors[0], net.devices[d].noise  # type: ignore[index]
    hub = net.hub()
    hub.collect()
    got = hub.unmask()
    assert got.survivors == devices and got.revealed_by == [d for d in devices if d != "d2"]
    total = np.sum(list(noised.values()), axis=0)
    want = secure_codec.decode(total, secure_grid(net.ann.plan))
    assert all(np.array_equal(got.delta[k], (want[k] / 6).astype(np.float32)) for k in TENSORS)
    noise_sum = np.sum(list(noise.values()), axis=0)
    assert float(noise_sum.std()) == pytest.approx(dp.sigma * math.sqrt(6), rel=0.05)
    for d in devices:  # conditional rounding: each device's vector within the bound the accountant uses
        norm = float(np.linalg.norm((noised[d] - noise[d]).astype(float)))
        assert 0.97 * dp.bound < norm <= dp.bound, (d, norm, dp.bound)
    assert got.stats["n_examples"] == 0 and got.stats["loss_before"] == 0 and np.all(np.asarray(got.ranges) == 0)


def test_a_sum_refused_after_unmasking_is_still_charged(tmp_path, monkeypatch) -> None:
    """A device that sends values off the grid makes the hub refuse the sum, but only after it has learned it:
    the failure carries the sum's size, so the round's privacy is counted (the coordinator's _finish)."""
    from cloud_hub.rounds.secure import SecureRoundFailed

    devices = [f"d{i}" for i in range(4)]
    net, dp = _dp_network(tmp_path, monkeypatch, devices, threshold=3)
    for i, d in enumerate(devices):
        stats, ranges = _stats(i)
        net.devices[d].trained(_deltas([d], seed=i)[d], stats, ranges)
    bad = net.devices["d0"]  # masks once the peers' shares are in: its vector pushed past the noise's tail first
    assert bad.vectors is not None and "masked" not in bad.done
    ints, stat_ints = bad.vectors
    bad.vectors = (ints + sum_limit(4, 63, dp.sigma) * 2, stat_ints)
    hub = net.hub()
    hub.collect()
    with pytest.raises(SecureRoundFailed, match="leaves the grid") as failed:
        hub.unmask()
    assert failed.value.summed == (4, secure_grid(net.ann.plan).padded)


def test_a_central_round_weighs_alike_adds_its_noise_keeps_the_base_ranges_and_states_its_epsilon(
        tmp_path, monkeypatch, shared_broker) -> None:
    cfg = FederateConfig(clip=0.5, target_epsilon=3.0, rounds=2, max_staleness=1)
    coordinator, engine, url = offline_coordinator(tmp_path, monkeypatch, cfg, ("a", "b", "c", "d"))
    store = Store(engine)
    rounds_done = []
    for _ in range(2):
        r = coordinator._open()
        dp = DpParams.from_obj(r.plan["dp"])
        assert dp.mode == "central" and r.plan["max_staleness"] == 0  # a late update would count a device twice
        with engine.connect() as conn:
            base = fedavg.mlp_tensors(weights.from_bytes(store.get_weights(conn, "default", 1)))
        # updates of 0.001 per weight, example counts 10 (all alike under dp: FedAvg would weigh by them)
        counted = [(d, 0, _update(r, d, base, 0.001)) for d in ("a", "b", "c", "d")]
        spent = coordinator._privacy(r, None, counted)
        state, version, outcome, _ = finish(engine, coordinator.s, r, counted, signing_key=None, allow_unsigned=True,
                                            evaluate=lambda *_: None, privacy=spent)
        assert state == "rejected" and version is not None
        with sessions.transaction(engine) as conn:
            RoundStore().set_round(conn, r.id, state=state, expect=("open",), new_version=version,
                                   outcome=outcome | {"privacy": spent}, reason="test")
        rounds_done.append((r, version, spent))
    r, version, spent = rounds_done[-1]
    assert spent["rounds"] == 2 and spent["epsilon_total"] == pytest.approx(3.0, rel=1e-3)
    assert spent["epsilon"] == pytest.approx(privacy.epsilon(privacy.central_rho(dp.noise), 1e-5), rel=1e-3)
    with engine.connect() as conn:
        new = fedavg.mlp_tensors(weights.from_bytes(store.get_weights(conn, "default", version)))
        row = store.get_model(conn, "default", version)
        base_row = store.get_model(conn, "default", 1)
    assert row is not None and base_row is not None
    assert row.manifest["training"]["privacy"]["epsilon_total"] == spent["epsilon_total"]
    # what the devices measured (example counts, losses, scores) is not noised: never released
    assert row.manifest["metrics"]["federated"] == {"round": r.id} and outcome["federated"] == {}
    # the noise comes from the round's own seed: a finish resumed after a crash draws the same noise
    assert "dp_seed" in r.plan
    from cloud_hub.rounds import finish as finish_module

    with engine.connect() as conn:
        blob1 = store.get_weights(conn, "default", 1)
    updates = [(cu.decode_update(p), s) for _d, s, p in counted]
    once, again = (finish_module._aggregate(r, updates, blob1, base_row.manifest, [base_row],
                                            decode_bundle(base_row.bundle).model).tensors for _ in range(2))
    assert all(np.array_equal(once[k], again[k]) for k in r.plan["trainable"])
    noise = np.concatenate([(new[k] - base[k] - np.float32(0.001)).ravel() for k in r.plan["trainable"]])
    assert float(noise.std()) == pytest.approx(dp.noise * 0.5 / 4, rel=0.1)  # noise x clip on the sum of 4
    # the INT8 model's activation ranges are the base's, not the devices' (theirs say [0, 1] everywhere)
    base_ranges = fedavg.ranges_of(decode_bundle(base_row.bundle).model)
    new_ranges = fedavg.ranges_of(decode_bundle(row.bundle).model)
    assert np.allclose(new_ranges, base_ranges, rtol=1e-3, atol=1e-4)
    assert not np.allclose(np.asarray(new_ranges)[:, :2], [[0.0, 1.0]] * len(new_ranges), atol=1e-3)
    # the budget is spent: the next round does not open
    with pytest.raises(privacy.BudgetSpent, match="of a target 3: no more rounds"):
        coordinator._open()
    res = CliRunner().invoke(hub_app, ["rounds", "--db", url, "--json"])
    views = orjson.loads(res.stdout.strip().splitlines()[-1])["rounds"]
    assert [(v["dp"], v["epsilon_total"]) for v in views] == [("central", rounds_done[0][2]["epsilon_total"]),
                                                            ("central", spent["epsilon_total"])]
    table = CliRunner().invoke(hub_app, ["rounds", "--db", url], env={"COLUMNS": "220"}).stdout
    assert f"{spent['epsilon']:.3g} / {spent['epsilon_total']:.3g}" in table, table
    # `federate` on the spent budget says so, and not "no federated round yet" (two rounds are there)
    res = CliRunner().invoke(hub_app, ["federate", "--db", url, "--insecure-unsigned", "--target-epsilon", "3",
                                       "--broker", shared_broker.url, "--prefix", f"dp-{tmp_path.name[-6:]}",
                                       "--wait-devices", "0"])
    assert res.exit_code == 0, res.output
    assert "of a target 3: no more rounds" in res.output and "no round of default ran this time" in res.output, res.output
    assert "no federated round of default yet" not in res.output, res.output
    engine.dispose()


def test_federate_refuses_dp_with_a_rule_of_no_stated_sensitivity(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    res = CliRunner().invoke(hub_app, ["federate", "--db", url, "--insecure-unsigned", "--aggregate", "trimmed-mean",
                                       "--target-epsilon", "4"])
    assert res.exit_code == exits.USAGE and "needs fedavg" in res.output


def test_a_central_round_gives_every_update_the_same_weight(tmp_path, monkeypatch) -> None:
    """FedAvg weighs an update by its example count, which would let one device's data count for more than the
    clip: under dp every update weighs the same (noise tiny here, so the mean shows)."""
    import dataclasses

    coordinator, engine, _ = offline_coordinator(tmp_path, monkeypatch, FederateConfig(clip=1.0, dp_noise=1e-6),
                                                 ("a", "b"))
    r = coordinator._open()
    store = Store(engine)
    with engine.connect() as conn:
        base = fedavg.mlp_tensors(weights.from_bytes(store.get_weights(conn, "default", 1)))

    def update(device: str, value: float, n_examples: int) -> bytes:
        u = cu.decode_update(_update(r, device, base, value))
        return dataclasses.replace(u, n_examples=n_examples).encode()

    counted = [("a", 0, update("a", 0.001, 10)), ("b", 0, update("b", 0.003, 90))]
    _state, version, _outcome, _ = finish(engine, coordinator.s, r, counted, signing_key=None, allow_unsigned=True,
                                          evaluate=lambda *_: None, privacy=coordinator._privacy(r, None, counted))
    with engine.connect() as conn:
        new = fedavg.mlp_tensors(weights.from_bytes(store.get_weights(conn, "default", version)))
    for name in r.plan["trainable"]:  # (0.001 + 0.003) / 2, not FedAvg's (10 x 0.001 + 90 x 0.003) / 100
        np.testing.assert_allclose(new[name], base[name] + np.float32(0.002), rtol=0, atol=2e-5)
    engine.dispose()
