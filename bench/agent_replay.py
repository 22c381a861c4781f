"""Benchmark: the edge agent replaying a recorded log at --speed 0 into a real local broker.

Prints, from one run:
* readings/s and windows/s of ``edge-agent replay LOG --speed 0`` (a subprocess) into a hub (in this
  process, on a SQLite file), exiting once the hub has receipted every result; the agent's peak RSS,
  and wall time including interpreter start;
* the agent's anonymous memory (what presses a small device: the heap, arenas, copied-on-write pages,
  not the library code it shares with the page cache), sampled from ``/proc/PID/smaps_rollup`` every
  50 ms by a thread of this script, the peak kept, and once more when the agent has printed its summary;
  target: <= 40 MB with a trusted key; the agent runs with a device's packages (PySocks, which the dev extras
  bring with selenium, hidden from it: see ``device_packages``);
* the same replay with ``--until broker`` (rows leave at the broker's PUBACK, no hub), interleaved in
  the same run: what the end-to-end receipts cost the agent;
* the ceiling measured in the same run: parsing the same log alone (``read_log``), and the ratio;
* INT8 vs FP32 inference latency of the same model per batch (the agent's batch size) and per window.

    python bench/agent_replay.py [LOG] [--model BUNDLE] [--runs N] [--signed-only] [--agent-path DIR]

``--signed-only``: only the replays with a trusted key, with the medians of their peak RSS, readings/s and agent
CPU. ``--agent-path DIR``: the agent run is the ``edge_agent`` package in DIR (e.g. ``git archive COMMIT edge_agent |
tar -x -C DIR``): before/after figures under the same load, alternating runs of this command with and without it.

LOG defaults to ../shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv; without
--model the script trains one on subjects s01-s08 (the model `cloud-hub train` would make).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cloud_hub.data.ingest import Hub
from cloud_hub.models import datasets, lifecycle, training, weights
from cloud_hub.models.quantize import session
from cloud_hub.models.signing import keygen, load_private_key, sign_bundle
from cloud_hub.settings import HubSettings
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent.contract import decode_bundle
from edge_agent.runner import INFER_SLICE
from edge_agent.sources import read_log

ROOT = Path(__file__).resolve().parents[1]
ANON_TARGET_MB = 40.0  # issue #27 §4: a replay with a trusted key
_FLOOR = """
import sys, orjson, numpy as np
def anon():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("Anonymous:"))
from edge_agent.device import cli, jobs  # what `edge-agent replay` imports
from edge_agent.device.bundle import load_public_key, verify_bundle
from edge_agent.device.jobs import peak_rss_mb
from edge_agent.runner import INFER_SLICE
key = load_public_key(sys.argv[2])
imports, imports_anon = peak_rss_mb(), anon()
bundle, runner = verify_bundle(open(sys.argv[1], "rb").read(), trusted_key=key, allow_unsigned=False)
runner.predict(np.zeros((INFER_SLICE, bundle.manifest.n_features), np.float32))
print(orjson.dumps([imports, peak_rss_mb(), imports_anon, anon()]).decode())
"""
WATCH = ROOT.parent / "shared" / "data" / "watch_shoulder_exercise" / "watch_shoulder_exercise.csv"


class MemorySampler(threading.Thread):
    """Reads ``/proc/PID/smaps_rollup`` every ``every`` seconds while the process lives: the peaks of
    Anonymous (private memory no file backs: heap, arenas, pages copied on write) and of Rss, in MB."""

    def __init__(self, pid: int, argv: list[str], every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc, self.every = f"/proc/{pid}", every
        # Until its exec the child shares this process's memory (vfork): count it only once it runs argv.
        self._argv = ("\0".join(argv) + "\0").encode()
        self._execed = False
        self.anon_mb = self.rss_mb = 0.0
        self.samples = 0
        self.end_anon_mb: float | None = None  # read once the agent has printed its summary
        self._lock = threading.Lock()
        self._done = threading.Event()

    def sample(self) -> float | None:
        """One reading; the process's Anonymous MB (0 before its exec), or None once it is gone."""
        try:
            if not self._execed:
                with open(f"{self.proc}/cmdline", "rb") as f:
                    self._execed = f.read() == self._argv
                if not self._execed:
                    return 0.0
            with open(f"{self.proc}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.endswith("kB\n")}
        except (OSError, ValueError):  # exited (a zombie's file is empty)
            return None
        if "Anonymous" not in fields:
            return None
        with self._lock:
            self.samples += 1
            self.anon_mb = max(self.anon_mb, fields["Anonymous"])
            self.rss_mb = max(self.rss_mb, fields["Rss"])
        return fields["Anonymous"]

    def run(self) -> None:
        while self.sample() is not None and not self._done.wait(self.every):
            pass

    def stop(self) -> None:
        self._done.set()
        self.join()


def device_packages() -> Path:
    """A folder whose ``socks`` module fails to import, put on the agent's path: the agent runs with the packages
    a device has. PySocks is no dependency of the agent (deploy/agent/pyproject.toml); the dev extras bring it
    with selenium, and with it installed paho imports ``urllib.request`` on its first connect to look up a proxy
    (1.3-1.8 MB anonymous that a device does not have)."""
    folder = Path(tempfile.gettempdir()) / "bench-agent-device-packages"
    folder.mkdir(exist_ok=True)
    (folder / "socks.py").write_text('raise ImportError("PySocks is not installed on a device")\n')
    return folder


def run_sampled(cmd: list[str], stderr_path: Path, agent_path: Path | None = None
                ) -> tuple[subprocess.CompletedProcess[bytes], MemorySampler]:
    """Run the agent with a memory sampler on it; read it once more when its summary arrives (the
    replay is over, the interpreter not yet torn down). ``agent_path``: a folder holding another
    ``edge_agent`` (e.g. ``git archive`` of an older commit), run instead of this one's."""
    path = [str(agent_path)] if agent_path is not None else []
    path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [str(device_packages())])}
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=agent_path)
        sampler = MemorySampler(proc.pid, cmd)
        sampler.start()
        assert proc.stdout is not None
        first = proc.stdout.readline()
        sampler.end_anon_mb = sampler.sample()
        rest = proc.stdout.read()
        proc.wait()
        sampler.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, first + rest, stderr_path.read_bytes()), sampler


