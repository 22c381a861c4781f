"""Benchmark: a simulated fleet of devices (1,000 by default) against a real mosquitto and a real hub.

    python bench/fleet.py                                     # 1,000 devices for 120 s, SQLite, 1 hub
    python bench/fleet.py --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres --workers 2
    python bench/fleet.py --linger 0,5,20 --seconds 60 --switch-at 45   # one run per batch_linger_ms
    python bench/fleet.py --devices 10000 --period 10 --seconds 150 --switch-at 40 --storm-at 80 --linger 5

The devices (``bench/fleet_devices.py``) speak the real agent's protocol, each over its own MQTT session:
a retained status with a last will, one result every ``--period`` seconds kept until the hub's receipt,
the retained model topic with the bundle's signature checked, and the agent's reconnect policy. They are
spread over ``--procs`` processes, each driving its clients from one selector loop (paho's external-loop
API), so 10,000 sessions need no 10,000 threads.

Reported from one run: results/s stored (the hub's database) against results/s produced; the
latency from a result's window end to its receipt at the device (commit, then the receipt's trip:
an upper bound of window end -> commit), p50/p99; the results waiting for a receipt over time (the
backlog); broker, hub, simulator and PostgreSQL CPU and peak RSS; after ``--switch-at`` seconds, the
time from publishing a new signed model until every device has checked it and the hub's devices table
shows every device on it.

``--storm-at`` restarts the broker that many seconds in (SIGTERM: it saves its persistence file, as a
service restart does; ``--storm-down`` seconds later it starts again on the same port): every session
drops at once and comes back by the agent's reconnect policy. Reported: when every device was back,
when every result that was waiting at its return had its receipt, and that nothing was lost.

``--linger`` (default: 0 and the hub's default ``batch_linger_ms``) runs the whole fleet once per
value, one after the other, and ends with a table of the hub's CPU per 1,000 results/s (before the
model switch, and over the whole run) and the receipt latency of each: what the linger buys. The
table ends with the floor under those figures, measured in the same run at the fleet's rate
(``bench/paho_floor.py``): a bare paho client doing only the hub's four MQTT packets per result (the
result in, its PUBACK, a receipt out and its PUBACK in), with no decoding and no database; ``--no-floor``
skips it.

File descriptors: the broker holds one per session and each device process one per device; the bench
raises its soft ``RLIMIT_NOFILE`` to the hard limit (inherited by the broker and the devices) and refuses
to start when that is too low for ``--devices``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import exits

MODEL = "fleet"
SLOT_S = 5.0  # backlog samples (fleet_devices.SLOT_S)
DEVICES = Path(__file__).with_name("fleet_devices.py")


# --------------------------------------------------------------------------- the run


class Sampler:
    """CPU seconds and peak RSS of processes, from /proc."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids, self.tick = pids, os.sysconf("SC_CLK_TCK")
        self.start = {name: self.cpu(ps) for name, ps in pids.items()}
        self.gone: dict[str, tuple[float, float]] = {}  # CPU seconds and peak RSS of processes that ended
        self.peaks: dict[str, float] = {}

    def retire(self, name: str, pid: int) -> None:
        """Keep what ``pid`` (about to end, e.g. a restarted broker) used, and stop reading it."""
        cpu, rss = self.gone.get(name, (0.0, 0.0))
        self.gone[name] = (cpu + self.cpu([pid]), max(rss, self.peak_rss_mb([pid])))
        self.pids[name] = [p for p in self.pids[name] if p != pid]

    def add(self, name: str, pid: int) -> None:
        self.pids[name].append(pid)

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
        return sum(_vm(pid, "VmHWM:") for pid in pids)

    def report(self, seconds: float) -> dict[str, tuple[float, float]]:
        for name, ps in self.pids.items():  # the peak so far: a process may be gone at the next report
            self.peaks[name] = max(self.peaks.get(name, 0.0), self.peak_rss_mb(ps), self.gone.get(name, (0.0, 0.0))[1])
        return {name: ((self.cpu(ps) + self.gone.get(name, (0.0, 0.0))[0] - self.start[name]) / seconds,
                       self.peaks[name]) for name, ps in self.pids.items()}


