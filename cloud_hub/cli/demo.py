"""``cloud-hub demo``: the whole mission in about a minute."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud_hub.cli.common import new_console, pct
from edge_agent import exits

MAX_SAMPLE_S = 604_800  # sample --seconds: a week per device (activity: 30 million readings each)


def demo(
    broker: Annotated[str | None, typer.Option("--broker", help="Use this broker instead of starting a private "
                                               "mosquitto.")] = None,
    agents: Annotated[int, typer.Option(help="Number of agents (devices) to run.", min=2, max=8)] = 4,
    speed: Annotated[float | None, typer.Option(help="Replay speed of the agents (default: ~20 s of replay).")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its broker, database, keys and agents.")]
        = Path("demo-run"),
    scenario: Annotated[str, typer.Option(help="activity (smartwatch recordings, or a generated IMU log: "
                                          "classes) or positioning (phones' Wi-Fi scans: x, y in metres).")]
        = "activity",
    federated: Annotated[bool, typer.Option("--federated", help="Devices learn instead: federated rounds on "
                                            "their own recordings (INT8 deltas, never data), then the rounds "
                                            "table.")] = False,
    rounds: Annotated[int, typer.Option(help="--federated: rounds to run.", min=1)] = 5,
    secure: Annotated[bool, typer.Option("--secure", help="--federated: secure aggregation (the hub learns only "
                                         "the sum of the deltas; at least 3 agents).")] = False,
) -> None:
    """Start a broker, a hub and agents; train v1, publish, retrain v2 from the fleet, roll it out, show stats."""
    if scenario not in ("activity", "positioning"):
        raise _usage(f"--scenario must be activity or positioning, got {scenario!r}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    restore = exits.on_stop_signals(exits.interrupt)  # SIGTERM too: without it the broker and agents outlive us
    if secure and not federated:
        raise _usage("--secure is for --federated rounds")
    if secure and agents < 3:
        raise _usage("--secure needs at least 3 agents: a sum of two would give away each one's delta to the other")
    try:
        _demo(broker, agents, speed, workdir, scenario, federated, rounds, secure)
    except KeyboardInterrupt:  # the demo's finally blocks have stopped what it started
        typer.echo("cloud-hub demo: error: interrupted; everything the demo started is stopped", err=True)
        raise typer.Exit(exits.INTERRUPTED) from None
    finally:
        restore()


def _demo(broker: str | None, agents: int, speed: float | None, workdir: Path, scenario: str, federated: bool,
          rounds: int, secure: bool = False) -> None:
    from cloud_hub.tools.demo import Demo

    if federated:
        if scenario != "activity":
            raise _usage("--federated runs the activity scenario (the watch recordings, or a generated IMU log)")
        _federated(workdir, broker, agents, rounds, secure)
        return
    view = _FleetView()
    try:
        outcome = Demo(workdir, broker=broker, agents=agents, speed=speed, say=view.say, show=view.show,
                       scenario=scenario).run()
    except Exception as exc:  # the demo's outer loop: report, clean up (done by Demo.run), exit non-zero
        typer.echo(f"cloud-hub demo: failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        view.stop()
    _summary(view, outcome, workdir)
    if outcome["problems"]:  # a claim the demo printed is false: say which, and fail
        typer.echo("cloud-hub demo: check failed: " + "; ".join(outcome["problems"]), err=True)
        raise typer.Exit(1)


def _federated(workdir: Path, broker: str | None, agents: int, rounds: int, secure: bool = False) -> None:
    from cloud_hub.cli.rounds import show_rounds
    from cloud_hub.tools.demo_federated import FederatedDemo

    view = _FleetView()
    try:
        outcome = FederatedDemo(workdir, broker=broker, agents=agents, rounds=rounds, say=view.say,
                                show=view.show, secure=secure).run()
    except Exception as exc:
        typer.echo(f"cloud-hub demo: failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        view.stop()
    show_rounds(outcome["engine"], "default", outcome["rounds"], json_out=False)
    outcome["engine"].dispose()
    view.console.print(f"done in {outcome['seconds']:.0f} s; everything the demo started is stopped "
                       f"(files in {workdir}/; `cloud-hub rounds --db sqlite:///{workdir}/hub.sqlite`)")


class _FleetView:
    """The demo's progress: a live table on a terminal, a line every 5 s in pipes and CI."""

    def __init__(self) -> None:
        from rich.live import Live

        self.console = new_console()
        self.live = Live(console=self.console, refresh_per_second=4, transient=True) if self.console.is_terminal else None
        self._last_line = 0.0
        if self.live is not None:
            self.live.start()

    def say(self, line: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("›", "bold cyan"), " ", line))

    def table(self, rows: list[dict[str, Any]], title: str = "fleet (live)") -> Any:
        from rich.table import Table

        t = Table(title=title)
        regression = any(r.get("error") for r in rows)
        quality = "error mean / median / p90" if regression else "accuracy"
        for col in ("device", "results", quality, "model version", "status"):
            t.add_column(col, justify="right" if col != "device" else "left")
        for r in rows:
            e = r.get("error")
            t.add_row(r["device"], f"{r['results']:,}",
                      f"{e['mean']:.2f} / {e['median']:.2f} / {e['p90']:.2f}" if e else
                      "-" if regression else pct(r["accuracy"]),
                      "-" if r["model_version"] is None else f"v{r['model_version']}", r.get("state") or "-")
        return t

    def show(self, rows: list[dict[str, Any]]) -> None:
        if self.live is not None:
            self.live.update(self.table(rows))
        elif rows and time.monotonic() - self._last_line >= 5.0:
            self._last_line = time.monotonic()
            self.console.print("  fleet: " + ", ".join(
                f"{r['device']} {r['results']} results" + (f" (v{r['model_version']})" if r["model_version"] else "")
                for r in rows))

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def _summary(view: _FleetView, outcome: dict[str, Any], workdir: Path) -> None:
    console = view.console
    stats = outcome["stats"].to_obj()
    rows = [{"device": device, "results": s["results"], "accuracy": s["accuracy"], "error": s["error"],
             "model_version": s.get("model_version"), "state": "done"}
            for device, s in sorted(stats["devices"].items())]
    console.print(view.table(rows, title="final stats per device (model version = the one that produced the last "
                                         "result)"))
    versions = ", ".join(f"v{v}: {n:,}" for v, n in sorted(outcome["per_version"].items()))
    delivered = "stored exactly once" if not outcome["delivery"] else "stored, NOT exactly once"
    e = stats["error"]
    quality = (f"error mean {e['mean']:.2f} / median {e['median']:.2f} / p90 {e['p90']:.2f}" if e else
               f"accuracy {pct(stats['accuracy'])}")
    console.print(f"fleet: {stats['results']:,} results {delivered} ({versions}), {quality}, "
                  f"dead letters {stats['dead_letters']}")
    from cloud_hub.data.summaries import describe_score

    retrained = outcome.get("v2")
    if retrained is not None and retrained.gate:  # the one comparison of two versions on the same windows
        console.print(f"v{retrained.version} against the running version, both on the same hold-out (its gate): "
                      f"{retrained.gate}")
    for m in outcome["models"]:  # each on its own hold-out: different devices, not a comparison
        console.print(f"model v{m['version']}: {m['state']}{' (on the model topic)' if m['on_topic'] else ''}, "
                      f"devices running it: {m['devices']}; on its own hold-out "
                      f"({', '.join(m['holdout_devices']) or '-'}, not comparable with another version's): "
                      f"INT8 {describe_score(m['int8'], named=False) if m['int8'] else '-'}")
    console.print(f"done in {outcome['seconds']:.0f} s; everything the demo started is stopped "
                  f"(files in {workdir}/)")


