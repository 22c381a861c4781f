"""Model-lifecycle commands of ``cloud-hub``: train, retrain, keygen, publish, models, export.

Exit codes as in :mod:`cloud_hub.cli.data`, plus 4: a model refused by its gate, not found, or not
enough data to train; 5: a malformed input log.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cloud_hub.cli.common import (
    EXIT_MODEL,
    EXIT_USAGE,
    ConfigOpt,
    DbOpt,
    age,
    engine_for,
    fail,
    lifecycle_errors,
    new_console,
    new_table,
    pct,
    progress_lines,
    settings_from,
    stoppable,
)
from edge_agent.contract.wire import MAX_INT

MAX_VERSION = MAX_INT  # what the database's integer holds (a larger one was an OverflowError traceback)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Model name (default: settings model_name).")]
HoldoutOpt = Annotated[str | None, typer.Option("--holdout-devices", help="Comma-separated device ids to evaluate "
                                                "on (default: the last 20% of device ids, sorted).")]


def _holdout(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _absent(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        value, _, counts_as = text.partition("=")
        return float(value), float(counts_as)
    except ValueError:
        raise fail(2, f"--absent: expected VALUE=AS (e.g. 100=-110), got {text!r}") from None


def _metric(m: dict[str, Any] | None) -> str:
    if not m or not {"accuracy", "mae", "mean_error"} & m.keys():  # e.g. an INT8 model no device scored
        return "-"
    if "accuracy" in m:
        return pct(m["accuracy"])
    from cloud_hub.data.summaries import describe_error

    return describe_error(m)


def _print_outcome(outcome: Any, json_out: bool) -> None:
    if json_out:
        typer.echo(orjson.dumps(outcome.to_obj()).decode())
        return
    table = new_table(f"model {outcome.name} v{outcome.version}: {outcome.state} "
                   f"(hold-out devices: {', '.join(outcome.holdout_devices) or 'last 20% in time'})",
                   "", "hold-out score", "bytes", "latency/window", right=("hold-out score", "bytes", "latency/window"))
    rows = [("FP32", outcome.fp32), ("INT8", outcome.int8)]
    if outcome.baseline:
        rows.append(("running (INT8)", outcome.baseline))
    for label, m in rows:
        table.add_row(label, _metric(m), f"{m['bytes']:,}", f"{m['latency_ms']:.3f} ms")
    for label, m in sorted(outcome.extra.get("baselines", {}).items()):
        table.add_row(f"baseline: {label}", _metric(m), "-", "-")
    console = new_console()
    console.print(table)
    if outcome.gate:
        console.print(f"gate: {outcome.gate}")


def train(
    logs: Annotated[list[str], typer.Argument(help="Labelled logs (CSV / JSON Lines) to learn from.")],
    db: DbOpt = None,
    holdout_devices: HoldoutOpt = None,
    window: Annotated[float | None, typer.Option("--window", help="Window length in seconds (default 2.5; "
                                                 "scans of WAPnnn columns: 3 scans).")] = None,
    hop: Annotated[float | None, typer.Option("--hop", help="Step between windows in seconds (default 0.5; "
                                              "scans: 1 scan).")] = None,
    features: Annotated[str | None, typer.Option("--features", help="Feature set: stats-v1 (time-domain, the "
                                                 "default), stats-fft-v1 (adds spectra), mean-v1 (window means; "
                                                 "the default for scans), trend-v1 (last readings, slope: the "
                                                 "default with --forecast).")] = None,
    forecast: Annotated[str | None, typer.Option("--forecast", help="Channel whose next readings the labels "
                                                 "hold (e.g. the reading an hour later): a window's target is "
                                                 "its last reading's label and the model learns the change from "
                                                 "that channel's last reading.")] = None,
    absent: Annotated[str | None, typer.Option("--absent", help="VALUE=AS: a reading of VALUE means 'not there' "
                                               "and counts as AS (scans: 100=-110, UJIIndoorLoc's 'not heard').")]
        = None,
    mirror: Annotated[str | None, typer.Option("--mirror", help="Comma-separated channels to negate in an "
                                               "extra mirrored copy of each training window (sensors worn on "
                                               "either side; the watch data: ax,wy,wz).")] = None,
    name: NameOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the bundle (.emlb) to this file.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a classifier (text labels) or regressor (numeric labels), quantize to INT8, register it."""
    from cloud_hub.data.db import removed_if_left_empty
    from cloud_hub.models import lifecycle
    for flag, seconds in (("--window", window), ("--hop", hop)):
        if seconds is not None and not 0 < seconds < math.inf:
            raise fail(EXIT_USAGE, f"{flag} is seconds: more than 0, got {seconds:g}")
    with lifecycle_errors():
        s = settings_from(config, db=db, model_name=name)
        progress_lines(json_out)
        with stoppable("no model registered"), removed_if_left_empty(s.db):  # a log it cannot read leaves no empty database behind
            outcome = lifecycle.train_from_logs(engine_for(s.db, create=True), logs, name=s.model_name,
                                                holdout=_holdout(holdout_devices), window_s=window, hop_s=hop,
                                                seed=seed, features=features, mirror=_holdout(mirror) or (),
                                                absent=_absent(absent), forecast=forecast)
        if out is not None:
            with stoppable(f"{s.model_name} v{outcome.version} is registered; --out {out} not written"):
                _export(s.db, s.model_name, outcome.version, out, s.signing_key)
    _print_outcome(outcome, json_out)
    if outcome.state == "rejected":  # no better than a constant: registered, said, not publishable
        raise typer.Exit(EXIT_MODEL)


