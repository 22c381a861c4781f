"""`cloud-hub serve --http`: Prometheus metrics of a real hub process, fed by a real agent replay."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.data import db, sessions
from cloud_hub.tools.local_broker import LocalBroker, free_port
from edge_agent import exits
from tests.helpers import agent_cmd, fleet_files, wait_for
from tests.test_hub_cli import ServeProcess, count_rows, invoke


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_metrics_of_a_replay_agree_with_the_database(procs, broker: LocalBroker, prefix: str,
                                                     tmp_path: Path) -> None:
    log, model, keys = fleet_files(tmp_path)
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    port = free_port()
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve.log", env={"CLOUD_HUB_HTTP": f"127.0.0.1:{port}"})
    hub.wait_started()
    wait_for(lambda: answers(port), what="/metrics")
    before = scrape(port)
    assert before[("edgeml_hub_results_stored_total", ())] == 0
    replay = procs.popen(agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix",
                                   prefix, "--state-dir", str(tmp_path / "agent"), "--speed", "20"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: scrape(port)[("edgeml_hub_results_stored_total", ())] > 0, what="results while replaying")
    during = scrape(port)
    assert replay.wait(120) == 0, replay.stderr.read() if replay.stderr else ""
    wait_for(lambda: scrape(port)[("edgeml_devices", (("state", "offline"),))] == 3, what="the agent's last status")
    after = scrape(port)

    stored = count_rows(url)
    assert stored == len(keys)  # what the table says, and `cloud-hub stats`:
    code, out, err = invoke("stats", "--db", url, "--json")
    assert code == 0, err
    stats = orjson.loads(out)
    assert stats["results"] == stored and stats["dead_letters"] == after[("edgeml_hub_dead_letters_total", ())]
    assert {d: s["results"] for d, s in stats["devices"].items()} == {
        d: sum(1 for dd, _ in keys if dd == d) for d in ("dev-a", "dev-b", "dev-c")}
    assert after[("edgeml_hub_results_stored_total", ())] == stored
    assert during[("edgeml_hub_results_stored_total", ())] <= stored
    assert after[("edgeml_hub_results_duplicate_total", ())] == 0
    assert after[("edgeml_hub_dead_letters_total", ())] == 0
    assert after[("edgeml_hub_receipts_sent_total", ())] >= 3  # each device got at least one receipt
    transactions = after[("edgeml_hub_transactions_total", ())]
    assert transactions >= 1 and after[("edgeml_hub_commit_seconds_count", ())] == transactions
    assert after[("edgeml_hub_commit_seconds_sum", ())] > 0
    assert after[("edgeml_devices", (("state", "online"),))] == 0
    with sessions.transaction(db.make_engine(url), write=False) as conn:
        versions = {int(v) for (v,) in conn.exec_driver_sql("SELECT model_version FROM devices")}
    assert versions == {1}
    assert after[("edgeml_devices_by_model", (("model", "default"), ("state", "offline"), ("version", "1")))] == 3
    assert after[("edgeml_device_outbox_results", ())] == 0  # every result was receipted
    assert after[("edgeml_hub_backlog_messages", ())] == 0


def test_a_bad_or_taken_http_address_is_one_line_and_exit_2(broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    base = ["-m", "cloud_hub", "serve", "--broker", broker.url, "--db", url, "--prefix", prefix]
    res = subprocess.run([sys.executable, *base, "--http", "host:port"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == exits.USAGE and "http must be PORT or HOST:PORT" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, *base, "--http", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == exits.USAGE, res.stderr
    assert f"http 127.0.0.1:{port}: cannot listen" in res.stderr and "Traceback" not in res.stderr


def test_canaries_rounds_and_drift_are_read_from_the_database(tmp_path: Path) -> None:
    """The fleet's history as a hub reports it: written through the stores into a real SQLite file."""
    import time

    from prometheus_client import generate_latest

    from cloud_hub.data.ingest import Hub
    from cloud_hub.data.store import Store
    from cloud_hub.rounds.store import RoundStore
    from cloud_hub.settings import HubSettings
    from cloud_hub.web.metrics import HubMetrics
    from edge_agent import contract as c

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    hub = Hub(HubSettings(db=url), engine=engine)  # never started: no broker, the collector reads the database
    try:
        metrics = HubMetrics(hub)

        def sample(name: str, **labels: str) -> float | None:
            return metrics.registry.get_sample_value(name, labels)

        assert sample("edgeml_canary_version", model="default") == 0  # every series there before anything happened
        for outcome in ("promoted", "rolled_back"):
            assert sample("edgeml_rollouts_total", model="default", outcome=outcome) == 0
        for outcome in ("published", "rejected", "failed"):
            assert sample("edgeml_rounds_total", model="default", outcome=outcome) == 0
        assert sample("edgeml_rounds_open", model="default") == 0
        assert "edgeml_device_drift_psi{" not in generate_latest(metrics.registry).decode()

        store, rounds, now = Store(hub.engine), RoundStore(), time.time()
        with sessions.transaction(hub.engine) as conn:
            for version, end in ((2, "rolled_back"), (3, "promoted"), (4, "rolled_back"), (5, None)):
                rid = store.add_rollout(conn, name="default", version=version, previous=version - 1, cohort=["a"],
                                        min_results=10, tolerance=0.02, at=now)
                if end is not None:
                    assert store.end_rollout(conn, rid, end, "test", now)
            store.add_rollout(conn, name="other", version=9, previous=8, cohort=["a"], min_results=10,
                              tolerance=0.02, at=now)  # another model's canary: not the hub's model
            for rid, state in enumerate(("failed", "published", "failed", "rejected", "closed", "open"), start=1):
                rounds.add_round(conn, round_id=rid, name="default", base_version=1, participants=["a"], plan={},
                                 announcement=b"x", opened_at=now, deadline=now + 60)
                if state != "open":
                    assert rounds.set_round(conn, rid, state=state, expect=("open",))
            store.apply_statuses(conn, {
                "s01": (c.Status("s01", c.ONLINE, now, "default", 5, "ab" * 32, drift_psi=0.41), now),
                "s02": (c.Status("s02", c.ONLINE, now, "default", 5, "ab" * 32, drift_psi=0.05), now),
                "s03": (c.Status("s03", c.ONLINE, now, "default", 5, "ab" * 32), now)})  # before MIN_WINDOWS: no PSI

        assert sample("edgeml_canary_version", model="default") == 5
        assert sample("edgeml_rollouts_total", model="default", outcome="rolled_back") == 2
        assert sample("edgeml_rollouts_total", model="default", outcome="promoted") == 1
        assert sample("edgeml_rounds_total", model="default", outcome="failed") == 2
        assert sample("edgeml_rounds_total", model="default", outcome="published") == 1
        assert sample("edgeml_rounds_total", model="default", outcome="rejected") == 1
        assert sample("edgeml_rounds_open", model="default") == 2
        assert sample("edgeml_device_drift_psi", device="s01") == 0.41
        assert sample("edgeml_device_drift_psi", device="s02") == 0.05
        assert 'device="s03"' not in generate_latest(metrics.registry).decode()
        assert sample("edgeml_devices_by_model", model="default", version="5", state="online") == 3
    finally:
        engine.dispose()
