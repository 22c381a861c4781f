"""``cloud-hub demo``: the whole mission in about a minute."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud_hub.cli_data import _console, _pct


def demo(
    broker: Annotated[str | None, typer.Option("--broker", help="Use this broker instead of starting a private "
                                               "mosquitto.")] = None,
    agents: Annotated[int, typer.Option(help="Number of agents (devices) to run.", min=2, max=8)] = 4,
    speed: Annotated[float | None, typer.Option(help="Replay speed of the agents (default: ~20 s of replay).")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its broker, database, keys and agents.")]
        = Path("demo-run"),
) -> None:
    """Start a broker, a hub and agents; train v1, publish, retrain v2 from the fleet, roll it out, show stats."""
    from cloud_hub.demo import Demo

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    view = _FleetView()
    try:
        outcome = Demo(workdir, broker=broker, agents=agents, speed=speed, say=view.say, show=view.show).run()
    except Exception as exc:  # the demo's outer loop: report, clean up (done by Demo.run), exit non-zero
        typer.echo(f"cloud-hub demo: failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        view.stop()
    _summary(view, outcome, workdir)
    if outcome["delivery"]:
        typer.echo("cloud-hub demo: delivery check failed: " + "; ".join(outcome["delivery"]), err=True)
        raise typer.Exit(1)


class _FleetView:
    """The demo's progress: a live table on a terminal, a line every 5 s in pipes and CI."""

    def __init__(self) -> None:
        from rich.live import Live

        self.console = _console()
        self.live = Live(console=self.console, refresh_per_second=4, transient=True) if self.console.is_terminal else None
        self._last_line = 0.0
        if self.live is not None:
            self.live.start()

    def say(self, line: str) -> None:
        self.console.print(f"[bold cyan]›[/] {line}")

    def table(self, rows: list[dict[str, Any]], title: str = "fleet (live)") -> Any:
        from rich.table import Table

        t = Table(title=title)
        for col in ("device", "results", "accuracy", "model version", "status"):
            t.add_column(col, justify="right" if col != "device" else "left")
        for r in rows:
            t.add_row(r["device"], f"{r['results']:,}", _pct(r["accuracy"]),
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
    rows = [{"device": device, "results": s["results"], "accuracy": s["accuracy"],
             "model_version": s.get("model_version"), "state": "done"}
            for device, s in sorted(stats["devices"].items())]
    console.print(view.table(rows, title="final stats per device (model version = the one that produced the last "
                                         "result)"))
    versions = ", ".join(f"v{v}: {n:,}" for v, n in sorted(outcome["per_version"].items()))
    delivered = "stored exactly once" if not outcome["delivery"] else "stored, NOT exactly once"
    console.print(f"fleet: {stats['results']:,} results {delivered} ({versions}), accuracy "
                  f"{_pct(stats['accuracy'])}, dead letters {stats['dead_letters']}")
    for m in outcome["models"]:
        console.print(f"model v{m['version']}: {m['state']}{' (on the model topic)' if m['on_topic'] else ''}, "
                      f"INT8 {_pct((m['int8'] or {}).get('accuracy'))} on hold-out "
                      f"{', '.join(m['holdout_devices']) or '-'}, devices running it: {m['devices']}")
    console.print(f"done in {outcome['seconds']:.0f} s; everything the demo started is stopped "
                  f"(files in {workdir}/)")


def sample(
    out: Annotated[Path, typer.Argument(help="CSV log to write: ts,device_id,ax,ay,az,wx,wy,wz,label.")],
    devices: Annotated[str, typer.Option(help="Comma-separated device ids.")] = "dev-a,dev-b,dev-c",
    seconds: Annotated[float, typer.Option(help="Recorded seconds per device (50 readings a second).")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a labelled sensor log to try the pipeline with (recorded until now, labels idle/walk/run/lift)."""
    from cloud_hub.sample import write_sample_log

    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or seconds <= 0:
        typer.echo("cloud-hub: error: --devices needs at least one id and --seconds must be > 0", err=True)
        raise typer.Exit(2)
    n = write_sample_log(out, devices=ids, seconds=seconds, seed=seed, start_ts=float(int(time.time() - seconds)))
    typer.echo(f"wrote {n:,} readings of {len(ids)} devices to {out}")


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(sample)
