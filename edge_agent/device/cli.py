"""The ``edge-agent`` command line: a thin shell over :mod:`edge_agent.device.jobs`.

Exit codes: :mod:`edge_agent.exits` (one table for both command lines).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Annotated, Any, NoReturn

import orjson
import typer

from edge_agent import exits, heap
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import SettingsError, load_settings
from edge_agent.usage import OneLineUsage

app = typer.Typer(help="Edge agent: read sensors or replay logs, run the INT8 model, publish results over MQTT.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineUsage,
                  context_settings={"help_option_names": ["-h", "--help"]})

EXIT_USAGE, EXIT_BROKER, EXIT_MODEL, EXIT_INPUT, EXIT_INTERRUPTED = (
    exits.USAGE, exits.UNAVAILABLE, exits.MODEL, exits.INPUT, exits.INTERRUPTED)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="TOML settings file.")]
BrokerOpt = Annotated[str | None, typer.Option(help="mqtt://\\[user:pass@]host:port or mqtts://…")]  # \\[: not markup
ModelOpt = Annotated[str | None, typer.Option(help="Model bundle file (.emlb); default: the retained model topic.")]
DeviceOpt = Annotated[str | None, typer.Option("--device-id", help="Device id: rename a single-device log.")]
RunDeviceOpt = Annotated[str | None, typer.Option("--device-id", help="This device's id: its results, status "
                                                   "and model topics (EDGE_AGENT_DEVICE_ID, device_id).")]
StateOpt = Annotated[str | None, typer.Option("--state-dir", help="Folder for the outbox and the active model.")]
PrefixOpt = Annotated[str | None, typer.Option(help="Topic prefix.")]
KeyOpt = Annotated[str | None, typer.Option("--trusted-key", help="Ed25519 public key (PEM) that signs models.")]
LogLevelOpt = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]


def _version(value: bool) -> None:
    if value:
        from edge_agent import __version__

        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Edge agent: read sensors or replay logs, run the INT8 model, publish results over MQTT."""
    one_malloc_arena()


def one_malloc_arena() -> bool:
    """glibc's malloc gives each thread that allocates an arena of its own (up to 8 per core): the agent's
    threads (paho's network loop, the publisher, the main loop) each kept their own free memory. One arena
    for all, set before any thread starts: 0.4-0.5 MB less anonymous memory in a replay, as fast (#27 §4).
    False where the C library has no ``mallopt`` (not glibc)."""
    return heap.mallopt(heap.M_ARENA_MAX, 1)




def _settings(config: str | None, **flags: Any) -> AgentSettings:
    try:
        return load_settings(AgentSettings, env_prefix="EDGE_AGENT", config=config, flags=flags,
                             warn=lambda m: typer.echo(f"edge-agent: warning: {m}", err=True))
    except SettingsError as exc:
        _fail(f"settings: {exc}", EXIT_USAGE)


