"""The installed console scripts start and list their commands (the README's promise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("script", "commands"), [
    ("edge-agent", ("replay", "run")),
    ("cloud-hub", ("serve", "stats", "devices", "train", "retrain", "keygen", "publish", "models", "demo")),
])
def test_console_script_help(script: str, commands: tuple[str, ...]) -> None:
    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"{script} is not installed next to {sys.executable}"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    for command in commands:
        assert command in res.stdout


@pytest.mark.slow
def test_the_wheel_carries_the_broker_config_and_the_migrations(tmp_path: Path) -> None:
    """An installed hub starts its brokers from the project's mosquitto.conf (never mosquitto's
    defaults, which drop QoS 1 messages) and upgrades databases with the migrations it ships."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("edgeml_mqtt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        conf = z.read("cloud_hub/tools/mosquitto.conf").decode()
    assert conf == (root / "mosquitto.conf").read_text()
    assert "max_queued_messages 10000000" in conf
    assert {"cloud_hub/data/migrations/env.py", "cloud_hub/data/migrations/script.py.mako",
            "cloud_hub/data/migrations/versions/0001_baseline.py"} <= names


def test_a_missing_broker_config_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    from cloud_hub.tools.local_broker import BrokerError, LocalBroker

    with pytest.raises(BrokerError, match="cannot be read"):
        LocalBroker(tmp_path, base_config=tmp_path / "nosuch.conf")
