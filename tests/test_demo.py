"""The README's main command: `cloud-hub demo` runs the whole mission and exits 0 (generated data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cloud_hub.broker import port_open


@pytest.mark.slow
def test_demo_runs_end_to_end_on_generated_data(tmp_path) -> None:
    env = {**os.environ, "EDGEML_DEMO_DATA": str(tmp_path / "none.csv"), "COLUMNS": "160"}
    res = subprocess.run([sys.executable, "-m", "cloud_hub", "demo", "--agents", "2", "--speed", "24",
                          "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "generated sensor log" in out and "published v1" in out and "published v2" in out
    assert "final stats per device" in out and "results stored exactly once" in out
    assert "model v2: published (on the model topic)" in out and "devices running it: 2" in out
    port = int(re.search(r"private mosquitto on mqtt://127\.0\.0\.1:(\d+)", out).group(1))
    assert not port_open("127.0.0.1", port), "the demo stopped the broker it started"
