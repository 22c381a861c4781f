"""A full disk on the device (#29 §2): the agent keeps inferring, says what it cannot keep, never
corrupts its outbox, and once space returns delivers everything it kept, each result stored once.

The agent's state dir is on a small tmpfs the test mounts (root only: skipped elsewhere), filled with a
filler file so that the outbox soon has no room; the hub is down at first, so the outbox must hold
the results. Real mosquitto, real `edge-agent replay`, real `cloud-hub serve`.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from edge_agent.contract.bundles import decode_bundle
from edge_agent.device.disk_room import RESERVE_BYTES
from edge_agent.preprocess import PreprocessParams
from tests.helpers import Processes, agent_cmd, expected_keys, fleet_files, make_log, wait_for
from tests.test_hub_cli import ServeProcess
from tests.test_ingest import stored_keys

pytestmark = pytest.mark.slow

FAST_RESEND = {"EDGE_AGENT_RESEND_AFTER_S": "0.5", "EDGE_AGENT_RESEND_MAX_S": "2",
               "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.1"}
DISK = 8 << 20  # the tmpfs: the outbox's reserve (4 MiB) and room for a few thousand results
ROOM = 256 << 10  # what the filler leaves beyond the reserve and the files the agent makes at its start


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK bytes of the test's own, unmounted at the end (on failure too)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK // 1024}k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[tuple[str, int]]]:
    """A model trained on a short log, and a long log of the same devices to replay (about 24,000 results:
    far more than the room the disk leaves)."""
    root = tmp_path_factory.mktemp("diskfull")
    short, model, _ = fleet_files(root)
    long = make_log(root / "long.csv", seconds=8000.0, seed=7)
    params = PreprocessParams.from_dict(decode_bundle(model.read_bytes()).manifest.preprocess)
    return long, model, expected_keys(long, params)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, model: Path) -> Path:
    """A filler that leaves the reserve, the model's copy, SQLite's first pages and ROOM: the outbox can
    hold a few hundred results, then the disk is full (tmpfs counts whole pages: deterministic)."""
    filler = disk / "filler"
    leave = RESERVE_BYTES + model.stat().st_size + (64 << 10) + ROOM
    with open(filler, "wb") as f:
        f.write(b"\1" * (free_bytes(disk) - leave))
    assert abs(free_bytes(disk) - leave) < 8192
    return filler


def start_replay(procs: Processes, broker_url: str, prefix: str, log: Path, model: Path, state: Path,
                 err: Path, **env: str) -> subprocess.Popen:
    with open(err, "ab") as out:
        return procs.popen(
            agent_cmd("replay", str(log), "--broker", broker_url, "--model", str(model), "--prefix", prefix,
                      "--state-dir", str(state), "--json", "--timeout", "120"),
            stdout=subprocess.PIPE, stderr=out, env={**os.environ, **FAST_RESEND, **env})


def integrity(state: Path) -> str:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def meta_dropped(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def said(err: Path) -> tuple[int, int]:
    """(results not kept, results dropped) from the agent's last word on the full disk."""
    lines = [ln for ln in err.read_text().splitlines() if "disk full in" in ln or "disk space again in" in ln]
    assert lines, err.read_text()
    m = re.search(r"(\d+) results could not be kept.*?(\d+) dropped", lines[-1])
    assert m, lines[-1]
    return int(m[1]), int(m[2])


def free_space(disk: Path, filler: Path) -> None:
    filler.unlink()
    subprocess.run(["mount", "-o", f"remount,size={4 * DISK // 1024}k", str(disk)], check=True)


def assert_stored_once(url: str, expected: set[tuple[str, int]]) -> set[tuple[str, int]]:
    keys = stored_keys(url)
    doubled = [k for k, n in Counter(keys).items() if n > 1]
    assert not doubled, f"stored twice: {doubled[:5]}"
    assert set(keys) <= expected
    return set(keys)


def space_returns(small_disk: Path, filler: Path, procs, broker, prefix: str, tmp_path: Path, agent, err: Path,
                  state: Path, expected: set[tuple[str, int]]) -> tuple[dict, set[tuple[str, int]]]:
    """Free the disk, start the hub, let the agent finish: (its report, the keys stored, each once)."""
    free_space(small_disk, filler)
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    out, _ = agent.communicate(timeout=180)
    assert agent.returncode == 0, err.read_text()
    report = orjson.loads(out)
    assert hub.signal(signal.SIGTERM) == 0
    assert integrity(state) == "ok"
    return report, assert_stored_once(url, expected)


def test_full_disk_drop_oldest_keeps_inferring_and_delivers_what_it_kept(
        small_disk: Path, procs, broker, prefix: str, tmp_path: Path, logs) -> None:
    log, model, expected = logs
    state = small_disk / "agent"
    filler = fill(small_disk, model)
    err = tmp_path / "agent.log"
    agent = start_replay(procs, broker.url, prefix, log, model, state, err)
    wait_for(lambda: "disk full in" in err.read_text() or agent.poll() is not None, timeout=60,
             what="the agent to say its disk is full")
    # It read the whole log and now waits for the hub: it kept inferring on a full disk.
    wait_for(lambda: "waiting for the hub's receipts" in err.read_text() or agent.poll() is not None,
             timeout=120, what="the replay to finish inferring")
    assert agent.poll() is None, err.read_text()
    assert err.read_text().count("disk full in") == 1, "said once a minute, not at every batch"
    assert "Traceback" not in err.read_text()
    assert integrity(state) == "ok"
    dropped = meta_dropped(state)
    assert dropped > 0, "drop_oldest made room by dropping the oldest results"

    report, stored = space_returns(small_disk, filler, procs, broker, prefix, tmp_path, agent, err, state, expected)
    unstored, said_dropped = said(err)
    assert said_dropped == dropped == meta_dropped(state)
    assert report["windows"] == len(expected)  # every window inferred
    assert report["published"] == len(stored)
    # nothing silently lost: each window was stored once, dropped to make room, or (when every row was in
    # flight for 2 s: rare, a loaded machine) not kept; each of them counted and said
    assert unstored <= dropped, "drop_oldest drops the oldest results first, not the new ones"
    assert len(stored) + dropped + unstored == report["windows"], (len(stored), dropped, unstored)
    assert len(stored) > 0


def test_full_disk_block_waits_for_room_and_loses_nothing(
        small_disk: Path, procs, broker, prefix: str, tmp_path: Path, logs) -> None:
    log, model, expected = logs
    state = small_disk / "agent"
    filler = fill(small_disk, model)
    err = tmp_path / "agent.log"
    agent = start_replay(procs, broker.url, prefix, log, model, state, err, EDGE_AGENT_OUTBOX_OVERFLOW="block")
    wait_for(lambda: "disk full in" in err.read_text() or agent.poll() is not None, timeout=60,
             what="the agent to say its disk is full")
    assert agent.poll() is None, err.read_text()
    assert "Traceback" not in err.read_text()
    assert integrity(state) == "ok"
    assert meta_dropped(state) == 0
    assert "waiting for the hub's receipts" not in err.read_text(), "back-pressure: the replay waits for room"

    report, stored = space_returns(small_disk, filler, procs, broker, prefix, tmp_path, agent, err, state, expected)
    assert stored == expected, f"{len(expected - stored)} results lost"
    assert report["windows"] == report["published"] == len(expected)
    assert said(err) == (0, 0)
