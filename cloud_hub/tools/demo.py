"""The whole pipeline in one command: broker, hub, agents, train v1, retrain v2, rollout, stats.

Data: the real smartwatch recordings in ``../shared/data/watch_shoulder_exercise`` when they are
next to the repository (or named by ``EDGEML_DEMO_DATA``), otherwise a generated labelled log.
Some devices' recordings train version 1; the others are replayed by the agents, which report
labelled feature vectors; version 2 is retrained from those (plus the training logs), gated on a
held-out agent device, signed and pushed; the agents hot-swap to it.

The agents replay the first part of their recordings, then v2 is decided, then they replay the rest
(with the state dir of the first part: they start on v1 and swap to the retained v2). Retraining while
they replay was a race: on a loaded machine the replays ended before v2 came, and the demo said the
agents swap to v2 while every device ran v1. The demo checks each claim it prints (:func:`claims`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cloud_hub.data import db
from cloud_hub.data.aggregate import fleet_stats
from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import Store
from cloud_hub.data.summaries import describe_score
from cloud_hub.models import lifecycle
from cloud_hub.models.signing import keygen
from cloud_hub.rollout import publish as rollout
from cloud_hub.settings import HubSettings
from cloud_hub.tools.local_broker import LocalBroker, port_open
from cloud_hub.tools.positioning import write_positioning_log
from cloud_hub.tools.sample import write_sample_log
from edge_agent.settings.loader import load_settings

log = logging.getLogger(__name__)
WATCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "watch_shoulder_exercise" / "watch_shoulder_exercise.csv"
PREFIX = "demo"


@dataclass
class DemoData:
    train_log: Path
    agent_logs: dict[str, Path]  # device -> log
    holdout_train: list[str]  # hold-out devices for v1 (within the training log)
    holdout_fleet: list[str]  # hold-out agent for the v2 gate
    source: str
    duration_s: float  # recorded seconds per agent log


def find_watch() -> Path | None:
    env = os.environ.get("EDGEML_DEMO_DATA")
    if env:
        return Path(env) if Path(env).is_file() else None
    return WATCH if WATCH.is_file() else None


def _split_csv(src: Path, out: Path, groups: dict[str, set[str]]) -> dict[str, Path]:
    """Split a log by device into one file per group (header kept)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {g: open(out / f"{g}.csv", "w") for g in groups}  # noqa: SIM115 - closed below
    owner = {d: g for g, devs in groups.items() for d in devs}
    try:
        with open(src) as f:
            header = f.readline()
            for fh in files.values():
                fh.write(header)
            for line in f:
                g = owner.get(line.split(",", 2)[1])
                if g is not None:
                    files[g].write(line)
    finally:
        for fh in files.values():
            fh.close()
    return {g: out / f"{g}.csv" for g in groups}


