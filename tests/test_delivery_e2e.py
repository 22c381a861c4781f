"""End to end, not hop by hop: a result leaves the device only when the hub has committed it.

Real processes (edge-agent replay, cloud-hub serve, mosquitto) are crashed at the moments that
lose data when a device trusts the broker's PUBACK: a broker crash while the hub is down for a
deploy (with persistence, and with a broker that forgets everything), a broker crash while the hub
runs, an agent SIGKILLed with results in flight, a hub SIGKILLed between receiving and committing.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cloud_hub.tools.local_broker import REPO_CONF, LocalBroker
from edge_agent import contract as c
from tests.helpers import Processes, agent_cmd, fleet_files, outbox, wait_for
from tests.test_hub_cli import ServeProcess, wait_ready
from tests.test_ingest import Publisher, batch, stored_keys

pytestmark = pytest.mark.slow

# Sent results without a receipt go out again after 0.5 s, then 1 s, at most 2 s apart.
FAST_RESEND = {"EDGE_AGENT_RESEND_AFTER_S": "0.5", "EDGE_AGENT_RESEND_MAX_S": "2",
               "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.1"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[tuple[str, int]]]:
    root = tmp_path_factory.mktemp("delivery")
    log, model, expected = fleet_files(root)
    (root / "empty.csv").write_text(log.read_text().splitlines()[0] + "\n")  # a header: nothing new to read
    return log, model, expected


def unreceipted(state: Path) -> int:
    return sum(due is not None for due in outbox(state).values())


def start_replay(procs: Processes, broker: LocalBroker, prefix: str, log: Path, model: Path, state: Path,
                 *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return procs.popen(
        agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                  "--state-dir", str(state), "--json", "--timeout", "120", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **FAST_RESEND, **(env or {})})


def finish(agent: subprocess.Popen) -> dict:
    out, err = agent.communicate(timeout=180)
    assert agent.returncode == 0, err
    return orjson.loads(out)


def assert_exactly_once(url: str, expected: set[tuple[str, int]]) -> None:
    keys = stored_keys(url)
    doubled = [k for k, n in Counter(keys).items() if n > 1]
    assert not doubled, f"stored twice: {doubled[:5]}"
    missing = expected - set(keys)
    assert not missing, f"{len(missing)} of {len(expected)} results lost, e.g. {sorted(missing)[:3]}"
    assert set(keys) == expected


@pytest.fixture
def forgetful_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker that forgets everything on a restart: no sessions, no queued messages, no retained ones."""
    base = tmp_path / "forgetful.conf"
    base.write_text(REPO_CONF.read_text().replace("persistence true", "persistence false"))
    assert "persistence false" in base.read_text()
    broker = LocalBroker(tmp_path / "forgetful", base_config=base).start()
    yield broker
    broker.kill()


def _deploy_scenario(procs: Processes, broker: LocalBroker, prefix: str, tmp_path: Path, fleet) -> None:
    """Hub stopped for a deploy, agent publishing, broker SIGKILLed and back, hub back."""
    log, model, expected = fleet
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    topics = c.Topics(prefix)
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    pub = Publisher(broker, f"{prefix}-marker")
    wait_ready(pub, topics, url, "marker")  # the hub's persistent session exists at the broker
    pub.stop()
    assert hub.signal(signal.SIGTERM) == 0  # the broker queues results for the hub meanwhile
    state = tmp_path / "agent"
    agent = start_replay(procs, broker, prefix, log, model, state, "--speed", "8")
    wait_for(lambda: unreceipted(state) >= 60, timeout=60, what="results acknowledged by the broker")
    broker.kill()  # what it queued in memory only is gone
    broker.start()
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub2.log")
    hub.wait_started()
    report = finish(agent)
    assert report["published"] == report["windows"] == len(expected), report
    assert report["resent"] > 0, "results were sent again for want of a receipt"
    assert outbox(state) == {}
    assert hub.signal(signal.SIGTERM) == 0
    assert_exactly_once(url, expected)


def test_broker_crash_while_the_hub_is_down_loses_and_doubles_nothing(procs, broker, prefix, tmp_path, fleet) -> None:
    _deploy_scenario(procs, broker, prefix, tmp_path, fleet)


def test_broker_that_forgets_everything_while_the_hub_is_down_loses_nothing(
        procs, forgetful_broker, prefix, tmp_path, fleet) -> None:
    _deploy_scenario(procs, forgetful_broker, prefix, tmp_path, fleet)


def test_broker_crash_while_the_hub_runs_loses_and_doubles_nothing(procs, broker, prefix, tmp_path, fleet) -> None:
    log, model, expected = fleet
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    state = tmp_path / "agent"
    agent = start_replay(procs, broker, prefix, log, model, state, "--speed", "8")
    wait_for(lambda: len(stored_keys(url)) >= 40, timeout=60, what="the first results stored")
    broker.kill()
    broker.start()
    report = finish(agent)
    assert report["published"] == len(expected), report
    assert hub.signal(signal.SIGTERM) == 0
    assert_exactly_once(url, expected)


