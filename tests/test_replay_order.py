"""Replay in true time order (#28 §2): whatever order a log's rows are in (by time, grouped by device,
several files), every device is released at its own recorded time, together; what cannot be merged
is refused with the command that sorts the log."""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from edge_agent import exits
from edge_agent.sources import LogError, pace, read_log
from edge_agent.sources.merge import ROWS_IN_ALL, ReplayLogs
from edge_agent.sources.runs import MAX_RUNS
from tests.helpers import agent_cmd, fleet_files
from tests.test_sources import FakeClock

HEADER = "ts,device_id,x,y,label"


def by_device(path: Path, devices: dict[str, float], n: int = 300, rate: float = 10.0) -> Path:
    """A log grouped by device (all of the first, then all of the next): ``devices`` maps each id to
    the time its recording starts; a bad line is easy to place (line = 2 + row)."""
    rows = [HEADER]
    for k, (dev, t0) in enumerate(devices.items()):
        rows += [f"{t0 + i / rate:.2f},{dev},{k + i % 7},{i % 5}.5,{'ab'[i // 50 % 2]}" for i in range(n)]
    write(path, rows)
    return path


def write(path: Path, rows: list[str]) -> None:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        names = rows[0].split(",")
        recs = []
        for r in rows[1:]:
            v = dict(zip(names, r.split(","), strict=True))
            recs.append(orjson.dumps({"ts": float(v["ts"]), "device_id": v["device_id"], "x": float(v["x"]),
                                      "y": float(v["y"]), "label": v["label"]}).decode())
        rows = recs
    data = ("\n".join(rows) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def merged(logs: ReplayLogs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row the merge releases: (ts, device ids, values)."""
    chunks = list(logs)
    return (np.concatenate([c.ts for c in chunks]), np.concatenate([c.device_ids for c in chunks]),
            np.concatenate([c.values for c in chunks]))


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz", "log.jsonl", "log.jsonl.gz"])
def test_a_log_grouped_by_device_is_released_in_time_order(tmp_path: Path, name: str) -> None:
    log = by_device(tmp_path / name, {"a": 100.0, "b": 103.0, "c": 101.5})
    logs = ReplayLogs([log], rows=512).index()
    assert logs.runs == 3 and logs.rows == 900
    ts, dev, vals = merged(logs)
    assert np.all(np.diff(ts) >= 0)  # the devices interleave: one clock for all of them
    whole = read_log(log).read_all()
    assert whole is not None
    for d in "abc":  # each device's readings are the file's, in the file's order
        assert np.array_equal(ts[dev == d], whole.ts[whole.device_ids == d])
        assert np.array_equal(vals[dev == d], whole.values[whole.device_ids == d])
    assert logs.stats.rows_read == 900 and logs.stats.rows_skipped == 0


def test_every_device_is_paced_by_its_own_timestamps_at_the_same_time(tmp_path: Path) -> None:
    log = by_device(tmp_path / "log.csv", {"a": 100.0, "b": 100.05, "c": 110.0})
    fc = FakeClock()
    released: list[tuple[float, float, str]] = []
    for sub in pace(ReplayLogs([log]).index(), 10.0, clock=fc.clock, sleep=fc.sleep):
        released += [(fc.now - 1000.0, t, d) for t, d in zip(sub.ts.tolist(), sub.device_ids.tolist(), strict=True)]
    assert len(released) == 900
    for at, t, _ in released:  # never early, never late: at its recorded offset from the first reading, / speed
        assert at == pytest.approx((t - 100.0) / 10.0, abs=2e-4)
    first = {d: min(at for at, _, dd in released if dd == d) for d in "abc"}
    assert first == pytest.approx({"a": 0.0, "b": 0.005, "c": 1.0}, abs=2e-4)  # b starts with a, not after a's 30 s


def test_several_files_are_merged_into_one_clock(tmp_path: Path) -> None:
    one = by_device(tmp_path / "one.csv", {"a": 100.0, "b": 105.0})
    two = by_device(tmp_path / "two.jsonl.gz", {"c": 102.0}, rate=20.0)
    logs = ReplayLogs([one, two]).index()
    assert logs.runs == 3 and logs.rows == 900
    ts, dev, _ = merged(logs)
    assert np.all(np.diff(ts) >= 0)
    assert set(dev[:21].tolist()) == {"a"} and dev[21] == "c"  # c joins a at 102 s (a first at a tie: its file)
    for path, d in ((one, "a"), (one, "b"), (two, "c")):
        whole = read_log(path).read_all()
        assert whole is not None and np.array_equal(ts[dev == d], whole.ts[whole.device_ids == d])


def test_jitter_between_devices_never_reorders_a_device(tmp_path: Path) -> None:
    """b's clock runs 0.5 s ahead of a's (no new run: within the slack), so a's last rows of the first
    run are keyed at b's times; the second run (it starts with d far back) continues a at 30 s: a's
    rows still come out in their file order, none refused."""
    rows = [HEADER] + [f"{t:.2f},{d},1,2,x" for t0 in np.arange(0, 30, 0.1) for t, d in ((t0, "a"), (t0 + 0.5, "b"))]
    rows += ["0.00,d,1,2,x"] + [f"{30 + i / 10:.2f},a,1,2,x" for i in range(300)]
    log = tmp_path / "log.csv"
    write(log, rows)
    logs = ReplayLogs([log]).index()
    assert logs.runs == 2
    ts, dev, _ = merged(logs)
    assert len(ts) == 901 and np.all(np.diff(ts) >= -1.0)  # in time order up to the slack
    whole = read_log(log).read_all()
    assert whole is not None and np.array_equal(ts[dev == "a"], whole.ts[whole.device_ids == "a"])


def test_memory_is_bounded_by_the_runs_not_the_rows(tmp_path: Path) -> None:
    """Forty devices, one after the other: forty cursors, each holding one chunk (32,768 rows in all
    split between them), whether the log has 40,000 or 160,000 rows."""
    peaks = []
    for n in (1000, 4000):
        log = by_device(tmp_path / f"log{n}.csv.gz", {f"d{k:02d}": 100.0 + k % 3 for k in range(40)}, n=n)
        logs = ReplayLogs([log]).index()
        ts, dev, _ = merged(logs)
        assert len(ts) == 40 * n and np.all(np.diff(ts) >= 0)
        assert logs.peak_cursors == logs.runs == 40
        peaks.append(logs.peak_rows)
    assert peaks[0] == peaks[1] <= ROWS_IN_ALL


def test_a_bad_line_in_a_later_run_is_named_by_its_own_line(tmp_path: Path) -> None:
    rows = [HEADER] + [f"{100 + i / 10:.2f},{d},1,2,a" for d in "abc" for i in range(300)]
    rows[1 + 2 * 300 + 17] = "101.70,c,oops,2,a"  # line 619 of the file, in c's run
    log = tmp_path / "log.csv"
    write(log, rows)
    with pytest.raises(LogError) as err:
        list(ReplayLogs([log]))
    assert str(err.value) == f"{log}:619: bad number 'oops' in column 'x'"
    skipping = ReplayLogs([log], on_error="skip")
    ts, _, _ = merged(skipping)
    straight = read_log(log, on_error="skip")
    assert len(ts) == len(straight.read_all() or []) == 899
    assert skipping.stats.summary() == straight.stats.summary()


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz"])
def test_a_skipped_line_ahead_in_time_does_not_drop_the_good_rows_after_it(tmp_path: Path, name: str) -> None:
    """A bad line whose ts runs ahead of the rest: skipped, its ts must not count as its device's last. The CSV
    index pass read the ts field alone, so the later rows of the device were judged against it and dropped as
    "non-monotonic" (69 of 119 here; a new user lost 334 good lines to one bad one)."""
    rows = [HEADER] + [f"{100 + i / 10:.2f},a,{i % 7},1,a" for i in range(120)] + \
        [f"{100 + i / 10:.2f},b,{i % 5},1,a" for i in range(120)]
    rows[52] = "130.00,a,abc,1,a"  # line 53 of the file
    log = tmp_path / name
    write(log, rows)
    skipping = ReplayLogs([log], on_error="skip")
    ts, dev, _ = merged(skipping)
    straight = read_log(log, on_error="skip")
    assert len(ts) == len(straight.read_all() or []) == 239
    assert skipping.stats.summary() == straight.stats.summary() and skipping.stats.skipped_by_reason == {"bad number": 1}
    assert np.all(np.diff(ts[dev == "a"]) > 0)


def test_a_device_that_goes_back_in_time_is_refused_with_how_to_sort(tmp_path: Path) -> None:
    """a's second stretch (0-30 s) comes after its first (30-60 s) in the file: the parser's rule,
    across the runs; the message's own command sorts the log, which then replays."""
    rows = [HEADER] + [f"{30 + i / 10:.2f},a,1,2,x" for i in range(300)] + [f"{i / 10:.2f},b,1,2,x" for i in range(300)]
    rows += [f"{i / 10:.2f},a,1,2,x" for i in range(300)]
    log = tmp_path / "log.csv"
    write(log, rows)
    with pytest.raises(LogError) as err:
        list(ReplayLogs([log]))
    assert str(err.value).startswith(f"{log}:602: non-monotonic ts 0.0 for device 'a' (previous 59.9 at line 301): ")
    command = str(err.value).split("to sort the log by time: ", 1)[1]
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    logs = ReplayLogs([tmp_path / "log.sorted.csv"]).index()
    assert logs.runs == 1
    ts, dev, _ = merged(logs)
    assert len(ts) == 900 and np.array_equal(np.sort(ts[dev == "a"]), ts[dev == "a"])


def test_a_device_in_two_files_that_overlap_is_refused(tmp_path: Path) -> None:
    one = by_device(tmp_path / "one.csv", {"a": 100.0})
    two = by_device(tmp_path / "two.csv", {"a": 110.0, "b": 100.0})
    with pytest.raises(LogError) as err:
        list(ReplayLogs([one, two]))
    assert str(err.value).startswith(f"{two}:2: device 'a': reading at ts 110.0 comes after ts 110.0 ({one}:102)")
    skipping = ReplayLogs([one, two], on_error="skip")
    ts, dev, _ = merged(skipping)
    assert np.all(np.diff(ts[dev == "a"]) > 0) and skipping.stats.rows_skipped == 200


def test_rows_in_no_usable_order_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    """Two devices whose clocks are 10 s apart, written as the readings arrived: every row of b goes back."""
    rows = [HEADER] + [f"{t + 10 * (d == 'a'):.2f},{d},1,2,x" for t in np.arange(0, 40, 0.1) for d in "ab"]
    log = tmp_path / "log.csv.gz"
    write(log, rows)
    with pytest.raises(LogError) as err:
        ReplayLogs([log]).index()
    assert err.value.exit_code == exits.INPUT and f"at most {MAX_RUNS} stretches" in str(err.value)
    assert str(err.value).startswith(f"{log}:{2 * MAX_RUNS + 1}: the readings go back in time (25.5 after 35.5)")
    subprocess.run(["bash", "-c", str(err.value).split("sort the log by time: ", 1)[1]], check=True, timeout=60)
    assert ReplayLogs([tmp_path / "log.sorted.csv"]).index().runs == 1


# --------------------------------------------------------------------------- the real command


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[tuple[str, int]]]:
    return fleet_files(tmp_path_factory.mktemp("replay_order"))


def _outbox_order(state: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        return [(d, s) for d, s in db.execute("SELECT device_id, seq FROM outbox ORDER BY id")]
    finally:
        db.close()


@pytest.mark.parametrize("files", [1, 2])
def test_edge_agent_replay_of_a_log_grouped_by_device_runs_every_device_together(
        shared_broker, prefix, fleet, tmp_path: Path, files: int) -> None:
    """`edge-agent replay --speed 10` of the fleet log grouped by device (or split in two files): the
    results enter the outbox in time order across devices.  No hub receipts them, so they stay there
    (exit 3 at the timeout) for the test to read in the order they were made."""
    log, model, expected = fleet
    lines = log.read_text().splitlines()
    body = sorted(lines[1:], key=lambda ln: ln.split(",")[1])  # stable: each device in time order
    logs = [tmp_path / "by_device.csv"] if files == 1 else [tmp_path / "ab.csv", tmp_path / "c.csv"]
    if files == 1:
        logs[0].write_text("\n".join([lines[0], *body]) + "\n")
    else:
        logs[0].write_text("\n".join([lines[0], *[b for b in body if ",dev-c," not in b]]) + "\n")
        logs[1].write_text("\n".join([lines[0], *[b for b in body if ",dev-c," in b]]) + "\n")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    res = subprocess.run(agent_cmd("replay", *map(str, logs), "--broker", shared_broker.url, "--model", str(model),
                                   "--prefix", prefix, "--state-dir", str(state), "--speed", "10", "--timeout", "2",
                                   "--json"), capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == exits.UNAVAILABLE, res.stderr
    assert orjson.loads(res.stdout)["readings"] == len(lines) - 1
    order = _outbox_order(state)
    assert set(order) == expected
    where = {d: [i for i, (dd, _) in enumerate(order) if dd == d] for d in ("dev-a", "dev-b", "dev-c")}
    # Every device's first window was made before any device's last: they ran together.  (Grouped by
    # device and replayed in file order, dev-b's first window came after dev-a's last.)
    assert max(w[0] for w in where.values()) < min(w[-1] for w in where.values())
    # and their results interleave (in file order the device changed twice).
    assert sum(a != b for (a, _), (b, _) in zip(order, order[1:], strict=False)) >= 10
    for d in where:
        seqs = [s for dd, s in order if dd == d]
        assert seqs == sorted(seqs)


def test_edge_agent_replay_refuses_a_device_going_back_in_one_line_before_any_result(
        shared_broker, prefix, fleet, tmp_path: Path) -> None:
    """The fleet log grouped by device, with dev-a's first 100 readings written again at its end: exit 5
    and one line naming the file, the line and the command that sorts it; no result was made."""
    log, model, _ = fleet
    lines = log.read_text().splitlines()
    body = sorted(lines[1:], key=lambda ln: ln.split(",")[1])
    again = [b for b in body if b.split(",")[1] == "dev-a"][:100]
    bad = tmp_path / "again.csv"
    bad.write_text("\n".join([lines[0], *body, *again]) + "\n")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    res = subprocess.run(agent_cmd("replay", str(bad), "--broker", shared_broker.url, "--model", str(model),
                                   "--prefix", prefix, "--state-dir", str(state), "--timeout", "5"),
                         capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == exits.INPUT, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert errors[0].startswith(f"edge-agent: error: {bad}:{len(lines) + 1}: non-monotonic ts 0.0 for device 'dev-a' ")
    assert errors[0].endswith(f"to sort the log by time: (head -n 1 {bad}; tail -n +2 {bad} | LC_ALL=C sort -s -t, "
                              f"-k1,1g) > {tmp_path / 'again.sorted.csv'}")
    assert _outbox_order(state) == []


def test_a_replay_refuses_a_reading_before_1970_and_training_takes_it(tmp_path: Path) -> None:
    """A hostile peer's finding: a log whose ts began at -5 s made results with negative keys; every hub
    dead-lettered their batch with the good results in it, sent again for ever, and the replay never finished.
    A replay's readings become results: such a line is a bad line. Training makes no keys: a log in relative
    time that starts below 0 still trains (the review's catch)."""
    log = tmp_path / "rel.csv"
    log.write_text("ts,device_id,ax\n" + "".join(f"{t / 10:.1f},a,{t}\n" for t in range(-50, 50)))
    with pytest.raises(LogError) as err:
        list(ReplayLogs([log]).index())
    assert (err.value.line, err.value.kind) == (2, "ts out of range")
    assert "ts -5.0 is before 1970" in str(err.value)
    skipping = ReplayLogs([log], on_error="skip").index()
    ts, _, _ = merged(skipping)
    assert ts.tolist() == [t / 10 for t in range(0, 50)] and skipping.stats.skipped_by_reason == {"ts out of range": 50}
    whole = read_log(log).read_all()
    assert whole is not None and len(whole) == 100
