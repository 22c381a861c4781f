"""`metrics_port`: an agent's Prometheus metrics, scraped from a real `edge-agent run` process."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.tools.local_broker import free_port
from edge_agent import exits
from tests.helpers import agent_cmd, fleet_files, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_a_live_agent_serves_its_metrics(procs, shared_broker, prefix, tmp_path: Path) -> None:
    _log, model, _ = fleet_files(tmp_path)
    port = free_port()
    agent = procs.popen(
        agent_cmd("run", "--broker", shared_broker.url, "--prefix", prefix, "--device-id", "m-1", "--model", str(model),
                  "--state-dir", str(tmp_path / "state"), "--source", "simulated"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_METRICS_PORT": str(port), "EDGE_AGENT_RECEIPTS": "false",
             "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2"})

    def ready() -> bool:
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        return answers(port) and scrape(port)[("edgeml_agent_windows_total", ())] >= 3

    try:
        wait_for(ready, timeout=60, what="three windows in the agent's metrics")
        m = scrape(port)
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert m[("edgeml_agent_model_version", (("model", "default"),))] == 1
    assert m[("edgeml_agent_readings_total", ())] >= m[("edgeml_agent_windows_total", ())]
    assert m[("edgeml_agent_results_total", ())] == m[("edgeml_agent_windows_total", ())]
    calls = m[("edgeml_agent_inference_seconds_count", ())]
    assert 1 <= calls <= m[("edgeml_agent_windows_total", ())] and m[("edgeml_agent_inference_seconds_sum", ())] > 0
    assert ("edgeml_agent_outbox_results", ()) in m and m[("edgeml_agent_model_swaps_total", ())] == 0
    # the simulated sensor's windows are labelled: kept for federated rounds, none answered yet
    assert 0 < m[("edgeml_agent_labelled_windows", ())] <= m[("edgeml_agent_windows_total", ())]
    assert m[("edgeml_agent_round_updates_total", ())] == 0


def test_a_taken_metrics_port_is_one_line_and_exit_2(shared_broker, prefix, tmp_path: Path) -> None:
    _log, model, _ = fleet_files(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            agent_cmd("run", "--broker", shared_broker.url, "--prefix", prefix, "--device-id", "m-2", "--model",
                      str(model), "--state-dir", str(tmp_path / "state"), "--source", "simulated"),
            capture_output=True, text=True, timeout=60, env={**os.environ, "EDGE_AGENT_METRICS_PORT": str(port)})
    assert res.returncode == exits.USAGE, res.stderr
    assert f"metrics_port {port}: cannot listen on 127.0.0.1" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
