"""Benchmark: how often the persistence gate is wrong, by rolling origins on real series.

The gate (``persistence_check``: ``train``'s verdict, the condition a ``retrain`` and ``serve``'s
automatic retrain must meet) passes a forecast whose INT8 MAE on the hold-out (the last 20 % in time)
is below persistence's (the next reading is the last one). This bench measures how often that verdict
disagrees with the same comparison on data the product has not seen yet.

Data (statsmodels' bundled CSV files, read without importing statsmodels: ``pip install --no-deps
statsmodels``, a bench-only dependency; bench/forecast.py finds them), one device each, one step ahead:

- ``co2``: Mauna Loa's weekly CO2, 1958-2001 (2,284 weeks, 59 missing; bench/forecast.py's log and
  its ``window_s`` of 26 weeks): a trend and a yearly cycle.
- ``elnino``: monthly sea surface temperature of the El Nino region, 1950-2010 (732 months, the 12
  month columns of each year in order), windows of 12 readings (one yearly cycle).
- ``sunspots``: yearly sunspot numbers, 1700-2008 (309 years), windows of 11 readings (one solar cycle).

The last two have no dates, only years (and months): they are written one reading every 30 days and
every 365 days.

Protocol, per series and cutoff (``--cutoffs`` of them, evenly from 45 % to 83 % of the series: a
later cutoff's fresh block would run past the end): the log cut before the cutoff, the label of its
last reading blanked (it is the reading after the cutoff), goes through ``train_from_logs(forecast=
CHANNEL)``, the code of ``cloud-hub train --forecast``: trained on the first 80 % of its windows,
gated on the last 20 % (verdict: INT8 MAE < persistence MAE, by ``persistence_check``). The registered
INT8 bundle then forecasts the next block after the cutoff (as many windows as the hold-out, targets
never seen; featurized with the bundle's own preprocessing, as a device would), next to persistence
on the same windows: the fresh verdict. A false pass: the gate passed a model that loses on the fresh
block; a false reject: it rejected one that wins there. Adjacent cutoffs share most of their data
(hold-outs and fresh blocks overlap), so their verdicts are not independent: errors come in runs.

Usage: python bench/forecast_gate.py [--cutoffs 10] [--series co2,elnino,sunspots] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.forecast import CHANNEL, WEEK, co2_csv, write_log
from cloud_hub.data import db
from cloud_hub.data.store import Store
from cloud_hub.models import datasets, lifecycle, quantize
from cloud_hub.models.forecast import Persistence, persistence_baseline, persistence_check
from edge_agent.contract import decode_bundle
from edge_agent.preprocess import PreprocessParams, extract_features

DAY = 86400.0
FIRST, LAST = 0.45, 0.83


def _write_series(values: list[str], channel: str, out: Path, step_s: float) -> None:
    """A regular series as a log, one reading every ``step_s``: ts, device_id, the reading, label = the
    next reading."""
    with out.open("w") as f:
        f.write(f"ts,device_id,{channel},label\n")
        for i, value in enumerate(values):
            nxt = values[i + 1] if i + 1 < len(values) else ""
            f.write(f"{i * step_s:.0f},{channel},{value},{nxt}\n")


def co2_log(datasets: Path, out: Path) -> list[str]:
    """bench/forecast.py's log (real weekly dates); the dates of its readings."""
    write_log(datasets / "co2" / "co2.csv", out)
    with out.open() as f:
        return [datetime.fromtimestamp(float(r["ts"]), UTC).strftime("%Y-%m") for r in csv.DictReader(f)]


