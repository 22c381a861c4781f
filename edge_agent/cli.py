"""The ``edge-agent`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="Edge agent: read sensors or replay logs, run the INT8 model, publish results over MQTT.",
                  no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the version."""
    from edge_agent import __version__

    typer.echo(__version__)