def test_agent_sigkilled_with_results_in_flight_keeps_every_unstored_result(
        procs, broker, prefix, tmp_path, fleet) -> None:
    """What the hub has not committed is still in the outbox after a SIGKILL, and goes out on the next start."""
    log, model, expected = fleet
    empty = log.parent / "empty.csv"
    path = tmp_path / "hub.sqlite"
    url = f"sqlite:///{path}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    state = tmp_path / "agent"
    agent = start_replay(procs, broker, prefix, log, model, state, "--speed", "8")
    wait_for(lambda: len(stored_keys(url)) >= 20, timeout=60, what="the first results stored")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the hub's commits wait: results pile up sent but not receipted
    wait_for(lambda: unreceipted(state) >= 20, timeout=60, what="results in flight to the hub")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    lock.execute("ROLLBACK")
    lock.close()
    kept, stored = set(outbox(state)), set(stored_keys(url))
    assert kept, "the kill came while results were on the device"
    # Every window produced before the kill is stored or kept: per device the produced windows are a
    # prefix of its expected keys, so nothing up to the last key seen may be missing.
    seen = kept | stored
    last = defaultdict(int)
    for device, seq in seen:
        last[device] = max(last[device], seq)
    produced = {(d, s) for d, s in expected if s <= last[d]}
    assert produced <= seen, f"{len(produced - seen)} results gone with the agent"
    # A new process on the same state with nothing new to read delivers what was kept, and only that.
    report = finish(start_replay(procs, broker, prefix, empty, model, state))
    assert report["windows"] == 0 and report["published"] == len(kept)
    assert outbox(state) == {}
    assert hub.signal(signal.SIGTERM) == 0
    assert set(stored_keys(url)) == produced and len(stored_keys(url)) == len(produced)


def test_hub_sigkilled_between_receiving_and_committing_loses_nothing(procs, broker, prefix, tmp_path) -> None:
    """The hub acknowledges a message only after its commit: a hub killed while its write waits for
    the database leaves every message with the broker, which redelivers it to the next hub. The
    publisher here never resends (a device that ignores receipts), so only the hub's ack order saves it."""
    path = tmp_path / "hub.sqlite"
    url = f"sqlite:///{path}"
    topics = c.Topics(prefix)
    env = {"CLOUD_HUB_LOG_LEVEL": "DEBUG"}
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log", env=env)
    hub.wait_started()
    pub = Publisher(broker, f"{prefix}-pub")
    wait_ready(pub, topics, url, "probe")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the hub's next write waits for the database
    batches = [batch(f"dev-{k % 3}", 100 * k, 50) for k in range(12)]
    for b in batches:
        pub.publish(topics.results(b.device_id), b.encode())
    pub.wait_acked()
    holding = re.compile(r"committing a batch: \d+ messages, [1-9]\d* results")
    wait_for(lambda: holding.search(hub.log.read_text()) is not None, what="the hub to hold results")
    assert hub.signal(signal.SIGKILL) == -signal.SIGKILL
    lock.execute("ROLLBACK")
    lock.close()
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub2.log")
    hub.wait_started()
    expected = {(b.device_id, r.seq) for b in batches for r in b.results}
    wait_for(lambda: expected <= set(stored_keys(url)), timeout=30, what="every result redelivered and stored")
    assert hub.signal(signal.SIGTERM) == 0
    pub.stop()
    assert_exactly_once(url, expected)


def test_run_drains_into_the_hub_on_end_of_input_and_keeps_nothing(procs, broker, prefix, tmp_path, fleet) -> None:
    """`edge-agent run` waits (bounded) for the hub's receipts of what it produced before it exits."""
    from tests.test_live_sources_e2e import _readings

    _, model, _ = fleet
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    state = tmp_path / "agent"
    agent = procs.popen(agent_cmd("run", "--broker", broker.url, "--prefix", prefix, "--device-id", "live-1",
                                  "--state-dir", str(state), "--model", str(model), "--source", "stdin"),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, **FAST_RESEND})
    start = 1_700_000_000.0
    lines = "".join(orjson.dumps(r).decode() + "\n" for r in _readings("live-1", 10, start))
    _, err = agent.communicate(input=lines, timeout=120)
    assert agent.returncode == 0, err
    summary = orjson.loads(err.strip().splitlines()[-1])
    assert summary["drained"] is True and summary["outbox_depth"] == 0, summary
    expected = {("live-1", int(round((start + s) * 1000))) for s in range(9)}
    assert set(stored_keys(url)) == expected and outbox(state) == {}
    assert hub.signal(signal.SIGTERM) == 0
