"""What the operator reads is about what it says (issue 24): a replay tells results the hub stored from
results it had already; `train` names a log without labels before reading anything through."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
from typer.testing import CliRunner

from cloud_hub.cli.app import app
from edge_agent import exits
from tests.helpers import fleet_files, make_log, run_agent
from tests.test_hub_cli import ServeProcess


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_train_says_a_log_has_no_label_column_before_reading_the_logs_through(tmp_path: Path) -> None:
    """The labelled log comes first and breaks on its last line: reading it through (devices, windows)
    would stop there, so the message about the second log proves only headers were read before it."""
    good = make_log(tmp_path / "good.csv", seconds=20)
    good.write_text(good.read_text() + "not,a,reading\n")
    lines = make_log(tmp_path / "raw.csv", seconds=20).read_text().splitlines()
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    code, out, err = invoke("train", str(good), str(unlabelled), "--db", f"sqlite:///{tmp_path / 'hub.sqlite'}")
    assert code == exits.MODEL, (code, out, err)
    assert f"{unlabelled}: no label column, cannot train from it" in err, err
    assert "line" not in err, err  # not the malformed last line of the first log


def test_a_replay_says_which_results_the_hub_stored_and_which_it_had_already(procs, broker, prefix, tmp_path) -> None:
    """The first half of a log, then the whole log from a fresh state dir: the second replay's results are
    the first's again (already stored) and the second half's (new), each counted as such."""
    log, model, expected = fleet_files(tmp_path)
    lines = log.read_text().splitlines()
    cut = float(lines[-1].split(",", 1)[0]) / 2
    half = tmp_path / "half.csv"
    half.write_text("\n".join([lines[0], *(ln for ln in lines[1:] if float(ln.split(",", 1)[0]) < cut)]) + "\n")
    hub = ServeProcess(procs, broker, f"sqlite:///{tmp_path / 'hub.sqlite'}", prefix, tmp_path / "hub.log")
    hub.wait_started()
    args = ("--broker", broker.url, "--model", str(model), "--prefix", prefix)
    first = run_agent("replay", str(half), *args, "--state-dir", str(tmp_path / "s1"), "--json")
    assert first.returncode == 0, first.stderr
    report = orjson.loads(first.stdout)
    assert report["already_stored"] == 0 and 0 < report["published"] == report["windows"] < len(expected)
    again = run_agent("replay", str(log), *args, "--state-dir", str(tmp_path / "s2"))
    assert again.returncode == 0, again.stderr
    said = re.search(r"the hub stored ([\d,]+) and had ([\d,]+) already", again.stdout)
    assert said is not None, again.stdout
    new, already = (int(x.replace(",", "")) for x in said.groups())
    assert (new, already) == (len(expected) - report["windows"], report["windows"])



def test_a_replay_after_an_interrupted_one_counts_the_results_left_in_the_outbox_apart(procs, broker, prefix,
                                                                                         tmp_path) -> None:
    """No hub at first: the replay gives up waiting and leaves its results in the outbox. The same replay again,
    with the hub up: it sends those first, then its own (the same keys), and says which are which."""
    log, model, expected = fleet_files(tmp_path)
    args = ("--broker", broker.url, "--model", str(model), "--prefix", prefix, "--state-dir", str(tmp_path / "s"))
    first = run_agent("replay", str(log), *args, "--timeout", "2")
    assert first.returncode == exits.UNAVAILABLE, first.stderr
    assert f"{len(expected)} results not yet stored by the hub" in first.stderr, first.stderr
    # the summary says so too (it said "stored by the hub" when the hub had stored nothing, then "0 results sent")
    said = re.search(rf": 0 results stored by the hub, {len(expected)} not yet \(the broker acknowledged ([\d,]+) sends\)",
                     first.stdout)
    assert said is not None and int(said.group(1).replace(",", "")) >= len(expected), first.stdout
    hub = ServeProcess(procs, broker, f"sqlite:///{tmp_path / 'hub.sqlite'}", prefix, tmp_path / "hub.log")
    hub.wait_started()
    again = run_agent("replay", str(log), *args)
    assert again.returncode == 0, again.stderr
    n = len(expected)
    # The earlier run's results go first; this run's, with the same keys, go again (the hub had them) unless they
    # reached the outbox while those were still there (it keeps one result a key): all, none or some of them, as
    # the receipts and this run's writes interleave. Either way n stored now, and each one sent counted once.
    said = re.search(r"([\d,]+) results sent \(the outbox held ([\d,]+) from an earlier run when this one started\)"
                     r"(?:, stored by the hub|; the hub stored ([\d,]+) and had ([\d,]+) already)", again.stdout)
    assert said is not None, again.stdout
    sent, held = int(said[1].replace(",", "")), int(said[2].replace(",", ""))
    stored, already = (int(x.replace(",", "")) for x in (said[3], said[4])) if said[3] else (sent, 0)
    assert held == n and stored == n and sent == n + already and 0 <= already <= n, again.stdout

def test_the_fleet_row_was_seen_when_its_devices_were_even_when_it_sent_only_duplicates(tmp_path: Path) -> None:
    """Results stored 9 minutes ago, sent again (a replay of duplicates) 12 s ago: each device and the
    fleet row were seen 12 s ago, in `stats` and its JSON alike."""
    from cloud_hub.data import db, sessions
    from cloud_hub.data.store import Batch, Store

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    store = Store(engine)
    stored, again = 1_000_000.0, 1_000_528.0
    for t in (stored, again):
        rows = [(d, seq, seq / 1000, seq / 1000 + 2, 1, "walk", 0.9, None, "walk", 0.5, None, t)
                for d in ("dev-a", "dev-b") for seq in range(0, 5000, 500)]
        with sessions.transaction(engine) as conn:
            store.write(conn, Batch(rows=rows, seen={"dev-a": t, "dev-b": t}))
    engine.dispose()
    code, out, err = invoke("stats", "--db", url, "--json")
    assert code == 0, err
    got = orjson.loads(out)
    assert {d: v["last_seen"] for d, v in got["devices"].items()} == {"dev-a": again, "dev-b": again}
    assert got["last_seen"] == again  # the fleet's, at the top level
