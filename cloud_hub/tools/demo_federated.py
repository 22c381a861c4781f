"""``cloud-hub demo --federated``: devices learn from their own recordings; only INT8 deltas travel.

Some subjects' recordings train version 1 centrally (one of them held out: the gate's hold-out log);
each agent is ``edge-agent run`` following its own subject's recording, so it infers, reports its
results and keeps its labelled windows at home. Then rounds: every agent fine-tunes the running
model on its windows and sends an INT8 delta; the hub averages them, re-quantizes, gates the new
version on the hold-out subject, signs and publishes it; the agents verify and hot-swap, and the next
round starts from it. It ends with the rounds table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cloud_hub.data import db
from cloud_hub.data.ingest import Hub
from cloud_hub.data.store import Store
from cloud_hub.data.summaries import describe_score
from cloud_hub.models import lifecycle
from cloud_hub.rollout import publish as rollout
from cloud_hub.rounds.config import FederateConfig
from cloud_hub.rounds.coordinator import Coordinator
from cloud_hub.tools.demo import PREFIX, DemoData, DemoRun, prepare_data


def _holdout_log(data: DemoData, work: Path) -> Path:
    """The v1 hold-out subject's recording alone: the gate of every round (no device trains on it)."""
    out = work / "data" / "holdout.csv"
    keep = set(data.holdout_train)
    with open(data.train_log) as src, open(out, "w") as dst:
        dst.write(src.readline())
        for line in src:
            if line.split(",", 2)[1] in keep:
                dst.write(line)
    return out


class FederatedDemo(DemoRun):
    """``demo --federated``: train v1 centrally, then federated rounds among agents that keep their data."""

    def __init__(self, work: Path, *, broker: str | None, agents: int, rounds: int,
                 say: Callable[[str], None], show: Callable[[list[dict[str, Any]]], None], secure: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(work, broker=broker, agents=agents, say=say, show=show)
        self.rounds, self.secure = rounds, secure
        self.config = config or {}  # FederateConfig fields over the demo's (the benches')

    def _run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._fresh_workdir()
        data = prepare_data(self.work, self.agents)
        holdout = _holdout_log(data, self.work)
        self.say(f"data: {data.source}; {', '.join(data.holdout_train)} is the gate's hold-out")
        url = self._start_broker()
        settings, public, kid = self._hub_settings(url)
        key = self.work / "keys" / "hub.pem"
        engine = db.make_engine(settings.db)
        hub = Hub(settings, engine=engine)
        hub.start()
        try:
            v1 = lifecycle.train_from_logs(engine, [str(data.train_log)], holdout=data.holdout_train)
            self.say(f"trained v1 centrally on {v1.train_windows} windows: hold-out INT8 {describe_score(v1.int8, named=False)}")
            rollout.publish(engine, settings)
            self.say(f"published v1, signed by {kid}")
            for device, path in data.agent_logs.items():
                self.procs[device] = subprocess.Popen(
                    [sys.executable, "-m", "edge_agent", "run", "--broker", url, "--prefix", PREFIX,
                     "--device-id", device, "--trusted-key", str(public), "--state-dir",
                     str(self.work / "agents" / device), "--source", "follow", "--source-path", str(path)],
                    stdout=subprocess.DEVNULL, stderr=open(self.work / f"agent-{device}.log", "wb"),  # noqa: SIM115
                    env={**os.environ, "EDGE_AGENT_STATUS_INTERVAL_S": "1"})
            self._wait_recorded(engine, data)
            cfg = FederateConfig(**{"rounds": self.rounds, "min_available": len(self.procs), "deadline_s": 120.0,
                                    "holdout_logs": (str(holdout),), "tolerance": 0.01, "secure": self.secure,
                                    **self.config})
            self.say(f"federated rounds: {self.rounds}, every agent trains {cfg.epochs} epoch(s) on its own "
                     f"windows and sends an INT8 delta{' masked (secure: the hub sees only their sum)' if self.secure else ''}"
                     f"; gate: {', '.join(data.holdout_train)}")
            done = Coordinator(settings, engine, cfg, signing_key=str(key), allow_unsigned=False,
                               progress=lambda line: self.say("  " + line)).run()
            last = max((r.new_version or 1 for r in done if r.state == "published"), default=1)
            self._wait(lambda: all(v == last for v in self._versions(engine).values()),
                       f"every agent on v{last}")
        finally:
            for p in self.procs.values():
                p.send_signal(signal.SIGTERM)
            for device, p in self.procs.items():
                if p.wait(60) != 0:
                    raise RuntimeError(f"agent {device} exited with {p.returncode}: "
                                       + (self.work / f"agent-{device}.log").read_text()[-500:])
            hub.stop()
        return {"rounds": [r.id for r in done], "engine": engine, "v1": v1, "seconds": time.monotonic() - t0}

    def _versions(self, engine: sa.Engine) -> dict[str, int | None]:
        with engine.connect() as conn:
            rows = Store(engine).device_rows(conn)
        return {d: rows.get(d, {}).get("model_version") for d in self.procs}

    def _wait(self, cond: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
        until = time.monotonic() + timeout
        while not cond():
            for device, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"agent {device} stopped: "
                                       + (self.work / f"agent-{device}.log").read_text()[-500:])
            if time.monotonic() > until:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def _wait_recorded(self, engine: sa.Engine, data: DemoData) -> None:
        """Until each agent has inferred its whole recording: its result count has not grown for 3 s."""
        seen: dict[str, tuple[int, float]] = {}

        def settled() -> bool:
            with engine.connect() as conn:
                per = Store(engine).count_results(conn, "device_id")
            versions = self._versions(engine)
            self.show([{"device": d, "results": per.get(d, 0), "accuracy": None, "error": None,
                        "model_version": versions[d], "state": "online"} for d in self.procs])
            now = time.monotonic()
            for d in self.procs:
                n = per.get(d, 0)
                if seen.get(d, (-1, 0.0))[0] != n:
                    seen[d] = (n, now)
            return all(n > 0 and now - at >= 3.0 for n, at in seen.values())

        self._wait(settled, "the agents' recordings")
        self.say(f"agents: {len(self.procs)} have inferred their recordings ({data.duration_s:.0f} s each) and keep "
                 "their labelled windows")
