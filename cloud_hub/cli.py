"""The ``cloud-hub`` command line: one Typer app composed from one module per command group.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage or settings; 3 broker or database
unavailable; 4 model refused by the gate, not found, or not enough data; 5 malformed input.
"""

from __future__ import annotations

import typer

from cloud_hub import cli_data, cli_db, cli_demo, cli_models

app = typer.Typer(help="Cloud hub: ingest device results into SQL, aggregate, retrain and roll out models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# Data path (serve, stats, devices), model lifecycle (train, retrain, keygen, publish, models, export),
# the schema (db current|history|upgrade|downgrade) and the demo.
for _group in (cli_data, cli_models, cli_db, cli_demo):
    _group.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    from cloud_hub import __version__

    typer.echo(__version__)