class RssTimeline:
    """The resident memory of processes every ``SLOT_S`` seconds, from a thread."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SLOT_S):
            for name, pids in self.pids.items():
                self.samples[name].append(sum(_vm(pid, "VmRSS:") for pid in pids))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _vm(pid: int, field: str) -> float:
    """A ``/proc/PID/status`` size in MB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


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
                [sys.executable, str(DEVICES), str(broker.port), prefix, str(first), str(n),
                 str(args.seconds), str(args.period), str(work / "hub.pub.pem")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        procs += sims
        for s in sims:
            if (line := s.stdout.readline().strip()) != "ready":  # type: ignore[union-attr]
                raise SystemExit(f"a device process did not start: {line!r}")
        print(f"{args.devices} devices connected, running {args.seconds:.0f} s ...", flush=True)
        sampler = Sampler({"broker": [broker.pid or 0], "hub": [h.pid for h in hubs], "devices": [s.pid for s in sims],
                           **({"postgres": postgres_pids()} if schema else {})})
        stored0 = count(db_url, "SELECT count(*) FROM results")
        t_go = time.time()
        for s in sims:
            s.stdin.write("go\n")  # type: ignore[union-attr]
            s.stdin.flush()  # type: ignore[union-attr]
        memory = RssTimeline({"hub": [h.pid for h in hubs], "broker": [broker.pid or 0]})
        _sleep_until(t_go + args.switch_at)
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
        storm: tuple[float, float] | None = None
        if args.storm_at is not None:
            _sleep_until(t_go + args.storm_at)
            sampler.retire("broker", broker.pid or 0)
            t_down = time.time()
            broker.stop()  # SIGTERM: the persistence file is saved, as a service restart does
            time.sleep(args.storm_down)
            broker.start(timeout=30)
            storm = (t_down, time.time())
            sampler.add("broker", broker.pid or 0)
            memory.pids["broker"] = [broker.pid or 0]
            print(f"broker restarted: down {storm[1] - storm[0]:.1f} s", flush=True)
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
        rate = args.devices / args.period
        print(f"\n{args.devices:,} devices x 1 result every {args.period:g} s ({rate:,.0f} results/s) for "
              f"{args.seconds:.0f} s, {args.workers} hub worker(s), {'PostgreSQL' if schema else 'SQLite'}, "
              f"{args.procs} device processes")
        print(f"  produced {sent:,} results ({sent / args.seconds:,.0f}/s); stored {stored:,} "
              f"({window / args.seconds:,.0f}/s during the run); unreceipted at the end "
              f"{sum(r['unreceipted'] for r in reports)}, sent again {sum(r['resent'] for r in reports)}; "
              f"{'every result stored once' if stored == sent else f'MISMATCH: {sent - stored:+,} not stored'}")
        print(f"  window end -> receipt at the device: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
              f"p99 {np.percentile(lat, 99) * 1000:.0f} ms, max {lat.max() * 1000:.0f} ms ({len(lat):,} receipts); "
              f"before the switch p50 {np.percentile(calm, 50) * 1000:.0f} ms, p99 {np.percentile(calm, 99) * 1000:.0f} ms")
        print("  results waiting for a receipt (every 5 s): "
              + " ".join(str(slots[k]) for k in sorted(slots)))
        memory.stop()
        for name, values in memory.samples.items():
            print(f"  {name} RSS (MB, every 5 s): " + " ".join(f"{v:.0f}" for v in values))
        for name, (cpu, rss) in usage.items():
            print(f"  {name:8s} CPU {cpu:5.0%} of one core   peak RSS {rss:7.1f} MB   (before the switch: "
                  f"{steady[name][0]:.0%})")
        print(f"  model v2: signed and PUBACKed {t_acked - t_pub:.2f} s after publish; every device checked it within "
              f"{max(got_v2) - t_pub:.2f} s (median {np.median(got_v2) - t_pub:.2f} s); the hub's devices table "
              f"shows all {args.devices:,} on v2 {t_all - t_pub:.2f} s after publish; refused bundles: "
              f"{sum(r['rejected'] for r in reports)}", flush=True)
        checks = [pair for r in reports for pair in r["bundle_checks"]]
        print(f"  model bundles the devices downloaded during the run: "
              f"{sum(r['bundle_bytes'] for r in reports) / 1e6:,.0f} MB", flush=True)
        print(f"  each device process checked each bundle once ({len(checks)} checks: {max(n for n, _ in checks):,} "
              f"bytes, {1000 * max(t for _, t in checks):.1f} ms at most); a device checks its own copy, on its own CPU",
              flush=True)
        if storm is not None:
            backs = [t for r in reports for t in r["backs"] if t is not None]
            dropped = sum(t is not None for r in reports for t in r["drops"])
            recovered = [t for r in reports for t in r["recovered"] if t is not None]
            never = sum(r["never_recovered"] for r in reports)
            print(f"  reconnect storm: {dropped:,} sessions dropped; broker down {storm[1] - storm[0]:.1f} s; after it "
                  f"was up again: {len(backs):,} devices back, the last after {max(backs) - storm[1]:.1f} s "
                  f"(median {np.median(backs) - storm[1]:.1f} s); every result waiting at a device's return "
                  f"receipted after {max(recovered) - storm[1]:.1f} s" if backs and recovered else
                  f"  reconnect storm: {dropped:,} sessions dropped, {len(backs):,} back", flush=True)
            if never or len(backs) < args.devices:
                print(f"  reconnect storm: NOT RECOVERED: {args.devices - len(backs):,} devices not back, "
                      f"{never:,} with results still waiting", flush=True)
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


def _sleep_until(t: float) -> None:
    if (left := t - time.time()) > 0:
        time.sleep(left)


def raise_fd_limit(devices: int) -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one (the broker and the device processes inherit it); exit 2
    when even the hard limit cannot hold the broker's sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = devices + 256  # the broker: a socket per session, its listeners, persistence, log
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"fleet.py: {devices:,} devices need {need:,} open files in the broker, the hard limit "
                         f"(ulimit -Hn) is {hard:,}: raise it (LimitNOFILE= for a service, nofile in "
                         f"/etc/security/limits.conf) or run fewer devices")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wait_log(path: Path, needle: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while needle not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"hub did not start: {path.read_text()[-2000:]}")
        time.sleep(0.05)


