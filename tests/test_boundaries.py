"""The walls between the rooms (ARCHITECTURE.md), checked on the source: the hub imports from the agent
package only what is meant to be shared, the device never imports the hub, and no private-key code
ships to devices. (ruff's banned-api keeps paho inside edge_agent/mqtt.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = {
    "contract": "the wire contract",
    "contract_rounds": "the wire contract of federated rounds (announcements and updates)",
    "preprocess": "the one preprocessing implementation (the hub trains on the agent's features)",
    "sources": "the log reader (and the simulated sensor `cloud-hub sample` writes logs with)",
    "mqtt": "the paho adapter",
    "runner": "the onnxruntime model runner",
    "settings": "one settings loader and the broker settings both sides use",
    "exits": "one exit-code table for both command lines",
    "drift": "the training-feature bins the hub ships and the device measures its drift against",
}


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def test_the_hub_imports_only_the_shared_modules_of_the_agent() -> None:
    offenders = {}
    for path in sorted((ROOT / "cloud_hub").rglob("*.py")):
        agent = {m.split(".")[1] for m in imported_modules(path) if m.startswith("edge_agent.")}
        if agent - set(SHARED):
            offenders[str(path.relative_to(ROOT))] = sorted(agent - set(SHARED))
    assert not offenders, f"the hub reaches into the agent's internals: {offenders}"


def test_the_device_never_imports_the_hub_nor_signs() -> None:
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        modules = imported_modules(path)
        assert not [m for m in modules if m.split(".")[0] == "cloud_hub"], path
        text = path.read_text()
        assert "load_pem_private_key" not in text and "Ed25519PrivateKey" not in text, path