def elnino_log(datasets: Path, out: Path) -> list[str]:
    with (datasets / "elnino" / "elnino.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    _write_series([v for row in rows for v in row[1:13]], "sst", out, 30 * DAY)  # the months of each year, in order
    return [f"{int(float(row[0]))}-{m:02d}" for row in rows for m in range(1, 13)]


def sunspots_log(datasets: Path, out: Path) -> list[str]:
    with (datasets / "sunspots" / "sunspots.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    _write_series([r[1] for r in rows], "sunspots", out, 365 * DAY)
    return [str(int(float(r[0]))) for r in rows]


@dataclass(frozen=True)
class Series:
    name: str
    channel: str
    step_s: float  # between readings in the log
    window: int  # in steps
    unit: str
    write: Callable[[Path, Path], list[str]]


SERIES = {s.name: s for s in (
    Series("co2", CHANNEL, WEEK, 26, "week", co2_log),
    Series("elnino", "sst", 30 * DAY, 12, "month", elnino_log),
    Series("sunspots", "sunspots", 365 * DAY, 11, "year", sunspots_log),
)}


@dataclass
class Origin:
    series: str
    cutoff: float  # share of the series before the cutoff
    date: str
    train_windows: int
    holdout_windows: int
    gate: tuple[float, float]  # INT8 MAE, persistence MAE on the hold-out
    fresh: tuple[float, float]  # the same on the next block

    @property
    def passed(self) -> bool:
        return self.gate[0] < self.gate[1]

    @property
    def wins(self) -> bool:
        return self.fresh[0] < self.fresh[1]

    @property
    def error(self) -> str:
        return "" if self.passed == self.wins else "FALSE PASS" if self.passed else "FALSE REJECT"


def cut(lines: list[str], n: int, out: Path) -> None:
    """The log's first ``n`` readings; the last one's label (the reading after the cutoff) blanked."""
    head = lines[1:1 + n]
    head[-1] = head[-1].rsplit(",", 1)[0] + ",\n"
    out.write_text(lines[0] + "".join(head))


def origin(s: Series, log: Path, lines: list[str], dates: list[str], share: float, tmp: Path,
           seed: int) -> Origin:
    n = int(round(share * (len(lines) - 1)))
    cutoff_ts = float(lines[1 + n].split(",", 1)[0])  # the first reading the product has not seen
    part = tmp / f"{s.name}-{n}.csv"
    cut(lines, n, part)
    engine = db.make_engine(f"sqlite:///{tmp}/{s.name}-{n}.db", create=True)
    out = lifecycle.train_from_logs(engine, [str(part)], name=s.name, window_s=s.window * s.step_s,
                                    hop_s=s.step_s, seed=seed, forecast=s.channel)
    base = out.extra["baselines"]
    passed, _ = persistence_check(out.int8, base)
    with engine.connect() as conn:
        row = Store(engine).get_model(conn, s.name, out.version)
    engine.dispose()
    assert row is not None and row.bundle is not None
    bundle = decode_bundle(row.bundle)
    params = PreprocessParams.from_dict(bundle.manifest.preprocess)
    data, y, devices, starts = datasets.windows_from_logs([str(log)], params)
    # a window's target is the reading one step after its last: fresh when it is at or after the cutoff
    fresh = np.flatnonzero(starts + s.window * s.step_s >= cutoff_ts - s.step_s / 2)
    fresh = fresh[np.argsort(starts[fresh], kind="stable")][:out.holdout_windows]
    if len(fresh) < out.holdout_windows:
        raise SystemExit(f"{s.name} at {share:.0%}: {len(fresh)} fresh windows, {out.holdout_windows} needed")
    X, y_fresh = extract_features(data[fresh], params), y[fresh]
    m_int8 = quantize.evaluate(bundle.model, X, y_fresh, latency_runs=1, warmup=0)
    last = data[fresh][:, -1, :].astype(np.float64)
    p = persistence_baseline(Persistence(last, last, params.channels, s.channel), y_fresh, y_fresh)
    assert p is not None
    return Origin(s.name, share, dates[n], out.train_windows, out.holdout_windows,
                  (out.int8["mae"], base["persistence"]["mae"]), (m_int8["mae"], p["mae"]))


def rates(rows: list[Origin]) -> str:
    passes = [r for r in rows if r.passed]
    rejects = [r for r in rows if not r.passed]
    fp = sum(r.error == "FALSE PASS" for r in rows)
    fr = sum(r.error == "FALSE REJECT" for r in rows)
    wrong = [f"{r.series} {r.cutoff:.0%}" for r in rows if r.error]
    gate = [r.gate[0] / r.gate[1] for r in rows]
    fresh = [r.fresh[0] / r.fresh[1] for r in rows]
    return (f"ratio gate {min(gate):.2f}-{max(gate):.2f}, fresh {min(fresh):.2f}-{max(fresh):.2f}; "
            f"false pass {fp} of {len(passes)} passes, false reject {fr} of {len(rejects)} rejects"
            + (" (none rejected: unmeasured)" if not rejects else "")
            + f", wrong {fp + fr} of {len(rows)}" + (f" (at {', '.join(wrong)})" if wrong else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cutoffs", type=int, default=10, help="rolling origins per series")
    ap.add_argument("--series", default=",".join(SERIES), help=f"comma-separated, of {', '.join(SERIES)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = [x for x in args.series.split(",") if x]
    unknown = sorted(set(names) - set(SERIES))
    if unknown or not names or args.cutoffs < 1:
        print(f"bench/forecast_gate.py: unknown series {unknown} or no cutoffs (series: {', '.join(SERIES)})",
              file=sys.stderr)
        return 2
    src = co2_csv()
    if src is None:
        print("bench/forecast_gate.py: statsmodels' datasets not found: pip install --no-deps statsmodels (bench only)",
              file=sys.stderr)
        return 2
    datasets = src.parents[1]
    shares = np.linspace(FIRST, LAST, args.cutoffs) if args.cutoffs > 1 else np.array([LAST])
    t0 = time.perf_counter()
    rows: list[Origin] = []
    print(f"data: {datasets}; {args.cutoffs} cutoffs from {shares[0]:.0%} to {shares[-1]:.0%}, seed {args.seed}; "
          "ratio = INT8 MAE / persistence MAE (persistence: the baseline), < 1 passes")
    print(f"{'series':9} {'cutoff':>6} {'date':>7} {'train':>5} {'hold':>4} | {'gate INT8':>9} {'persist.':>8} "
          f"{'ratio':>5} {'verdict':>7} | {'fresh INT8':>10} {'persist.':>8} {'ratio':>5} {'verdict':>7} |")
    with tempfile.TemporaryDirectory(prefix="bench-forecast-gate-") as tmp:
        for name in names:
            s = SERIES[name]
            log = Path(tmp) / f"{name}.csv"
            dates = s.write(datasets, log)
            lines = log.read_text().splitlines(keepends=True)
            size = datasets.default_params(str(log), window_s=s.window * s.step_s, hop_s=s.step_s,
                                            forecast=s.channel).window_size
            print(f"# {name}: {len(dates):,} readings ({dates[0]} to {dates[-1]}), one {s.unit} ahead, "
                  f"window_s {s.window} {s.unit}s = {size} readings, hop 1")
            for share in shares:
                r = origin(s, log, lines, dates, float(share), Path(tmp), args.seed)
                rows.append(r)
                print(f"{name:9} {share:6.0%} {r.date:>7} {r.train_windows:5} {r.holdout_windows:4} | "
                      f"{r.gate[0]:9.4g} {r.gate[1]:8.4g} {r.gate[0] / r.gate[1]:5.2f} "
                      f"{'pass' if r.passed else 'reject':>7} | {r.fresh[0]:10.4g} {r.fresh[1]:8.4g} "
                      f"{r.fresh[0] / r.fresh[1]:5.2f} {'wins' if r.wins else 'loses':>7} | {r.error}", flush=True)
    for name in names:
        print(f"{name}: {rates([r for r in rows if r.series == name])}")
    print("adjacent cutoffs share most of their hold-out and fresh data: errors cluster in time, "
          "the counts are not independent trials")
    print(f"summary: {rates(rows)} over {len(names)} series x {args.cutoffs} cutoffs "
          f"(persistence the baseline); wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
