"""Benchmark: does one device flooding the hub slow the others down? (`device_max_msgs_per_s`)

    python bench/flood.py [--devices 20] [--seconds 20]

Each phase starts a fresh broker and ``cloud-hub serve`` (SQLite), then ``--devices`` simulated devices
(``bench/fleet.py``'s, one result a second each, kept until their receipt) for ``--seconds``, and
measures their latency from a result to its receipt. Phases:

* quiet: the honest devices alone (the ceiling: what the others get when nobody floods);
* 10x: one more device sending one-result messages at ten times an agent's normal rate (20/s);
* line rate, limited: that device sends as fast as one client can (QoS 1, 1,000 in flight), with the
  hub's default limit (200 messages/s, bursts of 2,000);
* line rate, unlimited: the same flood with ``device_max_msgs_per_s = 0`` (how the hub behaved before).

Prints, per phase, the honest devices' receipt latency p50/p99 and its ratio to the quiet phase, what
the flooder sent, and what the hub stored and dropped of it.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet_devices import CONNECTING, Device, pump, session_properties

from edge_agent import contract as c
from edge_agent.mqtt import tcp_no_delay

FLOODER = "flood-0000"


def devices_main(port: int, prefix: str, count: int, seconds: float) -> None:
    """Honest devices: one result a second each, spread over the second; print their receipt latencies."""
    topics, sel = c.Topics(prefix), selectors.DefaultSelector()
    devices = [Device(f"sim-{i:04d}", topics, None, sel, set()) for i in range(count)]
    started = 0
    while not all(d.connected for d in devices):  # at most CONNECTING sessions without a CONNACK, as fleet_devices
        while started < count and started - sum(d.connected for d in devices[:started]) < CONNECTING:
            devices[started].client.connect("127.0.0.1", port, keepalive=60, clean_start=True,
                                            properties=session_properties())
            started += 1
        pump(sel, 0.05)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    next_at = [t0 + i / count for i in range(count)]
    while (now := time.time()) < t0 + seconds:
        for i, d in enumerate(devices):
            if now >= next_at[i]:
                d.produce(now)
                next_at[i] += 1.0
        pump(sel, 0.01)
    until = time.monotonic() + 60
    while any(d.waiting for d in devices) and time.monotonic() < until:
        pump(sel, 0.05)
    print(json.dumps({"latencies": [seconds for _end, seconds in (x for d in devices for x in d.latencies)],
                      "unreceipted": sum(len(d.waiting) for d in devices)}), flush=True)


def flood_main(port: int, prefix: str, seconds: float, rate: float) -> None:
    """One device sending valid one-result messages at ``rate`` a second (0: as fast as it can)."""
    topics = c.Topics(prefix)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=FLOODER, protocol=paho.MQTTv5)
    client.on_socket_open = tcp_no_delay
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(2000)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    t0, sent, topic = time.time(), 0, topics.results(FLOODER)
    while (now := time.time()) < t0 + seconds:
        if rate and sent >= (now - t0) * rate:
            time.sleep(0.001)
            continue
        r = c.Result(seq=int(t0 * 1000) + sent, start=now - 2.5, end=now, model_version=0, latency_ms=0.8,
                     label="walk", confidence=0.9)
        info = client.publish(topic, c.ResultBatch(FLOODER, (r,)).encode(), qos=1)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.0005)
            continue
        sent += 1
    client.loop_stop()
    client.disconnect()
    print(json.dumps({"sent": sent, "seconds": time.time() - t0}), flush=True)


def phase(name: str, work: Path, args: argparse.Namespace, flood_rate: float | None, limit: float) -> dict:
    from cloud_hub.tools.local_broker import LocalBroker

    work.mkdir()
    prefix = f"flood-{uuid.uuid4().hex[:6]}"
    db = work / "hub.sqlite"
    broker = LocalBroker(work / "mosquitto").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        log = open(work / "hub.log", "w")  # noqa: SIM115 - closed with the process
        hub = subprocess.Popen([sys.executable, "-m", "cloud_hub", "serve", "--broker", broker.url, "--db",
                                f"sqlite:///{db}", "--prefix", prefix], stderr=log, stdout=log, text=True,
                               env={**os.environ, "CLOUD_HUB_DEVICE_MAX_MSGS_PER_S": str(limit)})
        procs.append(hub)
        while " ingesting " not in (work / "hub.log").read_text():
            if hub.poll() is not None:
                raise SystemExit((work / "hub.log").read_text())
            time.sleep(0.1)
        me = str(Path(__file__).resolve())
        run = [subprocess.Popen([sys.executable, me, "_devices", str(broker.port), prefix, str(args.devices),
                                 str(args.seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)]
        if flood_rate is not None:
            run.append(subprocess.Popen([sys.executable, me, "_flood", str(broker.port), prefix, str(args.seconds),
                                         str(flood_rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        procs += run
        for p in run:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in run:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in run]  # type: ignore[union-attr]
        time.sleep(1.0)  # the hub commits what it holds
        con = sqlite3.connect(db)
        stored_flood = con.execute("SELECT count(*) FROM results WHERE device_id = ?", (FLOODER,)).fetchone()[0]
        dead = con.execute("SELECT count(*) FROM dead_letters WHERE reason LIKE '%over its limit%'").fetchone()[0]
        con.close()
        lat = np.array(reports[0]["latencies"]) * 1000
        out = {"phase": name, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
               "receipts": len(lat), "unreceipted": reports[0]["unreceipted"], "stored_flood": stored_flood,
               "dead_letters": dead}
        if flood_rate is not None:
            out["flood_sent"] = reports[1]["sent"]
            out["flood_rate"] = reports[1]["sent"] / reports[1]["seconds"]
        return out
    finally:
        for p in procs:
            p.kill()
            p.wait()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        for i, (name, rate, limit) in enumerate([("quiet", None, 200.0), ("10x (20 msgs/s)", 20.0, 200.0),
                                                  ("line rate, limited", 0.0, 200.0),
                                                  ("line rate, unlimited", 0.0, 0.0)]):
            print(f"phase {name} ...", flush=True)
            rows.append(phase(name, Path(tmp) / f"p{i}", args, rate, limit))
    quiet = rows[0]
    print(f"\n{args.devices} honest devices x 1 result/s for {args.seconds:g} s; receipt latency of the honest ones:")
    print(f"{'phase':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 x':>6s} {'p99 x':>6s} {'flooder sent':>13s} "
          f"{'its rate/s':>10s} {'stored':>8s} {'dead letters':>12s} {'unreceipted':>11s}")
    for r in rows:
        print(f"{r['phase']:24s} {r['p50']:8.1f} {r['p99']:8.1f} {r['p50'] / quiet['p50']:6.2f} "
              f"{r['p99'] / quiet['p99']:6.2f} {r.get('flood_sent', 0):13,} {r.get('flood_rate', 0):10,.0f} "
              f"{r['stored_flood']:8,} {r['dead_letters']:12,} {r['unreceipted']:11,}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_devices":
        a = sys.argv[2:]
        devices_main(int(a[0]), a[1], int(a[2]), float(a[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_flood":
        a = sys.argv[2:]
        flood_main(int(a[0]), a[1], float(a[2]), float(a[3]))
    else:
        main()
