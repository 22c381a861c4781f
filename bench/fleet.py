"""Benchmark: a simulated fleet of devices (1,000 by default) against a real mosquitto and a real hub.

    python bench/fleet.py                                     # 1,000 devices for 120 s, SQLite, 1 hub
    python bench/fleet.py --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres --workers 2
    python bench/fleet.py --linger 0,5,20 --seconds 60 --switch-at 45   # one run per batch_linger_ms

Every simulated device speaks the real agent's protocol over its own MQTT session (client id
``sim-NNNN``): a retained ``online`` status naming the model it runs, with a last will ``offline``;
one result a second (QoS 1) that it keeps until the hub's receipt, sending it again after 15 s
without one; and the retained model topic, where it checks a new bundle's digest and Ed25519
signature (``edge_agent.device.bundle.check_bundle``, as the agent does before loading it) and then
reports the new version in its status. It runs no model: inference is the agent's own cost
(``bench/agent_replay.py``). The devices are spread over ``--procs`` processes, each driving its
clients from one selector loop (paho's external-loop API), so 1,000 sessions need no 1,000 threads.

Reported from one run: results/s stored (the hub's database) against results/s produced; the
latency from a result's window end to its receipt at the device (commit, then the receipt's trip:
an upper bound of window end -> commit), p50/p99; the results waiting for a receipt over time (the
backlog); broker, hub and PostgreSQL CPU and peak RSS; and, after ``--switch-at`` seconds, the
time from publishing a new signed model until the hub's devices table shows every device on it.

``--linger`` (default: 0 and the hub's default ``batch_linger_ms``) runs the whole fleet once per
value, one after the other, and ends with a table of the hub's CPU per 1,000 results/s (before the
model switch, and over the whole run) and the receipt latency of each: what the linger buys.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import contract as c
from edge_agent import exits
from edge_agent.device.bundle import BundleRejected, check_bundle, load_public_key
from edge_agent.mqtt import tcp_no_delay

MODEL = "fleet"
RESEND_S = 15.0
SLOT_S = 5.0  # backlog samples


# --------------------------------------------------------------------------- device processes


class Device:
    """One simulated device: its session, the results it still waits a receipt for, its model."""

    def __init__(self, name: str, topics: c.Topics, key: Any) -> None:
        self.name, self.topics, self.key = name, topics, key
        self.model: c.Manifest | None = None
        self.waiting: dict[int, tuple[float, float]] = {}  # seq -> (window end, last sent)
        self.latencies: list[tuple[float, float]] = []  # (window end, seconds until its receipt)
        self.model_at: dict[int, float] = {}  # version -> when it arrived
        self.rejected = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        self.client.on_socket_open = tcp_no_delay  # as the agent's link does
        self.client.will_set(topics.status(name), c.Status(name, c.OFFLINE, time.time()).encode(), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = False

    def status(self, state: str = c.ONLINE) -> None:
        m = self.model
        s = c.Status(self.name, state, time.time(), model_name=m.name if m else None,
                     model_version=m.version if m else None, model_sha256=m.sha256 if m else None,
                     outbox_depth=len(self.waiting))
        self.client.publish(self.topics.status(self.name), s.encode(), qos=1, retain=True)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            raise SystemExit(f"{self.name}: connection refused: {rc}")
        client.subscribe([(self.topics.receipts(self.name), 1), (self.topics.model(MODEL), 1)])
        self.connected = True
        self.status()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/receipts"):
            now = time.time()
            for seq in c.decode_receipt(bytes(msg.payload), self.name).seqs():
                entry = self.waiting.pop(seq, None)
                if entry is not None:
                    self.latencies.append((entry[0], now - entry[0]))
            return
        try:
            bundle = check_bundle(bytes(msg.payload), trusted_key=self.key, allow_unsigned=False)
        except BundleRejected:
            self.rejected += 1
            return
        self.model = bundle.manifest
        self.model_at.setdefault(bundle.manifest.version, time.time())
        self.status()

    def produce(self, now: float) -> None:
        seq = int(now * 1000)
        version = self.model.version if self.model else 0
        r = c.Result(seq=seq, start=now - 2.5, end=now, model_version=version, latency_ms=0.8, label="walk",
                     confidence=0.9)
        self.client.publish(self.topics.results(self.name), c.ResultBatch(self.name, (r,)).encode(), qos=1)
        self.waiting[seq] = (now, now)

    def resend(self, now: float) -> int:
        late = [(s, e) for s, (e, sent) in self.waiting.items() if now - sent >= RESEND_S]
        for seq, end in late:
            r = c.Result(seq=seq, start=end - 2.5, end=end, model_version=self.model.version if self.model else 0,
                         latency_ms=0.8, label="walk", confidence=0.9)
            self.client.publish(self.topics.results(self.name), c.ResultBatch(self.name, (r,)).encode(), qos=1)
            self.waiting[seq] = (end, now)
        return len(late)


def connect_all(devices: list[Device], port: int) -> Callable[[float], None]:
    """Connect every device to the broker on ``port``; the pump that drives them all from one selector."""
    sel = selectors.DefaultSelector()
    for d in devices:
        d.client.connect("127.0.0.1", port, keepalive=60)
        sel.register(d.client.socket(), selectors.EVENT_READ, d)  # type: ignore[arg-type]

    def pump(timeout: float) -> None:
        for k, _ in sel.select(timeout):
            k.data.client.loop_read()
        for d in devices:
            if d.client.want_write():
                d.client.loop_write()

    return pump


def devices_main(port: int, prefix: str, first: int, count: int, seconds: float, pubkey: str) -> None:
    """A device process: connect ``count`` devices, say ready, wait for go, run, print a JSON report."""
    topics, key = c.Topics(prefix), load_public_key(pubkey)
    devices = [Device(f"sim-{i:04d}", topics, key) for i in range(first, first + count)]
    pump = connect_all(devices, port)

    deadline = time.monotonic() + 60
    while not all(d.connected and d.model for d in devices):
        pump(0.05)
        if time.monotonic() > deadline:
            raise SystemExit(f"devices {first}..: not all connected with a model within 60 s")
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    phase = [(i / count) for i in range(count)]  # spread each second's results over the second
    next_at = [t0 + p for p in phase]
    backlog: list[tuple[float, int]] = []
    next_slot, next_misc, resent = t0 + SLOT_S, time.monotonic() + 1, 0
    while (now := time.time()) < t0 + seconds:
        for i, d in enumerate(devices):
            if now >= next_at[i]:
                d.produce(now)
                next_at[i] += 1.0
        pump(0.01)
        if time.monotonic() >= next_misc:
            next_misc += 1
            for d in devices:
                d.client.loop_misc()
                resent += d.resend(now)
        if now >= next_slot:
            backlog.append((now - t0, sum(len(d.waiting) for d in devices)))
            next_slot += SLOT_S
    drain_until = time.monotonic() + 30  # the last receipts
    while any(d.waiting for d in devices) and time.monotonic() < drain_until:
        pump(0.05)
    for d in devices:
        d.status(c.OFFLINE)
        pump(0)
        d.client.disconnect()
        pump(0)
    print(json.dumps({
        "sent": sum(len(d.latencies) + len(d.waiting) for d in devices),
        "unreceipted": sum(len(d.waiting) for d in devices), "resent": resent,
        "latencies": [(round(e, 3), round(x, 4)) for d in devices for e, x in d.latencies],
        "model_at": [d.model_at.get(2) for d in devices], "rejected": sum(d.rejected for d in devices),
        "backlog": backlog,
    }), flush=True)


# --------------------------------------------------------------------------- the run


class Sampler:
    """CPU seconds and peak RSS of processes, from /proc."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids, self.tick = pids, os.sysconf("SC_CLK_TCK")
        self.start = {name: self.cpu(ps) for name, ps in pids.items()}

    def cpu(self, pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self.tick
            except OSError:
                pass
        return total

    @staticmethod
    def peak_rss_mb(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                pass
        return total

    def report(self, seconds: float) -> dict[str, tuple[float, float]]:
        return {name: ((self.cpu(ps) - self.start[name]) / seconds, self.peak_rss_mb(ps))
                for name, ps in self.pids.items()}


def postgres_pids() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() in ("postgres", "postmaster"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def hub_cli(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "cloud_hub", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"cloud-hub {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def count(db_url: str, sql: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(sql).scalar_one())
    finally:
        engine.dispose()


def run(args: argparse.Namespace, work: Path, linger_ms: float) -> dict[str, float]:
    """One fleet run with the hub's ``batch_linger_ms`` at ``linger_ms``: prints its figures, returns the
    headline ones."""
    from cloud_hub.data.db import make_engine
    from cloud_hub.rollout import publish as rollout
    from cloud_hub.settings import HubSettings
    from cloud_hub.tools.local_broker import LocalBroker
    from cloud_hub.tools.sample import write_sample_log

    schema = None
    if args.db:
        from hub_ingest import PgSchema

        schema = PgSchema(args.db)
        db_url = schema.hub_url
    else:
        db_url = f"sqlite:///{work / 'hub.sqlite'}"
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(work / "mosquitto").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        print(f"setting up: two model versions, a broker on port {broker.port}, {args.workers} hub worker(s) on "
              f"{'PostgreSQL' if schema else 'SQLite'}, batch_linger_ms {linger_ms:g}", flush=True)
        log = work / "sample.csv"
        write_sample_log(log, seconds=40)
        hub_cli("keygen", str(work / "hub.key"))
        common = ["--db", db_url, "--name", MODEL]
        for seed in (0, 1):
            hub_cli("train", str(log), *common, "--seed", str(seed))
        publish = ["publish", *common, "--broker", broker.url, "--prefix", prefix, "--signing-key",
                   str(work / "hub.key"), "--force"]
        hub_cli(*publish, "--version", "1")
        hubs = []
        for k in range(args.workers):
            share = ["--share-group", "fleet", "--client-id", f"hub-{k}"] if args.workers > 1 else []
            hubs.append(subprocess.Popen([sys.executable, "-m", "cloud_hub", "serve", "--broker", broker.url,
                                          "--db", db_url, "--prefix", prefix, *share],
                                         env={**os.environ, "CLOUD_HUB_BATCH_LINGER_MS": f"{linger_ms:g}"},
                                         stderr=open(work / f"hub-{k}.log", "w"), text=True))  # noqa: SIM115
        procs += hubs
        for hub, k in zip(hubs, range(args.workers), strict=True):
            _wait_log(work / f"hub-{k}.log", "ingesting", hub)
        per = -(-args.devices // args.procs)
        sims = []
        for first in range(0, args.devices, per):
            n = min(per, args.devices - first)
            sims.append(subprocess.Popen(
                [sys.executable, __file__, "_devices", str(broker.port), prefix, str(first), str(n),
                 str(args.seconds), str(work / "hub.pub.pem")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        procs += sims
        for s in sims:
            if (line := s.stdout.readline().strip()) != "ready":  # type: ignore[union-attr]
                raise SystemExit(f"a device process did not start: {line!r}")
        print(f"{args.devices} devices connected, running {args.seconds:.0f} s ...", flush=True)
        sampler = Sampler({"broker": [broker.pid or 0], "hub": [h.pid for h in hubs],
                           **({"postgres": postgres_pids()} if schema else {})})
        stored0 = count(db_url, "SELECT count(*) FROM results")
        t_go = time.time()
        for s in sims:
            s.stdin.write("go\n")  # type: ignore[union-attr]
            s.stdin.flush()  # type: ignore[union-attr]
        time.sleep(args.switch_at)
        steady = sampler.report(time.time() - t_go)  # before the model switch: results only
        settings = HubSettings(broker=broker.url, db=db_url, prefix=prefix, model_name=MODEL)
        engine = make_engine(db_url)
        t_pub = time.time()  # what `cloud-hub publish` does, timed without its interpreter start
        rollout.publish(engine, settings, version=2, signing_key=str(work / "hub.key"), force=True)
        t_acked = time.time()
        engine.dispose()
        while count(db_url, "SELECT count(*) FROM devices WHERE model_version = 2 AND substr(device_id, 1, 4) = 'sim-'") \
                < args.devices:
            if time.time() - t_pub > 120:
                raise SystemExit("not every device reported model v2 within 120 s")
            time.sleep(0.1)
        t_all = time.time()
        reports = [json.loads(s.stdout.readline()) for s in sims]  # type: ignore[union-attr]
        elapsed = time.time() - t_go
        usage = sampler.report(elapsed)
        stored = count(db_url, "SELECT count(*) FROM results") - stored0
        window = count(db_url, f"SELECT count(*) FROM results WHERE received_at <= {t_go + args.seconds}")
        ends, lat = np.array([pair for r in reports for pair in r["latencies"]]).reshape(-1, 2).T
        calm = lat[ends < t_pub]  # receipts of results made before the model switch
        sent = sum(r["sent"] for r in reports)
        got_v2 = [t for r in reports for t in r["model_at"] if t is not None]
        slots: dict[float, int] = {}
        for r in reports:
            for t, n in r["backlog"]:
                slots[round(t / SLOT_S) * SLOT_S] = slots.get(round(t / SLOT_S) * SLOT_S, 0) + n
        print(f"\n{args.devices} devices x 1 result/s for {args.seconds:.0f} s, {args.workers} hub worker(s), "
              f"{'PostgreSQL' if schema else 'SQLite'}, {args.procs} device processes")
        print(f"  produced {sent:,} results ({sent / args.seconds:,.0f}/s); stored {stored:,} "
              f"({window / args.seconds:,.0f}/s during the run); unreceipted at the end "
              f"{sum(r['unreceipted'] for r in reports)}, sent again {sum(r['resent'] for r in reports)}")
        print(f"  window end -> receipt at the device: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
              f"p99 {np.percentile(lat, 99) * 1000:.0f} ms, max {lat.max() * 1000:.0f} ms ({len(lat):,} receipts); "
              f"before the switch p50 {np.percentile(calm, 50) * 1000:.0f} ms, p99 {np.percentile(calm, 99) * 1000:.0f} ms")
        print("  results waiting for a receipt (every 5 s): "
              + " ".join(str(slots[k]) for k in sorted(slots)))
        for name, (cpu, rss) in usage.items():
            print(f"  {name:8s} CPU {cpu:5.0%} of one core   peak RSS {rss:7.1f} MB   (before the switch: "
                  f"{steady[name][0]:.0%})")
        print(f"  model v2: signed and PUBACKed {t_acked - t_pub:.2f} s after publish; every device checked it within "
              f"{max(got_v2) - t_pub:.2f} s (median {np.median(got_v2) - t_pub:.2f} s); the hub's devices table "
              f"shows all {args.devices} on v2 {t_all - t_pub:.2f} s after publish; refused bundles: "
              f"{sum(r['rejected'] for r in reports)}", flush=True)
        per_k = 1000 / max(window / args.seconds, 1e-9)  # CPU per 1,000 results/s
        return {"linger": linger_ms, "cpu": usage["hub"][0] * per_k, "steady": steady["hub"][0] * per_k,
                "p50": float(np.percentile(calm, 50)), "p99": float(np.percentile(calm, 99)),
                "p99_all": float(np.percentile(lat, 99)),
                "lost": sent - stored}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        broker.stop()
        if schema is not None:
            schema.__exit__()


def _wait_log(path: Path, needle: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while needle not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"hub did not start: {path.read_text()[-2000:]}")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long every device produces results")
    ap.add_argument("--switch-at", type=float, default=60.0, help="publish model v2 this many seconds in")
    ap.add_argument("--procs", type=int, default=4, help="device processes")
    ap.add_argument("--workers", type=int, default=1, help="hub workers ($share group when more than one)")
    ap.add_argument("--db", help="a postgresql+psycopg:// URL (default: a SQLite file)")
    ap.add_argument("--linger", default=None,
                    help="the hub's batch_linger_ms, comma-separated: one run each (default: 0 and the hub's default)")
    args = ap.parse_args()
    from cloud_hub.settings import HubSettings
    try:
        lingers = [float(x) for x in args.linger.split(",")] if args.linger else [0.0, HubSettings().batch_linger_ms]
    except ValueError:
        ap.error(f"--linger takes numbers separated by commas, got {args.linger!r}")
    if any(x < 0 for x in lingers):
        ap.error("--linger values must be 0 or more")
    if args.workers > 1 and not args.db:
        ap.error("several hub workers need PostgreSQL (--db)")
    if args.db and not args.db.startswith("postgresql+psycopg://"):
        ap.error("--db takes a postgresql+psycopg:// URL (SQLite is the default)")
    if args.devices < 1 or args.procs < 1:
        ap.error("--devices and --procs must be at least 1")
    args.procs = min(args.procs, args.devices)
    if args.switch_at >= args.seconds:
        ap.error("--switch-at must be within --seconds")
    from cloud_hub.data.sessions import DatabaseUnavailable
    figures = []
    for linger in lingers:
        with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
            try:
                figures.append(run(args, Path(tmp), linger))
            except DatabaseUnavailable as exc:
                print(f"fleet.py: {exc}", file=sys.stderr)
                raise SystemExit(exits.UNAVAILABLE) from None
    print(f"\nhub CPU per 1,000 results/s and receipt latency by batch_linger_ms ({args.devices} devices, "
          f"{'PostgreSQL' if args.db else 'SQLite'}, load average {os.getloadavg()[0]:.1f} at the end):")
    print("  linger ms   CPU before the switch   CPU whole run   receipt p50 / p99 before the switch   "
          "p99 whole run   not stored")
    for f in figures:
        print(f"  {f['linger']:9g}   {f['steady']:21.1%}   {f['cpu']:13.1%}   {f['p50'] * 1000:17.0f} / "
              f"{f['p99'] * 1000:.0f} ms {'':12s}   {f['p99_all'] * 1000:10.0f} ms   {f['lost']:10.0f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_devices":
        a = sys.argv[2:]
        devices_main(int(a[0]), a[1], int(a[2]), int(a[3]), float(a[4]), a[5])
    else:
        main()
