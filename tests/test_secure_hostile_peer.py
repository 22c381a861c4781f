"""A hostile peer in a real secure round: it garbles the shares it seals for one honest peer.

Four real `edge-agent run` agents and a fifth device, the hostile one, that is the same agent started by this
test with its shares answer tampered with before it is published (no hook in the project's code)."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import tables
from cloud_hub.models import weights
from cloud_hub.rounds.fedavg import mlp_tensors
from edge_agent.contract import rounds as cr
from edge_agent.contract import secure_codec
from edge_agent.contract.secure_rounds import secure_grid
from tests import test_federated
from tests.test_federated import Fleet, _devices, _query

HONEST, HOSTILE, VICTIM = ("sa-1", "sa-2", "sa-3", "sa-4"), "sa-5", "sa-2"

# the hostile agent: `edge-agent run`, whose shares answer flips a byte of the shares it sealed for VICTIM
HOSTILE_AGENT = f"""
import runpy, sys
from edge_agent.device import secure
answer = secure.SecureAnswerer._answer
def garbled(self, step, **fields):
    if step == "shares":
        sealed = dict(fields["sealed"])
        sealed[{VICTIM!r}] = bytes([sealed[{VICTIM!r}][0] ^ 1]) + sealed[{VICTIM!r}][1:]
        fields["sealed"] = sealed
    return answer(self, step, **fields)
secure.SecureAnswerer._answer = garbled
sys.argv = ["edge-agent", *sys.argv[1:]]
runpy.run_module("edge_agent", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_secure_round_leaves_out_a_peer_that_garbles_the_shares_it_seals(procs, broker, prefix, tmp_path,
                                                                            monkeypatch) -> None:
    """sa-5 seals shares for sa-2 that do not open. sa-2 masks all the same and names sa-5; the hub leaves sa-5
    out of the sum (its mask key rebuilt from the three other survivors), says who named whom, and publishes
    base + the mean of the four honest deltas, bit for bit their sum (their audit copies)."""
    honest_cmd = test_federated.agent_cmd

    def agent_cmd(*args: str) -> list[str]:
        if args[args.index("--device-id") + 1] == HOSTILE:
            return [sys.executable, "-c", HOSTILE_AGENT, *args]
        return honest_cmd(*args)

    monkeypatch.setattr(test_federated, "agent_cmd", agent_cmd)
    fleet = Fleet(procs, broker, prefix, tmp_path, devices=(*HONEST, HOSTILE),
                  agent_env={"EDGE_AGENT_SECURE_AUDIT": "1"})
    fed = fleet.federate("--secure", "--rounds", "1", "--deadline", "120", "--tolerance", "1")
    assert fed.wait(300) == 0, (tmp_path / "federate.log").read_text()
    out = (tmp_path / "federate.log").read_text()
    assert f"{VICTIM} says the shares {HOSTILE} sealed for it do not open: {HOSTILE} left out of the sum" in out, out
    assert f"summed ({', '.join(HONEST)}), 1 left out ({HOSTILE}: its shares did not open for {VICTIM})" in out, out

    r = subprocess.run([sys.executable, "-m", "cloud_hub", "rounds", "--db", fleet.url, "--json"],
                       capture_output=True, text=True, check=True)
    (view,) = orjson.loads(r.stdout)["rounds"]
    assert (view["state"], view["secure"], view["summed"], view["masked"]) == ("published", True, 4, 5), view
    assert view["dropped"] == [HOSTILE] and view["unopened"] == {VICTIM: [HOSTILE]}, view

    # the sum is the honest survivors' audit copies, bit for bit; the model is the base plus their mean
    plain = {}
    for d in HONEST:
        (copy,) = (tmp_path / d).glob("secure-*.npz")
        with np.load(copy) as z:
            plain[d] = z["delta"].astype(np.int64)
    total = np.sum(list(plain.values()), axis=0)
    fr, m = tables.fl_rounds.c, tables.models.c
    outcome = orjson.loads(_query(fleet.url, sa.select(fr.outcome).where(fr.id == 1))[0][0])
    assert outcome["sum_sha256"] == hashlib.sha256(total.astype("<i8").tobytes()).hexdigest()
    assert outcome["survivors"] == list(HONEST) and outcome["unopened"] == {VICTIM: [HOSTILE]}
    blobs = dict(_query(fleet.url, sa.select(m.version, m.weights)))
    base, new = mlp_tensors(weights.from_bytes(blobs[1])), mlp_tensors(weights.from_bytes(blobs[2]))
    ann = cr.decode_announcement(_query(fleet.url, sa.select(fr.announcement).where(fr.id == 1))[0][0])
    mean = secure_codec.decode(total, secure_grid(ann.plan))
    for name in ann.plan.trainable:
        assert np.allclose(new[name], base[name] + mean[name] / len(HONEST), atol=1e-5), name
    fleet.check(lambda: all(_devices(fleet.url).get(d) == 2 for d in HONEST), "the honest devices on v2")
    fleet.stop()
