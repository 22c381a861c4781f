"""Usage errors of both command-line tools as one line, like every other error of theirs.

click (under Typer) prints a usage error as a usage line, a hint and a boxed message: five lines for "no
such option". :class:`OneLineUsage`, the top-level group of ``edge-agent`` and ``cloud-hub``, says it as
``edge-agent: error: No such option: --sped (Did you mean --speed?) (edge-agent replay -h)`` with exit 2.
Everything else keeps click's standalone behaviour: ``typer.Exit`` codes, ``--help``, ``--version``; an
stray EOFError (typer's Abort) is exit 1 with one line instead of "Aborted!".
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

# click's exception classes, from a public name of typer's (typer 0.28 carries its own copy of click as a private
# module; before, these are click's own): BadParameter is a UsageError, a ClickException.
_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
UsageError: type[Exception] = _ERRORS["UsageError"]
ClickException: type[Exception] = _ERRORS["ClickException"]


# A path the operator gave that cannot be used: a folder where a file goes, no permission, read-only, not there.
_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
                          errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP})


class OneLineUsage(TyperGroup):
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        name = prog_name = prog_name or Path(sys.argv[0]).name or self.name or "command"
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except UsageError as exc:
            ctx, message = getattr(exc, "ctx", None), _message(exc)
            if not message:  # no arguments at all: the help was printed (no_args_is_help)
                sys.exit(getattr(exc, "exit_code", 2))
            where = ctx.command_path if ctx is not None else name
            _exit(getattr(exc, "exit_code", 2), f"{name}: error: {message} ({where} -h)")
        except ClickException as exc:  # a bad file argument and the like: click's own words, on one line
            _exit(getattr(exc, "exit_code", 1), f"{name}: error: {_message(exc)}")
        except OSError as exc:  # a file that cannot be used: the operator's path (2), or the disk (3)
            if exc.filename is None:
                raise
            code = 2 if exc.errno in _PATH_ERRNOS else 3  # a full disk, an I/O error, too many open files
            _exit(code, f"{name}: error: {exc.filename}: {exc.strerror or exc}")
        except typer.Abort:  # typer's word for an EOFError that no command caught: no command prompts, so a bug
            _exit(1, f"{name}: error: unexpected end of input (a bug: please report it with the log)")
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


def _message(exc: Exception) -> str:
    format_message = getattr(exc, "format_message", None)
    return str(format_message() if format_message is not None else exc).strip()


def _exit(code: int, line: str) -> NoReturn:
    typer.echo(" ".join(line.split()), err=True)  # click's messages may hold newlines
    sys.exit(code)
