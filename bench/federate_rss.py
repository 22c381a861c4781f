"""Peak RSS of a real ``cloud-hub federate`` process through a few rounds (issue 26 §5: target <= 150 MB).

    python bench/federate_rss.py [--agents 4] [--rounds 3] [--secure] [--workdir /tmp/edgeml-federate-rss]

Runs ``cloud-hub demo --federated``'s fleet (a private mosquitto, the hub ingesting in this process, v1 trained
centrally and published, one ``edge-agent run`` per device following its own recording: the watch recordings of
``../shared/data`` when present, else the generated IMU log) but the rounds are run by ``python -m cloud_hub
federate`` as a process of its own, with the demo's options (hold-out log gate, tolerance 0.01).

Its peak RSS is its ``VmHWM`` as it exits (written by an ``atexit`` hook of a two-line wrapper that runs the
``cloud_hub`` module as ``python -m`` does), checked against the highest ``VmHWM`` this script read from
``/proc/<pid>/status`` every 5 ms while it ran (the larger of the two is printed: the kernel updates the
high-water mark lazily, so a read can see a few hundred kB more than the exit). Not the ``ru_maxrss`` of ``os.wait4``: the kernel folds into it the
RSS the forked child had before its ``exec``, i.e. this script's (~270 MB with the hub and scikit-learn loaded),
which hid every figure under it. Also printed: what importing federate's modules costs in a fresh interpreter, and
whether scikit-learn, skl2onnx or onnxruntime are among them. A hold-out log is scored in a child that
federate forks for it (``cloud_hub.rounds.finish._score_apart``): that child's own peak RSS, and the highest RSS of
the two read at one time, are printed too (both count the pages they share, the second twice). ``--trace``: federate's RSS each time it grew by
2 MB, after the last line it had logged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.models.signing import keygen
from cloud_hub.rounds.store import RoundStore
from cloud_hub.settings import HubSettings
from cloud_hub.tools import demo_federated
from cloud_hub.tools.demo import PREFIX
from cloud_hub.tools.demo_federated import FederatedDemo
from edge_agent.settings.loader import load_settings

TARGET_MB = 150.0
FLOOR = ("import sys\n"
         "import cloud_hub.cli.app, cloud_hub.cli.rounds, cloud_hub.rounds.coordinator, cloud_hub.rounds.finish\n"
         "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
         "print(' '.join(sorted(m for m in ('sklearn', 'scipy', 'skl2onnx', 'onnxruntime', 'onnx', "
         "'onnxruntime.quantization') if m in sys.modules)))\n")


HWM = ("import atexit, runpy, sys\n"
       "def hwm(path=sys.argv.pop(1)):\n"
       "    open(path, 'w').write(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
       "atexit.register(hwm)\n"
       "sys.argv[0] = 'cloud-hub'\n"
       "runpy.run_module('cloud_hub', run_name='__main__', alter_sys=True)\n")


def status_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):  # it has just exited
        return 0.0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class FederateProcess:
    """Stands in for :class:`~cloud_hub.rounds.coordinator.Coordinator` in the demo: ``run`` is a ``cloud-hub
    federate`` process with the same settings and plan; its peak RSS is kept in ``peak_mb``."""

    peak_mb: float = 0.0  # its VmHWM at exit
    polled_mb: float = 0.0  # the highest VmHWM read while it ran
    child_mb: float = 0.0  # the highest VmHWM of a child of it (the one that scores a hold-out log)
    together_mb: float = 0.0  # the highest VmRSS of it and its children read at one time
    seconds: float = 0.0
    trace = False

    def __init__(self, settings: Any, engine: sa.Engine, cfg: Any, *, signing_key: str, allow_unsigned: bool,
                 progress: Any) -> None:
        self.s, self.engine, self.cfg, self.key = settings, engine, cfg, signing_key

    def run(self) -> list[Any]:
        c = self.cfg
        log = Path(self.s.db.removeprefix("sqlite:///")).with_name("federate.log")
        hwm = log.with_suffix(".hwm")
        cmd = [sys.executable, "-c", HWM, str(hwm), "federate", "--broker", str(self.s.broker_url), "--db", self.s.db,
               "--prefix", self.s.prefix, "--client-id", self.s.client_id, "--signing-key", self.key,
               "--rounds", str(c.rounds), "--min-available", str(c.min_available), "--deadline", str(c.deadline_s),
               "--tolerance", str(c.tolerance), *(a for h in c.holdout_logs for a in ("--holdout-log", h)),
               *(["--secure"] if c.secure else [])]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out)
            try:
                status = self._wait(proc.pid, log)
            finally:
                if proc.returncode is None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        FederateProcess.seconds = time.monotonic() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"cloud-hub federate exited with {os.waitstatus_to_exitcode(status)}: "
                               + log.read_text()[-2000:])
        FederateProcess.peak_mb = int(hwm.read_text()) / 1024
        with self.engine.connect() as conn:
            return RoundStore().rounds(conn, self.s.model_name)


    def _wait(self, pid: int, log: Path) -> int:
        """Its wait status, once it has exited; its VmHWM read every 5 ms meanwhile (``polled_mb``), and with
        ``trace`` its VmRSS printed each time it grew by 2 MB, after the last line of its log."""
        last = 0.0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            FederateProcess.polled_mb = max(FederateProcess.polled_mb, status_mb(pid, "VmHWM"))
            rss = status_mb(pid, "VmRSS")
            kids = children(pid)
            if kids:
                FederateProcess.child_mb = max([FederateProcess.child_mb, *(status_mb(k, "VmHWM") for k in kids)])
            FederateProcess.together_mb = max(FederateProcess.together_mb,
                                              rss + sum(status_mb(k, "VmRSS") for k in kids))
            if self.trace and rss >= last + 2:
                lines = log.read_text(errors="replace").splitlines()
                print(f"trace: RSS {rss:.0f} MB after: {lines[-1][:110] if lines else '(start)'}", file=sys.stderr)
                last = rss
            time.sleep(0.005)


class Fleet(FederatedDemo):
    """The demo's fleet, its signing key made before the settings that name it are read."""

    def _hub_settings(self, url: str) -> tuple[HubSettings, Path, str]:
        key = self.work / "keys" / "hub.pem"
        _, public, kid = keygen(key)
        settings = load_settings(HubSettings, env_prefix="CLOUD_HUB", environ={}, flags={
            "broker": url, "db": f"sqlite:///{self.work / 'hub.sqlite'}", "prefix": PREFIX, "client_id": "demo-hub",
            "log_interval_s": 0.0, "signing_key": str(key)})
        return settings, public, kid


