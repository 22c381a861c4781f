"""Exit codes of both command lines (``edge-agent`` and ``cloud-hub``), in one table.

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | unexpected failure (a bug: please report it with the log) |
| 2 | bad usage or settings: unknown option, invalid value (the message names the flag, variable or file) |
| 3 | broker or database unavailable: unreachable (with the cause), refused, taken over by another client; results not stored in time; a database that is not a hub database or at a schema revision this build does not serve |
| 4 | model: none usable, refused by its gate, not found, or not enough data |
| 5 | malformed input: a log file that is missing, unreadable, of unknown format or malformed (``file:line``), or a device id the contract refuses |
| 130 | interrupted by SIGTERM/SIGINT (the agent keeps its results in the outbox; `federate` keeps its open round; `demo` stops what it started) |
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Final

OK: Final = 0
UNEXPECTED: Final = 1
USAGE: Final = 2
UNAVAILABLE: Final = 3
MODEL: Final = 4
INPUT: Final = 5
INTERRUPTED: Final = 130



class Failure(Exception):
    """An error an operator can act on: a one-line message and the exit code of the table above.

    The errors of both packages derive from it (``SettingsError``, ``ContractError``, ``LogError``,
    ``MqttError``, ...; the hub's ``HubError``) and say their code as ``exit_code``: each command line
    turns any of them into one line on stderr and that code, in one place.
    """

    exit_code: int = UNEXPECTED


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
"""What stops a long-running command (``serve``, ``federate``, ``replay``, ``run``, ``demo``)."""

Handler = Callable[[int, FrameType | None], object]


def on_stop_signals(handler: Handler) -> Callable[[], None]:
    """Handle SIGTERM and SIGINT with ``handler``; returns what puts the previous handlers back.

    Both explicitly: a shell that starts a command in the background or under ``nohup`` hands SIGINT
    down as *ignored*, and Python then never raises KeyboardInterrupt: ``kill -INT`` (or Ctrl-C on a
    job brought back to the foreground) would do nothing. Outside the main thread (a test calling a
    command's function) signals cannot be handled, and nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def interrupt(signum: int, frame: FrameType | None) -> None:
    """A stop-signal handler that ends the command where it is: KeyboardInterrupt, whichever signal.

    Not inside a finalizer: Python prints an exception raised in ``__del__`` and goes on, so a signal that
    arrived while, say, paho's ``Client.__del__`` ran was lost, and the demo ran to its end and exited 0
    (seen once under load). There the signal is sent again a moment later, once the finalizer is over."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt
