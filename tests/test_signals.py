"""Every long-running command stops on SIGINT and SIGTERM with its one line, also when it was started
with SIGINT ignored: a shell hands SIGINT down as ignored to a background job or under ``nohup``, and
Python then never raises KeyboardInterrupt. Each command is spawned through a wrapper that sets
SIGINT's disposition itself, so no test depends on how the suite was started (`nohup ./dev test &`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import port_open
from edge_agent import exits
from tests.helpers import Processes, agent_cmd, make_log, wait_for
from tests.test_operator_errors import hub_cmd, one_line

_WRAPPER = ("import os, signal, sys; signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def started_with(sigint: str, cmd: list[str]) -> list[str]:
    """``cmd`` exec'd with SIGINT at its default or ignored (an ignored signal stays ignored across exec)."""
    return [sys.executable, "-c", _WRAPPER, {"default": "SIG_DFL", "ignored": "SIG_IGN"}[sigint], *cmd]


class Lines:
    """A process's stream read line by line on a thread: the test waits on what it says."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def said(self, text: str) -> bool:
        return any(text in ln for ln in self.lines)

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


def stopped(proc: subprocess.Popen, sig: signal.Signals, err: Lines) -> subprocess.CompletedProcess[str]:
    """Send ``sig``; the timeout only bounds a command that ignores it."""
    proc.send_signal(sig)
    proc.wait(30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err.text())


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_the_wrapper_starts_a_command_with_sigint_as_asked(sigint: str) -> None:
    probe = [sys.executable, "-c", "import signal; h = signal.getsignal(signal.SIGINT); "
             "print('ignored' if h == signal.SIG_IGN else 'default' if h is signal.default_int_handler else h)"]
    out = subprocess.run(started_with(sigint, probe), capture_output=True, text=True, timeout=30).stdout
    assert out.strip() == sigint


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_federate_says_what_it_waits_for_and_a_signal_ends_it_in_one_line(procs: Processes, shared_broker, prefix,
                                                                          tmp_path, sigint: str) -> None:
    from cloud_hub.data import db
    from cloud_hub.models import lifecycle
    from tests.helpers import SMALL

    db_url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    engine = db.make_engine(db_url)
    lifecycle.train_from_logs(engine, [str(make_log(tmp_path / "t.csv", seconds=60))], config=SMALL)  # 20 s: rejected
    engine.dispose()
    fed = procs.popen(started_with(sigint, hub_cmd(
        "federate", "--db", db_url, "--broker", shared_broker.url, "--prefix", prefix, "--insecure-unsigned",
        "--min-available", "2", "--wait-devices", "600")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(fed.stderr)

    def waiting() -> bool:
        assert fed.poll() is None, err.text()
        return err.said("waiting up to 600 s for 2 device(s) to report running default v1 (now 0)")

    wait_for(waiting, timeout=60, what="federate saying what it waits for")
    # no round was open yet: nothing to resume (it said "a round it opened stays open")
    one_line(stopped(fed, signal.SIGINT, err), exits.INTERRUPTED, "interrupted: no round was open")


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_serve_flushes_and_exits_on_sigint(procs: Processes, shared_broker, prefix, tmp_path, sigint: str) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = procs.popen(started_with(sigint, hub_cmd("serve", "--broker", shared_broker.url, "--db", url, "--prefix",
                                                   prefix, "--client-id", f"{prefix}-hub")),
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = Lines(hub.stderr)
    wait_for(lambda: err.said(" ingesting ") or hub.poll() is not None, what="serve to start")
    res = stopped(hub, signal.SIGINT, err)
    assert res.returncode == 0 and "final: this session" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "Aborted" not in res.stderr, res.stderr


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_log(tmp_path_factory.mktemp("signals") / "fleet.csv", seconds=20)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
@pytest.mark.parametrize("job", ["replay", "run"])
def test_an_agent_waiting_for_a_model_ends_on_sigint(procs: Processes, shared_broker, prefix, tmp_path, log: Path,
                                                     job: str, sigint: str) -> None:
    source = [str(log)] if job == "replay" else ["--source", "simulated", "--device-id", "sim-1"]
    agent = procs.popen(started_with(sigint, agent_cmd(
        job, *source, "--broker", shared_broker.url, "--prefix", prefix, "--state-dir", str(tmp_path / "s"),
        "--log-level", "INFO")), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_MODEL_WAIT_S": "120"})
    err = Lines(agent.stderr)
    wait_for(lambda: err.said("waiting up to 120 s for a model") or agent.poll() is not None, what="the model wait")
    one_line(stopped(agent, signal.SIGINT, err), exits.INTERRUPTED, "interrupted while waiting for a model")


def processes_naming(path: Path) -> list[str]:
    """Every live process whose command line holds ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or gone meanwhile
            continue
        if str(path) in cmd:
            found.append(f"{proc.name}: {cmd}")
    return found


@pytest.mark.parametrize(("sig", "stage", "started"), [
    (signal.SIGINT, "agents: 2 replaying", ("mosquitto", "edge_agent replay")),  # once every part runs
    (signal.SIGTERM, "private mosquitto on", ("mosquitto",)),  # early (the demo trains v1 meanwhile)
], ids=["SIGINT", "SIGTERM"])
def test_the_demo_stops_what_it_started_on_a_signal(procs: Processes, tmp_path, sig: signal.Signals, stage: str,
                                                    started: tuple[str, ...]) -> None:
    work = tmp_path / "demo"
    env = {**os.environ, "EDGEML_DEMO_DATA": str(tmp_path / "none.csv"), "COLUMNS": "160"}
    demo = procs.popen(started_with("ignored", hub_cmd("demo", "--agents", "2", "--workdir", str(work))),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = Lines(demo.stdout), Lines(demo.stderr)
    try:
        wait_for(lambda: out.said(stage) or demo.poll() is not None, timeout=120, what=stage)
        assert demo.poll() is None, out.text() + err.text()
        running = " ".join(processes_naming(work))
        assert all(name in running for name in started), running
        port = re.search(r"private mosquitto on mqtt://127\.0\.0\.1:(\d+)", "".join(out.lines))
        assert port is not None, out.lines
        one_line(stopped(demo, sig, err), exits.INTERRUPTED, "interrupted", "everything the demo started is stopped")
        assert processes_naming(work) == [], "nothing the demo started outlives it"
        assert not port_open("127.0.0.1", int(port.group(1)))
    finally:  # a failed run leaves no broker or agent behind: each is killed by its pid
        for leftover in processes_naming(work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(leftover.split(":")[0]), signal.SIGKILL)


def test_a_stop_signal_that_arrives_inside_a_finalizer_is_not_lost(tmp_path) -> None:
    """Python prints an exception raised in ``__del__`` and goes on: a SIGINT that arrived while paho's
    ``Client.__del__`` ran was lost, and the demo ran to its end and exited 0 (once, under load). The handler
    sends the signal again once the finalizer is over."""
    script = tmp_path / "finalizer.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from edge_agent import exits\n"
        "exits.on_stop_signals(exits.interrupt)\n"
        "class Dying:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        for _ in range(100_000):\n"
        "            pass\n"
        "try:\n"
        "    Dying()\n"
        "    deadline = time.monotonic() + 10\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
        "sys.exit(0)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Exception ignored" not in res.stderr, res.stderr
