"""More operator mistakes, found by a new user's first hour: each one ends at once with its exit code and one
line, or says what it does, instead of finishing wrongly or silently (the real commands, as subprocesses)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import LocalBroker, free_port
from edge_agent import contract as c
from edge_agent import exits
from tests.helpers import Processes, publish_retained
from tests.test_operator_errors import hub_cmd, one_line, run


def test_ctrl_c_while_train_fits_registers_nothing(procs: Processes, tmp_path: Path) -> None:
    """scikit-learn's MLP catches KeyboardInterrupt in its epoch loop, warns and returns: `train` then registered
    the half-trained model and exited 0. Now SIGINT ends it with 130 and leaves no database behind."""
    log = tmp_path / "log.csv"
    assert run(hub_cmd("sample", str(log), "--seconds", "300")).returncode == 0
    db = tmp_path / "hub.sqlite"
    proc = procs.popen(hub_cmd("train", str(log), "--db", f"sqlite:///{db}"), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the stage line printed just before fitting starts
        seen.append(line)
        if "training on" in line:
            break
    else:
        raise AssertionError(f"train never reached fitting: {seen}")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(120) == exits.INTERRUPTED, rest
    assert "cloud-hub: error: interrupted: no model registered" in rest, rest
    assert "Traceback" not in rest and "registered" not in "".join(seen), rest
    assert not db.exists()


def test_serve_with_a_taken_http_port_stops_before_it_stores_anything(shared_broker: LocalBroker, prefix: str,
                                                                     tmp_path: Path) -> None:
    """The HTTP door opens before the broker connection: a taken port no longer leaves behind a new database
    that already holds the fleet's retained statuses."""
    status = c.Status("dev-a", c.ONLINE, 1.0, model_version=1)
    publish_retained(shared_broker.url, c.Topics(prefix).status("dev-a"), status.encode())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "new.sqlite"
        res = run(hub_cmd("serve", "--broker", shared_broker.url, "--prefix", prefix, "--db", f"sqlite:///{db}",
                          "--http", str(port)), timeout=60)
    one_line(res, exits.USAGE, f"http {port}: cannot listen")
    assert not db.exists() and "creating a new database" not in res.stderr, res.stderr


