"""Every mistake an operator can make gets its exit code and one readable line naming the file, the
broker or the variable: each case runs the real command as a subprocess, as a user would."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import LocalBroker, free_port
from edge_agent import exits
from tests.helpers import Processes, agent_cmd, make_bundle, make_log, outbox, wait_for

FAST = {"EDGE_AGENT_CONNECT_TIMEOUT_S": "2", "EDGE_AGENT_MODEL_WAIT_S": "30"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("operator")
    log = make_log(root / "fleet.csv", seconds=20)
    model = root / "v1.emlb"
    model.write_bytes(make_bundle(log).encode())
    data = gzip.compress(log.read_bytes())
    truncated = root / "cut.csv.gz"
    truncated.write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text(log.read_text())
    (root / "fake.csv.gz").write_bytes(b"not gzip at all\n")
    return {"log": log, "model": model, "truncated": truncated, "txt": root / "notes.txt",
            "fake_gz": root / "fake.csv.gz", "root": root}


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "CLOUD_HUB_"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})


def hub_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloud_hub", *args]


def one_line(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command exited with ``code`` and said one line holding every needle, without a traceback."""
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, err)
    assert "Traceback" not in err and "Aborted" not in err, err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]  # progress and log lines may precede it
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_log_files_that_cannot_be_read_are_named(files, tmp_path) -> None:
    m = str(files["model"])
    state = str(tmp_path / "s")
    cases = [
        (["nosuch.csv"], "nosuch.csv: cannot open: No such file or directory"),
        ([str(files["txt"])], "notes.txt: unknown log format"),
        ([str(files["truncated"])], "cut.csv.gz:"),
        ([str(files["fake_gz"])], "fake.csv.gz: not a valid gzip file"),
    ]
    for args, needle in cases:
        res = run(agent_cmd("replay", *args, "--model", m, "--state-dir", state, "--broker", "mqtt://127.0.0.1:1"),
                  env=FAST)
        line = one_line(res, exits.INPUT, needle)
        if "cut" in needle:
            assert "truncated" in line
        train = run(hub_cmd("train", *args, "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"))
        one_line(train, exits.INPUT, needle)


def test_failing_commands_leave_no_empty_database_behind(files, tmp_path) -> None:
    """`publish` before `train` (and every command that needs what another stored) creates no database; a
    `train` that fails removes the one it created, but never one that was there before."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    closed = f"mqtt://127.0.0.1:{free_port()}"
    for command in (["publish", "--broker", closed, "--insecure-unsigned"],
                    ["publish", "--broker", closed, "--insecure-unsigned", "--canary", "10%"],
                    ["retrain"], ["rollback", "--broker", closed], ["rollout", "status", "--check", "--broker", closed]):
        res = run(hub_cmd(*command, "--db", url))
        one_line(res, exits.UNAVAILABLE, "hub.sqlite' does not exist", "`cloud-hub train`")
        assert list(tmp_path.iterdir()) == [], command
    for log, needle in ((str(files["txt"]), "unknown log format"), (str(files["truncated"]), "truncated")):
        one_line(run(hub_cmd("train", log, "--db", url)), exits.INPUT, needle)
        assert list(tmp_path.iterdir()) == [], "no database file (nor its -wal, -shm) left behind"
    from cloud_hub.data import db

    db.make_engine(url).dispose()  # an empty hub database made before: a failing command leaves it be
    one_line(run(hub_cmd("train", str(files["txt"]), "--db", url)), exits.INPUT, "unknown log format")
    assert (tmp_path / "hub.sqlite").exists()
    one_line(run(hub_cmd("publish", "--broker", closed, "--insecure-unsigned", "--db", url)), exits.MODEL,
             "no publishable version", "cloud-hub train")


def test_an_unreachable_broker_is_named_with_its_cause_and_nothing_hangs(files, tmp_path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    state = tmp_path / "s"
    res = run(agent_cmd("replay", str(files["log"]), "--model", str(files["model"]), "--state-dir", str(state),
                        "--broker", closed), env=FAST)
    one_line(res, exits.UNAVAILABLE, closed, "connection refused", "stay in the outbox")
    assert len(outbox(state)) > 0, "what was produced is kept"
    res = run(agent_cmd("replay", str(files["log"]), "--state-dir", str(tmp_path / "s2"), "--broker",
                        "mqtt://no-such-host.invalid:1883"), env=FAST)
    one_line(res, exits.UNAVAILABLE, "unknown host 'no-such-host.invalid'")
    res = run(hub_cmd("serve", "--broker", closed, "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"),
              env={"CLOUD_HUB_CONNECT_TIMEOUT_S": "2"})
    one_line(res, exits.UNAVAILABLE, closed, "connection refused")


def test_timeout_bounds_every_wait_of_a_replay_not_only_the_receipts(files, tmp_path) -> None:
    """``--timeout 2`` against a broker nobody runs: it gives up on the broker (and on the model it would
    fetch) after 2 s, not after the 30 s of the settings' defaults."""
    closed = f"mqtt://127.0.0.1:{free_port()}"
    res = run(agent_cmd("replay", str(files["log"]), "--state-dir", str(tmp_path / "s"), "--broker", closed,
                        "--timeout", "2"))
    one_line(res, exits.UNAVAILABLE, f"cannot reach the broker {closed} for 2 s", "to get a model")


