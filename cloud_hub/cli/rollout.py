"""Canary commands of ``cloud-hub``: ``publish --canary``/``--devices`` (through :func:`start_canary`),
``rollout status`` and ``rollback``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
import typer

from cloud_hub.cli.common import (
    ConfigOpt,
    DbOpt,
    age,
    fail,
    lifecycle_errors,
    new_console,
    new_table,
    progress_lines,
    settings_from,
)
from edge_agent.exits import USAGE as EXIT_USAGE


def start_canary(s: Any, engine: Any, *, version: int | None, share: str | None, devices: str | None,
                 min_results: int | None, tolerance: float | None, allow_unsigned: bool, force: bool,
                 key_from_flag: bool = False) -> None:
    """``publish --canary SHARE`` / ``--devices A,B``: the version goes to a cohort first."""
    from cloud_hub.data import sessions
    from cloud_hub.data.store import Store
    from cloud_hub.rollout import canary
    from cloud_hub.rollout.publish import pick

    named = [d.strip() for d in (devices or "").split(",") if d.strip()]
    if devices is not None and not named:  # "--devices ," was refused as a bad --canary share
        raise fail(EXIT_USAGE, f"--devices {devices!r} names no device: give ids, comma-separated")
    if named and share is not None:  # the share was ignored without a word
        raise fail(EXIT_USAGE, "--canary and --devices both choose the cohort: give one of them")
    with lifecycle_errors():
        store = Store(engine)
        with sessions.transaction(engine, write=False) as conn:
            row = pick(store, conn, s.model_name, version, force=force)
            rows = store.device_rows(conn)
        known = list(rows)
        fraction = None if named else canary.parse_canary(share or "")
        # A share is drawn from the devices that can answer: online, and running this model by their status (a
        # device known only from its results, or offline, would hold a cohort seat and never be judged).
        pool = known if named else [d for d, r in rows.items() if r["state"] == "online" and r["model_name"] == row.name]
        if not named and len(pool) < 2:
            raise canary.CanaryError(
                f"a canary needs at least 2 online devices running {row.name} by their status; the hub knows "
                f"{len(known)} devices, {len(pool)} of them such (`cloud-hub devices`): name a cohort with --devices A,B")
        cohort = canary.choose_cohort(pool, fraction=fraction, named=named, salt=f"{row.name}/v{row.version}")
        rollout = canary.start(engine, s, row, cohort=cohort,
                               min_results=s.canary_min_results if min_results is None else min_results,
                               tolerance=s.canary_tolerance if tolerance is None else tolerance,
                               allow_unsigned=allow_unsigned)
    of = f"{len(known)} devices" if named else f"the {len(pool)} online devices running {row.name}"
    typer.echo(f"canary: {row.name} v{row.version} sent to {len(cohort)} of {of} "
               f"({', '.join(cohort)}) on {s.prefix}/devices/<id>/model; the others keep v{rollout.previous}. "
               f"`cloud-hub serve` judges it from {rollout.min_results} cohort results: each cohort device against "
               f"its own results on v{rollout.previous}, rolled back when worse by more than the tolerance "
               f"({100 * rollout.tolerance:g} accuracy points; a regressor's: {100 * s.canary_error_tolerance:g} % "
               "more error) with "
               f"{100 * (1 - s.canary_alpha):g}% confidence, promoted when not worse with that confidence "
               f"(`cloud-hub rollout status`)")
    away = [f"{d} ({rows[d]['state']})" for d in cohort if rows[d]["state"] != "online"]
    if away:  # a new operator's finding: a canary on an offline device waited, said nowhere
        typer.echo(f"note: not online: {', '.join(away)}: the canary waits for their results, and blocks every "
                   "publish meanwhile (`cloud-hub rollback` ends it)", err=True)
    if key_from_flag:
        typer.echo("note: `cloud-hub serve` signs the promotion with its own key: a serve started without one "
                   f"(--signing-key {s.signing_key}, signing_key in its config, CLOUD_HUB_SIGNING_KEY) rolls back "
                   "but never promotes", err=True)


def status(
    db: DbOpt = None,
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://… (with --check).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Judge the open canary now and promote or roll it back "
                                        "(what `serve` does every canary_check_s).")] = False,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help="Ed25519 private key (PEM) that signs "
                                                    "the version if --check promotes it.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: settings model_name).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: ConfigOpt = None,
) -> None:
    """The model's rollouts (newest first), the open canary's verdict so far, and the latest events."""
    from cloud_hub.cli.common import engine_for
    from cloud_hub.data import sessions
    from cloud_hub.data.store import Store
    from cloud_hub.rollout import canary

    with lifecycle_errors():
        s = settings_from(config, signs=check, db=db, broker=broker, model_name=name, signing_key=signing_key)
        engine = engine_for(s.db)  # --check too: there is no canary in a database not there
        if check:
            canary.check(engine, s, s.model_name)
        store = Store(engine)
        with sessions.transaction(engine, write=False) as conn:
            rollouts = store.rollouts(conn, s.model_name)
            events = store.events(conn, 20)
        verdict = canary.judge(engine, rollouts[0], s) if rollouts and rollouts[0].state == "canary" else None
        # only when this command judges (--check): serve judges with its own settings, and this command's lack
        # of a key said in red, at every call, that a serve with one could not promote
        blocked = canary.unsigned_promotion(s, rollouts[0]) if verdict is not None and check else None
        behind = canary.cohort_not_running(engine, rollouts[0]) if verdict is not None else []
    if json_out:
        typer.echo(orjson.dumps({
            "rollouts": [{"id": r.id, "model": r.name, "version": r.version, "previous_version": r.previous,
                          "cohort": list(r.cohort), "state": r.state, "min_results": r.min_results,
                          "tolerance": r.tolerance, "started_at": r.started_at, "ended_at": r.ended_at,
                          "reason": r.reason} for r in rollouts],
            "verdict": None if verdict is None else verdict.to_obj(), "cannot_promote": blocked,
            "cohort_not_running": behind,
            "events": events}).decode())
        return
    table = new_table(f"rollouts of {s.model_name}", "version", "state", "cohort", "started", "reason")
    for r in rollouts:
        table.add_row(f"v{r.version} (from v{r.previous})", r.state, ", ".join(r.cohort), age(r.started_at),
                      r.reason or (verdict.reason if verdict is not None and r.state == "canary" else "-"))
    console = new_console()
    console.print(table)
    if not rollouts:
        console.print("no canary rollout yet: `cloud-hub publish --canary 10%` starts one")
    if verdict is not None:
        console.print(f"open canary v{rollouts[0].version}: {verdict.action}: {verdict.reason}")
        console.print(f"to decide: {verdict.deciding}")
        console.print(_pace(verdict.cohort_n, time.time() - rollouts[0].started_at, s.canary_max_results))
        if verdict.shift is not None:
            console.print(f"predicted classes shifted {100 * verdict.shift:.1f}% from the cohort's history")
        for line in behind:
            console.print(f"cohort {line}", style="yellow")
    if blocked:
        console.print(blocked, style="red")
    for e in events[:5]:
        console.print(f"event {age(e['ts'])}: {e['kind']} {e['model']} v{e['version']}"
                      + (f": {e['reason']}" if e.get("reason") else ""))


def _pace(results: int, elapsed_s: float, max_results: int) -> str:
    """How fast the cohort reports, and when the result limit comes at that pace: a young fleet's canary said
    "undecided" for hours without a time (a new operator's finding)."""
    if results <= 0 or elapsed_s <= 0:
        return "the cohort has sent no scored result yet"
    rate = results / elapsed_s
    left = max(max_results - results, 0) / rate
    when = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
    return (f"the cohort sends {60 * rate:,.1f} scored results a minute: the limit of {max_results:,} results "
            f"in about {when} at this pace")


def rollback(
    db: DbOpt = None,
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://… or mqtts://…")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: settings model_name).")] = None,
    config: ConfigOpt = None,
) -> None:
    """End the open canary by hand: its cohort returns to the fleet's version, the canary version is rejected."""
    from cloud_hub.cli.common import engine_for
    from cloud_hub.data import sessions
    from cloud_hub.data.store import Store
    from cloud_hub.rollout import canary

    progress_lines(True)  # "not connected to ... yet" after 3 s, as one "cloud-hub:" line
    with lifecycle_errors():
        s = settings_from(config, db=db, broker=broker, model_name=name)
        engine = engine_for(s.db)
        with sessions.transaction(engine, write=False) as conn:
            open_ = Store(engine).rollouts(conn, s.model_name, state="canary")
        if not open_:
            raise fail(EXIT_USAGE, f"no open canary of {s.model_name} to roll back (`cloud-hub rollout status`); "
                                    "to go back to an older version for the whole fleet: `cloud-hub publish "
                                    "--version N --force`")
        canary.roll_back(engine, s, open_[0], "rolled back by hand", by="operator")
    r = open_[0]
    typer.echo(f"rolled back {r.name} v{r.version}: {', '.join(r.cohort)} return to v{r.previous}; "
               f"v{r.version} is marked rejected")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Canary rollouts: `rollout status`.", no_args_is_help=True)
    group.command("status")(status)
    app.add_typer(group, name="rollout")
    app.command()(rollback)
