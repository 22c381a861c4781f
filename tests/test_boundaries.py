"""The walls between the rooms (ARCHITECTURE.md) are import-linter contracts (``.importlinter``), run by
``./dev test``. These tests check that the contracts hold here, and that each one breaks when its wall
is crossed (a contract that cannot fail guards nothing). No private-key code ships to devices."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.lint_contracts import private_imports

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")

# One crossing per contract: (file, line added, the contract's name as .importlinter spells it).
CROSSINGS = [
    ("edge_agent/device/outbox.py", "from cloud_hub import settings as _hub", "The device never imports the hub"),
    ("cloud_hub/data/store.py", "from edge_agent.device import outbox as _outbox",
     "The hub imports only the agent's shared rooms"),
    ("cloud_hub/data/tables.py", "from cloud_hub.rollout import canary as _canary", "The hub's rooms, top to bottom"),
    ("edge_agent/contract/wire.py", "from edge_agent import runner as _runner", "The agent: the device on top"),
    ("cloud_hub/rounds/fedavg.py", "from cloud_hub.rounds import coordinator as _coordinator",
     "No import cycles between the modules"),
    ("cloud_hub/data/aggregate.py", "import paho.mqtt.client as _paho", "paho is wrapped once"),
    ("cloud_hub/data/aggregate.py", "import onnxruntime as _ort", "onnxruntime's inference sessions"),
    ("cloud_hub/cli/rounds.py", "from cloud_hub.cli.data import _num", "No module imports another module's private"),
]


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", "PYTHONPATH": str(cwd)})


def test_the_import_contracts_hold() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_each_import_contract_breaks_when_its_wall_is_crossed(tmp_path: Path) -> None:
    for name in ("edge_agent", "cloud_hub"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "__init__.py", tmp_path / "tests")
    shutil.copy(ROOT / "tests" / "lint_contracts.py", tmp_path / "tests")
    shutil.copy(ROOT / ".importlinter", tmp_path)
    for rel, line, _ in CROSSINGS:
        path = tmp_path / rel
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    res = lint(tmp_path)
    assert res.returncode != 0
    out = " ".join(res.stdout.split())
    assert f"{len(CROSSINGS)} broken" in out, out[-3000:]
    for _, _, contract in CROSSINGS:
        assert f"{contract}" in out.split("Broken contracts")[1], contract


def test_private_names_are_found_wherever_they_are_imported() -> None:
    source = ("from cloud_hub.x import a, _b\n"
              "def f():\n    from edge_agent.y import (\n        c,\n        _d,\n    )\n"
              "from cloud_hub import __version__\nfrom numpy import _e\nfrom . import _f\n")
    assert private_imports(source, "cloud_hub.z", ("cloud_hub", "edge_agent")) == [
        (1, "cloud_hub.x", "_b"), (3, "edge_agent.y", "_d")]


def test_no_private_key_code_on_the_device() -> None:
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        text = path.read_text()
        assert "load_pem_private_key" not in text and "Ed25519PrivateKey" not in text, path
