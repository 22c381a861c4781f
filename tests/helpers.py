"""Test helpers: a generated labelled log, a small INT8 model bundle, a result collector."""

from __future__ import annotations

import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloud_hub.models import datasets, lifecycle, training
from cloud_hub.tools.sample import write_sample_log
from edge_agent import contract as c
from edge_agent.device.pipeline import window_seq
from edge_agent.mqtt import Message, MqttLink
from edge_agent.preprocess import PreprocessParams, make_windows
from edge_agent.settings.broker import BrokerURL
from edge_agent.sources import read_log

SMALL = training.TrainConfig(hidden=(32,), max_iter=40)
DEVICES = ("dev-a", "dev-b", "dev-c")


def make_log(path: Path, *, seconds: float = 40.0, devices=DEVICES, seed: int = 0, start_ts: float = 0.0) -> Path:
    write_sample_log(path, devices=devices, seconds=seconds, seed=seed, start_ts=start_ts)
    return path


def make_regression_log(path: Path, *, readings: int = 1500, seed: int = 0, spread: bool = False) -> Path:
    """Three devices (r1-r3) whose numeric label, the amplitude of channel ``x``, steps every 5 s;
    ``spread`` makes the targets vary inside a window too, so that a window's mean is not its majority."""
    rng = np.random.default_rng(seed)
    rows = ["ts,device_id,x,y,label"]
    for dev, amp in (("r1", 1.0), ("r2", 2.0), ("r3", 1.5)):
        for i in range(readings):
            t = i / 50
            a = amp * (1 + (i // 250) % 3) + (0.01 * (i % 7) if spread else 0.0)
            rows.append(f"{t:.2f},{dev},{a * np.sin(6 * t):.4f},{rng.normal():.4f},{a:.2f}")
    path.write_text("\n".join(rows) + "\n")
    return path


def make_bundle(log: Path, *, version: int = 1, name: str = "default", holdout=("dev-c",),
                window_s: float = 2.0, hop_s: float = 1.0, features: str = "stats-v1") -> c.Bundle:
    ds = datasets.dataset_from_logs([str(log)], window_s=window_s, hop_s=hop_s, holdout=list(holdout),
                                     features=features)
    train, test = datasets.split(ds, list(holdout))
    bundle, *_ = lifecycle.build(train, test, name=name, version=version, config=SMALL)
    return bundle


def fleet_files(root: Path, seconds: float = 40.0) -> tuple[Path, Path, set[tuple[str, int]]]:
    """A labelled log of three devices, a model bundle file trained on it, and every key it yields."""
    log = make_log(root / "fleet.csv", seconds=seconds)
    bundle = make_bundle(log)
    model = root / "v1.emlb"
    model.write_bytes(bundle.encode())
    return log, model, expected_keys(log, PreprocessParams.from_dict(bundle.manifest.preprocess))


def model_params(engine, version: int = 1) -> PreprocessParams:
    """The preprocessing parameters of a registered model version."""
    from cloud_hub.data.store import Store

    with engine.connect() as conn:
        return PreprocessParams.from_dict(Store(engine).get_model(conn, "default", version).manifest["preprocess"])


def expected_keys(log: Path, params: PreprocessParams) -> set[tuple[str, int]]:
    """Every (device, seq) the agent must produce for this log: computed with the batch windowing."""
    reader = read_log(log)
    whole = reader.read_all()
    assert whole is not None
    keys: set[tuple[str, int]] = set()
    cols = [whole.channels.index(ch) for ch in params.channels]
    for device, (ts, values, labels) in whole.by_device().items():
        batch = make_windows(ts, values[:, cols], labels, params)
        keys |= {(device, int(s)) for s in window_seq(batch.start)}
    return keys


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until ``check()``; the timeout only bounds a hang, it is not what the test measures."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Collector:
    """A persistent-session subscriber that records every result key it receives."""

    def __init__(self, broker_url: str, topics: c.Topics, name: str) -> None:
        self.topics = topics
        self.messages: queue.Queue[Message] = queue.Queue()
        self.keys: list[tuple[str, int]] = []
        self.results: dict[tuple[str, int], c.Result] = {}
        self._lock = threading.Lock()
        self.link = MqttLink(BrokerURL.parse(broker_url), name, clean_start=False, session_expiry_s=3600,
                             on_message=self._on_message, subscriptions=[(topics.all_results, 1)])
        self.link.start()
        self.link.wait_connected(10)
        self.link.wait_subscribed(10)

    def _on_message(self, msg: Message) -> None:
        batch = c.decode_results(msg.payload, self.topics.parse(msg.topic)[1])
        with self._lock:
            for r in batch.results:
                self.keys.append((batch.device_id, r.seq))
                self.results[(batch.device_id, r.seq)] = r
        self.messages.put(msg)

    def distinct(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.keys)

    def wait_for(self, expected: set[tuple[str, int]], timeout: float = 60.0) -> set[tuple[str, int]]:
        deadline = timeout
        while not expected <= self.distinct():
            try:
                self.messages.get(timeout=deadline)
            except queue.Empty:
                break
        return self.distinct()

    def stop(self) -> None:
        self.link.stop()


class Processes:
    """Owns every process a test spawns and kills each by pid at teardown, on failure too."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kw)
        self._procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def outbox(state: Path) -> dict[tuple[str, int], float | None]:
    """The agent's outbox as the test sees it: key -> due (None: not yet acknowledged by the broker)."""
    path = state / "outbox.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {(d, s): due for d, s, due in db.execute("SELECT device_id, seq, due FROM outbox")}
    except sqlite3.OperationalError as exc:  # the file exists a moment before its table
        if "no such table" in str(exc) or "no such column" in str(exc):
            return {}
        raise
    finally:
        db.close()


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", *args]


def run_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def features_of(results: dict[tuple[str, int], c.Result]) -> np.ndarray:
    return np.array([r.features for r in results.values() if r.features is not None], dtype=np.float32)


def publish_retained(broker_url: str, topic: str, payload: bytes) -> None:
    """Publish one retained message (model delivery: QoS 1, retained) and wait for its PUBACK."""
    done: queue.Queue[bool] = queue.Queue()
    link = MqttLink(BrokerURL.parse(broker_url), f"raw-{time.monotonic_ns()}", on_published=lambda *a: done.put(a[1]))
    link.start()
    link.wait_connected(10)
    link.publish(topic, payload, c.MODEL_DELIVERY)
    assert done.get(timeout=10)
    link.stop()


def offline_coordinator(tmp_path: Path, monkeypatch: Any, cfg: Any, devices: tuple[str, ...]) -> tuple[Any, Any, str]:
    """A ``federate`` coordinator on a SQLite hub holding a small trained v1, with no broker: ``devices`` are
    the ones available, and every send (announcement, clear) goes nowhere. Returns it, the engine and the URL."""
    from cloud_hub.data import db
    from cloud_hub.rounds.coordinator import Coordinator
    from cloud_hub.settings import HubSettings

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    engine = db.make_engine(url)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=40)
    lifecycle.train_from_logs(engine, [str(log)], holdout=["trn-2"], config=SMALL)
    coordinator = Coordinator(HubSettings(db=url, broker="mqtt://127.0.0.1:1"), engine, cfg, signing_key=None,
                              allow_unsigned=True)
    monkeypatch.setattr(coordinator, "_available", lambda _version: list(devices))
    monkeypatch.setattr(coordinator, "_send", lambda _topic, _payload, **_kw: None)
    return coordinator, engine, url


class StatusWatch:
    """Every device status published under ``prefix``, kept in order, for waits on a condition over them."""

    def __init__(self, broker_url: str, prefix: str, client_id: str) -> None:
        self._inbox: queue.Queue[c.Status] = queue.Queue()
        self.seen: list[c.Status] = []
        self.link = MqttLink(BrokerURL.parse(broker_url), client_id, subscriptions=[(c.Topics(prefix).all_status, 1)],
                             on_message=lambda m: self._inbox.put(c.decode_status(m.payload)))
        self.link.start()
        self.link.wait_connected(10)

    def where(self, pred: Callable[[c.Status], bool]) -> Callable[[], bool]:
        """A condition for :func:`wait_for`: some status seen so far (since :meth:`clear`) satisfies ``pred``."""
        def check() -> bool:
            while not self._inbox.empty():
                self.seen.append(self._inbox.get())
            return any(pred(s) for s in self.seen)
        return check

    def clear(self) -> None:
        self.seen.clear()

    def stop(self) -> None:
        self.link.stop()


# A test's live agent: statuses every second, no hub (a result is delivered once the broker has it).
LIVE_AGENT_ENV = {"EDGE_AGENT_STATUS_INTERVAL_S": "1", "EDGE_AGENT_RECEIPTS": "false"}


def live_agent_cmd(broker_url: str, prefix: str, state_dir: Path, trusted_key: Path, *extra: str) -> list[str]:
    """`edge-agent run` of one simulated device, `live-1`, trusting ``trusted_key`` (run with :data:`LIVE_AGENT_ENV`)."""
    return agent_cmd("run", "--broker", broker_url, "--prefix", prefix, "--device-id", "live-1", "--state-dir",
                     str(state_dir), "--trusted-key", str(trusted_key), "--source", "simulated", *extra)