def test_a_hub_that_never_answers_is_named_at_the_timeout(shared_broker, prefix, files, tmp_path) -> None:
    res = run(agent_cmd("replay", str(files["log"]), "--model", str(files["model"]), "--prefix", prefix,
                        "--state-dir", str(tmp_path / "s"), "--broker", shared_broker.url, "--timeout", "1"))
    one_line(res, exits.UNAVAILABLE, "not yet stored by the hub within 1 s", "no hub receipted them",
             f"prefix '{prefix}'", "stay in the outbox")


def test_settings_errors_name_the_variable_and_show_what_was_written(files, tmp_path) -> None:
    res = run(agent_cmd("replay", str(files["log"])), env={"EDGE_AGENT_LOG_LEVEL": "verbose"})
    one_line(res, exits.USAGE, "environment EDGE_AGENT_LOG_LEVEL", "got 'verbose'")
    res = run(hub_cmd("stats", "--db", "sqlite:///x.sqlite"), env={"CLOUD_HUB_LOG_LEVEL": "loud"})
    one_line(res, exits.USAGE, "environment CLOUD_HUB_LOG_LEVEL", "got 'loud'")
    res = run(agent_cmd("replay", str(files["log"]), "--broker", "http://x"))
    one_line(res, exits.USAGE, "mqtt://")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('outbox_overflow = "explode"\n')
    res = run(agent_cmd("replay", str(files["log"]), "--config", str(cfg)))
    one_line(res, exits.USAGE, str(cfg), "outbox_overflow", "'explode'")


def test_an_unknown_variable_with_our_prefix_is_reported(files, tmp_path) -> None:
    res = run(agent_cmd("replay", "nosuch.csv"), env={"EDGE_AGENT_BROKR": "mqtt://x"})
    assert res.returncode == exits.INPUT
    assert "warning: ignoring environment variable EDGE_AGENT_BROKR" in res.stderr
    assert "did you mean EDGE_AGENT_BROKER?" in res.stderr
    res = run(hub_cmd("stats", "--db", f"sqlite:///{tmp_path / 'none.sqlite'}"), env={"CLOUD_HUB_DBB": "x"})
    assert res.returncode == exits.UNAVAILABLE and "CLOUD_HUB_DBB" in res.stderr and "CLOUD_HUB_DB?" in res.stderr


def test_results_never_go_to_another_broker_or_prefix(shared_broker, prefix, files, tmp_path) -> None:
    state = tmp_path / "s"
    closed = f"mqtt://127.0.0.1:{free_port()}"
    res = run(agent_cmd("replay", str(files["log"]), "--model", str(files["model"]), "--state-dir", str(state),
                        "--broker", closed, "--prefix", prefix), env=FAST)
    assert res.returncode == exits.UNAVAILABLE and outbox(state)
    res = run(agent_cmd("replay", str(files["log"]), "--model", str(files["model"]), "--state-dir", str(state),
                        "--broker", shared_broker.url, "--prefix", f"{prefix}-other"), env=FAST)
    one_line(res, exits.USAGE, f"state dir {state} holds", f"made for {closed}", f"prefix {prefix}",
             "another --state-dir")


