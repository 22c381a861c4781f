"""A private mosquitto for tests, the demo and benchmarks, from a config derived from ``mosquitto.conf``.

Used by the test suite (a real broker, never a mock) and by ``cloud-hub demo``. The derived config
keeps every line of the base file except the listener, persistence location and log destination,
which point at a free loopback port and a private work folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# The project's mosquitto.conf (at the repository root; cloud_hub/mosquitto.conf links to it, and a built
# wheel carries a copy there).
REPO_CONF = Path(__file__).parent / "mosquitto.conf"
_REPLACED = ("listener", "port", "bind_address", "persistence_location", "log_dest", "pid_file", "user")


class BrokerError(RuntimeError):
    """mosquitto is missing or did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def derive_config(base: str, *, port: int, workdir: Path) -> str:
    """The base config with our listener, persistence folder and log file."""
    kept = [
        line for line in base.splitlines()
        if line.strip().split(" ", 1)[0] not in _REPLACED
    ]
    # Listener options of the base file (TLS files, protocol) must follow a listener line, so ours
    # goes first and they apply to it.
    head = [f"listener {port} 127.0.0.1"]
    # Started as root, mosquitto drops to the `mosquitto` user, which cannot write our work folder.
    user = pwd.getpwuid(os.getuid()).pw_name
    tail = [f"persistence_location {workdir}/", f"log_dest file {workdir / 'mosquitto.log'}", f"user {user}"]
    return "\n".join([*head, *kept, *tail]) + "\n"


class LocalBroker:
    """A mosquitto process on a loopback port, started and stopped by its pid."""

    def __init__(self, workdir: Path, *, port: int | None = None, base_config: Path | str | None = None,
                 config_text: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        if config_text is None:
            base = Path(base_config) if base_config else REPO_CONF
            try:
                text = base.read_text()
            except OSError as exc:  # never fall back to mosquitto's defaults: they drop QoS 1 messages
                raise BrokerError(f"broker config {base} cannot be read ({exc.strerror}): reinstall the "
                                  "package, or pass the config of your broker") from exc
            config_text = derive_config(text, port=self.port, workdir=self.workdir)
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0) -> LocalBroker:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if exe is None:
            raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install -y mosquitto)")
        log = open(self.workdir / "mosquitto.stderr", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([exe, "-c", str(self.config_path)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not accept connections on port {self.port} within {timeout:g} s")

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not yet autosaved is gone."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, n: int = 20) -> str:
        lines: list[str] = []
        for name in ("mosquitto.stderr", "mosquitto.log"):
            with contextlib.suppress(OSError):
                lines += (self.workdir / name).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
