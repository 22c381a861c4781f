"""``cloud-hub db``: the schema revision of a hub database, and upgrading it (Alembic).

Exit codes as in :mod:`cloud_hub.cli.data`: 3 when the database cannot be opened, is not a hub
database, is at a revision this build does not know, or a migration cannot be undone.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cloud_hub.cli.common import EXIT_UNAVAILABLE, ConfigOpt, DbOpt, errors, fail, settings_from

app = typer.Typer(help="Schema revisions of the hub database: current, history, upgrade, downgrade.",
                  no_args_is_help=True)


def engine_for(db: str | None, config: Any, *, create: bool) -> Any:
    from cloud_hub.data.db import make_engine
    return make_engine(settings_from(config, db=db).db, create=create, check=False)


def _revision(db: str | None, config: Any) -> tuple[str | None, str]:
    """(the database's revision, its URL without password); the database must exist."""
    from cloud_hub.data import revisions as schema
    from cloud_hub.data.sessions import describe, transaction
    with errors():
        engine = engine_for(db, config, create=False)
        try:
            with transaction(engine, write=False) as conn:
                return schema.current(conn), describe(engine)
        finally:
            engine.dispose()


@app.command()
def current(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """The database's revision, and whether this build serves it."""
    from cloud_hub.data import revisions as schema
    rev, where = _revision(db, config)
    if rev == schema.HEAD:
        typer.echo(f"{where}: {rev} (head: this build serves it)")
    elif rev is None:
        typer.echo(f"{where}: empty (serve or db upgrade creates the schema at {schema.HEAD})")
    elif rev == schema.UNVERSIONED or rev in schema.REVISIONS:
        typer.echo(f"{where}: {rev} (behind {schema.HEAD}: run `cloud-hub db upgrade`)")
    else:
        raise fail(EXIT_UNAVAILABLE, f"{where} is at revision {rev!r}, unknown to this build (newest {schema.HEAD})")


@app.command()
def history(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Every revision this build knows, oldest first; with --db, marks the database's."""
    from cloud_hub.data import revisions as schema
    rev = _revision(db, config)[0] if db is not None or config is not None else None
    for revision, doc in schema.history():
        mark = " (database)" if revision == rev else ""
        typer.echo(f"{revision}{' (head)' if revision == schema.HEAD else ''}{mark}: {doc}")


@app.command()
def upgrade(db: DbOpt = None, config: ConfigOpt = None,
            backup: Annotated[bool, typer.Option(help="SQLite: copy the file next to itself first.")] = True) -> None:
    """Upgrade the database to this build's schema (an empty one is created); safe to run again."""
    from cloud_hub.data import revisions as schema
    with errors():
        engine = engine_for(db, config, create=True)
        try:
            done = schema.upgrade(engine, backup=backup)
        finally:
            engine.dispose()
    if done.before == done.after:
        typer.echo(f"already at {done.after}: nothing to do")
        return
    if done.backup is not None:
        typer.echo(f"backup: {done.backup}")
    typer.echo(f"upgraded {done.before or 'empty database'} -> {done.after}")


@app.command()
def downgrade(target: Annotated[str, typer.Option("--to", help="Revision to go back to, or -1 for one step.")],
              db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Go back to an older revision (where a migration can be undone without losing data)."""
    from cloud_hub.data import revisions as schema
    with errors():
        engine = engine_for(db, config, create=False)
        try:
            copy = schema.sqlite_backup(engine, "before-downgrade")
            after = schema.downgrade(engine, target)
        except NotImplementedError as exc:
            raise fail(EXIT_UNAVAILABLE, str(exc)) from None
        finally:
            engine.dispose()
    if copy is not None:
        typer.echo(f"backup: {copy}")
    typer.echo(f"downgraded to {after}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="db")
