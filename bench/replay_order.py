"""Memory and speed of replaying a log grouped by device in time order, with its ceiling.

    python bench/replay_order.py [--rows 1000000] [--devices 50] [--repeat 3]

Writes a CSV log of ``--rows`` readings of ``--devices`` devices recorded at the same time (6
channels and a label, like the watch log), grouped by device (all of the first, then all of the
next), its gzip, and the same rows sorted by time.  Each figure comes from a fresh process (its peak
RSS, VmHWM, is its own), best of ``--repeat``:

* ``merge``: :class:`ReplayLogs` over the log grouped by device (index pass + k-way merge), every
  chunk iterated, as ``edge-agent replay --speed 0`` reads it;
* ``merge .gz``: the same over its gzip (each run resumed from a decompressor checkpoint);
* ``ceiling``: ``read_log`` over the time-sorted copy, the straight read a sorted log costs;
* ``in memory``: the alternative the merge avoids, the whole log read and sorted at once.

The ratios printed are merge / ceiling (time and peak RSS above the interpreter's floor).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def write_logs(root: Path, rows: int, devices: int) -> tuple[Path, Path, Path]:
    """The log grouped by device, its .gz, and the same rows sorted by time."""
    per = rows // devices
    rng = np.random.default_rng(0)
    t = np.arange(per) / 50.0
    blocks = []
    for d in range(devices):
        vals = rng.normal(size=(per, 6))
        cols = [np.char.mod("%.2f", 1_700_000_000 + t + d * 0.001), np.full(per, f"dev-{d:03d}")]
        cols += [np.char.mod("%.4f", vals[:, k]) for k in range(6)]
        cols.append(np.where((np.arange(per) // 500) % 2 == 0, "walk", "run"))
        line = cols[0]
        for c in cols[1:]:
            line = np.char.add(np.char.add(line, ","), c)
        blocks.append(line)
    header = "ts,device_id,ax,ay,az,wx,wy,wz,label\n"
    grouped, zipped, ordered = root / "grouped.csv", root / "grouped.csv.gz", root / "sorted.csv"
    body = np.concatenate(blocks)
    grouped.write_text(header + "\n".join(body.tolist()) + "\n")
    with open(grouped, "rb") as src, gzip.open(zipped, "wb", compresslevel=6) as dst:
        dst.write(src.read())
    order = np.argsort(np.concatenate([np.arange(per) * devices + d for d in range(devices)]), kind="stable")
    ordered.write_text(header + "\n".join(body[order].tolist()) + "\n")
    return grouped, zipped, ordered


def child(mode: str, path: str) -> None:
    from edge_agent.sources import read_log
    from edge_agent.sources.merge import ReplayLogs

    floor = vm_kb("VmRSS:")
    w0, c0 = time.perf_counter(), time.process_time()
    n, extra = 0, {}
    if mode == "merge":
        logs = ReplayLogs([path]).index()
        for chunk in logs:
            n += len(chunk)
        extra = {"runs": logs.runs, "peak_rows": logs.peak_rows, "peak_cursors": logs.peak_cursors}
    elif mode == "ceiling":
        for chunk in read_log(path):
            n += len(chunk)
    else:  # in memory: read everything, sort by time
        whole = read_log(path).read_all()
        assert whole is not None
        whole = whole.take(np.argsort(whole.ts, kind="stable"))
        n = len(whole)
    print(json.dumps({"rows": n, "wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                      "peak_mb": vm_kb("VmHWM:") / 1024, "floor_mb": floor / 1024, **extra}))


def measure(mode: str, path: Path, repeat: int) -> dict:
    best: dict = {}
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout)
        best = {**r, "wall": min(r["wall"], best.get("wall", 1e9)), "cpu": min(r["cpu"], best.get("cpu", 1e9)),
                "peak_mb": min(r["peak_mb"], best.get("peak_mb", 1e9))}
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        grouped, zipped, ordered = write_logs(Path(tmp), args.rows, args.devices)
        print(f"{args.rows:,} rows, {args.devices} devices grouped by device: {os.path.getsize(grouped) / 2**20:.1f} MB "
              f"({os.path.getsize(zipped) / 2**20:.1f} MB gzipped); best of {args.repeat}, a fresh process each")
        rows = {}
        for name, mode, path in (("merge", "merge", grouped), ("merge .gz", "merge", zipped),
                                 ("ceiling: straight read", "ceiling", ordered), ("in memory: read + sort", "sort",
                                                                                   grouped)):
            r = rows[name] = measure(mode, path, args.repeat)
            more = f"  ({r['runs']} runs, at most {r['peak_rows']:,} rows held)" if "runs" in r else ""
            print(f"{name:<24} {r['rows'] / r['wall']:>12,.0f} rows/s wall {r['rows'] / r['cpu']:>12,.0f} rows/s cpu  "
                  f"peak RSS {r['peak_mb']:6.1f} MB (+{r['peak_mb'] - r['floor_mb']:.1f} over the floor){more}")
        m, c = rows["merge"], rows["ceiling: straight read"]
        print(f"ratio merge / ceiling: time x{m['cpu'] / c['cpu']:.2f} (cpu), memory above the floor "
              f"x{(m['peak_mb'] - m['floor_mb']) / max(c['peak_mb'] - c['floor_mb'], 0.1):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