def _fail(message: str, code: int) -> NoReturn:
    typer.secho(f"edge-agent: error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _map_errors(exc: BaseException) -> NoReturn:
    """One line and the error's own exit code (:class:`edge_agent.exits.Failure`); anything else is a bug."""
    if isinstance(exc, exits.Failure):
        _fail(str(exc), exc.exit_code)
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
    skip_bad_lines: Annotated[bool, typer.Option("--skip-bad-lines", help="Count and report malformed lines instead "
                                                 "of stopping.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up after S seconds of waiting: for the broker or the "
                                                  "receipts (exit 3), for the model on its topic (exit 4).")] = None,
    until: Annotated[str | None, typer.Option(help="hub: exit 0 once the hub has stored every result (its receipts); "
                                            "broker: once the broker has them (setups without a hub). "
                                            "Default: the receipts setting (true = hub).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
    log_level: LogLevelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Replay recorded logs as if live; exit 0 once the hub has stored every result (or the broker, --until)."""
    from edge_agent.device import jobs

    if not speed >= 0:  # NaN is not (inf: as fast as possible, as 0)
        _fail(f"--speed must be >= 0 (1 = real time, 0 = as fast as possible), got {speed:g}", EXIT_USAGE)
    if timeout is not None and not timeout > 0:  # NaN is not (inf: no bound)
        _fail(f"--timeout is seconds to wait: more than 0, got {timeout:g}", EXIT_USAGE)
    if until not in (None, "hub", "broker"):
        _fail(f"--until must be hub or broker, got {until!r}", EXIT_USAGE)
    s = _settings(config, broker=broker, model=model, device_id=device_id, state_dir=state_dir, prefix=prefix,
                  trusted_key=trusted_key, features=features, receipts=None if until is None else until == "hub",
                  log_level=log_level)
    if timeout is not None and timeout > 0:  # one bound for every wait, not only the one for receipts
        s = dataclasses.replace(s, model_wait_s=min(s.model_wait_s, timeout),
                                connect_timeout_s=min(s.connect_timeout_s, timeout))
    _logging(s.log_level if log_level or not json_out else "WARNING")
    try:
        report = _with_progress(lambda cb: jobs.replay(
            s, logs, model=s.model, speed=speed, on_error="skip" if skip_bad_lines else "raise",
            progress=cb, drain_timeout=timeout))
    except Exception as exc:
        _map_errors(exc)
    for line in report.skipped_examples:
        typer.echo(f"skipped {line}", err=True)
    if report.skipped_lines:
        reasons = ", ".join(f"{why}: {n:,}" for why, n in sorted(report.skipped_by_reason.items()))
        typer.echo(f"skipped {report.skipped_lines:,} bad line{'s' if report.skipped_lines != 1 else ''} in all "
                   f"({reasons})", err=True)
    if json_out:
        typer.echo(orjson.dumps(report.as_dict()).decode())
    else:
        producing = max(report.seconds - report.drain_s, 1e-9)
        typer.echo(
            f"{report.devices} devices, {report.readings:,} readings, {report.windows:,} windows "
            f"({report.readings / producing:,.0f} readings/s), model v{report.model_version}, {report.seconds:.2f} s: "
            f"{_delivered(report)}"
        )
    if not report.drained:
        within = f" within {timeout:g} s" if timeout is not None else ""
        _fail(f"{report.not_stored} results not yet {'stored by the hub' if report.until == 'hub' else 'acknowledged'}"
              f"{within} ({report.cause}); they stay in the outbox ({s.state_path}) and are sent again on the "
              "next start", EXIT_BROKER)


def _delivered(report: Any) -> str:
    """The results sent (and what an earlier run had left in the outbox: the outbox keeps one result a key, so this
    run's results with those keys may or may not go again), and what the hub did with them: stored them, or had
    them already (its receipts say which); or, when the replay gave up waiting, how many are not yet stored."""
    held = f" (the outbox held {report.leftovers:,} from an earlier run when this one started)" if report.leftovers else ""
    if not report.drained:  # the reason follows on stderr; "published" counts the receipted ones only
        done = "stored by the hub" if report.until == "hub" else "acknowledged by the broker"
        return (f"{report.published:,} results {done}, {report.not_stored:,} not yet{held} (the broker "
                f"acknowledged {report.acknowledged:,} sends)")
    sent = f"{report.published:,} results sent{held}"
    if report.until != "hub":
        return f"{sent}, acknowledged by the broker"
    if not report.already_stored:
        return f"{sent}, stored by the hub"
    return (f"{sent}; the hub stored {report.published - report.already_stored:,} and had "
            f"{report.already_stored:,} already (each result is stored once, by its key)")


def _with_progress(job: Any) -> Any:
    """A progress bar (share of the logs read, ETA) on a terminal; log lines print above it, not on it."""
    if not sys.stderr.isatty():  # no bar (and no rich import) in pipes, services and CI
        return job(None)
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    root = logging.getLogger()
    plain = root.handlers[:]
    for handler in plain:
        root.removeHandler(handler)
    root.addHandler(RichHandler(console=console, show_path=False))
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("replaying", total=1.0)

            def update(readings: int, windows: int, fraction: float) -> None:
                bar.update(task, completed=fraction, description=f"{readings:,} readings → {windows:,} windows")

            return job(update)
    finally:
        root.handlers[:] = plain


@app.command()
def run(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    model: ModelOpt = None,
    device_id: RunDeviceOpt = None,
    state_dir: StateOpt = None,
    prefix: PrefixOpt = None,
    trusted_key: KeyOpt = None,
    source: Annotated[str | None, typer.Option(help="simulated | stdin | follow | mqtt | serial (docs: Sensor sources).")
                      ] = None,
    source_path: Annotated[str | None, typer.Option(help="Log file to follow (source = follow).")] = None,
    serial_port: Annotated[str | None, typer.Option(help="Serial port to read (source = serial).")] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """The long-running agent on a live source; SIGTERM or SIGINT drains the outbox and exits cleanly."""
    from edge_agent.device import jobs

    s = _settings(config, broker=broker, model=model, device_id=device_id, state_dir=state_dir, prefix=prefix,
                  trusted_key=trusted_key, source=source, source_path=source_path, serial_port=serial_port,
                  log_level=log_level)
    _logging(s.log_level)
    try:
        summary = jobs.run(s, model=s.model)
    except Exception as exc:
        _map_errors(exc)
    typer.echo(orjson.dumps(summary).decode(), err=True)


@app.command()
def version() -> None:
    """Print the version."""
    from edge_agent import __version__

    typer.echo(f"edge-agent {__version__}")
