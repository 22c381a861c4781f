"""Federated-learning commands of ``cloud-hub``: ``federate`` (run rounds) and ``rounds`` (what came of them)."""

from __future__ import annotations

from pathlib import Path
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
    settings_from,
)
from cloud_hub.settings import NO_SIGNING_KEY
from edge_agent import exits, heap

InsecureOpt = Annotated[bool, typer.Option("--insecure-unsigned", help="Unsigned announcements and models "
                                           "(development brokers).")]
ClientIdOpt = Annotated[str | None, typer.Option("--client-id", help="MQTT client id stem (its session, <id>-federate, "
                                                 "keeps updates sent while it is down).")]


def federate(
    db: DbOpt = None,
    broker: Annotated[str | None, typer.Option("--broker", help="mqtt://… or mqtts://…")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds to run (an open round left by a stopped "
                                        "hub is resumed and counts as the first).", min=1)] = 5,
    fraction: Annotated[float, typer.Option(help="Share of the available devices asked each round.",
                                            min=0.0, max=1.0)] = 1.0,
    min_available: Annotated[int, typer.Option("--min-available", help="Wait until this many devices run the "
                                               "base version.", min=1)] = 1,
    wait_devices: Annotated[float, typer.Option("--wait-devices", help="…for at most this many seconds.")] = 60.0,
    min_updates: Annotated[int | None, typer.Option("--min-updates", help="K: close a round at this many "
                                                    "updates (default: every participant).", min=1)] = None,
    deadline: Annotated[float, typer.Option("--deadline", help="Seconds before a round closes anyway.")] = 60.0,
    epochs: Annotated[int, typer.Option(help="Local epochs on each device.", min=1)] = 5,
    lr: Annotated[float, typer.Option(help="Local learning rate (SGD, momentum 0.9).")] = 0.03,
    batch: Annotated[int, typer.Option(help="Local minibatch size.", min=1)] = 64,
    mu: Annotated[float, typer.Option(help="FedProx proximal weight (0 = FedAvg).", min=0.0)] = 0.0,
    clip: Annotated[float, typer.Option(help="L2 norm devices clip their delta to; far above it is refused.")] = 10.0,
    train_layers: Annotated[int | None, typer.Option("--train-layers", help="Train and send only the last K "
                                                     "layers (smaller uploads).", min=1)] = None,
    min_windows: Annotated[int, typer.Option("--min-windows", help="A device answers when it holds at least "
                                             "this many labelled windows...", min=1)] = 32,
    min_new: Annotated[int, typer.Option("--min-new", help="...of which this many are new since it last "
                                         "answered.", min=0)] = 0,
    max_staleness: Annotated[int, typer.Option("--max-staleness", help="Rounds an answer may be late and still "
                                               "count (weighted down).", min=0)] = 1,
    fp32_deltas: Annotated[bool, typer.Option("--fp32-deltas", help="Devices send FP32 deltas (4x the bytes; "
                                              "for comparison).")] = False,
    fp32_announcements: Annotated[bool, typer.Option("--fp32-announcements", help="Announce the weights as "
                                                     "float32 (2x the bytes down), for agents older than float16 "
                                                     "announcements.")] = False,
    budget: Annotated[float, typer.Option("--budget", help="Seconds of training a device may spend.")] = 60.0,
    holdout_log: Annotated[list[str] | None, typer.Option("--holdout-log", help="Labelled log the candidate is "
                                                          "gated on (else the devices' own evaluation).")] = None,
    tolerance: Annotated[float, typer.Option(help="Gate: how much worse on the hold-out it may be.")] = 0.0,
    aggregate: Annotated[str, typer.Option("--aggregate", help="How the hub combines the updates: fedavg (their "
                                           "mean weighted by examples and lateness); centered-clip (robust: each "
                                           "update one vote, any further than twice the median distance from "
                                           "their trimmed mean pulled in to that distance, so one device moves a "
                                           "round by a bounded step); trimmed-mean (robust, the first such rule: "
                                           "per weight, the largest and smallest 1/8 of the values dropped and the "
                                           "rest averaged).")
                         ] = "fedavg",
    secure: Annotated[bool, typer.Option("--secure", help="Secure aggregation: devices mask their deltas so that "
                                         "the hub learns only their sum (at least 3 devices; docs: Federated "
                                         "rounds, secure aggregation).")] = False,
    threshold: Annotated[int | None, typer.Option("--threshold", help="--secure: devices that must reveal their "
                                                  "shares for the sum to come out (default: a majority).",
                                                  min=2)] = None,
    dp_noise: Annotated[float | None, typer.Option("--dp-noise", help="Differential privacy: the noise "
                                                   "multiplier (noise over the clip); added by the devices with "
                                                   "--secure, by the hub without (docs: Federated rounds, "
                                                   "differential privacy).", min=0.01)] = None,
    target_epsilon: Annotated[float | None, typer.Option("--target-epsilon", help="Differential privacy: the "
                                                         "model's privacy budget; no round opens that would spend "
                                                         "past it. Without --dp-noise, the noise is set so that "
                                                         "--rounds rounds spend what is left of it.",
                                                         min=0.01)] = None,
    dp_delta: Annotated[float, typer.Option("--dp-delta", help="Differential privacy: the delta every epsilon "
                                            "is stated at.", min=1e-12, max=0.1)] = 1e-5,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help="Ed25519 private key (PEM).")] = None,
    insecure_unsigned: InsecureOpt = False,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: settings model_name).")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Topic prefix (default: edgeml).")] = None,
    client_id: ClientIdOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the participant sampling.", min=0)] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rounds as one JSON object at the end.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Federated rounds: devices fine-tune the model on their own windows and send INT8 deltas, never data."""
    from cloud_hub.rounds.config import FederateConfig

    lean_malloc()

    for path in holdout_log or ():
        if not Path(path).is_file():
            raise fail(exits.INPUT, f"--holdout-log {path}: no such file")
    from cloud_hub.rounds.fedavg import RULES  # federate loads it anyway (its first round does)

    if not fraction > 0:
        raise fail(exits.USAGE, "--fraction is the share of the available devices asked each round: more than 0")
    if not wait_devices >= 0:  # NaN is not (inf: for as long as it takes)
        raise fail(exits.USAGE, f"--wait-devices is how long to wait for devices, in seconds: 0 or more, got {wait_devices:g}")
    if not deadline > 0:
        raise fail(exits.USAGE, f"--deadline is a round's length in seconds: it must be positive, got {deadline:g}")
    if not tolerance >= 0:  # a classifier's accuracy points as a fraction, a regressor's error in its units
        raise fail(exits.USAGE, f"--tolerance is how much worse the candidate may be: 0 or more, got {tolerance:g}")
    if aggregate not in RULES:
        raise fail(exits.USAGE, f"--aggregate must be one of {', '.join(RULES)}, got {aggregate!r}")
    if secure and aggregate != "fedavg":
        raise fail(exits.USAGE, f"--aggregate {aggregate} reads each update, which --secure hides: use one or the other")
    if threshold is not None and not secure:
        raise fail(exits.USAGE, "--threshold is the share threshold of --secure rounds: add --secure")
    if (dp_noise is not None or target_epsilon is not None) and aggregate != "fedavg":
        raise fail(exits.USAGE, f"--aggregate {aggregate} has no stated sensitivity: differential privacy "
                                "(--dp-noise, --target-epsilon) needs fedavg")
    cfg = FederateConfig(
        rounds=rounds, fraction=fraction, min_available=min_available, wait_devices_s=wait_devices,
        min_updates=min_updates, deadline_s=deadline, epochs=epochs, lr=lr, batch=batch, mu=mu, clip=clip,
        train_layers=train_layers, min_windows=min_windows, min_new=min_new, max_staleness=max_staleness,
        encoding="float32" if fp32_deltas else "int8", budget_s=budget, tolerance=tolerance,
        holdout_logs=tuple(holdout_log or ()), aggregate=aggregate, secure=secure, threshold=threshold,
        dp_noise=dp_noise, target_epsilon=target_epsilon, dp_delta=dp_delta,
        weights_dtype="float32" if fp32_announcements else "float16", seed=seed)
    with lifecycle_errors():
        s = settings_from(config, signs=True, db=db, broker=broker, model_name=name, signing_key=signing_key, prefix=prefix,
                          client_id=client_id)
        engine, done = _federate(s, cfg, insecure_unsigned=insecure_unsigned, quiet=quiet or json_out)
    if not done and not json_out:  # e.g. the privacy budget was spent: said above; the earlier rounds: `rounds`
        typer.echo(f"no round of {s.model_name} ran this time (`cloud-hub rounds` lists the earlier ones)")
        return
    show_rounds(engine, s.model_name, [r.id for r in done], json_out)