def retrain(
    db: DbOpt = None,
    holdout_devices: HoldoutOpt = None,
    tolerance: Annotated[float | None, typer.Option(help="How much worse (accuracy points as a fraction, "
                                                    "or MAE) the new INT8 model may be.")] = None,
    log: Annotated[list[str] | None, typer.Option("--log", help="Also learn from this labelled log.")] = None,
    name: NameOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Next version from the labelled features the fleet reported, warm-started, gated on hold-out devices."""
    from cloud_hub.models import lifecycle
    with lifecycle_errors():
        s = settings_from(config, db=db, model_name=name, retrain_tolerance=tolerance)
        progress_lines(json_out)
        with stoppable("no model registered"):
            outcome = lifecycle.retrain(engine_for(s.db), name=s.model_name, holdout=_holdout(holdout_devices),
                                        tolerance=s.retrain_tolerance, logs=log or [], seed=seed)
    _print_outcome(outcome, json_out)
    if outcome.state == "rejected":
        raise typer.Exit(EXIT_MODEL)


def keygen(
    private_key: Annotated[Path, typer.Argument(help="Where to write the Ed25519 private key (PEM, mode 0600).")],
    public_key: Annotated[Path | None, typer.Option("--public", help="Public key path "
                                                    "(default: <private>.pub.pem).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Make an Ed25519 key pair: the hub signs bundles with the private key, devices trust the public one."""
    from cloud_hub.models.signing import keygen as make

    try:
        priv, pub, kid = make(private_key, public_key, force=force)
    except (FileExistsError, OSError) as exc:
        raise fail(2, str(exc)) from None
    typer.echo(f"private key {priv}\npublic key  {pub} (give it to devices as trusted_key)\nkey id      {kid}")


def publish(
    db: DbOpt = None,
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://… or mqtts://…")] = None,
    version: Annotated[int | None, typer.Option(help="Version to publish (default: newest that passed its gate).", min=1, max=MAX_VERSION)] = None,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help="Ed25519 private key (PEM).")] = None,
    insecure_unsigned: Annotated[bool, typer.Option("--insecure-unsigned", help="Publish without a signature "
                                                    "(devices refuse it unless they allow unsigned models).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Publish a version that failed its gate.")] = False,
    name: NameOpt = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Topic prefix (default: edgeml).")] = None,
    canary: Annotated[str | None, typer.Option("--canary", help="Send it to this share of the devices first "
                                               "(e.g. 10%): promoted to all, or rolled back, by its results.")]
        = None,
    devices: Annotated[str | None, typer.Option("--devices", help="Send it to these devices first "
                                                "(comma-separated), as --canary does.")] = None,
    min_results: Annotated[int | None, typer.Option("--min-results", help="Canary: scored results from the "
                                                    "cohort before it is judged (default: canary_min_results, 50).",
                                                    min=1)] = None,
    tolerance: Annotated[float | None, typer.Option("--tolerance", help="Canary: how much worse than the others "
                                                    "it may do (default: canary_tolerance, 0.02).", min=0)] = None,
    config: ConfigOpt = None,
) -> None:
    """Sign a registered bundle and publish it retained on the model topic (or to a canary cohort first)."""
    from cloud_hub.rollout.publish import publish as run

    if tolerance is not None and not 0 <= tolerance < 1:
        raise fail(EXIT_USAGE, f"--tolerance is a fraction (0.02 = 2 accuracy points; a regressor's canary: "
                               f"canary_error_tolerance), got {tolerance:g}")
    if canary is not None or devices is not None:
        from cloud_hub.cli.rollout import start_canary

        with lifecycle_errors():
            s = settings_from(config, signs=True, db=db, broker=broker, model_name=name, signing_key=signing_key, prefix=prefix)
            engine = engine_for(s.db)
        progress_lines(True)  # warnings ("not connected to ... yet", a cohort not cleared) as "cloud-hub:" lines
        # Ctrl-C: the cohort's topics are cleared again (canary.start), or a warning says what is left to do
        with stoppable("no canary started (a cohort device it reached is cleared again, unless a line above says "
                       "otherwise)"):
            start_canary(s, engine, version=version, share=canary, devices=devices, min_results=min_results,
                         tolerance=tolerance, allow_unsigned=insecure_unsigned, force=force,
                         key_from_flag=signing_key is not None)
        return
    with lifecycle_errors():
        s = settings_from(config, signs=True, db=db, broker=broker, model_name=name, signing_key=signing_key, prefix=prefix)
        progress_lines(True)  # warnings ("not connected to ... yet") as one "cloud-hub:" line each
        with stoppable("the model may be on the topic already: publish it again so that the database says so"):
            bundle = run(engine_for(s.db), s, version=version, allow_unsigned=insecure_unsigned, force=force)
    m = bundle.manifest
    typer.echo(f"published {m.name} v{m.version} ({m.sha256[:12]}, "
               f"{'signed by ' + str(m.key_id) if m.signature else 'UNSIGNED'}) on {s.topics.model(m.name)} "
               f"at {s.broker_url}")


