"""The memory of real ``edge-agent run`` processes through federated rounds (issue 26 §5: peak RSS <= 100 MB).

    python bench/agent_round_memory.py [--agents 4] [--rounds 2] [--maps N] [--workdir /tmp/edgeml-agent-rounds]

Runs ``cloud-hub demo --federated``'s fleet (a private mosquitto, the hub in this process, v1 trained centrally and
published signed, one ``edge-agent run`` per device with a trusted key, following its own recording: the watch
recordings of ``../shared/data`` when present, else the generated IMU log) and its rounds (``Coordinator``, in this
process). A thread of this script reads every agent's ``/proc/PID/smaps_rollup`` (Rss, Anonymous) every 20 ms.

Printed per agent, then the highest of them:
* before any round (the agents have inferred their whole recordings and keep their labelled windows): RSS and
  anonymous memory then, and the peak RSS so far (``VmHWM``: the inference of the recording included);
* during the rounds (the learner loaded, fine-tuning, the update encoded and sent, the new model verified and
  swapped): the highest RSS and anonymous memory sampled (the target's figure), and ``VmHWM`` when the rounds
  are over (which holds the inference of the recording too).

The agents run with a device's packages: PySocks, which the dev extras bring with selenium, hidden from them
(``bench/agent_replay.py: device_packages``).

``--maps N`` reads every agent's whole ``/proc/PID/smaps`` before the rounds and at each new peak, and prints the
highest agent's N mappings (by pathname: a shared library, ``[heap]``, ``[anon]``) that hold most at its peak, with
what they held before: where a round's growth is (the heap, or a library's pages it touches first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_replay import device_packages  # bench/ is not a package: its scripts import each other by name

from cloud_hub.tools import demo_federated
from cloud_hub.tools.demo_federated import FederatedDemo

TARGET_MB = 100.0  # issue 26 §5: an agent's peak RSS during a round


def rollup(pid: int) -> tuple[float, float]:
    """(Rss, Anonymous) of a process in MB; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.endswith("kB\n")}
        return fields.get("Rss", 0.0), fields.get("Anonymous", 0.0)
    except (OSError, ValueError):
        return 0.0, 0.0


def smaps(pid: int) -> dict[str, tuple[float, float]]:
    """Rss and Anonymous (MB) of a process summed per mapping's pathname ("[anon]" for the unnamed ones)."""
    out: dict[str, list[float]] = {}
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping's header: address perms offset dev inode [pathname]
                    parts = line.split(None, 5)
                    name = parts[5].strip() if len(parts) > 5 else "[anon]"
                    out.setdefault(name, [0.0, 0.0])
                elif head == "Rss:":
                    out[name][0] += int(line.split()[1]) / 1024
                elif head == "Anonymous:":
                    out[name][1] += int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return {k: (v[0], v[1]) for k, v in out.items()}