def main() -> None:
    # SIGTERM (a service manager, `kill`, a timeout) ends the run like Ctrl-C: run()'s finally stops the
    # broker, the hub and the device processes instead of leaving them behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long every device produces results")
    ap.add_argument("--switch-at", type=float, default=60.0, help="publish model v2 this many seconds in")
    ap.add_argument("--procs", type=int, default=4, help="device processes")
    ap.add_argument("--workers", type=int, default=1, help="hub workers ($share group when more than one)")
    ap.add_argument("--db", help="a postgresql+psycopg:// URL (default: a SQLite file)")
    ap.add_argument("--linger", default=None,
                    help="the hub's batch_linger_ms, comma-separated: one run each (default: 0 and the hub's default)")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between a device's results")
    ap.add_argument("--storm-at", type=float, default=None,
                    help="restart the broker this many seconds in (after the model switch): a reconnect storm")
    ap.add_argument("--storm-down", type=float, default=2.0, help="seconds the restarted broker stays down")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the floor: a bare paho client's CPU for the hub's packets at the same rate")
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
    if args.period <= 0 or args.storm_down < 0:
        ap.error("--period must be above 0 and --storm-down 0 or more")
    if args.storm_at is not None and not args.switch_at < args.storm_at < args.seconds:
        ap.error("--storm-at must come after --switch-at and within --seconds")
    raise_fd_limit(args.devices)
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
    if not args.no_floor:
        from paho_floor import measure

        from cloud_hub.data.ingest import NETWORK_REST_MAX_MS
        rate = args.devices / args.period
        best = min(figures, key=lambda f: f["steady"])
        rest = min(best["linger"], NETWORK_REST_MAX_MS)  # the network thread's rest in the hub's best run
        floor = measure(rate, 20.0, min(args.devices, 10_000), 1, rest_ms=rest)["cpu_per_k"]
        print(f"  floor: a bare paho client doing only the hub's 4 packets a result at {rate:,.0f} results/s, its "
              f"network thread resting {rest:g} ms as the hub's: {floor:.1%} of a core per 1,000 results/s; the "
              f"hub's best before the switch is {best['steady'] / floor:.2f}x it "
              f"(target 8 %: {'below' if floor > 0.08 else 'above'} the floor)", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # everything it started is stopped by then (run's finally)
        print("fleet.py: interrupted", file=sys.stderr)
        sys.exit(130)
