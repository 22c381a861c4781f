"""Fuzz every decoder (or some), coverage-guided with atheris, and sum up what each run found.

    python bench/fuzz.py [TARGET ...] [--runs N | --seconds S] [--jobs J] [--seed N]
                         [--timeout S] [--rss-mb MB] [--engine atheris|random]

Each target runs in its own process (``python -m fuzz TARGET``) over its committed seed corpus
(``fuzz/corpus/<target>``, read only; new inputs go to /tmp/edgeml-fuzz-work/<target>, where a run
interrupted resumes): libFuzzer stops an input
that takes over ``--timeout`` seconds (a hang) and a process past ``--rss-mb`` MB (memory growth), and
writes the input that broke a property to ``fuzz/crashes/<target>-...``: make it a regression test in
tests/test_hostile_input.py and copy it into the corpus. Prints one line per target: inputs, inputs/s,
coverage edges, peak RSS, crashes (libFuzzer's own output: /tmp/edgeml-fuzz-logs/<target>.log). ``--engine random`` (no atheris) mutates the corpus in-house,
without coverage (``fuzz.engine``)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuzz.engine import CORPUS, fuzz_random  # noqa: E402
from fuzz.targets import TARGETS  # noqa: E402

CRASHES = ROOT / "fuzz" / "crashes"
LOGS = Path(tempfile.gettempdir()) / "edgeml-fuzz-logs"
WORK = Path(tempfile.gettempdir()) / "edgeml-fuzz-work"
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_COV = re.compile(r"cov: (\d+) ft: (\d+)")
# 1 KB log and config inputs: tens of lines, every path taken; HTTP past serve's 64 KiB request line
MAX_LEN = {"log_csv": 1024, "log_jsonl": 1024, "log_gz": 1024, "settings": 1024, "http": 1 << 17}


def run_atheris(name: str, args: argparse.Namespace) -> dict[str, object]:
    """One target under libFuzzer; its final statistics."""
    CRASHES.mkdir(exist_ok=True)
    LOGS.mkdir(exist_ok=True)
    limit = [f"-runs={args.runs}"] if args.seconds is None else [f"-max_total_time={args.seconds}"]
    work = WORK / name  # what the run adds to the corpus: kept, so an interrupted run resumes from it
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fuzz", name, *limit, f"-seed={args.seed}", f"-timeout={args.timeout}",
           f"-rss_limit_mb={args.rss_mb}", f"-max_len={MAX_LEN.get(name, 16384)}", "-print_final_stats=1",
           f"-artifact_prefix={CRASHES}/{name}-", str(work), str(CORPUS / name)]
    log = LOGS / f"{name}.log"  # libFuzzer's progress, readable while it runs
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    took = time.monotonic() - start
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    cov = _COV.findall(text)
    crashed = code != 0
    if crashed:
        (CRASHES / f"{name}.log").write_text(text[-20000:])
    inputs = stats.get("number_of_executed_units", 0)
    return {"target": name, "inputs": inputs, "per_s": round(inputs / took) if took else 0,
            "edges": int(cov[-1][0]) if cov else None, "rss_mb": stats.get("peak_rss_mb"),
            "crashes": int(crashed), "seconds": round(took)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET")
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    ap.add_argument("--seconds", type=int, default=None, help="time per target instead of --runs")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=5, help="seconds one input may take before it is a hang")
    ap.add_argument("--rss-mb", type=int, default=1024, help="memory bound of a target's process (MB)")
    ap.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    args = ap.parse_args()
    names = args.targets or list(TARGETS)
    print(f"{'target':14} {'inputs':>10} {'inputs/s':>9} {'edges':>6} {'rss MB':>7} {'crashes':>7}", flush=True)
    rows: Iterable[dict[str, object]]
    if args.engine == "random":  # in this process, one target after the other (a hang is caught by SIGALRM)
        rows = (_random(name, args) for name in names)
    else:
        rows = ThreadPoolExecutor(args.jobs).map(lambda name: run_atheris(name, args), names)
    for row in rows:
        print(f"{row['target']:14} {row['inputs']:>10,} {row['per_s']:>9,} {row['edges'] or '-':>6} "
              f"{row['rss_mb'] or '-':>7} {row['crashes']:>7}", flush=True)


def _random(name: str, args: argparse.Namespace) -> dict[str, object]:
    report = fuzz_random(name, runs=args.runs, seed=args.seed, seconds=args.seconds, per_input_s=args.timeout,
                         rss_mb=args.rss_mb)
    for data, why in report.failures[:3]:
        print(f"  {name}: {why}\n    input: {data[:300]!r}", file=sys.stderr)
    return report.as_row()


if __name__ == "__main__":
    main()