def hwm(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


class Sampler(threading.Thread):
    """The highest Rss and Anonymous of each process, every ``every`` seconds until stopped."""

    def __init__(self, pids: dict[str, int], every: float = 0.02, maps: bool = False) -> None:
        super().__init__(daemon=True)
        self.pids, self.every, self.maps = pids, every, maps
        self.at_peak: dict[str, dict[str, tuple[float, float]]] = {}  # with maps: each one's mappings at its peak
        self.rss = dict.fromkeys(pids, 0.0)
        self.anon = dict.fromkeys(pids, 0.0)
        self.when = dict.fromkeys(pids, 0.0)  # the wall clock of each peak RSS (to read against the agents' logs)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            for dev, pid in self.pids.items():
                rss, anon = rollup(pid)
                if rss > self.rss[dev]:
                    self.when[dev] = time.time()
                    if self.maps:
                        self.at_peak[dev] = smaps(pid)
                self.rss[dev], self.anon[dev] = max(self.rss[dev], rss), max(self.anon[dev], anon)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Measured:
    """Stands in for :class:`~cloud_hub.rounds.coordinator.Coordinator` in the demo: reads the agents before the
    rounds, samples them while the real coordinator runs the rounds."""

    demo: FederatedDemo
    before: dict[str, tuple[float, float, float]] = {}  # device -> (RSS, anonymous, VmHWM) before any round
    during: dict[str, tuple[float, float, float]] = {}  # device -> (peak RSS sampled, peak anonymous, VmHWM after)
    when: dict[str, float] = {}  # device -> the wall clock of its peak RSS sampled
    maps = False  # --maps: read every agent's /proc/PID/smaps before the rounds and at each one's peak
    maps_before: dict[str, dict[str, tuple[float, float]]] = {}
    maps_peak: dict[str, dict[str, tuple[float, float]]] = {}
    real = demo_federated.Coordinator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inner = self.real(*args, **kwargs)

    def run(self) -> list[Any]:
        pids = {dev: p.pid for dev, p in self.demo.procs.items()}
        Measured.before = {dev: (*rollup(pid), hwm(pid)) for dev, pid in pids.items()}
        if self.maps:
            Measured.maps_before = {dev: smaps(pid) for dev, pid in pids.items()}
        sampler = Sampler(pids, maps=self.maps)
        sampler.start()
        try:
            done = self.inner.run()
        finally:
            sampler.stop()
        # the last round's new model reaches the agents after federate's return: wait for the swap, then read
        self.demo._wait(lambda: all(v == max((r.new_version or 1 for r in done if r.state == "published"), default=1)
                                    for v in self.demo._versions(self.inner.engine).values()), "every agent swapped")
        Measured.when = dict(sampler.when)
        Measured.maps_peak = sampler.at_peak
        Measured.during = {dev: (max(sampler.rss[dev], rollup(pid)[0]), max(sampler.anon[dev], rollup(pid)[1]),
                                 hwm(pid)) for dev, pid in pids.items()}
        return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--maps", type=int, default=0, metavar="N",
                    help="print the N mappings (by pathname) of the highest agent that hold most at its peak, "
                         "with the same before the rounds")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgeml-agent-rounds"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    # The agents run with a device's packages (bench/agent_replay.py: device_packages), after any PYTHONPATH given.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(device_packages())]))
    demo = FederatedDemo(args.workdir, broker=None, agents=args.agents, rounds=args.rounds,
                         say=lambda line: print(f"  {line}", file=sys.stderr), show=lambda rows: None)
    Measured.demo, Measured.maps = demo, args.maps > 0
    demo_federated.Coordinator = Measured  # type: ignore[misc, assignment]
    out = demo.run()
    out["engine"].dispose()
    print(f"{args.agents} agents, rounds {out['rounds']} ({out['seconds']:.0f} s); MB:")
    print(f"{'device':10s} {'before: RSS':>12s} {'anon':>6s} {'VmHWM':>6s}   {'rounds: RSS':>12s} {'anon':>6s} "
          f"{'VmHWM':>6s}")
    for dev in sorted(Measured.before):
        b, d = Measured.before[dev], Measured.during[dev]
        at = time.strftime("%H:%M:%S", time.localtime(Measured.when[dev])) + f".{Measured.when[dev] % 1 * 1e3:03.0f}"
        print(f"{dev:10s} {b[0]:12.1f} {b[1]:6.1f} {b[2]:6.1f}   {d[0]:12.1f} {d[1]:6.1f} {d[2]:6.1f}   "
              f"(peak at {at}: see {args.workdir}/agent-{dev}.log)")
    peak = max(d[0] for d in Measured.during.values())  # VmHWM holds the inference of the recording too
    print(f"highest: before any round RSS {max(b[0] for b in Measured.before.values()):.1f} MB (anonymous "
          f"{max(b[1] for b in Measured.before.values()):.1f}, VmHWM {max(b[2] for b in Measured.before.values()):.1f}); "
          f"through the rounds peak RSS {peak:.1f} MB (anonymous "
          f"{max(d[1] for d in Measured.during.values()):.1f}): target <= {TARGET_MB:g}: "
          f"{'met' if peak <= TARGET_MB else 'NOT met'}")
    if args.maps:
        print_maps(args.maps)


def print_maps(n: int) -> None:
    """The ``n`` mappings holding most of the highest agent's RSS at its peak, against before the rounds."""
    dev = max(Measured.during, key=lambda d: Measured.during[d][0])
    before, peak = Measured.maps_before.get(dev, {}), Measured.maps_peak.get(dev, {})
    print(f"{dev}'s mappings, MB: before RSS / anon -> at its peak RSS / anon (growth)")
    for name in sorted(set(before) | set(peak), key=lambda k: -peak.get(k, (0.0, 0.0))[0])[:n]:
        b, p = before.get(name, (0.0, 0.0)), peak.get(name, (0.0, 0.0))
        print(f"  {b[0]:6.2f} / {b[1]:6.2f} -> {p[0]:6.2f} / {p[1]:6.2f} ({p[0] - b[0]:+5.2f})  {name}")
    grew = sorted(set(before) | set(peak), key=lambda k: before.get(k, (0.0, 0.0))[0] - peak.get(k, (0.0, 0.0))[0])
    print("  grew most: " + ", ".join(f"{Path(k).name or k} {peak.get(k, (0.0, 0.0))[0] - before.get(k, (0.0, 0.0))[0]:+.2f}"
                                     for k in grew[:12]))


if __name__ == "__main__":
    main()