def lean_malloc() -> bool:
    """Arrays of 128 kB and more in memory of their own, handed back when freed. glibc's malloc otherwise raises
    that threshold to the largest block freed so far (up to 32 MB): after a round's first aggregation the next
    rounds' arrays (a layer's float64 sums, the hold-out windows) come from the heap, which keeps what they leave.
    Measured with ``bench/federate_rss.py`` (hold-out gate): peak RSS 168-174 -> 159 MB over 3 rounds. False where
    the C library has no ``mallopt`` (not glibc)."""
    return heap.mallopt(heap.M_MMAP_THRESHOLD, 128 * 1024)




def _federate(s: Any, cfg: Any, *, insecure_unsigned: bool, quiet: bool) -> tuple[Any, list[Any]]:
    """Check that there is a signing key (settings_from(signs=True) loaded it), then run the rounds until done or a stop signal; (the engine, the rounds)."""
    from cloud_hub.cli.common import engine_for, progress_lines
    from cloud_hub.rounds.coordinator import Coordinator

    progress_lines(True)  # warnings (the broker's) as `cloud-hub: ...` lines, not raw log records
    if not s.signing_key and not insecure_unsigned:
        raise fail(exits.USAGE, NO_SIGNING_KEY)
    engine = engine_for(s.db, read_only=True)  # the model must be there: never create an empty database
    say = (lambda line: None) if quiet else (lambda line: typer.echo(f"federate: {line}", err=True))
    coordinator = Coordinator(s, engine, cfg, signing_key=s.signing_key, allow_unsigned=insecure_unsigned,
                              progress=say)
    restore = exits.on_stop_signals(exits.interrupt)
    try:
        done = coordinator.run()
        if quiet and coordinator.stopped_by:  # not said as progress: said here, once
            typer.echo(f"federate: {coordinator.stopped_by}", err=True)
        return engine, done
    except KeyboardInterrupt:
        left = coordinator.unfinished()  # asked of the database: a round is open once committed, announced or not
        if left is None:  # e.g. while it waited for devices: nothing to resume
            raise fail(exits.INTERRUPTED, "interrupted: no round was open") from None
        raise fail(exits.INTERRUPTED, f"interrupted: round {left} stays open with every update it has accepted "
                                       "(`cloud-hub rounds` shows it); run `cloud-hub federate` again to resume "
                                       "it") from None
    finally:
        restore()