def test_the_default_state_dir_is_one_per_broker_and_prefix(tmp_path) -> None:
    from edge_agent.settings.agent import AgentSettings
    from edge_agent.settings.loader import load_settings

    def state(**flags: str) -> Path:
        return load_settings(AgentSettings, env_prefix="EDGE_AGENT", environ={}, flags=flags).state_path

    assert state() != state(prefix="other") != state(broker="mqtt://elsewhere:1883")
    assert state(state_dir=str(tmp_path / "x")) == tmp_path / "x"


def test_two_hubs_with_one_client_id_are_told_so(procs: Processes, broker: LocalBroker, tmp_path) -> None:
    logs = [tmp_path / "h1.log", tmp_path / "h2.log"]
    hubs = []
    for i, log in enumerate(logs):
        with open(log, "wb") as out:
            hubs.append(procs.popen(hub_cmd("serve", "--broker", broker.url, "--db", f"sqlite:///{tmp_path}/{i}.sqlite",
                                            "--client-id", "same-hub"), stdout=out, stderr=out,
                                    env={**os.environ, "CLOUD_HUB_LOG_INTERVAL_S": "0"}))
        wait_for(lambda log=log: " ingesting " in log.read_text(), what="a hub to start")
    # mosquitto 2.0 closes the older connection without a reason code: both hubs see their connections
    # dropped within seconds, again and again; the first to notice stops and says why, the other then
    # keeps the session.
    wait_for(lambda: any(h.poll() is not None for h in hubs), timeout=60, what="a hub to notice")
    stopped = next(i for i, h in enumerate(hubs) if h.poll() is not None)
    assert hubs[stopped].returncode == exits.UNAVAILABLE
    text = logs[stopped].read_text()
    assert "cloud-hub: error: another client with the client id 'same-hub'" in text, text[-2000:]
    assert "give each process its own client id" in text and "Traceback" not in text
    assert text.count("another client with the client id") == 1, text[-2000:]  # said once, not logged as well
    assert hubs[1 - stopped].poll() is None, "the other hub keeps the session"



def test_a_link_that_lost_its_client_id_says_why_in_every_wait(broker: LocalBroker) -> None:
    """An exclusive link (the hub's, federate's) whose client id another process took stops and keeps the reason;
    a wait on it then raises that reason at once, not "no connection within N s" (federate waiting for its
    subscriptions would have said that, the reason lost)."""
    from edge_agent.mqtt import MqttError, MqttLink
    from edge_agent.settings.broker import BrokerURL

    url = BrokerURL.parse(broker.url)
    mine = MqttLink(url, "taken-id", exclusive=True, subscriptions=[("x/#", 1)])
    other = MqttLink(url, "taken-id")
    mine.start()
    mine.wait_connected(30)
    other.start()
    try:
        wait_for(lambda: mine.fatal is not None, timeout=60, what="the exclusive link to give up")
        for wait in (mine.wait_connected, mine.wait_subscribed, mine.connected_within):
            with pytest.raises(MqttError, match="another client with the client id 'taken-id'"):
                wait(5)
    finally:
        other.stop()
        mine.stop()

def test_default_hub_client_ids_differ_per_database_and_stay_stable(tmp_path) -> None:
    from cloud_hub.settings import HubSettings

    a, b = HubSettings(db="sqlite:///a.sqlite"), HubSettings(db="sqlite:///b.sqlite")
    assert a.session_id != b.session_id and a.session_id == HubSettings(db="sqlite:///a.sqlite").session_id
    assert a.session_id.startswith("cloud-hub-") and HubSettings(client_id="x").session_id == "x"