def test_serve_says_when_it_creates_a_new_database(procs: Processes, shared_broker: LocalBroker, prefix: str,
                                                   tmp_path: Path) -> None:
    """A mistyped SQLite path makes a new database that receipts the fleet's results: serve says so, loudly."""
    db = tmp_path / "hbu.sqlite"
    proc = procs.popen(hub_cmd("serve", "--broker", shared_broker.url, "--prefix", prefix, "--db", f"sqlite:///{db}"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "creating a new database" in line:
            assert "WARNING" in line and str(db) in line, line
            break
        assert "ingesting" not in line, "serve connected without saying it made a new database"
    else:
        raise AssertionError("serve ended without a word about the new database")
    for line in proc.stderr:  # stopped once it runs (its signal handlers are in place by then)
        if "ingesting" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_a_missing_signing_key_is_refused_at_start(shared_broker: LocalBroker, tmp_path: Path) -> None:
    """serve used to run for hours and fail only when a canary came to be promoted."""
    missing = tmp_path / "keys" / "nope.pem"
    res = run(hub_cmd("serve", "--broker", shared_broker.url, "--db", f"sqlite:///{tmp_path / 'h.sqlite'}",
                      "--signing-key", str(missing)), timeout=60)
    one_line(res, exits.USAGE, f"signing_key '{missing}' does not exist", "cloud-hub keygen")
    assert not (tmp_path / "h.sqlite").exists()
    res = run(hub_cmd("publish", "--db", f"sqlite:///{tmp_path / 'h.sqlite'}", "--signing-key", str(tmp_path)))
    one_line(res, exits.USAGE, f"signing_key '{tmp_path}' is not a file")
    public = tmp_path / "hub.pub.pem"  # keys swapped: a setting given the wrong file (exit 4 before, as a bad model)
    public.write_bytes(b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA" + b"A" * 43 + b"=\n-----END PUBLIC KEY-----\n")
    res = run(hub_cmd("publish", "--db", f"sqlite:///{tmp_path / 'h.sqlite'}", "--signing-key", str(public)))
    one_line(res, exits.USAGE, f"signing_key '{public}' is a public key", "cloud-hub keygen")
    # a command that does not sign does not need the key (a config shared with machines that only read)
    res = run(hub_cmd("stats", "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"), env={"CLOUD_HUB_SIGNING_KEY": str(missing)})
    one_line(res, exits.UNAVAILABLE, "does not exist")
    assert "signing_key '" not in res.stderr and "keygen" not in res.stderr
    res = run(hub_cmd("rollout", "status", "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"),  # reads; --check signs
              env={"CLOUD_HUB_SIGNING_KEY": str(public)})
    one_line(res, exits.UNAVAILABLE, "does not exist")
    assert "signing_key '" not in res.stderr, res.stderr


def test_sample_does_not_overwrite_a_log_without_force(tmp_path: Path) -> None:
    log = tmp_path / "recorded.csv"
    log.write_text("ts,device_id,ax\n1,a,0.5\n")
    res = run(hub_cmd("sample", str(log), "--seconds", "5"))
    one_line(res, exits.USAGE, f"{log} exists", "--force")
    assert log.read_text() == "ts,device_id,ax\n1,a,0.5\n"
    assert run(hub_cmd("sample", str(log), "--seconds", "5", "--force")).returncode == 0
    assert log.read_text().startswith("ts,device_id,ax,ay,az")


def test_publish_says_which_broker_it_published_to(tmp_path: Path) -> None:
    """Without --broker, publish goes to 127.0.0.1:1883: its line names the broker, so a wrong one shows."""
    from tests.helpers import make_bundle, make_log

    log = make_log(tmp_path / "fleet.csv", seconds=60)  # 20 s: a model no better than the majority class (exit 4)
    bundle = tmp_path / "v1.emlb"
    bundle.write_bytes(make_bundle(log).encode())
    db = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    assert run(hub_cmd("train", str(log), "--db", db)).returncode == 0
    with LocalBroker(tmp_path / "mosquitto") as broker:
        res = run(hub_cmd("publish", "--db", db, "--broker", broker.url, "--insecure-unsigned", "--force"))
    assert res.returncode == 0, res.stderr
    assert f"at mqtt://127.0.0.1:{broker.port}" in res.stdout, res.stdout
    port = free_port()
    closed = run(hub_cmd("publish", "--db", db, "--broker", f"mqtt://127.0.0.1:{port}", "--insecure-unsigned",
                         "--force"), env={"CLOUD_HUB_CONNECT_TIMEOUT_S": "4"})
    # not a silent wait of 30 s: what is in the way after 3 s, the end at connect_timeout_s
    assert closed.stderr.startswith(f"cloud-hub: not connected to mqtt://127.0.0.1:{port} yet (connection refused"), \
        closed.stderr
    one_line(closed, exits.UNAVAILABLE, f"no connection to mqtt://127.0.0.1:{port} within 4 s: connection refused")


def test_a_sqlite_url_with_two_slashes_is_a_settings_mistake(tmp_path: Path) -> None:
    """`sqlite://hub.sqlite` parses as a host named hub.sqlite: SQLAlchemy refused it as a database error (exit 3)."""
    res = run(hub_cmd("stats", "--db", "sqlite://hub.sqlite"))
    one_line(res, exits.USAGE, "db 'sqlite://hub.sqlite'", "sqlite:///hub.sqlite")


def test_a_second_agent_on_one_state_dir_is_refused(procs: Processes, shared_broker: LocalBroker, prefix: str,
                                                   tmp_path: Path) -> None:
    """Two agents on one state dir shared its outbox (one reported -3 results in it) and, with one device id,
    knocked each other off the broker: the second now stops at once naming the folder and the first's pid,
    and the lock goes with its holder, however it ends (SIGKILL here)."""
    from tests.helpers import agent_cmd, make_bundle, make_log, wait_for

    log = make_log(tmp_path / "fleet.csv", seconds=20)
    model = tmp_path / "v1.emlb"
    model.write_bytes(make_bundle(log).encode())
    state = tmp_path / "state"
    common = ("--model", str(model), "--state-dir", str(state), "--broker", shared_broker.url, "--prefix", prefix,
              "--until", "broker")
    first = procs.popen(agent_cmd("replay", str(log), *common, "--speed", "0.5"), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    lock = state / "agent.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), what="the first agent's lock")
    second = run(agent_cmd("replay", str(log), *common, "--speed", "0"))
    one_line(second, exits.USAGE, f"state dir {state} is in use by another edge-agent (pid {first.pid})")
    assert first.poll() is None
    first.kill()
    first.wait(30)
    third = run(agent_cmd("replay", str(log), *common, "--speed", "0"))
    assert third.returncode == 0, third.stderr


def test_an_agents_missing_files_and_device_id_are_settings_mistakes(tmp_path: Path) -> None:
    """A trusted key or model file that is not there, or `run` without a device id: exit 2 (the operator's to fix),
    not 4 (a model the fleet sent), and the error said once, not repeated by the OS's own message."""
    from tests.helpers import agent_cmd, make_log

    log = make_log(tmp_path / "fleet.csv", seconds=10)
    common = ("--state-dir", str(tmp_path / "s"), "--broker", f"mqtt://127.0.0.1:{free_port()}")
    key = tmp_path / "keys" / "hub.pub.pem"
    line = one_line(run(agent_cmd("replay", str(log), "--trusted-key", str(key), *common)), exits.USAGE,
                    f"cannot read trusted key {key}: No such file or directory")
    assert line.count(str(key)) == 1, line
    model = tmp_path / "v9.emlb"
    one_line(run(agent_cmd("replay", str(log), "--model", str(model), *common)), exits.USAGE,
             f"cannot read model {model}: No such file or directory")
    one_line(run(agent_cmd("run", "--source", "simulated", *common)), exits.USAGE, "run needs device_id")


def test_usage_errors_are_one_line_naming_the_option(tmp_path: Path) -> None:
    """click printed a usage line, a hint and a five-line box; now one line, exit 2, with where to look."""
    from tests.helpers import agent_cmd

    one_line(run(hub_cmd("rply")), exits.USAGE, "No such command 'rply'", "(cloud-hub -h)")
    one_line(run(hub_cmd("demo", "--agents", "20")), exits.USAGE, "'--agents'", "(cloud-hub demo -h)")
    one_line(run(agent_cmd("replay", "--sped", "1", "x.csv")), exits.USAGE, "No such option: --sped",
             "--speed", "(edge-agent replay -h)")
    line = one_line(run(agent_cmd("replay", "--speed", "fast", "x.csv")), exits.USAGE, "'fast' is not a valid float")
    assert line.startswith("edge-agent: error: "), line
    assert run(agent_cmd("--version")).returncode == 0


def test_an_agent_that_fails_to_start_frees_its_state_dir(tmp_path: Path) -> None:
    """In one process (a test, an embedding program), an Agent whose start failed, or whose settings were refused,
    no longer keeps its state dir locked against the next one."""
    from edge_agent.device.agent import Agent
    from edge_agent.device.errors import BadSetting
    from edge_agent.settings.agent import AgentSettings
    from edge_agent.settings.loader import SettingsError, load_settings

    def settings(**flags: object) -> AgentSettings:
        return load_settings(AgentSettings, env_prefix="EDGE_AGENT", environ={}, flags={
            "state_dir": str(tmp_path / "s"), "broker": f"mqtt://127.0.0.1:{free_port()}", "device_id": "d-1",
            **flags})

    with pytest.raises(BadSetting, match="cannot read trusted key"):
        Agent(settings(trusted_key=str(tmp_path / "none.pem")), device_ids=("d-1",))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = Agent(settings(metrics_port=taken.getsockname()[1]), device_ids=("d-1",))
        with pytest.raises(SettingsError, match="metrics_port"):
            agent.start()
    again = Agent(settings(), device_ids=("d-1",))  # not refused as "in use by another edge-agent"
    again.outbox.close()


@pytest.mark.parametrize("command", [("db", "current"), ("db", "history"), ("db", "upgrade")])
def test_a_database_error_names_the_database(tmp_path: Path, command: tuple[str, ...]) -> None:
    """`db current` on a file that is not a database said "database error: file is not a database", without
    saying which: an operator with a config file, an environment variable and a flag could not tell."""
    bad = tmp_path / "notes.sqlite"
    bad.write_text("these are notes, not a database " * 40)
    res = run(hub_cmd(*command, "--db", f"sqlite:///{bad}"))
    one_line(res, exits.UNAVAILABLE, f"database error on sqlite:///{bad}: file is not a database")
    # never a password, in the user part or as a query parameter (the port refuses: a database error)
    hidden = run(hub_cmd(*command, "--db", "postgresql+psycopg://bob:pw1@127.0.0.1:1/x?password=s3cret"))
    assert hidden.returncode == exits.UNAVAILABLE and "bob:***@" in hidden.stderr, hidden.stderr
    assert "s3cret" not in hidden.stderr and "pw1" not in hidden.stderr and "password=***" in hidden.stderr


@pytest.mark.parametrize(("command", "wants"), [
    (("replay", "--speed", "nan", "x.csv"), "--speed must be >= 0"),
    (("replay", "--timeout", "-1", "x.csv"), "--timeout is seconds to wait: more than 0, got -1"),
    (("replay", "--timeout", "nan", "x.csv"), "--timeout is seconds to wait: more than 0, got nan"),
])
def test_a_replay_wait_or_pace_that_is_no_number_of_seconds_is_refused(command: tuple[str, ...], wants: str) -> None:
    """`--timeout -1` said "not yet acknowledged within -1 s" after a whole replay; `--speed nan` was taken."""
    from tests.helpers import agent_cmd

    one_line(run(agent_cmd(*command)), exits.USAGE, wants)


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_federate_refuses_a_device_wait_that_is_no_number_of_seconds(value: str) -> None:
    """`--wait-devices nan` waited for ever (a new user's finding); -1 was taken. (inf: as long as it takes.)"""
    one_line(run(hub_cmd("federate", "--wait-devices", value, "--insecure-unsigned")), exits.USAGE,
             f"--wait-devices is how long to wait for devices, in seconds: 0 or more, got {value}")


@pytest.mark.parametrize(("flag", "value"), [("--window", "0"), ("--hop", "-1"), ("--window", "nan")])
def test_train_refuses_a_window_or_hop_that_is_no_length(tmp_path: Path, flag: str, value: str) -> None:
    """`train --window 0` read the log, then exit 4 with "invalid PreprocessParams" (a class name); now exit 2 at once."""
    res = run(hub_cmd("train", str(tmp_path / "absent.csv"), flag, value, "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"))
    one_line(res, exits.USAGE, f"{flag} is seconds: more than 0, got {value}")


@pytest.mark.parametrize("module", ["dp_accounting", "msgspec", "sqlalchemy"])
def test_a_missing_hub_dependency_is_one_line_naming_the_extra(module: str) -> None:
    """dp_accounting or msgspec missing gave a traceback (exit 1) at the first command that needed it."""
    import sys

    code = f"import sys; sys.modules[{module!r}] = None; import cloud_hub.cli.app"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    one_line(res, exits.USAGE, f"missing: {module}", "install the hub extra")


def test_a_model_named_receipts_still_gets_its_round_announcements(tmp_path: Path) -> None:
    """The agent routed every topic ending in /receipts to the outbox's receipts first: a model named "receipts"
    would never have seen a round (a hostile peer's note). The exact topics are matched first now."""
    from edge_agent.device.agent import Agent
    from edge_agent.mqtt import Message
    from edge_agent.settings.agent import AgentSettings
    from edge_agent.settings.loader import load_settings

    s = load_settings(AgentSettings, env_prefix="EDGE_AGENT", environ={}, flags={
        "state_dir": str(tmp_path / "s"), "broker": f"mqtt://127.0.0.1:{free_port()}", "device_id": "d-1",
        "model_name": "receipts"})
    agent = Agent(s, device_ids=("d-1",))
    try:
        offered: list[bytes] = []
        agent.learner.offer = offered.append  # type: ignore[union-attr, method-assign]
        receipts: list[str] = []
        agent.publisher.on_receipt = lambda topic, payload: receipts.append(topic)  # type: ignore[method-assign]
        topics = c.Topics(s.prefix)
        agent._on_message(Message(topics.rounds("receipts"), b"announcement", 1, True, 1))
        agent._on_message(Message(topics.receipts("d-1"), b"receipt", 1, False, 2))
        assert offered == [b"announcement"] and receipts == [topics.receipts("d-1")]
    finally:
        agent.close()


def test_train_on_a_slow_log_says_to_set_the_window(tmp_path: Path) -> None:
    """A new user's 1 Hz climate log: "invalid PreprocessParams: window_s=2.5 gives fewer than 2 samples", with no
    word of the flags that fix it."""
    log = tmp_path / "climate.csv"
    log.write_text("ts,device_id,t,label\n" + "".join(f"{i},d1,{20 + i % 5},{'warm' if i % 40 < 20 else 'cold'}\n"
                                                      for i in range(600)))
    res = run(hub_cmd("train", str(log), "--db", f"sqlite:///{tmp_path / 'h.sqlite'}"))
    line = one_line(res, exits.MODEL, f"{log}: the windows do not fit this log: hop_s=0.5 gives a hop of less than",
                    "set --window and --hop")
    assert "PreprocessParams" not in line


@pytest.mark.parametrize(("args", "wants"), [
    (("dead-letters", "--limit", "99999999999999999999"), "'--limit': 99999999999999999999 is not in the range"),
    (("rounds", "--last", "99999999999999999999"), "'--last': 99999999999999999999 is not in the range"),
    (("export", "OUT", "--version", "99999999999999999999"), "'--version': 99999999999999999999 is not in the range"),
    (("sample", "OUT", "--seconds", "nan"), "--seconds must be > 0 and at most 604,800 (a week)"),
    (("sample", "OUT", "--seconds", "1e300"), "--seconds must be > 0 and at most 604,800 (a week)"),
    (("sample", "OUT", "--seed", "-1"), "'--seed': -1 is not in the range x>=0"),
    (("stats", "--since", "nan"), "--since: 'nan' is no time"),
    (("stats", "--since", "1e400"), "--since: '1e400' is no time"),
])
def test_numbers_no_command_can_use_are_one_line_not_a_traceback(tmp_path: Path, args: tuple[str, ...],
                                                                   wants: str) -> None:
    """A hostile peer's findings: an OverflowError traceback (SQLite's integers), a ValueError from numpy, a
    sample that wrote 273 MB in 20 s and would have filled the disk, and a --since that showed 0 results."""
    from typer.testing import CliRunner

    from cloud_hub.cli.app import app as hub_app
    from cloud_hub.data import db

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    db.make_engine(url).dispose()
    argv = [str(tmp_path / "out.csv") if a == "OUT" else a for a in args]
    if args[0] not in ("sample",):
        argv += ["--db", url]
    res = CliRunner().invoke(hub_app, argv)
    assert res.exit_code == exits.USAGE and wants in res.stderr, (res.exit_code, res.output)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out.csv").exists()