def rounds(
    db: DbOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: settings model_name).")] = None,
    last: Annotated[int, typer.Option("--last", help="Show the newest N rounds.", min=1, max=1_000_000_000)] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Each federated round: rule, participants, updates accepted / late / refused, bytes, scores, epsilon."""
    from cloud_hub.cli.common import engine_for
    from cloud_hub.data import sessions
    from cloud_hub.rounds.store import RoundStore

    with lifecycle_errors():
        s = settings_from(config, db=db, model_name=name)
        engine = engine_for(s.db, read_only=True)
        with sessions.transaction(engine, write=False) as conn:
            ids = [r.id for r in RoundStore().rounds(conn, s.model_name, limit=last)]
    show_rounds(engine, s.model_name, ids, json_out)


def show_rounds(engine: Any, name: str, ids: list[int], json_out: bool) -> None:
    from cloud_hub.data import sessions
    from cloud_hub.rounds.store import RoundStore
    from cloud_hub.rounds.store import views as round_views

    with sessions.transaction(engine, write=False) as conn:
        views = round_views(conn, name, ids)
        plans = {r.id: r.plan for r in RoundStore().rounds(conn, name) if r.id in set(ids)}
    for v in views:  # the rule the round was aggregated by; a round opened before the plan named one: FedAvg
        v["aggregate"] = str(plans[v["round"]].get("aggregate", "fedavg"))
    if json_out:
        typer.echo(orjson.dumps({"rounds": views}).decode())
        return
    console = new_console()
    if not views:
        console.print(f"no federated round of {name} yet: `cloud-hub federate` runs some")
        return
    task = views[-1]["task"]
    unit = " %" if task == "classification" else ""
    table = new_table(f"federated rounds of {name}", "round", "base", "made", "rule", "updates", "upload",
                      f"devices{unit}", f"hold-out{unit}", f"FP32{unit}", "epsilon", "opened",
                      right=("updates", "upload"))
    for v in views:
        made = f"v{v['new_version']} {v['state']}" if v["new_version"] else v["state"]
        updates = (f"{v['summed'] or v['masked']} summed of {len(v['participants'])}" if v["secure"] else
                   f"{v['accepted']}/{v['late']}/{v['refused']} of {len(v['participants'])}")
        table.add_row(str(v["round"]), f"v{v['base_version']}", made, "secure" if v["secure"] else v["aggregate"],
                      updates, _bytes(v["upload_bytes"]),
                      _pair(v["device_metric_before"], v["device_metric_after"], v["task"]),
                      _pair(v["holdout_before"], v["holdout_after"], v["task"]), _fp32(v), _epsilon(v),
                      age(v["opened_at"]))
    console.print(table)
    console.print("rule: how the hub combined the updates (--aggregate; secure: it saw only their sum, --secure); "
                  "updates: accepted/late/refused of the devices asked (secure: how many were in the sum); devices: scores on their held-out windows, "
                  "the running INT8 model → the round's INT8 model (their evaluation, when there is no hold-out "
                  "log: the gate's own windows) or → their own fine-tuned models; hold-out: the base → the round's "
                  "INT8 model on the hold-out log; FP32: the round's FP32 weights on the same windows; epsilon: what the round "
                  "spent / what the model has spent (differential privacy, at the round's delta; - without)")
    for v in views:
        for reason, n in v["refusals"].items():
            console.print(f"round {v['round']}: refused {n}: {reason}")


def _epsilon(v: dict[str, Any]) -> str:
    if v.get("epsilon") is None:
        return "-" if v.get("dp") is None else f"{v['dp']}: none spent"
    return f"{v['epsilon']:.3g} / {v['epsilon_total']:.3g}"


def _fp32(v: dict[str, Any]) -> str:
    """The round's FP32 weights beside its INT8 model: the devices' evaluation (base → round), or the hold-out's."""
    if v.get("device_fp32_after") is not None:
        return _pair(v["device_fp32_before"], v["device_fp32_after"], v["task"])
    after = v.get("holdout_fp32_after")
    return "-" if after is None else _pair(after, after, v["task"]).split("→")[1]


def _pair(a: float | None, b: float | None, task: str | None) -> str:
    """Before → after: accuracy in % (classifier) or the mean error (regressor)."""
    if a is None or b is None:
        return "-"
    if task == "classification":
        return f"{100 * a:.1f}→{100 * b:.1f}"
    return f"{a:.3g}→{b:.3g}"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def register(app: typer.Typer) -> None:
    app.command()(federate)
    app.command("rounds")(rounds)
