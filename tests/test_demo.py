"""The README's main command: `cloud-hub demo` runs the whole mission and exits 0 (generated data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cloud_hub.data import db, tables
from cloud_hub.models.datasets import default_params
from cloud_hub.tools.demo import claims, delivery_check, split_log
from cloud_hub.tools.local_broker import port_open
from tests.helpers import expected_keys, model_params
from tests.test_ingest import stored_keys


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
    assert "v2 against the running version, both on the same hold-out (its gate): " in out
    assert "on its own hold-out (dev-01, not comparable with another version's)" in out  # v2's, labelled so
    port = int(re.search(r"private mosquitto on mqtt://127\.0\.0\.1:(\d+)", out).group(1))
    assert not port_open("127.0.0.1", port), "the demo stopped the broker it started"
    # "stored exactly once" is what the hub's table holds: every window of every agent's log, once.
    work = tmp_path / "demo"
    url = f"sqlite:///{work / 'hub.sqlite'}"
    engine = db.make_engine(url, create=False)
    params = model_params(engine, 1)
    engine.dispose()
    expected = set().union(*(expected_keys(work / "data" / f"dev-{i:02d}.csv", params) for i in range(2)))
    keys = stored_keys(url)
    assert len(keys) == len(expected) and set(keys) == expected
    shown = int(re.search(r"fleet: ([\d,]+) results stored exactly once", out).group(1).replace(",", ""))
    assert shown == len(expected)


def test_delivery_check_names_every_device_that_is_not_exactly_once() -> None:
    agents = {"a": {"windows": 10, "published": 10}, "b": {"windows": 8, "published": 8},
              "c": {"windows": 5, "published": 4}}
    assert delivery_check({k: agents[k] for k in "ab"}, {"a": 10, "b": 8}) == []
    assert delivery_check(agents, {"a": 10, "b": 7, "c": 5}) == [
        "b: 7 results stored for 8 windows", "c: 4 of 5 results receipted by the hub"]


def test_the_demo_names_each_claim_that_is_false() -> None:
    """v2 published: every agent must end on v2 and the hub count them all running it; v2 rejected:
    every agent stays on v1."""
    models = [{"version": 1, "devices": 0}, {"version": 2, "devices": 2}]
    on_v2 = {"a": {"model_version": 2}, "b": {"model_version": 2}}
    assert claims(2, on_v2, models) == []
    assert claims(2, {"a": {"model_version": 2}, "b": {"model_version": 1}},
                  [{"version": 1, "devices": 1}, {"version": 2, "devices": 1}]) == [
        "b: ended on v1, not v2", "the hub counts 1 of 2 devices running v2"]
    assert claims(None, on_v2, models) == ["a: ended on v2, not v1", "b: ended on v2, not v1",
                                           "the hub counts 0 of 2 devices running v1"]


def test_a_log_is_split_at_its_widest_pause_so_no_window_is_lost(tmp_path) -> None:
    from cloud_hub.tools.sample import write_sample_log

    log = tmp_path / "dev.csv"
    write_sample_log(log, devices=("dev-x",), seconds=60, recordings=3)  # 5 s apart: no gap at half the rows
    first, second = split_log(log)
    params = default_params(str(log))  # the windowing of a model trained on it
    assert expected_keys(first, params) | expected_keys(second, params) == expected_keys(log, params)
    a, b = (p.read_text().splitlines() for p in (first, second))
    assert a[0] == b[0] == log.read_text().splitlines()[0] and len(a) + len(b) - 2 == len(log.read_text().splitlines()) - 1
    assert float(b[1].split(",")[0]) - float(a[-1].split(",")[0]) >= 5  # cut in the gap


@pytest.mark.slow
def test_the_federated_demo_runs_rounds_and_ends_with_the_rounds_table(tmp_path) -> None:
    env = {**os.environ, "EDGEML_DEMO_DATA": str(tmp_path / "none.csv"), "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "cloud_hub", "demo", "--federated", "--rounds", "2", "--agents", "3",
                          "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "generated sensor log" in out and "published v1" in out
    assert "round 1: closed, 3 update(s) counted" in out and "round 2: closed, 3 update(s) counted" in out
    assert "federated rounds of default" in out
    table = [line.split() for line in out.splitlines() if re.match(r"\s*[12]\s+v[12]\s", line)]
    assert [row[0] for row in table] == ["1", "2"] and table[0][1] == "v1", out
    assert [row[2] for row in table] == ["v2", "v3"], table  # the version each round made
    assert all(row[3] in ("published", "rejected") and row[4:7] == ["fedavg", "3/0/0", "of"] for row in table), table
    url = f"sqlite:///{tmp_path / 'demo' / 'hub.sqlite'}"
    engine = db.make_engine(url, create=False)
    with engine.connect() as conn:
        updates = conn.execute(tables.fl_updates.select()).all()
        features = conn.execute(tables.results.select().where(tables.results.c.features.is_not(None))).all()
    engine.dispose()
    assert len(updates) == 6 and {u.status for u in updates} == {"accepted"}
    assert features == [], "the agents kept their windows: no feature vector reached the hub"
    port = int(re.search(r"private mosquitto on mqtt://127\.0\.0\.1:(\d+)", out).group(1))
    assert not port_open("127.0.0.1", port), "the demo stopped the broker it started"
