"""Agent → mosquitto → hub → SQL, all real processes: exactly one row per window, whatever dies."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import orjson
import pytest

from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from tests.helpers import agent_cmd, fleet_files, run_agent
from tests.test_hub_cli import ServeProcess, invoke, wait_ready
from tests.test_ingest import Publisher, stored_keys, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[tuple[str, int]]]:
    return fleet_files(tmp_path_factory.mktemp("pipeline"))


def _replay(broker: LocalBroker, prefix: str, log: Path, model: Path, state: Path, *extra: str) -> dict:
    res = run_agent("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                    "--state-dir", str(state), "--features", "sampled", "--json", *extra)
    assert res.returncode == 0, res.stderr
    return orjson.loads(res.stdout)


def _marker(pub: Publisher, topics: c.Topics, url: str, name: str) -> None:
    """The broker forwards in order: once a status published after the replay is stored, so is the replay."""
    wait_ready(pub, topics, url, name)


def test_replay_into_hub_twice_stores_each_window_once_and_stats_agree(procs, broker, prefix, tmp_path, fleet) -> None:
    log, model, expected = fleet
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    topics = c.Topics(prefix)
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    pub = Publisher(broker, f"{prefix}-marker")
    first = _replay(broker, prefix, log, model, tmp_path / "s1")
    _marker(pub, topics, url, "marker-1")
    keys = stored_keys(url)
    assert len(keys) == len(expected) and set(keys) == expected == {(d, s) for d, s in keys}
    # The same log again, from a fresh device state: the same keys, all ignored by the hub.
    again = _replay(broker, prefix, log, model, tmp_path / "s2")
    assert again["published"] == first["published"] == len(expected)
    _marker(pub, topics, url, "marker-2")
    assert sorted(stored_keys(url)) == sorted(keys)
    assert hub.signal(signal.SIGTERM) == 0
    assert f"{len(expected)} duplicates ignored" in hub.final_line()
    pub.stop()
    code, out, err = invoke("stats", "--db", url, "--json")
    assert code == 0, err
    stats = orjson.loads(out)
    per_device = Counter(d for d, _ in expected)
    assert stats["results"] == len(expected) and stats["dead_letters"] == 0
    assert {d: v["results"] for d, v in stats["devices"].items() if v["results"]} == per_device
    assert all(v["accuracy"] is not None and 0 <= v["accuracy"] <= 1 for d, v in stats["devices"].items()
               if d in per_device)


def test_hub_sigkilled_while_agent_replays_loses_and_doubles_nothing(procs, broker, prefix, tmp_path, fleet) -> None:
    log, model, expected = fleet
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    agent = procs.popen(
        agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                  "--state-dir", str(tmp_path / "s"), "--speed", "8", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.1"})
    wait_for(lambda: len(stored_keys(url)) >= 20, what="first results stored")
    hub.signal(signal.SIGKILL)  # the agent keeps publishing; the broker queues for the hub's persistent session
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    wait_for(lambda: len(stored_keys(url)) >= len(expected), timeout=60, what="every result stored")
    assert hub.signal(signal.SIGTERM) == 0
    keys = stored_keys(url)
    assert len(keys) == len(expected) and set(keys) == expected


@pytest.mark.slow
def test_a_regressor_end_to_end_stores_predictions_and_mean_targets(procs, broker, prefix, tmp_path) -> None:
    """Numeric labels train a regressor; the agent replays through a real broker into a real hub; every
    window is stored once with the model's value and, as truth, the mean target of its readings."""
    import sqlalchemy as sa

    from cloud_hub.data import db, tables
    from cloud_hub.data.store import Store
    from cloud_hub.models import lifecycle
    from edge_agent.device.pipeline import window_seq
    from edge_agent.preprocess import PreprocessParams, make_windows
    from edge_agent.sources import read_log
    from tests.helpers import SMALL, make_regression_log

    log = make_regression_log(tmp_path / "reg.csv", readings=1000, seed=1, spread=True)  # mean != majority
    engine = db.make_engine(f"sqlite:///{tmp_path / 'train.sqlite'}")
    lifecycle.train_from_logs(engine, [str(log)], holdout=["r3"], config=SMALL)
    with engine.connect() as conn:
        bundle = Store(engine).get_model(conn, "default").bundle
    engine.dispose()
    model = tmp_path / "reg.emlb"
    model.write_bytes(bundle)
    params = PreprocessParams.from_dict(c.decode_bundle(bundle).manifest.preprocess)

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    report = _replay(broker, prefix, log, model, tmp_path / "s")
    assert hub.signal(signal.SIGTERM) == 0
    whole = read_log(log).labels_as_numbers().read_all()
    want = {}
    cols = [whole.channels.index(ch) for ch in params.channels]
    for device, (ts, values, labels) in whole.by_device().items():
        batch = make_windows(ts, values[:, cols], labels, params)
        for seq, target in zip(window_seq(batch.start).tolist(), batch.labels.tolist(), strict=True):
            want[(device, seq)] = target
    hub_db = db.make_engine(url)
    with hub_db.connect() as conn:
        got = {(d, s): (v, t) for d, s, v, t in conn.execute(
            sa.select(tables.results.c.device_id, tables.results.c.seq, tables.results.c.value, tables.results.c.truth))}
    hub_db.dispose()
    assert report["published"] == len(want) == len(got) and set(got) == set(want)
    for key, (value, truth) in got.items():
        assert len(orjson.loads(value)) == 1  # one output, a number
        assert float(truth) == pytest.approx(want[key], rel=1e-12)
    assert len({t for _, t in got.values()}) > 3 * 6  # the means, not a handful of majority labels
