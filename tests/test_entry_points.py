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
