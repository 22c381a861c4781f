"""Data commands of ``cloud-hub``: ``serve`` (ingest), ``stats`` and ``devices``.

Exit codes: 0 success; 2 bad usage or settings (unknown option, invalid URL or value, bad config
file); 3 the broker or the database is unavailable (unreachable, refused, cannot be opened, not a hub
database, or at a schema revision this build does not serve: behind, ahead or unknown).
Errors are printed as one readable line on stderr, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from cloud_hub.db import HubError
from cloud_hub.settings import ENV_PREFIX, HubSettings
from edge_agent.settings import SettingsError, load_settings

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file of hub settings (keys = field names).",
                                                envvar=f"{ENV_PREFIX}_CONFIG")]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy database URL (default: sqlite:///hub.sqlite).")]


def _settings(config: Path | None, **flags: Any) -> HubSettings:
    return load_settings(HubSettings, env_prefix=ENV_PREFIX, config=config, flags=flags)


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"cloud-hub: error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Translate the hub's errors into a message and a documented exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from cloud_hub.db import DatabaseUnavailable
    from cloud_hub.ingest import BrokerUnavailable

    try:
        yield
    except SettingsError as exc:
        raise _fail(EXIT_USAGE, str(exc)) from None
    except (BrokerUnavailable, DatabaseUnavailable) as exc:
        raise _fail(EXIT_UNAVAILABLE, str(exc)) from None
    except SQLAlchemyError as exc:
        inner = getattr(exc, "orig", None) or exc
        raise _fail(EXIT_UNAVAILABLE, f"database error: {str(inner).strip().splitlines()[0]}") from None
    except HubError as exc:
        raise _fail(1, str(exc)) from None


def _with_db(settings: HubSettings, work: Callable[[Any], T]) -> T:
    """Run a read-only ``work(conn)``: the database must exist and be at this build's revision."""
    from cloud_hub.db import make_engine, transaction

    engine = make_engine(settings.db, create=False)
    try:
        with transaction(engine, write=False) as conn:
            return work(conn)
    finally:
        engine.dispose()


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)  # pipes: don't squeeze to 80 columns


def _ts(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def serve(
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://\\[user:pass@]host\\[:port] or mqtts://...")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Topic prefix (default: edgeml).")] = None,
    share_group: Annotated[str | None, typer.Option("--share-group", help="Split the fleet with other hubs "
                                                    "through $share/<group>/...")] = None,
    client_id: Annotated[str | None, typer.Option("--client-id", help="Client id = persistent session name. "
                                                  "(default: cloud-hub).")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = None,
) -> None:
    """Ingest every device's results and status into the database until SIGTERM/SIGINT."""
    from cloud_hub.ingest import serve as run

    with _errors():
        settings = _settings(config, broker=broker, db=db, prefix=prefix, share_group=share_group,
                             client_id=client_id, log_level=log_level)
        logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(settings)


def stats(
    db: DbOpt = None,
    config: ConfigOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only windows starting at or after this time: "
                                              "epoch seconds or ISO-8601 (UTC unless it has a zone).")] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="Also per time bucket: minute or hour.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Result counts, class histogram, confidence, accuracy and latency per device and fleet-wide."""
    from cloud_hub.aggregate import BUCKETS, fleet_stats, parse_since

    if bucket is not None and bucket not in BUCKETS:
        raise _fail(EXIT_USAGE, f"--bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    try:
        t0 = None if since is None else parse_since(since)
    except ValueError as exc:
        raise _fail(EXIT_USAGE, f"--since: {exc}") from None
    with _errors():
        settings = _settings(config, db=db)
        result = _with_db(settings, lambda conn: fleet_stats(conn, device=device, since=t0, bucket=bucket))
    if as_json:
        typer.echo(orjson.dumps(result.to_obj(), option=orjson.OPT_NON_STR_KEYS).decode())
        return
    from rich.table import Table

    table = Table(title=f"results{f' since {_ts(t0)} UTC' if t0 is not None else ''}")
    for col in ("device", "results", "accuracy", "labelled", "mean conf", "p50 ms", "p95 ms", "model", "state",
                "last seen (UTC)"):
        table.add_column(col, justify="left" if col in ("device", "state", "last seen (UTC)") else "right")
    for name, d in sorted(result.devices.items()):
        s = d.summary
        table.add_row(name, str(s.results), _pct(s.accuracy), str(s.labelled), _num(s.mean_confidence, ".3f"),
                      _num(s.latency_p50_ms), _num(s.latency_p95_ms), _num(d.model_version, "d"), d.state or "-",
                      _ts(d.last_seen))
    f = result.fleet
    table.add_row("[b]fleet[/b]", str(f.results), _pct(f.accuracy), str(f.labelled), _num(f.mean_confidence, ".3f"),
                  _num(f.latency_p50_ms), _num(f.latency_p95_ms), "", "", _ts(f.last_seen), end_section=True)
    console = _console()
    console.print(table)
    if f.classes:
        console.print("classes: " + ", ".join(f"{k} {v}" for k, v in sorted(f.classes.items())))
    console.print(f"dead letters: {result.dead_letters}")
    if bucket is not None:
        bt = Table(title=f"per {bucket} (window start, UTC)")
        for col in ("bucket", "results", "devices", "accuracy", "mean conf", "p50 ms", "p95 ms"):
            bt.add_column(col, justify="left" if col == "bucket" else "right")
        for start, (s, per_device) in sorted(result.buckets.items()):
            bt.add_row(_ts(start), str(s.results), str(len(per_device)), _pct(s.accuracy),
                       _num(s.mean_confidence, ".3f"), _num(s.latency_p50_ms), _num(s.latency_p95_ms))
        console.print(bt)


def devices(
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object keyed by device id.")] = False,
) -> None:
    """Every device: last seen, online/offline, model version, outbox depth, last error."""
    from cloud_hub.aggregate import device_list

    with _errors():
        settings = _settings(config, db=db)
        rows = _with_db(settings, device_list)
    if as_json:
        typer.echo(orjson.dumps({r["device_id"]: {k: v for k, v in r.items() if k != "device_id"} for r in rows})
                   .decode())
        return
    from rich.table import Table

    table = Table(title="devices")
    for col in ("device", "state", "last seen (UTC)", "model", "version", "outbox", "results", "last error"):
        table.add_column(col, justify="right" if col in ("version", "outbox", "results") else "left")
    for r in rows:
        table.add_row(r["device_id"], r["state"], _ts(r["last_seen"]), r["model_name"] or "-",
                      _num(r["model_version"], "d"), _num(r["outbox_depth"], "d"), str(r["results"]),
                      (r["last_error"] or "")[:60])
    _console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``stats`` and ``devices`` to the ``cloud-hub`` app."""
    app.command()(serve)
    app.command()(stats)
    app.command()(devices)
