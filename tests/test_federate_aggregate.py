"""`cloud-hub federate --aggregate`: the rule a round is opened with is stored in its plan (the hub's part,
beside its gate), a closed round is aggregated by it (also when a later coordinator finishes it), and
`cloud-hub rounds` shows it. A round opened before plans named a rule reads as FedAvg."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import orjson
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from cloud_hub.data import db, sessions
from cloud_hub.data.store import Store
from cloud_hub.models import weights
from cloud_hub.rounds import fedavg
from cloud_hub.rounds.config import FederateConfig
from cloud_hub.rounds.finish import finish
from cloud_hub.rounds.store import RoundRow, RoundStore
from edge_agent import exits
from edge_agent.contract import round_updates as cu
from tests.helpers import offline_coordinator


def test_federate_passes_aggregate_to_its_config_and_refuses_an_unknown_rule(tmp_path, monkeypatch) -> None:
    from cloud_hub.cli import rounds as cli_rounds

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    ran: list[FederateConfig] = []

    def federate(_s, cfg, **_kw):  # what `federate` runs once its options are checked
        ran.append(cfg)
        return engine, []

    monkeypatch.setattr(cli_rounds, "_federate", federate)
    base = ["federate", "--db", url, "--insecure-unsigned"]
    assert CliRunner().invoke(hub_app, base).exit_code == 0
    for rule in ("trimmed-mean", "centered-clip"):  # the first robust rule stays for the plans that name it
        assert CliRunner().invoke(hub_app, [*base, "--aggregate", rule]).exit_code == 0
    assert [c.aggregate for c in ran] == ["fedavg", "trimmed-mean", "centered-clip"]
    res = CliRunner().invoke(hub_app, [*base, "--aggregate", "median"])
    assert res.exit_code == exits.USAGE and "--aggregate must be one of fedavg, trimmed-mean" in res.output
    res = CliRunner().invoke(hub_app, [*base, "--aggregate", "centered-clip", "--secure"])
    assert res.exit_code != 0 and "--secure hides" in res.output
    assert len(ran) == 3, "an unknown rule, or a robust one with --secure, runs no round"
    engine.dispose()


def _update(r: RoundRow, device: str, tensors: dict, value: float) -> bytes:
    """An update whose delta is ``value`` in every trained weight (exact in INT8: one step of its scale)."""
    trainable = r.plan["trainable"]
    specs, arrays = cu.encode_update_delta({k: np.full_like(tensors[k], value) for k in trainable}, "int8")
    return cu.Update(r.id, device, "default", 1, 10, 1.0, 1.0, 0.5, 0.5, 0.0, 1, 0.1,
                     ((0.0, 1.0, 0.0, 1.0),) * (len(trainable) // 2), "int8", specs, arrays).encode()


def test_the_rule_is_stored_with_the_round_used_to_finish_it_and_shown(tmp_path, monkeypatch) -> None:
    coordinator, engine, url = offline_coordinator(
        tmp_path, monkeypatch, FederateConfig(aggregate="trimmed-mean", clip=1000.0), ("a", "b", "c"))
    r = coordinator._open()
    assert r.plan["aggregate"] == "trimmed-mean" and r.plan["tolerance"] == 0.0  # beside the round's gate
    with engine.connect() as conn:
        base = fedavg.mlp_tensors(weights.from_bytes(Store(engine).get_weights(conn, "default", 1)))
    # two devices step by 0.01 and 0.02, the third by 25x more
    counted = [(d, 0, _update(r, d, base, v)) for d, v in (("a", 0.01), ("b", 0.02), ("c", 0.5))]

    def finished(row: RoundRow) -> dict[str, np.ndarray]:
        state, version, _, _ = finish(engine, None, row, counted, signing_key=None,  # type: ignore[arg-type]
                                      allow_unsigned=True, evaluate=lambda *_: None)
        assert state == "rejected"  # no device evaluated it: registered, never published
        with engine.connect() as conn:
            return fedavg.mlp_tensors(weights.from_bytes(Store(engine).get_weights(conn, "default", version)))

    robust = finished(r)
    old_plan = {k: v for k, v in r.plan.items() if k != "aggregate"}  # as rounds were stored before the rule
    legacy = finished(dataclasses.replace(r, id=2, plan=old_plan))
    for name in r.plan["trainable"]:
        np.testing.assert_allclose(robust[name], base[name] + np.float32(0.02), rtol=0, atol=1e-6)  # median of 3
        np.testing.assert_allclose(legacy[name], base[name] + np.float32(0.53 / 3), rtol=0, atol=1e-6)  # FedAvg

    with sessions.transaction(engine) as conn:
        RoundStore().add_round(conn, round_id=2, name="default", base_version=1, participants=["a"], plan=old_plan,
                               announcement=b"x", opened_at=time.time(), deadline=time.time())
    res = CliRunner().invoke(hub_app, ["rounds", "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    views = orjson.loads(res.stdout.strip().splitlines()[-1])["rounds"]
    assert [(v["round"], v["aggregate"]) for v in views] == [(1, "trimmed-mean"), (2, "fedavg")]
    res = CliRunner().invoke(hub_app, ["rounds", "--db", url], env={"COLUMNS": "200"})
    rows = [line for line in res.stdout.splitlines() if line.lstrip("│ ").startswith(("1 ", "2 "))]
    assert len(rows) == 2 and "trimmed-mean" in rows[0] and "fedavg" in rows[1], res.stdout
    engine.dispose()
