"""The ``cloud-hub`` command line: one Typer app composed from one module per command group.

Exit codes: :mod:`edge_agent.exits` (one table for both command lines).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Annotated

import typer


def _require_hub_extra() -> None:
    """A device-only install (``pip install .``) has no hub dependencies: say which extra to install."""
    missing = []
    for module in ("sqlalchemy", "alembic", "sklearn", "onnx", "skl2onnx", "prometheus_client", "dp_accounting", "msgspec"):
        try:
            found = importlib.util.find_spec(module) is not None  # finds without importing (sklearn: ~1 s)
        except ValueError:  # sys.modules[module] is None: blocked
            found = False
        if not found:
            missing.append(module)
    if missing:
        sys.stderr.write(f"cloud-hub: error: the hub's dependencies are not installed (missing: {', '.join(missing)});"
                         " install the hub extra: pip install '.[hub]' from a clone of the repository, or"
                         " pip install 'edgeml-mqtt[hub]' (PostgreSQL: '[hub,postgres]')\n")
        raise SystemExit(2)


_require_hub_extra()

from cloud_hub.cli import data as cli_data  # noqa: E402 - after the check above
from cloud_hub.cli import db as cli_db  # noqa: E402
from cloud_hub.cli import demo as cli_demo  # noqa: E402
from cloud_hub.cli import models as cli_models  # noqa: E402
from cloud_hub.cli import rollout as cli_rollout  # noqa: E402
from cloud_hub.cli import rounds as cli_rounds  # noqa: E402
from edge_agent.usage import OneLineUsage  # noqa: E402

# Each paragraph of a help text is one string without line breaks: in rich mode typer keeps a break inside
# a paragraph where it is, so a hard-wrapped text renders as broken lines (tests/test_help_texts.py).
HELP = ("Cloud hub: ingest device results into SQL, aggregate, retrain and roll out models.\n\n"
        "To start: `cloud-hub demo` runs the whole pipeline on a private broker in about a minute. By hand: "
        "`cloud-hub sample log.csv` (a labelled log), `cloud-hub train log.csv` (the first model), "
        "`cloud-hub keygen keys/hub.pem`, then `cloud-hub serve --broker mqtt://HOST:1883` and "
        "`cloud-hub publish --signing-key keys/hub.pem --broker mqtt://HOST:1883`; devices run `edge-agent`. "
        "Getting started: docs/getting-started.md.")

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineUsage,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        from cloud_hub import __version__
        typer.echo(f"cloud-hub {__version__}")
        raise typer.Exit()


@app.callback(help=HELP)
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """The ``cloud-hub`` app's options (its help: :data:`HELP`)."""


# Data path (serve, stats, devices), model lifecycle (train, retrain, keygen, publish, models, export),
# canaries (rollout status, rollback), federated rounds (federate, rounds), the schema
# (db current|history|upgrade|downgrade) and the demo.
for _group in (cli_data, cli_models, cli_rollout, cli_rounds, cli_db, cli_demo):
    _group.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    from cloud_hub import __version__
    typer.echo(f"cloud-hub {__version__}")
