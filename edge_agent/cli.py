"""The ``edge-agent`` command line: a thin shell over :mod:`edge_agent.service`.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage or settings; 3 broker unreachable or
results not acknowledged in time; 4 no usable model; 5 malformed input log (or an invalid device id
in it); 130 interrupted by SIGTERM/SIGINT (results are kept in the outbox).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any, NoReturn

import orjson
import typer

from edge_agent.settings import AgentSettings, SettingsError, load_settings

app = typer.Typer(help="Edge agent: read sensors or replay logs, run the INT8 model, publish results over MQTT.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

EXIT_USAGE, EXIT_BROKER, EXIT_MODEL, EXIT_INPUT, EXIT_INTERRUPTED = 2, 3, 4, 5, 130

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="TOML settings file.")]
BrokerOpt = Annotated[str | None, typer.Option(help="mqtt://[user:pass@]host:port or mqtts://…")]
ModelOpt = Annotated[str | None, typer.Option(help="Model bundle file (.emlb); default: the retained model topic.")]
DeviceOpt = Annotated[str | None, typer.Option("--device-id", help="Device id (replay: rename a single-device log).")]
StateOpt = Annotated[str | None, typer.Option("--state-dir", help="Folder for the outbox and the active model.")]
PrefixOpt = Annotated[str | None, typer.Option(help="Topic prefix.")]
KeyOpt = Annotated[str | None, typer.Option("--trusted-key", help="Ed25519 public key (PEM) that signs models.")]


def _settings(config: str | None, **flags: Any) -> AgentSettings:
    try:
        return load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=config, flags=flags)
    except SettingsError as exc:
        _fail(f"settings: {exc}", EXIT_USAGE)


def _fail(message: str, code: int) -> NoReturn:
    typer.secho(f"edge-agent: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _map_errors(exc: BaseException) -> NoReturn:
    from edge_agent.agent import AgentError, Interrupted
    from edge_agent.bundle import BundleRejected
    from edge_agent.mqtt import ConnectRefused, MqttError
    from edge_agent.pipeline import DeviceIdError
    from edge_agent.sources import LogError

    if isinstance(exc, LogError):
        _fail(str(exc), EXIT_INPUT)
    if isinstance(exc, DeviceIdError):
        _fail(str(exc), EXIT_INPUT)
    if isinstance(exc, Interrupted):
        _fail(str(exc), EXIT_INTERRUPTED)
    if isinstance(exc, ConnectRefused | MqttError):
        _fail(str(exc), EXIT_BROKER)
    if isinstance(exc, AgentError | BundleRejected):
        _fail(str(exc), EXIT_MODEL)
    raise exc


@app.command()
def replay(
    logs: Annotated[list[str], typer.Argument(help="CSV or JSON Lines logs: ts,device_id,<channels>[,label].")],
    broker: BrokerOpt = None,
    model: ModelOpt = None,
    speed: Annotated[float, typer.Option(help="1 = real time, 10 = ten times faster, 0 = as fast as possible.")] = 0.0,
    device_id: DeviceOpt = None,
    state_dir: StateOpt = None,
    prefix: PrefixOpt = None,
    trusted_key: KeyOpt = None,
    features: Annotated[str | None, typer.Option(help="Send model inputs for retraining: off|sampled|all.")] = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="Count and report malformed lines instead of stopping.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting for receipts after S seconds (exit 3).")] = None,
    until: Annotated[str | None, typer.Option(help="hub: exit 0 once the hub has stored every result (its receipts); "
                                            "broker: once the broker has them (setups without a hub). "
                                            "Default: the receipts setting (true = hub).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Replay recorded logs as if live; exit 0 once the hub has stored every result (or the broker, --until)."""
    from edge_agent import service

    if speed < 0:
        _fail("--speed must be >= 0", EXIT_USAGE)
    if until not in (None, "hub", "broker"):
        _fail(f"--until must be hub or broker, got {until!r}", EXIT_USAGE)
    s = _settings(config, broker=broker, model=model, device_id=device_id, state_dir=state_dir, prefix=prefix,
                  trusted_key=trusted_key, features=features, receipts=None if until is None else until == "hub")
    _logging("WARNING" if json_out else s.log_level)
    try:
        report = _with_progress(lambda cb: service.replay(
            s, logs, model=s.model, speed=speed, on_error="skip" if skip_bad_lines else "raise",
            progress=cb, drain_timeout=timeout))
    except Exception as exc:
        _map_errors(exc)
    for line in report.skipped_examples:
        typer.echo(f"skipped {line}", err=True)
    if json_out:
        typer.echo(orjson.dumps(report.as_dict()).decode())
    else:
        typer.echo(
            f"{report.devices} devices, {report.readings} readings, {report.windows} windows, "
            f"{report.published} results {'stored by the hub' if report.until == 'hub' else 'acknowledged by the broker'}"
            f" in {report.seconds:.2f} s ({report.readings / max(report.seconds, 1e-9):,.0f} readings/s), "
            f"model v{report.model_version}"
        )
    if not report.drained:
        why = f"within {timeout:g} s" if timeout is not None else "(the broker refused them)"
        _fail(f"{report.not_stored} results not yet {'stored by the hub' if report.until == 'hub' else 'acknowledged'}"
              f" {why}: they stay in the outbox ({s.state_dir}) and are sent again on the next start", EXIT_BROKER)


def _with_progress(job: Any) -> Any:
    if not sys.stderr.isatty():  # no bar (and no rich import) in pipes, services and CI
        return job(None)
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("replaying")

        def update(readings: int, windows: int) -> None:
            bar.update(task, description=f"{readings:,} readings → {windows:,} windows")

        return job(update)


@app.command()
def run(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    model: ModelOpt = None,
    device_id: DeviceOpt = None,
    state_dir: StateOpt = None,
    prefix: PrefixOpt = None,
    trusted_key: KeyOpt = None,
    source: Annotated[str | None, typer.Option(help="simulated | stdin | follow.")] = None,
    source_path: Annotated[str | None, typer.Option(help="Log file to follow (source = follow).")] = None,
) -> None:
    """The long-running agent on a live source; SIGTERM drains the outbox and exits cleanly."""
    from edge_agent import service

    s = _settings(config, broker=broker, model=model, device_id=device_id, state_dir=state_dir, prefix=prefix,
                  trusted_key=trusted_key, source=source, source_path=source_path)
    _logging(s.log_level)
    try:
        summary = service.run(s, model=s.model)
    except Exception as exc:
        _map_errors(exc)
    typer.echo(orjson.dumps(summary).decode(), err=True)


@app.command()
def version() -> None:
    """Print the version."""
    from edge_agent import __version__

    typer.echo(__version__)
