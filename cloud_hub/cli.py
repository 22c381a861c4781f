"""The ``cloud-hub`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="Cloud hub: ingest device results into SQL, aggregate, retrain and roll out models.",
                  no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the version."""
    from cloud_hub import __version__

    typer.echo(__version__)