def test_a_device_only_install_says_which_extra_the_hub_needs() -> None:
    code = ("import sys; sys.modules['sqlalchemy'] = None; sys.argv = ['cloud-hub', 'stats']; "
            "from cloud_hub.cli.app import app; app()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    one_line(res, exits.USAGE, "sqlalchemy", "pip install '.[hub]' from a clone", "pip install 'edgeml-mqtt[hub]'")


def test_an_agent_without_prometheus_client_says_what_to_install(files, tmp_path) -> None:
    """The device install leaves prometheus_client out: metrics_port names the extra from a clone and published."""
    args = ["edge-agent", "replay", str(files["log"]), "--model", str(files["model"]), "--state-dir",
            str(tmp_path / "s"), "--broker", f"mqtt://127.0.0.1:{free_port()}"]
    code = (f"import sys; sys.modules['prometheus_client'] = None; sys.argv = {args!r}; "
            "from edge_agent.device.cli import app; app()")
    res = run([sys.executable, "-c", code], env={**FAST, "EDGE_AGENT_METRICS_PORT": str(free_port())})
    one_line(res, exits.USAGE, "metrics_port needs prometheus_client",
             "pip install './deploy/agent[agent-metrics]' from a clone", "'edgeml-agent[agent-metrics]'")


@pytest.mark.parametrize("exe", ["edge-agent", "cloud-hub"])
def test_version_and_short_help(exe: str) -> None:
    module = exe.replace("-", "_")
    res = run([sys.executable, "-m", module, "--version"])
    assert res.returncode == 0 and res.stdout.startswith(f"{exe} ")
    res = run([sys.executable, "-m", module, "-h"])
    assert res.returncode == 0 and "Usage" in res.stdout


def test_publish_takes_a_prefix_and_every_replay_option_is_documented() -> None:
    assert "--prefix" in run(hub_cmd("publish", "--help"), env={"COLUMNS": "200"}).stdout
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    help_text = run(agent_cmd("replay", "--help"), env={"COLUMNS": "200"}).stdout
    for option in ("--trusted-key", "--state-dir", "--timeout", "--prefix", "--until", "--log-level"):
        assert option in help_text and option in readme, option


def test_the_readme_exit_code_table_is_the_code_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code in (exits.USAGE, exits.UNAVAILABLE, exits.MODEL, exits.INPUT, exits.INTERRUPTED):
        assert f"| {code} |" in readme, code


def test_tables_fit_80_columns_and_never_cut_a_value(files, tmp_path) -> None:
    from cloud_hub.data import db, sessions
    from cloud_hub.data.store import Batch, Store
    from cloud_hub.models import lifecycle
    from edge_agent import contract as c
    from tests.helpers import SMALL

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    lifecycle.train_from_logs(engine, [str(files["log"])], holdout=["dev-c"], config=SMALL)
    devices = ["dev-a", "kitchen-sensor-with-a-long-name-042", "dev-c"]
    rows = [(d, 1_000 * k, float(k), k + 2.0, 1, "walk", 0.875, None, "walk" if k % 3 else "run", 0.0052,
             None, 1.0e9) for d in devices for k in range(40)]
    status = c.Status(devices[1], c.ONLINE, 1.0e9, "default", 1, "e" * 64, 123_456,
                      "broker refused a results message: Not authorized (retried after a restart)")
    with sessions.transaction(engine) as conn:
        Store(engine).write(conn, Batch(rows=rows, seen=dict.fromkeys(devices, 1.0e9),
                                        statuses={devices[1]: (status, 1.0e9)}))
    engine.dispose()
    for command in (["stats"], ["stats", "--bucket", "hour"], ["devices"], ["models"]):
        res = run(hub_cmd(*command, "--db", url), env={"COLUMNS": "80"})
        assert res.returncode == 0, res.stderr
        out = res.stdout
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert "…" not in out and "..." not in out, out
        if command == ["stats"] or command == ["devices"]:
            assert all(_first_column(out, d) for d in devices), out
    stats = run(hub_cmd("stats", "--db", url), env={"COLUMNS": "80"}).stdout
    assert "0.0052" in stats, "small latencies keep their digits"
    assert "v1" in stats and "held-out acc" in stats, "accuracy per model version, held out on its own"


def _first_column(out: str, value: str) -> bool:
    """Whether ``value`` stands whole in the first column, folded over several lines where narrow.

    A row starts where the second column has text (it never folds here); the lines below it until the
    next row continue its cells."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["device"])
    words = lines[head].split()
    x0, x1 = lines[head].index(words[0]), lines[head].index(words[1], len(words[0]))
    x2 = lines[head].index(words[2], x1 + len(words[1])) if len(words) > 2 else None
    cells: list[str] = []
    for line in lines[head + 2:]:
        if not line.strip():
            continue
        if line[x1:x2].strip():
            cells.append(line[x0:x1].strip())
        elif cells:
            cells[-1] += line[x0:x1].strip()
    return value in cells


def test_a_refused_model_ends_the_wait_with_what_to_do(shared_broker, prefix, files, tmp_path) -> None:
    from cloud_hub.models.signing import keygen, load_private_key, sign_bundle
    from edge_agent import contract as c
    from tests.test_ingest import Publisher

    priv, pub_key, _ = keygen(tmp_path / "hub.pem")
    signed = sign_bundle(c.decode_bundle(files["model"].read_bytes()), load_private_key(priv))
    pub = Publisher(shared_broker, f"{prefix}-pub")
    pub.publish(c.Topics(prefix).model("default"), signed.encode(), c.MODEL_DELIVERY)
    pub.wait_acked()
    pub.stop()
    res = run(agent_cmd("replay", str(files["log"]), "--broker", shared_broker.url, "--prefix", prefix,
                        "--state-dir", str(tmp_path / "s")), env={"EDGE_AGENT_MODEL_WAIT_S": "120"}, timeout=60)
    one_line(res, exits.MODEL, "was refused", "no trusted key is configured", "Pass --trusted-key")


def test_export_signs_with_a_key_so_a_trusted_agent_takes_it(files, tmp_path) -> None:
    from cloud_hub.models.signing import keygen
    from edge_agent.device.bundle import load_public_key, verify_bundle

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    log = make_log(tmp_path / "fleet.csv", seconds=60)  # the fixture's 20 s: a model no better than the majority
    assert run(hub_cmd("train", str(log), "--db", url, "--holdout-devices", "dev-c")).returncode == 0
    priv, pub_key, _ = keygen(tmp_path / "hub.pem")
    out = tmp_path / "signed.emlb"
    res = run(hub_cmd("export", str(out), "--db", url, "--signing-key", str(priv)))
    assert res.returncode == 0 and "unsigned" not in res.stdout, res.stdout + res.stderr
    bundle, _ = verify_bundle(out.read_bytes(), trusted_key=load_public_key(pub_key), allow_unsigned=False)
    assert bundle.manifest.signature is not None
    res = run(hub_cmd("export", str(tmp_path / "plain.emlb"), "--db", url))
    assert res.returncode == 0 and "unsigned" in res.stdout


def test_stats_of_an_unknown_device_says_so(files, tmp_path) -> None:
    from cloud_hub.data import db
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    db.make_engine(url).dispose()
    one_line(run(hub_cmd("stats", "--db", url, "--device", "nope")), exits.USAGE, "no device 'nope'")


def test_sample_writes_a_log_recorded_until_now(tmp_path) -> None:
    import time

    from edge_agent.sources import read_log

    out = tmp_path / "s.csv"
    res = run(hub_cmd("sample", str(out), "--devices", "a,b", "--seconds", "10"))
    assert res.returncode == 0 and "1,000 readings of 2 devices" in res.stdout
    whole = read_log(out).read_all()
    assert whole is not None and set(whole.device_names) == {"a", "b"}
    assert abs(float(whole.ts.max()) - time.time()) < 120


def test_federate_mistakes_are_one_line_each(shared_broker, prefix, tmp_path) -> None:
    from cloud_hub.data import db
    from cloud_hub.models.signing import keygen

    db_url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    db.make_engine(db_url).dispose()  # an empty hub database
    base = ["federate", "--db", db_url, "--prefix", prefix, "--insecure-unsigned", "--wait-devices", "1"]
    closed = f"mqtt://127.0.0.1:{free_port()}"
    res = run(hub_cmd(*base, "--broker", closed), env={"CLOUD_HUB_CONNECT_TIMEOUT_S": "2"})
    one_line(res, exits.UNAVAILABLE, closed, "connection refused")
    res = run(hub_cmd(*base, "--broker", shared_broker.url, "--holdout-log", str(tmp_path / "nope.csv")))
    one_line(res, exits.INPUT, "--holdout-log", "nope.csv: no such file")
    res = run(hub_cmd(*base, "--broker", shared_broker.url))
    one_line(res, exits.MODEL, "no model 'default' to federate", "cloud-hub train")
    res = run(hub_cmd("federate", "--db", db_url, "--broker", shared_broker.url))
    one_line(res, exits.USAGE, "no signing key", "--signing-key")
    _, public, _ = keygen(tmp_path / "k.pem")
    res = run(hub_cmd("federate", "--db", db_url, "--broker", shared_broker.url, "--signing-key", str(public)))
    one_line(res, exits.USAGE, f"signing_key '{public}' is a public key")
    for command in (["rounds"], ["federate", "--insecure-unsigned"]):  # neither creates a database not there
        res = run(hub_cmd(*command, "--db", f"sqlite:///{tmp_path / 'missing.sqlite'}"))
        one_line(res, exits.UNAVAILABLE, "missing.sqlite", "does not exist")
    assert not (tmp_path / "missing.sqlite").exists()


def test_device_id_on_a_log_of_several_devices_says_which_command_does_what(shared_broker, prefix, files,
                                                                            tmp_path) -> None:
    """--device-id renames a one-device log; on a log of several the line says what replay and run each do (it
    told `run` users to drop --device-id, which run needs)."""
    res = run(agent_cmd("replay", str(files["log"]), "--device-id", "renamed", "--model", str(files["model"]),
                        "--broker", shared_broker.url, "--prefix", prefix, "--state-dir", str(tmp_path / "s"),
                        "--until", "broker", "--speed", "0"))
    one_line(res, exits.INPUT, "--device-id renames a single-device log",
             "`edge-agent replay` without --device-id replays each under its own id",
             "`edge-agent run` is one device")


def test_paths_that_cannot_be_used_are_one_line_naming_them(files, tmp_path) -> None:
    """A state dir that is a file, an outbox that is not a database, a bundle or a log written over a folder
    or under a file: each one line naming the path, exit 2 (they were tracebacks, exit 1). Permissions (a
    read-only folder) take the same way; the suite runs as root, to whom no folder is read-only."""
    as_file = tmp_path / "a-file"
    as_file.write_text("x")
    base = ("--model", str(files["model"]), "--broker", "mqtt://127.0.0.1:1", "--timeout", "1")
    one_line(run(agent_cmd("replay", str(files["log"]), "--state-dir", str(as_file), *base)), 2, str(as_file))
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_text("not a database, a note someone left\n")
    one_line(run(agent_cmd("replay", str(files["log"]), "--state-dir", str(state), *base)), 2,
             f"cannot open the outbox {state / 'outbox.sqlite'}")
    one_line(run(hub_cmd("sample", str(as_file / "s.csv"))), 2, str(as_file), "File exists")
    one_line(run(hub_cmd("sample", str(tmp_path), "--force")), 2, str(tmp_path))


def test_tolerances_are_fractions_and_a_deadline_is_positive(tmp_path) -> None:
    """`--tolerance 5` meant 5 points and was stored as 500 (a canary that could never roll back); a negative
    round deadline opened a round that closed at once and blamed the devices. Each is one line, exit 2."""
    db = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    one_line(run(hub_cmd("publish", "--db", db, "--canary", "50%", "--tolerance", "5")), 2,
             "--tolerance is a fraction (0.02 = 2 accuracy points", "got 5")
    one_line(run(hub_cmd("stats", "--db", db), env={"CLOUD_HUB_CANARY_TOLERANCE": "2"}), 2, "canary_tolerance",
             "is a fraction")
    one_line(run(hub_cmd("federate", "--db", db, "--deadline", "-5")), 2, "--deadline", "got -5")
    one_line(run(hub_cmd("federate", "--db", db, "--tolerance", "-0.5")), 2, "--tolerance is how much worse")
    one_line(run(hub_cmd("federate", "--db", db, "--fraction", "0")), 2, "--fraction", "more than 0")
    one_line(run(hub_cmd("sample", str(tmp_path / "s.csv"), "--devices", "ok,bad/id")), 2, "invalid device id 'bad/id'")
    assert not (tmp_path / "s.csv").exists()


def test_serve_refuses_a_signing_key_that_cannot_sign_at_start(tmp_path) -> None:
    """It passed the start check (a file, not a public key) and failed hours later at the first promotion."""
    not_pem = tmp_path / "key.csv"
    not_pem.write_text("ts,device_id\n")
    res = run(hub_cmd("serve", "--signing-key", str(not_pem), "--db", f"sqlite:///{tmp_path / 'h.sqlite'}",
                      "--broker", "mqtt://127.0.0.1:1"))
    one_line(res, exits.USAGE, f"signing_key {str(not_pem)!r} is not a PEM private key")
    assert not (tmp_path / "h.sqlite").exists()