def sample(
    out: Annotated[Path, typer.Argument(help="CSV log to write: ts,device_id,ax,ay,az,wx,wy,wz,label (activity) "
                                        "or ts,device_id,WAP001..WAP012,label with label x;y in metres "
                                        "(positioning).")],
    scenario: Annotated[str, typer.Option(help="activity (a 6-axis IMU, classes idle/walk/run/lift) or "
                                          "positioning (Wi-Fi scans of phones walking an office floor).")]
        = "activity",
    devices: Annotated[str | None, typer.Option(help="Comma-separated device ids (default dev-a,dev-b,dev-c; "
                                                "positioning: phone-01..phone-08).")] = None,
    seconds: Annotated[float, typer.Option(help="Recorded seconds per device (activity: 50 readings a second; "
                                           "positioning: 1 scan a second).")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed (positioning: of the phones; the floor stays the same).", min=0)]
        = 0,
    ujiindoorloc: Annotated[Path | None, typer.Option("--ujiindoorloc", help="positioning: convert this "
                                                      "UJIIndoorLoc CSV instead of generating scans.")] = None,
    building: Annotated[int | None, typer.Option(help="--ujiindoorloc: keep this BUILDINGID only.")] = None,
    floor: Annotated[int | None, typer.Option(help="--ujiindoorloc: keep this FLOOR only.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write a labelled log, recorded until now: activity readings, or phones' Wi-Fi scans and positions."""
    if out.exists() and not force:  # a recorded log of the same name is worth more than a sample
        raise _usage(f"{out} exists: pass --force to overwrite it")
    if scenario not in ("activity", "positioning"):
        raise _usage(f"--scenario must be activity or positioning, got {scenario!r}")
    default = "dev-a,dev-b,dev-c" if scenario == "activity" else ",".join(f"phone-{i:02d}" for i in range(1, 9))
    ids = [d.strip() for d in (devices or default).split(",") if d.strip()]
    if not ids or not 0 < seconds <= MAX_SAMPLE_S:  # nan is not; 1e300 wrote until the disk was full
        raise _usage(f"--devices needs at least one id and --seconds must be > 0 and at most {MAX_SAMPLE_S:,} "
                     "(a week)")
    from edge_agent.contract import ContractError, check_id

    for device in ids:  # a log whose ids no agent takes (replay refused it; train did not)
        try:
            check_id(device, "device id")
        except ContractError as exc:
            raise _usage(f"--devices: {exc.reason}") from None
    start = float(int(time.time() - seconds))
    if scenario == "activity":
        from cloud_hub.tools.sample import write_sample_log

        n = write_sample_log(out, devices=ids, seconds=seconds, seed=seed, start_ts=start)
        typer.echo(f"wrote {n:,} readings of {len(ids)} device{'s' if len(ids) != 1 else ''} to {out}")
        return
    from cloud_hub.tools.positioning import convert_ujiindoorloc, write_positioning_log

    if ujiindoorloc is not None:
        try:
            n = convert_ujiindoorloc(ujiindoorloc, out, building=building, floor=floor)
        except (OSError, ValueError) as exc:
            raise _usage(str(exc)) from None
        typer.echo(f"wrote {n:,} scans of {ujiindoorloc} to {out}")
        return
    n = write_positioning_log(out, phones=ids, seconds=seconds, seed=seed, start_ts=start)
    typer.echo(f"wrote {n:,} scans of {len(ids)} phones to {out} (label: x;y in metres)")


def _usage(message: str) -> typer.Exit:
    typer.echo(f"cloud-hub: error: {message}", err=True)
    return typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(sample)