def prepare_positioning(work: Path, agents: int) -> DemoData:
    """Phones walking an office floor (cloud_hub/tools/positioning.py): six phones' scans train v1, the
    agents are other phones, recorded "yesterday"."""
    data = work / "data"
    trainers = [f"trn-{i:02d}" for i in range(1, 7)]
    write_positioning_log(data / "train.csv", phones=trainers, seconds=900, seed=101)
    fleet = [f"phone-{i:02d}" for i in range(1, agents + 1)]
    logs = {}
    for i, phone in enumerate(fleet):
        logs[phone] = data / f"{phone}.csv"
        write_positioning_log(logs[phone], phones=[phone], seconds=600, seed=200 + i,
                              start_ts=float(int(time.time()) // 3600 * 3600 - 86_400 + 3_600 * i))
    return DemoData(data / "train.csv", logs, trainers[-1:], fleet[-1:],
                    f"generated Wi-Fi scans of phones walking an office floor ({len(trainers)} phones train v1, "
                    f"{agents} are replayed by agents; the target is x;y in metres)", 600.0)


def split_log(path: Path) -> tuple[Path, Path]:
    """The log in two parts, cut at its widest pause between readings in the middle third (a recording's
    gap, where no window spans the cut; a continuous log loses the one window across it)."""
    lines = path.read_text().splitlines()
    ts = [float(line.split(",", 1)[0]) for line in lines[1:]]
    lo, hi = len(ts) // 3, max(len(ts) // 3 + 1, 2 * len(ts) // 3)
    cut = max(range(lo, hi), key=lambda i: ts[i] - ts[i - 1]) if len(ts) > 3 else len(ts) // 2
    parts = (path.with_suffix(".part1.csv"), path.with_suffix(".part2.csv"))
    for part, rows in zip(parts, (lines[1:cut + 1], lines[cut + 1:]), strict=True):
        part.write_text("\n".join([lines[0], *rows]) + "\n")
    return parts


def prepare_data(work: Path, agents: int, scenario: str = "activity") -> DemoData:
    if scenario == "positioning":
        return prepare_positioning(work, agents)
    watch = find_watch()
    data = work / "data"
    if watch is not None:
        subjects = [f"s{i:02d}" for i in range(1, 11)]
        fleet = subjects[-agents:]
        trainers = subjects[: 10 - agents]
        parts = _split_csv(watch, data, {"train": set(trainers), **{d: {d} for d in fleet}})
        return DemoData(parts.pop("train"), parts, trainers[-1:], fleet[-1:],
                        f"real smartwatch IMU recordings ({watch.name}): {len(trainers)} subjects train v1, "
                        f"{agents} are replayed by agents", 500.0)
    fleet = [f"dev-{i:02d}" for i in range(agents)]
    trainers = [f"trn-{i:02d}" for i in range(4)]
    write_sample_log(data / "train.csv", devices=trainers, seconds=240, recordings=4, seed=7)
    logs = {}
    for i, dev in enumerate(fleet):
        logs[dev] = data / f"{dev}.csv"
        # Recorded "yesterday" (not in 1970): `stats --since` and the time buckets then read naturally.
        write_sample_log(logs[dev], devices=[dev], seconds=240, recordings=4, seed=7,
                         start_ts=float(int(time.time()) // 3600 * 3600 - 86_400 + 3_600 * i))
    return DemoData(data / "train.csv", logs, trainers[-1:], fleet[-1:],
                    f"generated sensor log ({len(trainers)} training devices, {agents} agents)", 240.0)


class DemoRun:
    """What every demo does around its stages: a fresh work folder, a broker (the given one or a private
    mosquitto), the hub's settings and signing key, and on the way out, success or not, every process it
    started stopped. Reports through ``say`` (a line) and ``show`` (a live table)."""

    def __init__(self, work: Path, *, broker: str | None, agents: int, say: Callable[[str], None],
                 show: Callable[[list[dict[str, Any]]], None]) -> None:
        self.work = work
        self.broker_url = broker
        self.agents = agents
        self.say = say
        self.show = show
        self.broker: LocalBroker | None = None
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            stop_all(self.procs.values(), self.broker)

    def _run(self) -> dict[str, Any]:
        raise NotImplementedError

    def _fresh_workdir(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)

    def _start_broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        port = 1883 if not port_open("127.0.0.1", 1883) else None
        self.broker = LocalBroker(self.work / "broker", port=port).start()
        self.say(f"broker: private mosquitto on {self.broker.url} (config derived from mosquitto.conf)")
        return self.broker.url

    def _hub_settings(self, url: str) -> tuple[HubSettings, Path, str]:
        """The demo hub's settings and a fresh signing key: (settings, the public key file, its id)."""
        key = self.work / "keys" / "hub.pem"
        _, public, kid = keygen(key)  # first: the settings refuse a signing key that does not exist
        settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
            "broker": url, "db": f"sqlite:///{self.work / 'hub.sqlite'}", "prefix": PREFIX, "client_id": "demo-hub",
            "log_interval_s": 0.0, "signing_key": str(key)})
        return settings, public, kid


class Demo(DemoRun):
    """The pipeline demo: train v1, publish, agents replay, retrain v2 from the fleet, roll it out, show stats."""

    def __init__(self, work: Path, *, broker: str | None, agents: int, speed: float | None,
                 say: Callable[[str], None], show: Callable[[list[dict[str, Any]]], None],
                 scenario: str = "activity") -> None:
        super().__init__(work, broker=broker, agents=agents, say=say, show=show)
        self.scenario = scenario
        self.speed = speed

    def _run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._fresh_workdir()
        data = prepare_data(self.work, self.agents, self.scenario)
        self.say(f"data: {data.source}")
        url = self._start_broker()
        dbfile = self.work / "hub.sqlite"
        settings, public, kid = self._hub_settings(url)
        self.say(f"keys: Ed25519 signing key {kid}; agents trust {public.name}")
        engine = db.make_engine(settings.db)
        hub = Hub(settings, engine=engine)
        hub.start()
        self.say("hub: ingesting into " + str(dbfile))
        try:
            v1 = lifecycle.train_from_logs(engine, [str(data.train_log)], holdout=data.holdout_train)
            self.say(f"trained v1 on {v1.train_windows} windows: hold-out ({', '.join(v1.holdout_devices)}) "
                     f"FP32 {describe_score(v1.fp32, named=False)}, INT8 {describe_score(v1.int8, named=False)}, INT8 {v1.int8['bytes']:,} bytes "
                     f"vs FP32 {v1.fp32['bytes']:,}")
            self.say("baselines on the same hold-out: " + ", ".join(
                f"{name} {describe_score(m, named=False)}" for name, m in sorted(v1.extra["baselines"].items())))
            rollout.publish(engine, settings)
            self.say("published v1 (signed, retained) on " + settings.topics.model("default"))
            speed = self.speed or max(1.0, data.duration_s / 20.0)
            halves = {device: split_log(path) for device, path in data.agent_logs.items()}
            self._start_agents({d: h[0] for d, h in halves.items()}, url, public, speed)
            self.say(f"agents: {len(self.procs)} replaying the first part of their recordings at {speed:g}x, "
                     "sending labelled features")
            first = self._wait_agents(engine)  # each exits once the hub has receipted all its results
            v2 = lifecycle.retrain(engine, holdout=data.holdout_fleet, tolerance=0.02,
                                   logs=[str(data.train_log)])
            self.say(f"retrained v2 from {v2.extra['fleet_windows']} fleet windows (+ training log), warm-started "
                     f"from v1: {v2.gate}")
            if v2.state == "publishable":
                rollout.publish(engine, settings)
                self.say("published v2: the agents, replaying the rest of their recordings, verify its signature "
                         "and hot-swap to it")
            self._start_agents({d: h[1] for d, h in halves.items()}, url, public, speed)
            second = self._wait_agents(engine)
            self.show(self._table(engine))
        finally:
            hub.stop()
        store = Store(engine)
        with engine.connect() as conn:
            stats = fleet_stats(conn)
            per_version = store.count_results(conn, "model_version")
            per_device = store.count_results(conn, "device_id")
        models = rollout.rollout(engine)
        engine.dispose()
        results = {d: {k: first[d][k] + second[d][k] for k in ("windows", "published")} for d in first}
        delivery = delivery_check(results, per_device)
        return {"stats": stats, "models": models, "per_version": per_version, "agents": results,
                "seconds": time.monotonic() - t0, "v1": v1, "v2": v2, "delivery": delivery,
                "problems": delivery + claims(v2.version if v2.state == "publishable" else None, second, models)}

    def _start_agents(self, logs: dict[str, Path], url: str, public: Path, speed: float) -> None:
        exe = [sys.executable, "-m", "edge_agent"]
        for device, path in logs.items():
            cmd = [*exe, "replay", str(path), "--broker", url, "--prefix", PREFIX, "--trusted-key", str(public),
                   "--state-dir", str(self.work / "agents" / device), "--speed", f"{speed:g}",
                   "--features", "all", "--json"]
            self.procs[device] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                  env={**os.environ, "EDGE_AGENT_STATUS_INTERVAL_S": "1"})

    def _table(self, engine: sa.Engine) -> list[dict[str, Any]]:
        with engine.connect() as conn:
            stats = fleet_stats(conn)
            devices = Store(engine).device_rows(conn)
        rows = []
        for device, s in sorted(stats.to_obj()["devices"].items()):
            d: Any = devices.get(device, {})
            rows.append({"device": device, "results": s["results"], "accuracy": s["accuracy"], "error": s["error"],
                         "model_version": d.get("model_version"), "state": d.get("state")})
        return rows

    def _wait_agents(self, engine: sa.Engine) -> dict[str, dict[str, Any]]:
        while any(p.poll() is None for p in self.procs.values()):
            self.show(self._table(engine))
            time.sleep(0.5)
        import orjson

        out = {}
        for device, p in self.procs.items():
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"agent {device} exited with {p.returncode}: {stderr.strip()[-500:]}")
            out[device] = orjson.loads(stdout)
        return out