def floor() -> tuple[float, str]:
    """(VmHWM in MB, the heavy packages loaded) of a fresh interpreter importing what federate imports."""
    out = subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True, check=True).stdout.split("\n")
    return float(out[0]), out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secure", action="store_true", help="secure rounds (at least 3 agents)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgeml-federate-rss"))
    ap.add_argument("--no-holdout", action="store_true", help="no hold-out log: the devices evaluate each candidate")
    ap.add_argument("--trace", action="store_true", help="federate's RSS every 0.2 s in its log (WORKDIR/federate.log)")
    args = ap.parse_args()
    FederateProcess.trace = args.trace
    shutil.rmtree(args.workdir, ignore_errors=True)
    demo_federated.Coordinator = FederateProcess  # type: ignore[misc, assignment]
    out = Fleet(args.workdir, broker=None, agents=args.agents, rounds=args.rounds, secure=args.secure,
                        config={"holdout_logs": ()} if args.no_holdout else None,
                        say=lambda line: print(f"  {line}", file=sys.stderr), show=lambda rows: None).run()
    with out["engine"].connect() as conn:
        rounds = RoundStore().rounds(conn, "default")
    out["engine"].dispose()
    imports, loaded = floor()
    print(f"{args.agents} agents, {args.rounds} {'secure' if args.secure else 'plain'} rounds, gate: "
          f"{'the devices evaluate' if args.no_holdout else 'hold-out log'}: "
          + ", ".join(f"round {r.id} {r.state}" + (f" v{r.new_version}" if r.new_version else "") for r in rounds))
    peak = max(FederateProcess.peak_mb, FederateProcess.polled_mb)
    print(f"federate peak RSS: {peak:.1f} MB (VmHWM at exit {FederateProcess.peak_mb:.1f} MB, polled "
          f"{FederateProcess.polled_mb:.1f} MB) over {FederateProcess.seconds:.0f} s (target <= {TARGET_MB:g} MB: {'met' if peak <= TARGET_MB else 'NOT met'})")
    if FederateProcess.child_mb:
        print(f"its child that scored the hold-out log: peak RSS {FederateProcess.child_mb:.1f} MB (pages shared "
              f"with federate counted); both at once at most {FederateProcess.together_mb:.1f} MB (shared pages "
              "counted twice)")
    print(f"its imports alone (cli.rounds, coordinator, finish): {imports:.1f} MB; loaded: {loaded or 'none of them'}")


if __name__ == "__main__":
    main()
