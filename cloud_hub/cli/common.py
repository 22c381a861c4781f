"""What every ``cloud-hub`` command group shares: the common options, settings, the database, errors and tables.

Exit codes: :mod:`edge_agent.exits`. Errors are one readable line on stderr, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cloud_hub.data.summaries import shown
from cloud_hub.settings import ENV_PREFIX, HubSettings
from edge_agent import exits
from edge_agent.settings.loader import load_settings

EXIT_USAGE = exits.USAGE
EXIT_UNAVAILABLE = exits.UNAVAILABLE
EXIT_MODEL = exits.MODEL
EXIT_INPUT = exits.INPUT

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file of hub settings (keys = field names).",
                                                envvar=f"{ENV_PREFIX}_CONFIG")]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy database URL (default: sqlite:///hub.sqlite).")]


def settings_from(config: Path | None, *, signs: bool = False, **flags: Any) -> HubSettings:
    """The command's settings; ``signs``: it signs bundles, so its signing key must be there (checked now)."""
    settings = load_settings(HubSettings, env_prefix=ENV_PREFIX, config=config, flags=flags,
                             warn=lambda m: typer.echo(f"cloud-hub: warning: {m}", err=True),
                             other_env=(f"{ENV_PREFIX}_CONFIG",))
    global _database
    _database = _shown_url(settings.db)
    if signs:
        settings.signing_key_check()
        if settings.signing_key:  # a key that cannot sign (not PEM, not Ed25519) fails now, not at the first promotion
            from cloud_hub.models.signing import load_private_key

            load_private_key(settings.signing_key)
    return settings


_database: str | None = None  # the database of the command's settings, for errors() to name


def _shown_url(url: str) -> str:
    from sqlalchemy.exc import ArgumentError

    from cloud_hub.data.sessions import shown_url

    try:
        return shown_url(url)
    except ArgumentError:
        return url


def fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"cloud-hub: error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """Every error of ours as one line and its own exit code (:class:`edge_agent.exits.Failure`); a database
    error SQLAlchemy raises (a lost server, a locked file) as exit 3."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except exits.Failure as exc:
        raise fail(exc.exit_code, str(exc)) from None
    except SQLAlchemyError as exc:
        from cloud_hub.data.sessions import first_line

        where = f" on {_database}" if _database else ""
        raise fail(EXIT_UNAVAILABLE, f"database error{where}: {first_line(exc)}") from None


def with_db(settings: HubSettings, work: Callable[[Any], T]) -> T:
    """Run a read-only ``work(conn)``: the database must exist and be at this build's revision."""
    from cloud_hub.data.db import make_engine
    from cloud_hub.data.sessions import transaction
    engine = make_engine(settings.db, create=False)
    try:
        with transaction(engine, write=False) as conn:
            return work(conn)
    finally:
        engine.dispose()


def new_console() -> Any:
    """A console that prints text as it is: no rich markup (a device's label ``[/b]`` stopped ``stats`` with
    a MarkupError); style with ``style=`` or :class:`rich.text.Text`."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console(markup=False)
    return Console(width=160, markup=False)  # pipes: don't squeeze to 80 columns


def new_table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Any:
    """A table that fits a terminal: light borders, values folded (never cut with "…") when narrow. Its text
    cells are printed as they are (print it on :func:`new_console`), control characters escaped (:func:`shown`)."""
    from rich import box
    from rich.table import Table

    class Shown(Table):
        def add_row(self, *cells: Any, **kwargs: Any) -> None:
            super().add_row(*(shown(c) if isinstance(c, str) else c for c in cells), **kwargs)

    table = Shown(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    return table


def utc(t: float | None) -> str:
    from cloud_hub.data.summaries import utc_text

    return utc_text(t)


def age(t: float | None, now: float | None = None) -> str:
    """How long ago, compactly: 4s, 12m, 3h, 2d (the exact UTC times are in --json)."""
    if t is None:
        return "-"
    dt = max(0.0, (time.time() if now is None else now) - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if dt >= size:
            return f"{dt / size:.0f}{unit} ago"
    return f"{dt:.0f}s ago"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@contextmanager
def lifecycle_errors() -> Iterator[None]:
    """:func:`errors`, where a value a trainer refuses (a ``ValueError`` not of ours) or a stored bundle the
    contract refuses is a model problem: exit 4."""
    from edge_agent.contract import ContractError

    with errors():
        try:
            yield
        except ValueError as exc:
            if isinstance(exc, exits.Failure) and not isinstance(exc, ContractError):
                raise
            raise fail(EXIT_MODEL, str(exc)) from None


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a one-shot command (:func:`stoppable`). Not a KeyboardInterrupt: scikit-learn's
    MLP catches that in its epoch loop, warns "Training interrupted by user." and returns the half-trained
    model, which ``train`` would then register and call done."""


@contextmanager
def stoppable(what: str) -> Iterator[None]:
    """A one-shot command stopped by SIGINT or SIGTERM (even started in the background, where the shell hands
    SIGINT down as ignored) ends where it is: exit 130 and one line saying what was not done. Outer ``with``
    blocks see the exception on the way (:func:`cloud_hub.data.db.removed_if_left_empty` removes a database the
    command created and left empty)."""

    def stop(_signum: int, _frame: object) -> None:
        raise Interrupted

    restore = exits.on_stop_signals(stop)
    try:
        yield
    except Interrupted:
        raise fail(exits.INTERRUPTED, f"interrupted: {what}") from None
    finally:
        restore()


def engine_for(db: str, *, create: bool = False, read_only: bool = False) -> Any:
    """The hub database. Only a command that fills a new one creates it (``create``: ``train``, inside
    :func:`cloud_hub.data.db.removed_if_left_empty`); every other one reads or needs what an earlier command
    stored (``publish`` a trained model, ``rollback`` a canary), so a missing SQLite file is an error naming
    the commands that make one, and a failing command leaves no empty database behind. ``read_only`` says
    that the command only reads: it never creates either."""
    from cloud_hub.data.db import make_engine
    return make_engine(db, create=create and not read_only)


def progress_lines(quiet: bool) -> None:
    """Stage lines of training on stderr ("training on 8,012 windows...") unless the output is JSON."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="cloud-hub: %(message)s")
    if not quiet:
        logging.getLogger("cloud_hub.models.lifecycle").setLevel(logging.INFO)


