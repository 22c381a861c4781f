"""Benchmark: the CPU a bare paho client spends on the hub's MQTT packets alone, per 1,000 results/s.

    python bench/paho_floor.py                 # 1,000 results/s from 1,000 device topics, 20 s each case
    python bench/paho_floor.py --rate 2000 --seconds 30
    python bench/paho_floor.py --rest 0,2,5,10,20 --cases receipts-qos1   # the network thread's rest, swept

The hub's cost per result (``bench/fleet.py``) has a floor that no batching can lower: every result is
one QoS 1 PUBLISH in and its PUBACK out (after the commit), and, since each device sends one result at
a time, one receipt PUBLISH out and the broker's PUBACK of it in. This script measures that floor with
nothing else in the process: a paho client (the hub's settings: MQTT 5, manual acks, TCP_NODELAY, its
network thread started by ``loop_start``) that, for every message, publishes a fixed receipt to the
device's topic and acknowledges the message, on its network thread, with no decoding, no database and
no queue. A separate process publishes one-result messages at ``--rate`` to ``--devices`` device topics
through a private mosquitto (the project's ``mosquitto.conf``).

Cases, each measured over the same rate and length:

* ``receipts QoS 1``: the hub's four packets per result (what ``serve`` does);
* ``receipts QoS 0``: the receipt's PUBACK saved;
* ``no receipts``: the result and its PUBACK only (``receipts = false``).

``--rest MS`` (default 0 and the hub's: 5) runs each case again with the network thread resting that long
between turns, as the hub's does (``edge_agent.mqtt``'s lingering client: each turn reads all that has
arrived, then rests; paho's own loop turns once a packet).

The figure is the client process's CPU (user + system, ``getrusage``) over the middle of the run, per
1,000 results/s. ``bench/fleet.py`` runs the first case in the same run as the hub and prints the hub
against it.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.tools.local_broker import LocalBroker
from edge_agent.mqtt.client import LingeringClient, tcp_no_delay

PREFIX = "floor"
# The sizes of a one-result message and of its receipt as the agent and the hub send them (about).
RESULT = b'{"v":1,"d":"d0000","r":[[1700000000000,1700000000.0,1700000002.5,3,0.41,"walk",0.93,null]]}'
RECEIPT = b'{"v":1,"s":[[1700000000000,1]]}'
CASES = {"receipts-qos1": 1, "receipts-qos0": 0, "no-receipts": None}


def publish_main(port: int, rate: float, seconds: float, devices: int) -> None:
    """The load: ``rate`` one-result messages a second, round-robin over ``devices`` topics, QoS 1."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="floor-pub", protocol=paho.MQTTv5)
    client.on_socket_open = tcp_no_delay
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topics = [f"{PREFIX}/devices/d{i:05d}/results" for i in range(devices)]
    sent, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        while sent < elapsed * rate:
            client.publish(topics[sent % devices], RESULT, qos=1)
            sent += 1
        time.sleep(0.001)
    client.disconnect()
    client.loop_stop()


def measure(rate: float = 1000.0, seconds: float = 20.0, devices: int = 1000, receipt_qos: int | None = 1,
            workdir: Path | None = None, rest_ms: float = 0.0) -> dict[str, float]:
    """One case: the floor client's CPU per 1,000 results/s (a fraction of a core) and the rate it saw."""
    with tempfile.TemporaryDirectory() as tmp, LocalBroker(Path(workdir or tmp) / "floor-broker") as broker:
        got = [0]
        client = LingeringClient(CallbackAPIVersion.VERSION2, client_id="floor-hub", protocol=paho.MQTTv5,
                                  manual_ack=True)
        client.linger = rest_ms / 1000.0  # 0: paho's own loop
        client.on_socket_open = tcp_no_delay

        def on_message(c: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            got[0] += 1
            if receipt_qos is not None:
                c.publish(msg.topic[: -len("results")] + "receipts", RECEIPT, qos=receipt_qos)
            c.ack(msg.mid, msg.qos)

        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *_a: subscribed.set()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.subscribe(f"{PREFIX}/devices/+/results", qos=1)
            if not subscribed.wait(10):
                raise RuntimeError("the floor client's subscription was not acknowledged")
            load = subprocess.Popen([sys.executable, __file__, "_publish", str(broker.port), str(rate),
                                     str(seconds), str(devices)])
            try:
                # Measure the middle of the run: the publisher's start and end are not the steady state.
                settle = min(3.0, seconds / 4)
                deadline = time.monotonic() + settle
                while got[0] == 0 or time.monotonic() < deadline:
                    if load.poll() is not None:
                        raise RuntimeError(f"the publisher exited with {load.returncode}")
                    time.sleep(0.05)
                r0, n0, t0 = resource.getrusage(resource.RUSAGE_SELF), got[0], time.perf_counter()
                time.sleep(max(1.0, seconds - 2 * settle))
                r1, n1, t1 = resource.getrusage(resource.RUSAGE_SELF), got[0], time.perf_counter()
                load.wait(seconds + 30)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait()
        finally:
            client.disconnect()
            client.loop_stop()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    seen = (n1 - n0) / (t1 - t0)
    return {"cpu_per_k": cpu / (t1 - t0) / (seen / 1000), "rate": seen, "us_per_result": cpu / (n1 - n0) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="results a second (default 1000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each case (default 20)")
    ap.add_argument("--devices", type=int, default=1000, help="device topics the results come from (default 1000)")
    ap.add_argument("--rest", default="0,5", help="the network thread's rest in ms, comma-separated (default 0,5)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    try:
        rests = [float(x) for x in args.rest.split(",")]
    except ValueError:
        ap.error(f"--rest takes numbers separated by commas, got {args.rest!r}")
    cases = args.cases.split(",")
    if args.rate <= 0 or args.seconds < 4 or args.devices < 1 or any(not 0 <= r <= 100 for r in rests):
        ap.error("--rate must be positive, --seconds at least 4, --devices at least 1, --rest 0-100 ms")
    if unknown := [c for c in cases if c not in CASES]:
        ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    print(f"a bare paho client doing the hub's packets, {args.rate:g} results/s from {args.devices} devices, "
          f"{args.seconds:g} s a case")
    for name in cases:
        for rest in rests:
            f = measure(args.rate, args.seconds, args.devices, CASES[name], rest_ms=rest)
            with open("/proc/loadavg") as fh:
                load = fh.read().split()[0]
            print(f"  {name:13s} rest {rest:4g} ms {f['cpu_per_k']:6.1%} of a core per 1,000 results/s "
                  f"({f['us_per_result']:5.0f} µs a result, {f['rate']:,.0f} results/s seen, load {load})", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_publish"]:
        publish_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