def stop_all(procs: Iterable[subprocess.Popen[Any]], broker: LocalBroker | None) -> None:
    """Whatever a demo started, on success or failure: its agents (by pid), then its broker."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if broker is not None:
        broker.stop()


def delivery_check(agents: dict[str, dict[str, Any]], stored: dict[str, int]) -> list[str]:
    """Problems with "every window stored exactly once": empty when each agent's windows (distinct
    keys, unique in the table) are all stored and the hub receipted each of them."""
    problems = []
    for device, report in sorted(agents.items()):
        windows, have = report["windows"], stored.get(device, 0)
        if have != windows:
            problems.append(f"{device}: {have} results stored for {windows} windows")
        if report["published"] != windows:
            problems.append(f"{device}: {report['published']} of {windows} results receipted by the hub")
    return problems


def claims(v2: int | None, last: dict[str, dict[str, Any]], models: list[dict[str, Any]]) -> list[str]:
    """The demo's claims that are false: with ``v2`` published, every agent ended its replay on v2 (it
    swapped) and the hub counts every device running it; else every agent stayed on v1."""
    want = v2 or 1
    problems = [f"{device}: ended on v{report['model_version']}, not v{want}"
                for device, report in sorted(last.items()) if report["model_version"] != want]
    running = {m["version"]: m["devices"] for m in models}
    if running.get(want, 0) != len(last):
        problems.append(f"the hub counts {running.get(want, 0)} of {len(last)} devices running v{want}")
    return problems

