"""Exit codes of both command lines (``edge-agent`` and ``cloud-hub``), in one table.

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | unexpected failure (a bug: please report it with the log) |
| 2 | bad usage or settings: unknown option, invalid value (the message names the flag, variable or file) |
| 3 | broker or database unavailable: unreachable (with the cause), refused, taken over by another client; results not stored in time; a database that is not a hub database or at a schema revision this build does not serve |
| 4 | model: none usable, refused by its gate, not found, or not enough data |
| 5 | malformed input: a log file that is missing, unreadable, of unknown format or malformed (``file:line``), or a device id the contract refuses |
| 130 | interrupted by SIGTERM/SIGINT (the agent keeps its results in the outbox; `federate` keeps its open round) |
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
UNEXPECTED: Final = 1
USAGE: Final = 2
UNAVAILABLE: Final = 3
MODEL: Final = 4
INPUT: Final = 5
INTERRUPTED: Final = 130
