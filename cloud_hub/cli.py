"""The ``cloud-hub`` command line: one Typer app composed from one module per command group.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage or settings; 3 broker or database
unavailable; 4 model refused by the gate or not found; 5 malformed input.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="Cloud hub: ingest device results into SQL, aggregate, retrain and roll out models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# Each module adds its commands with register(app): data path (serve, stats, devices),
# model lifecycle (train, retrain, keygen, publish, models) and the demo.
for _name in ("cloud_hub.cli_data", "cloud_hub.cli_models", "cloud_hub.cli_demo"):
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command group whose optional dependency is missing
        if exc.name != _name:
            raise
        continue
    _module.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    from cloud_hub import __version__

    typer.echo(__version__)
