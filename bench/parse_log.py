"""Parse speed of edge_agent.sources.read_log on a recorded log, with its ceiling.

    python bench/parse_log.py [LOG] [--repeat N] [--chunk-rows N] [--jsonl]

Prints the rows/s of read_log (iterating every chunk, all columns parsed and
validated) and, in the same run as the reference, the rows/s of a bare
``csv.reader`` loop that only iterates rows (no number conversion at all),
plus the ratio between them and the peak RSS of the process.  Best of
``--repeat`` runs, as wall-clock and as CPU time (the CPU figure is steadier
on a busy machine).  ``--jsonl`` also times the same data converted to JSON
Lines (written to a temporary file).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.sources import DEFAULT_CHUNK_ROWS, read_log

DEFAULT_LOG = "/work/shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv"


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def best_of(fn, repeat: int) -> tuple[int, float, float]:
    """(rows, best wall seconds, best CPU seconds)."""
    rows, wall, cpu = 0, float("inf"), float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        rows = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return rows, wall, cpu


def run_read_log(path: str, chunk_rows: int) -> int:
    n = 0
    reader = read_log(path, chunk_rows=chunk_rows)
    for chunk in reader:
        n += len(chunk)
    assert reader.stats.rows_skipped == 0
    return n


def run_csv_reader(path: str) -> int:
    n = 0
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        next(r)
        for _row in r:
            n += 1
    return n


def to_jsonl(path: str, out: str) -> None:
    import orjson

    chunk = read_log(path).read_all()
    assert chunk is not None
    names = chunk.device_ids.tolist()
    labels = chunk.labels.tolist() if chunk.labels is not None else None
    with open(out, "wb") as f:
        for i in range(len(chunk)):
            rec = {"ts": float(chunk.ts[i]), "device_id": names[i]}
            for k, ch in enumerate(chunk.channels):
                v = float(chunk.values[i, k])
                rec[ch] = None if v != v else v
            if labels is not None:
                rec["label"] = labels[i]
            f.write(orjson.dumps(rec) + b"\n")


def line(name: str, rows: int, wall: float, cpu: float) -> str:
    return f"{name:<28} {rows:>9,d} rows  {rows / wall:>12,.0f} rows/s wall  {rows / cpu:>12,.0f} rows/s cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", nargs="?", default=DEFAULT_LOG)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    ap.add_argument("--jsonl", action="store_true", help="also time the same data as JSON Lines")
    args = ap.parse_args()

    rss0 = rss_mb()
    print(
        f"log: {args.log} ({os.path.getsize(args.log) / 2**20:.1f} MB), chunk_rows={args.chunk_rows}, "
        f"best of {args.repeat}"
    )
    n, wall, cpu = best_of(lambda: run_read_log(args.log, args.chunk_rows), args.repeat)
    peak = peak_rss_mb()
    print(line("read_log", n, wall, cpu))
    n2, wall2, cpu2 = best_of(lambda: run_csv_reader(args.log), args.repeat)
    print(line("csv.reader (bare loop)", n2, wall2, cpu2))
    print(f"{'ratio read_log / csv.reader':<28} {wall2 / wall:>9.2f}x wall  {cpu2 / cpu:>9.2f}x cpu")
    print(f"peak RSS {peak:.1f} MB (after imports {rss0:.1f} MB: read_log added {peak - rss0:.1f} MB)")
    if args.jsonl:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "log.jsonl")
            to_jsonl(args.log, out)
            n3, wall3, cpu3 = best_of(lambda: run_read_log(out, args.chunk_rows), args.repeat)
            print(line("read_log (same as JSONL)", n3, wall3, cpu3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
