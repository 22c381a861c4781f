"""The data commands: `serve` as a real process (SIGKILL and SIGTERM), `stats` and `devices` with CliRunner."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from cloud_hub.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE
from cloud_hub.cli.data import register
from cloud_hub.data import db, sessions, tables
from cloud_hub.data.store import Store, dead_letter
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from tests.helpers import Processes, wait_for
from tests.test_ingest import Publisher, batch, stored_keys

runner = CliRunner()


def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli_app(), list(args))
    return result.exit_code, result.stdout, result.stderr


class ServeProcess:
    """`cloud-hub serve` as a real subprocess, logging to a file."""

    def __init__(self, procs: Processes, broker: LocalBroker, url: str, prefix: str, log: Path,
                 env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.log = log
        env = {**os.environ, "CLOUD_HUB_LOG_INTERVAL_S": "1", **(env or {})}
        with open(log, "ab") as out:
            self.proc = procs.popen(
                [sys.executable, "-m", "cloud_hub", "serve", "--broker", broker.url, "--db", url,
                 "--prefix", prefix, "--client-id", f"{prefix}-hub", *args], stdout=out, stderr=out, env=env)

    def wait_started(self) -> None:
        """Until the hub logs that it ingests (its signal handlers are in place by then)."""
        wait_for(lambda: " ingesting " in self.log.read_text() or self.proc.poll() is not None, what="serve")
        assert self.proc.poll() is None, self.log.read_text()

    def signal(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def final_line(self) -> str:
        lines = [ln for ln in self.log.read_text().splitlines() if "final:" in ln]
        assert lines, self.log.read_text()
        return lines[-1]


def wait_ready(pub: Publisher, topics: c.Topics, url: str, probe: str) -> None:
    """A retained status reaches the hub once it has subscribed: wait until it is stored."""
    pub.publish(topics.status(probe), c.Status(probe, c.ONLINE, time.time()).encode(), c.STATUS_DELIVERY)

    def stored() -> bool:
        engine = db.make_engine(url)
        try:
            with sessions.transaction(engine, write=False) as conn:
                return conn.execute(sa.select(tables.devices.c.device_id)
                                    .where(tables.devices.c.device_id == probe)).first() is not None
        finally:
            engine.dispose()

    wait_for(stored, what="the hub to subscribe")


def count_rows(url: str) -> int:
    return len(stored_keys(url))


@pytest.mark.slow
def test_serve_killed_mid_stream_and_restarted_stores_every_result_once(
        procs, broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    topics = c.Topics(prefix)
    pub = Publisher(broker, f"{prefix}-pub")
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve.log")
    wait_ready(pub, topics, url, "probe-1")
    batches = [batch(f"dev-{k % 3}", 1000 + 20 * k, 20) for k in range(240)]

    def publish(part: list[c.ResultBatch], pause: float) -> None:
        for b in part:
            pub.publish(topics.results(b.device_id), b.encode())
            time.sleep(pause)

    stream = threading.Thread(target=publish, args=(batches[:120], 0.004))
    stream.start()
    wait_for(lambda: count_rows(url) >= 400, what="the first rows")
    assert hub.signal(signal.SIGKILL) == -signal.SIGKILL  # mid-stream: nothing flushed, nothing acked after
    stream.join()
    publish(batches[120:180], 0.0)  # while no hub runs: the broker queues them in the hub's session
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve2.log")
    publish(batches[180:], 0.002)
    pub.wait_acked()
    expected = {(b.device_id, r.seq) for b in batches for r in b.results}
    wait_for(lambda: count_rows(url) >= len(expected), what="every result")
    hub.wait_started()
    assert hub.signal(signal.SIGTERM) == 0
    got = stored_keys(url)
    assert len(got) == len(expected) == 4800
    assert set(got) == expected

    code, out, _ = invoke("stats", "--db", url, "--json")  # stats agrees with the rows stored
    assert code == 0
    stats = orjson.loads(out)
    assert stats["results"] == 4800 and stats["dead_letters"] == 0
    assert {d: v["results"] for d, v in stats["devices"].items()} == {
        "dev-0": 1600, "dev-1": 1600, "dev-2": 1600, "probe-1": 0}
    pub.stop()


@pytest.mark.slow
def test_serve_exits_0_on_sigterm_after_flushing(procs, broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    topics = c.Topics(prefix)
    pub = Publisher(broker, f"{prefix}-pub")
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve1.log")
    wait_ready(pub, topics, url, "probe")
    batches = [batch("dev-a", 20 * k, 20) for k in range(150)]

    def stream() -> None:
        for b in batches:
            pub.publish(topics.results("dev-a"), b.encode())
            time.sleep(0.003)

    publisher = threading.Thread(target=stream)
    publisher.start()
    wait_for(lambda: count_rows(url) >= 400, what="the first rows")
    assert hub.signal(signal.SIGTERM) == 0  # while the stream goes on
    first = count_rows(url)
    final = hub.final_line()
    assert f"{first} rows stored" in final, final  # what it logged as stored is what is in the table
    assert "Traceback" not in hub.log.read_text()
    publisher.join()
    pub.wait_acked()

    # Everything the first run committed was acknowledged: the second run sees no duplicate.
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve2.log")
    hub.wait_started()
    wait_for(lambda: count_rows(url) >= 3000, what="the rest")
    assert hub.signal(signal.SIGINT) == 0
    assert re.search(r"\b0 duplicates ignored", hub.final_line()), hub.final_line()
    assert set(stored_keys(url)) == {("dev-a", s) for s in range(3000)}
    assert count_rows(url) == 3000
    pub.stop()


def test_stats_json_numbers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    store = Store(engine)
    t0 = 1_699_999_200.0  # 2023-11-14T22:00:00Z, a whole hour

    def r(device: str, seq: int, start: float, label: str, truth: str | None, conf: float, lat: float,
          version: int = 1) -> tuple:
        return (device, seq, start, start + 2, version, label, conf, None, truth, lat, None, 99.0)

    rows = [r("a", 1, t0 + 10, "walk", "walk", 0.8, 1.0), r("a", 2, t0 + 70, "run", "walk", 0.6, 3.0, 2),
            r("a", 3, t0 + 20, "walk", None, 0.7, 2.0),  # a late result for the first minute
            r("b", 1, t0 + 3700, "sit", "sit", 0.9, 5.0, 4)]
    with sessions.transaction(engine) as conn:
        store.insert_results(conn, rows)
        store.touch_devices(conn, {"a": 99.0, "b": 99.0})
        store.insert_dead_letters(conn, [dead_letter("x", b"junk", "bad", 99.0, 100)])
    engine.dispose()

    code, out, err = invoke("stats", "--db", url, "--json")
    assert code == 0, err
    s = orjson.loads(out)
    assert (s["results"], s["dead_letters"], s["labelled"]) == (4, 1, 3)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["mean_confidence"] == pytest.approx(0.75)
    assert s["classes"] == {"run": 1, "sit": 1, "walk": 2} and "buckets" not in s
    a, b = s["devices"]["a"], s["devices"]["b"]
    assert (a["results"], a["accuracy"], a["model_version"]) == (3, 0.5, 1)  # version of its latest seq
    assert (b["results"], b["accuracy"], b["model_version"]) == (1, 1.0, 4)
    assert a["latency_ms"] == {"p50": 2.0, "p95": pytest.approx(2.9)}

    code, out, _ = invoke("stats", "--db", url, "--json", "--bucket", "minute", "--device", "a")
    s = orjson.loads(out)
    assert s["results"] == 3 and list(s["devices"]) == ["a"]
    assert [(x["start"], x["results"], x["accuracy"]) for x in s["buckets"]] == [
        (t0, 2, 1.0), (t0 + 60, 1, 0.0)]
    assert s["buckets"][0]["devices"]["a"]["classes"] == {"walk": 2}

    code, out, _ = invoke("stats", "--db", url, "--json", "--bucket", "hour", "--since", "2023-11-14T22:00:40Z")
    s = orjson.loads(out)
    assert s["results"] == 2 and [(x["start"], x["results"]) for x in s["buckets"]] == [(t0, 1), (t0 + 3600, 1)]

    code, out, _ = invoke("stats", "--db", url)  # the readable table
    assert code == 0 and "fleet" in out and "dead letters: 1" in out

    code, out, _ = invoke("devices", "--db", url, "--json")
    assert code == 0
    devs = orjson.loads(out)
    assert set(devs) == {"a", "b"} and devs["a"]["results"] == 3 and devs["a"]["state"] == "online"
    code, out, _ = invoke("devices", "--db", url)
    assert code == 0 and "online" in out


def test_errors_have_documented_exit_codes(tmp_path: Path) -> None:
    cases = [
        (["stats", "--db", "no url"], EXIT_USAGE, "not a database URL"),
        (["stats", "--db", f"sqlite:///{tmp_path / 'missing.sqlite'}"], EXIT_UNAVAILABLE, "does not exist"),
        (["stats", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/x"], EXIT_UNAVAILABLE, "cannot open"),
        (["stats", "--db", "sqlite://", "--bucket", "week"], EXIT_USAGE, "--bucket must be one of minute, hour"),
        (["stats", "--db", "sqlite://", "--since", "soon"], EXIT_USAGE, "--since"),
        (["devices", "--config", str(tmp_path / "nope.toml")], EXIT_USAGE, "does not exist"),
        (["serve", "--broker", "http://x"], EXIT_USAGE, "must start with mqtt://"),
        (["serve", "--db", "sqlite://", "--share-group", "a/b"], EXIT_USAGE, "invalid share group"),
    ]
    for args, code, message in cases:
        got, out, err = invoke(*args)
        assert got == code, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)


def test_a_sqlite_file_in_a_folder_that_does_not_exist_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    """A new operator's finding: "database error on ...: unable to open database file", exit 3, naming no folder."""
    proc = subprocess.run([sys.executable, "-m", "cloud_hub", "db", "upgrade", "--db",
                           f"sqlite:///{tmp_path / 'nope' / 'hub.sqlite'}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stderr.strip() == (f"cloud-hub: error: db 'sqlite:///{tmp_path / 'nope' / 'hub.sqlite'}': the folder "
                                   f"'{tmp_path / 'nope'}' does not exist (create it, or name a file in another)")


def test_serve_exits_3_when_the_broker_is_unreachable_and_leaves_no_empty_database(tmp_path: Path) -> None:
    """A hub started with a wrong broker address creates no database; one that was there stays."""
    from cloud_hub.data import revisions
    from cloud_hub.tools.local_broker import free_port

    def serve(path: Path) -> None:
        proc = subprocess.run([sys.executable, "-m", "cloud_hub", "serve", "--broker",
                               f"mqtt://127.0.0.1:{free_port()}", "--db", f"sqlite:///{path}"], capture_output=True,
                              text=True, env={**os.environ, "CLOUD_HUB_CONNECT_TIMEOUT_S": "1"}, timeout=60)
        assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr
        assert "cloud-hub: error: no connection to" in proc.stderr and "Traceback" not in proc.stderr

    serve(tmp_path / "new.sqlite")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no database file (nor its -wal, -shm) left behind"
    existing = tmp_path / "hub.sqlite"
    db.make_engine(f"sqlite:///{existing}").dispose()  # an empty hub database made before: never removed
    serve(existing)
    engine = db.make_engine(f"sqlite:///{existing}", create=False)
    try:
        with sessions.transaction(engine, write=False) as conn:
            assert revisions.current(conn) == revisions.HEAD
    finally:
        engine.dispose()


def test_hub_settings_from_file_environment_and_flags(tmp_path: Path) -> None:
    from cloud_hub.settings import ENV_PREFIX, HubSettings
    from edge_agent.settings.loader import SettingsError, load_settings

    cfg = tmp_path / "hub.toml"
    cfg.write_text('db = "sqlite:///file.sqlite"\nshare_group = "hubs"\nbatch_max = 100\n')
    s = load_settings(HubSettings, env_prefix=ENV_PREFIX, config=cfg,
                      environ={"CLOUD_HUB_PREFIX": "fleet", "CLOUD_HUB_BATCH_MAX": "200"},
                      flags={"client_id": "hub-7", "prefix": None})
    assert (s.db, s.share_group, s.batch_max, s.prefix, s.client_id) == (
        "sqlite:///file.sqlite", "hubs", 200, "fleet", "hub-7")
    assert s.topics.shared(s.topics.all_results, s.share_group) == "$share/hubs/fleet/devices/+/results"
    for flags, message in [({"prefix": "a/#"}, "invalid topic prefix"), ({"batch_max": 0}, "batch_max must be > 0"),
                           ({"log_level": "LOUD"}, "log_level must be one of"), ({"db": "::"}, "not a database URL"),
                           ({"client_id": "a b"}, "invalid client id")]:
        with pytest.raises(SettingsError, match=re.escape(message)):
            load_settings(HubSettings, env_prefix=ENV_PREFIX, environ={}, flags=flags)


def test_text_a_device_chose_is_printed_as_it_is(tmp_path: Path) -> None:
    """A label ``[/bold]`` stopped `stats` with rich's MarkupError (and a model name ``[/x]`` `devices`), for good:
    the row stays. Escape sequences and NULs in a device's text reached the operator's terminal raw."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    store = Store(engine)
    label, evil = "[/bold]", "\x1b]0;pwned\x07[red]x[/red]\x00\u202egol.exe"  # and a right-to-left override
    with sessions.transaction(engine) as conn:
        store.insert_results(conn, [("d1", 1, 10.0, 12.0, 1, label, 0.9, None, label, 1.0, None, 99.0),
                                    ("d1", 2, 12.0, 14.0, 1, evil, 0.9, None, None, 1.0, None, 99.0)])
        store.apply_statuses(conn, {"d1": (c.Status("d1", c.ONLINE, 99.0, "[/x]", 1, "e" * 64, 0, evil), 99.0)})
    engine.dispose()
    code, out, err = invoke("stats", "--db", url)
    assert code == 0, err
    assert "classes: \\x1b]0;pwned\\x07[red]x[/red]\\x00\\u202egol.exe 1, [/bold] 1" in out, out
    code, out, err = invoke("devices", "--db", url)
    assert code == 0, err
    assert "[/x] v1" in out and "\\x1b]0;pwned" in out and "\x1b" not in out and "\x00" not in out, out
    assert "\u202e" not in out and "\\u202egol.exe" in out, out


def test_dead_letters_lists_what_the_hub_refused_and_why(tmp_path: Path) -> None:
    """`cloud-hub dead-letters` (the docs named it before it existed): newest first, by device, since a time,
    as a table or JSON with the kept payload."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    topics = c.Topics("edgeml")
    letters = [dead_letter(topics.results("d1"), b"not json", "results payload is not valid JSON: x", 100.0, 64),
               dead_letter(topics.results("d2"), b'{"v":9}', "results has unsupported schema version 9", 200.0, 64),
               dead_letter(topics.status("d1"), b"\x1b[31m" + b"y" * 100, "status payload is not valid JSON", 300.0, 64)]
    with sessions.transaction(engine) as conn:
        Store(engine).insert_dead_letters(conn, letters)
    engine.dispose()

    code, out, err = invoke("dead-letters", "--db", url)
    assert code == 0, err
    assert "newest 3 of 3" in out and out.index("1970-01-01 00:05:00") < out.index("1970-01-01 00:01:40"), out
    assert "unsupported schema version 9" in out and "\\x1b[31myyy" in out and "\x1b" not in out, out
    code, out, err = invoke("dead-letters", "--db", url, "--device", "d1", "--since", "150", "--json")
    assert code == 0, err
    got = orjson.loads(out)
    assert got["total"] == 1 and [d["topic"] for d in got["dead_letters"]] == [topics.status("d1")]
    assert got["dead_letters"][0]["size"] == 105 and len(base64.b64decode(got["dead_letters"][0]["payload"])) == 64
    code, out, _ = invoke("dead-letters", "--db", url, "--limit", "1")
    assert "newest 1 of 3" in out and "status payload" in out, out
    code, out, _ = invoke("dead-letters", "--db", url, "--device", "d3")
    assert code == 0 and "no dead letters of d3" in out, out
    code, _, err = invoke("dead-letters", "--db", url, "--device", "a/b")
    assert code == EXIT_USAGE and "not a device id" in err, err