def models(
    db: DbOpt = None,
    name: NameOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Every model version with its metrics and how many devices run it now."""
    from cloud_hub.rollout.publish import rollout

    with lifecycle_errors():
        s = settings_from(config, db=db)
        rows = rollout(engine_for(s.db, read_only=True), name)
    if json_out:
        typer.echo(orjson.dumps({"models": rows}).decode())
        return
    table = new_table("models: scores on each version's hold-out (never a device whose data shaped it; a federated "
                   "evaluation: held-out windows of the devices that trained it); devices running it (online)",
                   "model", "state", "topic", "INT8", "FP32", "held out", "bytes", "devices", "created",
                   right=("INT8", "FP32", "bytes", "devices"))
    for r in rows:
        table.add_row(f"{r['name']} v{r['version']}", r["state"], "yes" if r["on_topic"] else "",
                      _metric(r["int8"]), _metric(r["fp32"]), _held_out(r), f"{(r['int8'] or {}).get('bytes', 0):,}",
                      f"{r['devices']} ({r['devices_online']})", age(r["created"]))
    new_console().print(table)


def _held_out(row: dict[str, Any]) -> str:
    """What a version's figures were measured on, in a few words."""
    on = row.get("evaluated_on")
    if on:
        return str(on).split(" (")[0]
    return ", ".join(row["holdout_devices"]) or "last 20% in time"


def export(
    out: Annotated[Path, typer.Argument(help="Bundle file to write (.emlb).")],
    db: DbOpt = None,
    version: Annotated[int | None, typer.Option(help="Version (default: newest).", min=1, max=MAX_VERSION)] = None,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help="Sign it with this Ed25519 private "
                                                    "key (PEM), as publish does (default: settings signing_key).")] = None,
    name: NameOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write a registered bundle to a file (for `edge-agent replay|run --model FILE`), signed when a key is given."""
    with lifecycle_errors():
        s = settings_from(config, signs=True, db=db, model_name=name, signing_key=signing_key)
        v, signed = _export(s.db, s.model_name, version, out, s.signing_key)
    typer.echo(f"wrote {s.model_name} v{v} to {out}" + ("" if signed else
               " (unsigned: an agent with --trusted-key refuses it; pass --signing-key to sign it)"))


def _export(db_url: str, name: str, version: int | None, out: Path, key: str | None = None) -> tuple[int, bool]:
    from cloud_hub.data.sessions import transaction
    from cloud_hub.data.store import Store
    from cloud_hub.models.lifecycle import LifecycleError

    engine = engine_for(db_url, read_only=True)
    with transaction(engine, write=False) as conn:
        row = Store(engine).get_model(conn, name, version)
    if row is None or row.bundle is None:
        raise LifecycleError(f"model {name} v{version or 'latest'} is not registered")
    payload = row.bundle
    if key is not None:
        from cloud_hub.models.signing import load_private_key, sign_bundle
        from edge_agent.contract import decode_bundle

        payload = sign_bundle(decode_bundle(payload), load_private_key(key)).encode()
    out.write_bytes(payload)
    return row.version, key is not None


def register(app: typer.Typer) -> None:
    for command in (train, retrain, keygen, publish, models, export):
        app.command()(command)
