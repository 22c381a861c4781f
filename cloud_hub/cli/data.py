"""Data commands of ``cloud-hub``: ``serve`` (ingest), ``stats`` and ``devices``.

Exit codes: :mod:`edge_agent.exits`. Errors are one readable line on stderr, without a traceback.
Errors are printed as one readable line on stderr, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import orjson
import typer

from cloud_hub.cli.common import (
    EXIT_USAGE,
    ConfigOpt,
    DbOpt,
    age,
    errors,
    fail,
    new_console,
    new_table,
    pct,
    settings_from,
    shown,
    utc,
    with_db,
)
from edge_agent import contract as c


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _quality(s: Any) -> str:
    """A classifier's accuracy, or a regressor's mean / median / p90 error (in the targets' unit)."""
    if s.error is not None:
        return f"{s.error.mean:.3g} / {s.error.median:.3g} / {s.error.p90:.3g}"
    return pct(s.accuracy)


def _ms(x: float | None) -> str:
    """Milliseconds with the digits that matter: 0.0052, 0.42, 3.1, 120."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def serve(
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://\\[user:pass@]host\\[:port] or mqtts://...")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Topic prefix (default: edgeml).")] = None,
    share_group: Annotated[str | None, typer.Option("--share-group", help="Split the fleet with other hubs "
                                                    "through $share/<group>/...")] = None,
    client_id: Annotated[str | None, typer.Option("--client-id", help="Client id = persistent session name, "
                                                  "stable and unique per hub (default: cloud-hub-<host>-<hash of "
                                                  "db and prefix>).")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = None,
    http: Annotated[str | None, typer.Option("--http", help="PORT (on 127.0.0.1) or HOST:PORT of the live dashboard "
                                             "(/) and the Prometheus metrics (/metrics); a public HOST needs "
                                             "--http-token-file.")] = None,
    http_token_file: Annotated[str | None, typer.Option("--http-token-file", help="File holding the token the "
                                                        "HTTP door asks for (bearer, or basic auth's password)."
                                                        )] = None,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help="Ed25519 private key (PEM) that signs "
                                                    "a canary's promotion (and auto_publish's versions).")] = None,
) -> None:
    """Ingest every device's results and status into the database until SIGTERM/SIGINT."""
    from cloud_hub.data.db import removed_if_left_empty
    from cloud_hub.serve import serve as run

    with errors():
        settings = settings_from(config, signs=True, broker=broker, db=db, prefix=prefix, share_group=share_group,
                             client_id=client_id, log_level=log_level, http=http,
                             http_token_file=http_token_file, signing_key=signing_key)
        logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with removed_if_left_empty(settings.db):  # e.g. a wrong broker address: no empty database left behind
            run(settings)


def _since(text: str | None) -> float | None:
    """``--since`` as epoch seconds (None: from the start); a time it cannot read is a usage error."""
    from cloud_hub.data.summaries import parse_since

    try:
        return None if text is None else parse_since(text)
    except ValueError as exc:
        raise fail(EXIT_USAGE, f"--since: {exc}") from None


def stats(
    db: DbOpt = None,
    config: ConfigOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only windows starting at or after this time: "
                                              "epoch seconds or ISO-8601 (UTC unless it has a zone).")] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="Also per time bucket: minute or hour.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per device and fleet-wide: results, classes, confidence, accuracy (a regressor's error), latency."""
    from rich.text import Text

    from cloud_hub.data.aggregate import BUCKETS, fleet_stats

    if bucket is not None and bucket not in BUCKETS:
        raise fail(EXIT_USAGE, f"--bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    t0 = _since(since)
    with errors():
        settings = settings_from(config, db=db)
        result = with_db(settings, lambda conn: fleet_stats(conn, device=device, since=t0, bucket=bucket))
    if device is not None and device not in result.devices:
        raise fail(EXIT_USAGE, f"no device {device!r} in {settings.db} (`cloud-hub devices` lists them)")
    if as_json:
        typer.echo(orjson.dumps(result.to_obj(), option=orjson.OPT_NON_STR_KEYS).decode())
        return
    quality = "error mean/median/p90" if result.fleet.error is not None else "accuracy"
    table = new_table(f"results{f' since {utc(t0)} UTC' if t0 is not None else ''}", "device", "results", quality,
                   "conf", "p50 ms", "p95 ms", "model", "state", "seen",
                   right=("results", quality, "conf", "p50 ms", "p95 ms", "model"))
    for name, d in sorted(result.devices.items()):
        s = d.summary
        table.add_row(name, f"{s.results:,}", _quality(s), _num(s.mean_confidence, ".2f"),
                      _ms(s.latency_p50_ms), _ms(s.latency_p95_ms), _num(d.model_version, "d"), d.state or "-",
                      age(d.last_seen))
    f = result.fleet
    table.add_row(Text("fleet", style="bold"), f"{f.results:,}", _quality(f), _num(f.mean_confidence, ".2f"),
                  _ms(f.latency_p50_ms), _ms(f.latency_p95_ms), "", "", age(f.last_seen), end_section=True)
    console = new_console()
    console.print(table)
    if result.versions:
        held = "held-out acc" if result.fleet.error is None else "held-out error"
        vt = new_table("per model version (held out: devices outside its training set)", "model", "results",
                    quality, held, "held-out results", "trained on",
                    right=("results", quality, held, "held-out results"))
        for version, v in sorted(result.versions.items()):
            vt.add_row(f"v{version}", f"{v.summary.results:,}", _quality(v.summary), _quality(v.held_out),
                       f"{v.held_out.results:,}", f"{len(v.train_devices)} devices" if v.train_devices else "-")
        console.print(vt)
    if f.classes:
        console.print("classes: " + ", ".join(f"{shown(k)} {v}" for k, v in sorted(f.classes.items())))
    console.print(f"dead letters: {result.dead_letters}")
    if bucket is not None:
        bt = new_table(f"per {bucket} (window start, UTC)", "bucket", "results", "devices", quality, "conf",
                    "p50 ms", "p95 ms", right=("results", "devices", quality, "conf", "p50 ms", "p95 ms"))
        for start, (s, per_device) in sorted(result.buckets.items()):
            bt.add_row(utc(start).removesuffix(":00"), f"{s.results:,}", str(len(per_device)), _quality(s),
                       _num(s.mean_confidence, ".2f"), _ms(s.latency_p50_ms), _ms(s.latency_p95_ms))
        console.print(bt)


def devices(
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object keyed by device id.")] = False,
) -> None:
    """Every device: last seen, online/offline, model version, outbox depth, drift, last error."""
    from cloud_hub.data.aggregate import device_list
    from edge_agent.drift import DRIFTING

    with errors():
        settings = settings_from(config, db=db)
        listed = with_db(settings, device_list)
    rows = [{**r, "drifting": r["drift_psi"] is not None and r["drift_psi"] > DRIFTING} for r in listed]
    if as_json:
        typer.echo(orjson.dumps({r["device_id"]: {k: v for k, v in r.items() if k != "device_id"} for r in rows})
                   .decode())
        return
    table = new_table("devices", "device", "state", "seen", "model", "outbox", "results", "drift (PSI)", "last error",
                   right=("outbox", "results", "drift (PSI)"))
    for r in rows:
        model = "-" if r["model_version"] is None else f"{r['model_name'] or ''} v{r['model_version']}"
        drift = _num(r["drift_psi"], ".2f") + (" DRIFTING" if r["drifting"] else "")
        table.add_row(r["device_id"], r["state"], age(r["last_seen"]), model, _num(r["outbox_depth"], ",d"),
                      f"{r['results']:,}", drift, r["last_error"] or "")
    new_console().print(table)


def dead_letters(
    db: DbOpt = None,
    config: ConfigOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="Only what came on this device's topics.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only what arrived at or after this time: "
                                              "epoch seconds or ISO-8601 (UTC unless it has a zone).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1_000_000_000, help="Show the newest N.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (payloads in base64).")] = False,
) -> None:
    """Messages the hub refused, newest first: when, on which topic, why, and how the payload starts."""
    import base64

    from cloud_hub.data.store import Store

    t0 = _since(since)
    with errors():
        settings = settings_from(config, db=db)
        if device is not None and not c.valid_id(device):
            raise fail(EXIT_USAGE, f"--device: {c.show(device)} is not a device id (1-64 of A-Z a-z 0-9 _ . : -)")
        topics = None if device is None else [settings.topics.results(device), settings.topics.status(device)]
        total, rows = with_db(settings, lambda conn: Store(conn.engine).dead_letters(
            conn, limit=limit, since=t0, topics=topics))
    if as_json:
        typer.echo(orjson.dumps({"total": total, "dead_letters": [
            {**r, "payload": base64.b64encode(r["payload"]).decode()} for r in rows]}).decode())
        return
    if not rows:
        typer.echo(f"no dead letters{' of ' + device if device else ''}{f' since {utc(t0)} UTC' if t0 is not None else ''}")
        return
    table = new_table(f"dead letters, newest {len(rows)} of {total:,}", "received (UTC)", "topic", "reason",
                      "bytes", "payload starts", right=("bytes",))
    for r in rows:
        start = r["payload"][:60].decode("utf-8", "backslashreplace")
        table.add_row(utc(r["received_at"]), r["topic"], r["reason"], f"{r['size']:,}", start)
    new_console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``stats``, ``devices`` and ``dead-letters`` to the ``cloud-hub`` app."""
    app.command()(serve)
    app.command()(stats)
    app.command()(devices)
    app.command("dead-letters")(dead_letters)
