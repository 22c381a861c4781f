"""The agent's own memory (#27 §4): an agent that joins no federated round does not carry the learner
nor the rounds' contract, and one without a config file does not carry the TOML parser.

Each case is a fresh interpreter (this one has imported everything by now): it builds the agent as
``edge-agent replay`` and ``run`` do, without starting it, and says which of the learner's modules it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, sys
from edge_agent.device.agent import Agent
from edge_agent.settings import AgentSettings, load_settings
s = load_settings(AgentSettings, env_prefix="EDGE_AGENT_PROBE", config=None,
                  flags=dict(broker="mqtt://127.0.0.1:9", state_dir=sys.argv[1], device_id=sys.argv[2] or None,
                             federated=sys.argv[3] == "on"))
agent = Agent(s, device_ids=(s.device_id,) if s.device_id else ())
print(json.dumps({"learner": agent.learner is not None,
                  "loaded": sorted(m for m in ("edge_agent.device.learner", "threadpoolctl", "edge_agent.contract.rounds",
                                              "tomllib") if m in sys.modules)}))
agent.outbox.close()
"""


def _agent_modules(state: Path, device_id: str, federated: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(state), device_id, federated],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("device_id", "federated"), [("", "on"), ("d-1", "off")],
                         ids=["replay-of-several-devices", "federated-off"])
def test_an_agent_that_joins_no_round_does_not_import_the_learner(tmp_path: Path, device_id: str,
                                                                  federated: str) -> None:
    out = _agent_modules(tmp_path / "state", device_id, federated)
    assert out == {"learner": False, "loaded": []}


def test_an_agent_that_joins_rounds_has_its_learner(tmp_path: Path) -> None:
    out = _agent_modules(tmp_path / "state", "d-1", "on")
    assert out == {"learner": True, "loaded": ["edge_agent.contract.rounds", "edge_agent.device.learner", "threadpoolctl"]}
