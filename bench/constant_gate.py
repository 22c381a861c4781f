"""Benchmark: how often ``train``'s constant gate is wrong, on the watch recordings.

    python bench/constant_gate.py               # 10 hold-outs x (real labels, labels no reading tells), ~10 min

``cloud-hub train`` registers a model ``rejected`` when its INT8 score on the hold-out does no better than
the constant predictor (the training's majority class): ``cloud_hub.models.baselines.constant_check``.
Two kinds of error:

* a useful model rejected: each subject s01..s10 held out in turn, the model trained on the other nine as
  ``train`` trains (its default config), on the real labels. Each hold-out is one person, whose exercises
  are not the training's mix: the case where a skewed hold-out could favour the majority class;
* a useless model passed: the same hold-outs, with labels that no reading tells (each 3 s stretch of a
  subject's recording labelled by a seeded draw with the real labels' shares): it should be rejected.

Printed per hold-out: INT8 accuracy, the majority class's, the verdict; then the two error rates.
Data: /work/shared/data/watch_shoulder_exercise (absent: the bench says so and exits 0).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.data import db
from cloud_hub.models import lifecycle

DATA = Path("/work/shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv")
SUBJECTS = [f"s{i:02d}" for i in range(1, 11)]


def blind_labels(src: Path, out: Path, seed: int) -> Path:
    """``src`` with each 3 s stretch of each device labelled by a draw with the real labels' shares."""
    with open(src, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    labels = np.array([r[-1] for r in body])
    names, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    drawn: dict[tuple[str, int], str] = {}
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in body:
            key = (r[1], int(float(r[0]) // 3))
            if key not in drawn:
                drawn[key] = str(rng.choice(names, p=counts / counts.sum()))
            w.writerow([*r[:-1], drawn[key]])
    return out


def one(log: Path, holdout: str, work: Path) -> tuple[float, float, bool]:
    engine = db.make_engine(f"sqlite:///{work / f'{holdout}-{log.stem}.sqlite'}")
    try:
        out = lifecycle.train_from_logs(engine, [str(log)], holdout=[holdout])
    finally:
        engine.dispose()
    return out.int8["accuracy"], out.extra["baselines"]["majority"]["accuracy"], out.state == "rejected"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--holdouts", default=",".join(SUBJECTS))
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"no data at {args.data}: nothing measured")
        return 0
    t0 = time.perf_counter()
    wrong = {"real": 0, "blind": 0}
    holdouts = args.holdouts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        blind = blind_labels(args.data, work / "blind.csv", seed=0)
        print(f"{'hold-out':8s} {'labels':6s} {'INT8':>7s} {'majority':>9s} verdict")
        for h in holdouts:
            for kind, log in (("real", args.data), ("blind", blind)):
                acc, maj, rejected = one(log, h, work)
                wrong[kind] += rejected if kind == "real" else not rejected
                print(f"{h:8s} {kind:6s} {100 * acc:6.1f}% {100 * maj:8.1f}% "
                      f"{'rejected' if rejected else 'publishable'}", flush=True)
    n = len(holdouts)
    print(f"useful models rejected: {wrong['real']} of {n}; useless models passed: {wrong['blind']} of {n} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