def met(value: float, target: float) -> str:
    return f"target <= {target:g}: {'met' if value <= target else 'NOT met'}"


def parse_ceiling(log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = sum(len(chunk) for chunk in read_log(log))
    return rows, time.perf_counter() - t0


def batch_latency(onnx_bytes: bytes, x: np.ndarray, runs: int = 200) -> float:
    sess = session(onnx_bytes)
    name = sess.get_inputs()[0].name
    for _ in range(20):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", nargs="?", type=Path, default=WATCH)
    ap.add_argument("--model", type=Path, help="bundle (.emlb); default: train one on s01-s08")
    ap.add_argument("--runs", type=int, default=3, help="replays; the best is reported")
    ap.add_argument("--signed-only", action="store_true",
                    help="only the --trusted-key replays (the memory target), and their agent CPU")
    ap.add_argument("--agent-path", type=Path, help="run the edge_agent package under this folder instead (before/after)")
    args = ap.parse_args()
    if not args.log.is_file():
        sys.exit(f"no log at {args.log} (pass one)")
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    fp32, feats = None, None
    if args.model is None:  # the model `cloud-hub train LOG --holdout-devices s09,s10 --mirror ax,wy,wz` makes
        ds = datasets.dataset_from_logs([str(args.log)], window_s=datasets.DEFAULT_WINDOW_S,
                                         hop_s=datasets.DEFAULT_HOP_S, holdout=["s09", "s10"],
                                         mirror=["ax", "wy", "wz"])
        train, test = datasets.split(ds, ["s09", "s10"])
        bundle, _, _, weights_blob = lifecycle.build(train, test, name="default", version=1)
        fp32 = training.export_onnx(weights.from_bytes(weights_blob), train.X.shape[1])
        feats = test.X
        args.model = work / "model.emlb"
        args.model.write_bytes(bundle.encode())
    bundle = decode_bundle(args.model.read_bytes())

    # An installed package carries compiled bytecode; compiling at import would count in the RSS.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "edge_agent")], check=True)
    if args.signed_only:
        signed_replays(args, work, bundle)
        return
    rows, parse_s = 0, float("inf")
    best: dict[str, dict] = {}
    anon: dict[str, float] = {}  # the highest anonymous peak of each mode's runs
    with LocalBroker(work / "broker") as broker:
        hub = Hub(HubSettings(broker=broker.url, db=f"sqlite:///{work / 'hub.sqlite'}", client_id="bench-hub",
                              log_interval_s=0))
        hub.start()
        try:
            ingested = 0
            for i in range(args.runs):  # interleaved: both modes see the same background load
                for until in ("hub", "broker"):
                    # Start each replay with an idle hub (a --until broker replay exits before the hub is done).
                    while hub.stats.stored + hub.stats.duplicates < ingested:
                        time.sleep(0.01)
                    if until == "hub":  # the ceiling: the best of as many runs as the agent's, each on an idle hub
                        rows, took = parse_ceiling(args.log)
                        parse_s = min(parse_s, took)
                    cmd = [sys.executable, "-m", "edge_agent", "replay", str(args.log), "--broker", broker.url,
                           "--model", str(args.model), "--speed", "0", "--state-dir", str(work / f"state-{until}{i}"),
                           "--json", "--until", until]
                    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                    proc, mem = run_sampled(cmd, work / "stderr.txt")
                    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
                    if proc.returncode != 0:
                        sys.exit(f"replay failed ({proc.returncode}): {proc.stderr.decode()}")
                    out = orjson.loads(proc.stdout)
                    if not out["drained"] or out["published"] != out["windows"]:
                        sys.exit(f"replay did not deliver everything: {out}")
                    out["wall"] = wall
                    ingested += out["windows"]
                    out["cpu"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                    anon[until] = max(anon.get(until, 0.0), mem.anon_mb)
                    if until not in best or out["seconds"] < best[until]["seconds"]:
                        best[until] = out
        finally:
            hub.stop()
    e2e, plain = best["hub"], best["broker"]
    rps = e2e["readings"] / e2e["seconds"]
    rps_plain = plain["readings"] / plain["seconds"]
    print(f"log: {args.log.name}: {rows:,} readings, {e2e['devices']} devices, {e2e['windows']:,} windows")
    print(f"ceiling  parse only (read_log):          {rows / parse_s:>10,.0f} readings/s")
    print(f"agent    replay --speed 0, hub receipts: {rps:>10,.0f} readings/s  {e2e['windows'] / e2e['seconds']:,.0f} "
          f"windows/s  ({e2e['seconds']:.2f} s in replay, {e2e['wall']:.2f} s wall with interpreter start)")
    print(f"agent    replay --until broker:          {rps_plain:>10,.0f} readings/s  (receipts cost "
          f"{1 - rps / rps_plain:.0%})")
    print(f"         waiting after the last reading: {e2e['drain_s'] * 1e3:.0f} ms for receipts, "
          f"{plain['drain_s'] * 1e3:.0f} ms for PUBACKs; agent CPU {e2e['cpu']:.2f} s vs {plain['cpu']:.2f} s")
    print(f"ratio    agent / parse-only ceiling:     {rps / (rows / parse_s):.2f}")
    print(f"agent peak RSS (VmHWM, reported by the agent): {e2e['peak_rss_mb']:.1f} MB "
          f"({plain['peak_rss_mb']:.1f} MB with --until broker); anonymous peak {anon['hub']:.1f} MB "
          f"({anon['broker']:.1f} MB with --until broker; highest of {args.runs} runs, sampled every 50 ms)")

    signed, pub = signed_replays(args, work, bundle)

    # The floor under any replay: the imports, the verification, the session and one inference,
    # and nothing else (no log, no outbox, no broker).
    floor = subprocess.run([sys.executable, "-c", _FLOOR, str(signed), str(pub)], capture_output=True, check=True)
    imports_mb, floor_mb, imports_anon, floor_anon = orjson.loads(floor.stdout)
    print(f"floor of the agent process: imports {imports_mb:.1f} MB (numpy, onnxruntime, paho, typer, sqlite3; "
          f"cryptography's Ed25519 with the key); + verified bundle, onnxruntime session and one batch of {INFER_SLICE}: {floor_mb:.1f} MB")
    print(f"         of it anonymous: imports {imports_anon:.1f} MB, + bundle, session and a batch {floor_anon:.1f} MB")

    m = bundle.manifest
    x = (feats[:160] if feats is not None else  # about one chunk's windows
         np.random.default_rng(0).normal(size=(160, m.n_features)).astype(np.float32))
    int8_b, int8_1 = batch_latency(bundle.model, x), batch_latency(bundle.model, x[:1], runs=500)
    print(f"INT8 model: {len(bundle.model):,} bytes; per batch of {len(x)}: {int8_b:.3f} ms; "
          f"per single window: {int8_1:.3f} ms")
    if fp32 is not None:
        fp32_b, fp32_1 = batch_latency(fp32, x), batch_latency(fp32, x[:1], runs=500)
        print(f"FP32 model: {len(fp32):,} bytes; per batch of {len(x)}: {fp32_b:.3f} ms; "
              f"per single window: {fp32_1:.3f} ms")
        print(f"INT8 / FP32 latency: batch {int8_b / fp32_b:.2f}, single window {int8_1 / fp32_1:.2f}")


def signed_replays(args: argparse.Namespace, work: Path, bundle: Any) -> tuple[Path, Path]:
    """The same replay with signature verification (a production agent: trusted_key set): the memory target."""
    priv, pub, _ = keygen(work / "hub.pem")
    signed = work / "signed.emlb"
    signed.write_bytes(sign_bundle(bundle, load_private_key(priv)).encode())
    verified: dict = {}
    peak = {"anon": 0.0, "rss": 0.0, "end": 0.0}
    anons: list[float] = []  # each run's anonymous peak
    rss: list[float] = []
    cpus: list[float] = []
    rates: list[float] = []
    with LocalBroker(work / "broker2") as broker:
        for i in range(args.runs):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            res, mem = run_sampled([sys.executable, "-m", "edge_agent", "replay", str(args.log.resolve()), "--broker",
                                    broker.url, "--model", str(signed.resolve()), "--trusted-key", str(pub.resolve()),
                                    "--state-dir", str((work / f"signed{i}").resolve()), "--json", "--until", "broker"],
                                   work / "stderr.txt", args.agent_path)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if res.returncode != 0:
                sys.exit(f"signed replay failed ({res.returncode}): {res.stderr.decode()}")
            out = orjson.loads(res.stdout)
            anons.append(mem.anon_mb)
            rss.append(out["peak_rss_mb"])
            cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            rates.append(out["readings"] / out["seconds"])
            peak = {"anon": max(peak["anon"], mem.anon_mb), "rss": max(peak["rss"], out["peak_rss_mb"]),
                    "end": max(peak["end"], mem.end_anon_mb or 0.0)}
            if not verified or out["seconds"] < verified["seconds"]:
                verified = out
    print(f"with --trusted-key (Ed25519 verification loads cryptography): "
          f"{verified['readings'] / verified['seconds']:,.0f} readings/s, peak RSS {peak['rss']:.1f} MB")
    print(f"         anonymous peak {peak['anon']:.1f} MB ({met(peak['anon'], ANON_TARGET_MB)}; highest of "
          f"{args.runs} runs, median {statistics.median(anons):.1f} MB, /proc/PID/smaps_rollup every 50 ms), "
          f"{peak['end']:.1f} MB after the summary")
    print(f"         medians of the {args.runs} runs: peak RSS {statistics.median(rss):.1f} MB, "
          f"{statistics.median(rates):,.0f} readings/s, agent CPU {statistics.median(cpus):.3f} s "
          f"(load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return signed, pub


if __name__ == "__main__":
    main()
