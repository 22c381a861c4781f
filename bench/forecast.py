"""Benchmark: a forecast against persistence (the next reading is the last one) on a real sensor series.

Data: the weekly CO2 of Mauna Loa, 1958-2001 (the Keeling curve, 2,284 weeks, 59 missing), as
statsmodels bundles it (``statsmodels/datasets/co2/co2.csv``; only the file is read, statsmodels is
not imported: ``pip install statsmodels`` or ``pip install --no-deps statsmodels`` provides it, a
bench-only dependency). It becomes a CSV log: one device, a reading a week, the label of each reading
the next week's (empty where unknown), so a model predicts one week ahead.

Protocol: the production path. Windows of ``--window`` weeks every week, the last 20 % in time held
out (the default for a log of one device: later years, CO2 above any level seen in training);
``lifecycle.build`` trains, quantizes to INT8 (calibrated on training windows) and evaluates on the
hold-out, with the baselines `cloud-hub train --json` prints (training mean, k-NN, persistence).
Options measured on the same windows and targets: ``stats-v1`` (today's summary statistics)
predicting the value, ``trend-v1`` predicting the value, ``trend-v1`` predicting the change from the
last reading (what ``--forecast`` ships); the last is then run as ``train_from_logs(forecast=...)``,
the code of ``cloud-hub train --forecast co2``.

Target: the shipped forecast's INT8 MAE below persistence's (ratio < 1).

Usage: python bench/forecast.py [--window 26] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.data import db
from cloud_hub.models import datasets, lifecycle
from edge_agent.preprocess import extract_features, fit_normalization

WEEK = 7 * 86400.0
CHANNEL = "co2"


def co2_csv() -> Path | None:
    """statsmodels' bundled co2.csv, found without importing statsmodels."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "co2" / "co2.csv"
    return path if path.is_file() else None


def write_log(src: Path, out: Path) -> int:
    """The series as a log: ts (seconds), device_id, co2 (empty when missing), label = the next week's co2."""
    with src.open() as f:
        rows = [(datetime.strptime(r["date"], "%Y%m%d").replace(tzinfo=UTC).timestamp(), r["co2"])
                for r in csv.DictReader(f)]
    with out.open("w") as f:
        f.write(f"ts,device_id,{CHANNEL},label\n")
        for i, (ts, value) in enumerate(rows):
            nxt = rows[i + 1][1] if i + 1 < len(rows) and rows[i + 1][0] - ts == WEEK else ""
            f.write(f"{ts:.0f},mauna-loa,{value},{nxt}\n")
    return len(rows)


def option(log: str, window: int, features: str, change: bool, seed: int) -> dict:
    """One option on the same windows and targets (the forecast's: each window's last label)."""
    params = datasets.default_params(log, window_s=window * WEEK, hop_s=WEEK, forecast=CHANNEL)
    data, y, devices, starts = datasets.windows_from_logs([log], params)
    params = dataclasses.replace(params, features=features, forecast=CHANNEL if change else None)
    order = starts >= np.quantile(starts, 0.8)
    params = params.with_normalization(*fit_normalization(data[~order].reshape(-1, data.shape[2]), params))
    ds = datasets.Dataset(extract_features(data, params), y, devices, params, starts, last=data[:, -1, :])
    train, test = datasets.split(ds, [])
    t0 = time.perf_counter()
    bundle, _fp32, int8, _ = lifecycle.build(train, test, name="co2", version=1, seed=seed)
    base = bundle.manifest.metrics["baselines"]
    return {"option": f"{features}, {'change' if change else 'value'}", "int8": int8["mae"],
            "persistence": base["persistence"]["mae"], "mean": base["mean"]["mae"],
            "knn": base.get("knn3", {}).get("mae", float("nan")), "train_s": time.perf_counter() - t0,
            "windows": (len(train.y), len(test.y))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=26, help="window length in weeks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = co2_csv()
    if src is None:
        print("bench/forecast.py: statsmodels' co2.csv not found: pip install statsmodels (bench only)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-forecast-") as tmp:
        log = str(Path(tmp) / "co2.csv")
        n = write_log(src, Path(log))
        print(f"data: {src} ({n:,} weeks), window {args.window} weeks, hop 1 week, last 20% in time held out")
        print(f"{'option':24} {'INT8 MAE':>9} {'persistence':>11} {'ratio':>6} {'mean':>7} {'k-NN':>7} {'train':>7}")
        for features, change in (("stats-v1", False), ("trend-v1", False), ("trend-v1", True)):
            r = option(log, args.window, features, change, args.seed)
            print(f"{r['option']:24} {r['int8']:9.3f} {r['persistence']:11.3f} {r['int8'] / r['persistence']:6.2f} "
                  f"{r['mean']:7.3f} {r['knn']:7.3f} {r['train_s']:6.1f}s")
        engine = db.make_engine(f"sqlite:///{tmp}/hub.db", create=True)
        out = lifecycle.train_from_logs(engine, [log], name="co2", window_s=args.window * WEEK, hop_s=WEEK,
                                        seed=args.seed, forecast=CHANNEL)
    persistence = out.extra["baselines"]["persistence"]["mae"]
    ratio = out.int8["mae"] / persistence
    print(f"cloud-hub train --forecast {CHANNEL}: v{out.version} on {out.train_windows} windows, "
          f"{out.holdout_windows} held out: INT8 MAE {out.int8['mae']:.3f} ppm, persistence {persistence:.3f} ppm, "
          f"ratio {ratio:.2f}")
    print(f"gate: {out.gate}")
    met = ratio < 1.0
    print(f"target (INT8 MAE below persistence's): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
