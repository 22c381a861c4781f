"""Benchmark: the canary judge's error rates on simulated fleets whose errors cluster, old judge vs new.

    python bench/canary_judge.py                 # 200 canaries of each kind (about 2 minutes)
    python bench/canary_judge.py --canaries 500 --devices 50 --cohort 0.1

Each canary: ``--devices`` devices (one result a second each), a cohort of ``--cohort`` of them on the
canary, the others on the previous version; every device has ``--history`` results on the previous
version before the canary starts. Devices differ (a device's error rate out of hard stretches is drawn
log-normally around 4 %) and their errors come in stretches (a hard stretch starts once in ~300 results,
lasts ~30, and errs 40 % of the time), independently per device: a good canary meets its own device's
hard stretches just as the previous version did. Kinds:

- ``good``: a classifier as good as the previous version on every device;
- ``worse5``: a classifier 5 points worse (error + 0.05 in and out of hard stretches);
- ``broken``: a classifier 40 points worse (a clearly bad model: what the old judge's speed is judged on);
- ``reg20``: a regressor with 20 % more error (errors |N(0, 1)| x the device's scale, x3 in a stretch);
- ``reg_good``: a regressor as good as the previous version.

Both judges look every ``--check-s`` seconds (``serve``'s ``canary_check_s``). Today's judge: from
``min_results`` cohort results, roll back when the cohort's mean is worse than the control's (now) by
more than the tolerance, else promote. The new judge: ``cloud_hub.rollout.canary_judge`` with the settings'
defaults. Printed per judge and kind: wrong decisions (false rollback for the good kinds, missed rollback
for the bad ones), undecided at the limit (then ``on_undecided``), and the median cohort results and
seconds to a decision.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.rollout import canary_judge as cj
from cloud_hub.settings import HubSettings

HARD_IN, HARD_OUT, HARD_ERR = 1 / 300, 1 / 30, 0.40


@dataclass(frozen=True)
class Kind:
    name: str
    regression: bool
    worse: float  # classifier: + error rate; regressor: x error
    bad: bool


KINDS = [Kind("good", False, 0.0, False), Kind("worse5", False, 0.05, True), Kind("broken", False, 0.4, True),
         Kind("reg_good", True, 1.0, False), Kind("reg20", True, 1.2, True)]


def hard_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    """A two-state chain per result, True while the device is in a hard stretch: alternating runs of
    geometric lengths (mean 1/HARD_IN out of stretches, 1/HARD_OUT in them)."""
    out = np.zeros(n, dtype=bool)
    i, hard = 0, bool(rng.random() < HARD_IN / (HARD_IN + HARD_OUT))
    while i < n:
        run = int(rng.geometric(HARD_OUT if hard else HARD_IN))
        out[i:i + run] = hard
        i, hard = i + run, not hard
    return out


def device_stream(rng: np.random.Generator, n: int, kind: Kind, base: float, worse: bool) -> np.ndarray:
    """What ``n`` consecutive results say: a hit (1) or a miss (0), or a regressor's error (>= 0), as
    canary.judge reads them from the store."""
    hard = hard_mask(rng, n)
    if kind.regression:
        return np.abs(rng.normal(size=n)) * base * np.where(hard, 3.0, 1.0) * (kind.worse if worse else 1.0)
    p_err = np.where(hard, HARD_ERR, base) + (kind.worse if worse else 0.0)
    return (rng.random(n) >= np.clip(p_err, 0, 1)).astype(np.float64)


def simulate(rng: np.random.Generator, kind: Kind, args: argparse.Namespace):
    n_dev = args.devices
    n_cohort = max(1, round(args.cohort * n_dev))
    horizon = args.max_s
    bases = (np.exp(rng.normal(0, 0.5, n_dev)) if kind.regression
             else np.clip(0.04 * np.exp(rng.normal(0, 0.6, n_dev)), 0.005, 0.3))
    history = [device_stream(rng, args.history, kind, bases[d], False) for d in range(n_dev)]
    during = [device_stream(rng, horizon, kind, bases[d], d < n_cohort and kind.bad) for d in range(n_dev)]
    return n_cohort, history, during


def old_judge(cohort: np.ndarray, control_mean: float, tolerance: float, min_results: int) -> str | None:
    """Today's judge (before this bench): the cohort's mean against the control's, from min_results on."""
    if cohort.size < min_results:
        return None
    return "roll_back" if cohort.mean() < control_mean - tolerance else "promote"


def run_one(rng: np.random.Generator, kind: Kind, args: argparse.Namespace, rules: cj.Rules
            ) -> tuple[tuple[str, int, float], tuple[str, int, float]]:
    n_cohort, history, during = simulate(rng, kind, args)
    names = np.arange(args.devices)  # device ids as numbers: the judge groups them faster than strings
    base = cj.Series(np.repeat(names[:n_cohort], args.history), np.concatenate(history[:n_cohort]))
    cohort_all, control_all = np.stack(during[:n_cohort]), np.stack(during[n_cohort:])  # (devices, seconds)
    sign = -1.0 if kind.regression else 1.0  # the old judge: higher is better (a regressor's -error)
    control_sum = np.cumsum(sign * control_all.sum(axis=0))
    old: tuple[str, int, float] | None = None
    new: tuple[str, int, float] | None = None
    t = args.check_s
    while t <= args.max_s and (old is None or new is None):
        k = int(t)  # results per device so far (one a second)
        cohort = cj.Series(np.repeat(names[:n_cohort], k), cohort_all[:, :k].reshape(-1))
        if old is None:
            verdict = old_judge(sign * cohort.score, control_sum[k - 1] / (k * control_all.shape[0]),
                                args.old_tolerance, args.min_results)
            if verdict:
                old = (verdict, len(cohort), t)
        if new is None:
            # every simulated cohort device has its own history, so the judge never reads the control
            # fleet (it does only for a device without one): skip building it at every check
            control = cj.Series(names[:0], control_all[:0, 0])
            c, b, ctl = cj.relative_errors(cohort, base, control) if kind.regression else (cohort, base, control)
            est = cj.estimate(c, b, ctl, rules)
            d = cj.decide(est, rules, elapsed_s=t, metric="error" if kind.regression else "accuracy")
            if d.action != "wait":
                new = (d.action + ("*" if d.reason.startswith("undecided") else ""), len(cohort), t)
        t += args.check_s
    return old or ("none", 0, t), new or ("none", 0, t)


def _one(kind: Kind, args: argparse.Namespace, rules: cj.Rules, seed: int):
    return run_one(np.random.default_rng(seed), kind, args, rules)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=200)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--cohort", type=float, default=0.1)
    ap.add_argument("--history", type=int, default=7200)
    ap.add_argument("--check-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kinds", default=",".join(k.name for k in KINDS))
    args = ap.parse_args()
    s = HubSettings()
    args.min_results, args.old_tolerance = s.canary_min_results, s.canary_tolerance
    rules_cls = cj.Rules(tolerance=s.canary_tolerance, alpha=s.canary_alpha, min_results=s.canary_min_results,
                         max_results=s.canary_max_results, max_s=s.canary_max_s,
                         on_undecided=s.canary_on_undecided)
    rules_reg = cj.Rules(**{**rules_cls.__dict__, "tolerance": s.canary_error_tolerance})
    n_cohort = max(1, round(args.cohort * args.devices))
    args.max_s = int(rules_cls.max_s or (rules_cls.max_results / n_cohort + args.check_s))
    print(f"{args.canaries} canaries per kind; {args.devices} devices, cohort {n_cohort}, 1 result/s each, "
          f"{args.history} results of history, checks every {args.check_s:g} s")
    print(f"new judge: alpha {rules_cls.alpha}, tolerance {rules_cls.tolerance} (classifier) / "
          f"{rules_reg.tolerance} relative (regressor), min {rules_cls.min_results}, max {rules_cls.max_results} "
          f"results, on_undecided={rules_cls.on_undecided}; old judge: tolerance {args.old_tolerance} absolute")
    print(f"{'kind':9} {'judge':4} {'wrong':>7} {'undecided':>9} {'median results':>15} {'median s':>9}")
    started = time.monotonic()
    for kind in [k for k in KINDS if k.name in args.kinds.split(",")]:
        jobs = [(kind, args, rules_reg if kind.regression else rules_cls, args.seed * 1_000_003 + i)
                for i in range(args.canaries)]
        with multiprocessing.Pool(args.procs) as pool:
            outcomes = pool.starmap(_one, jobs, chunksize=4)
        for label, idx in (("old", 0), ("new", 1)):
            acts = [o[idx] for o in outcomes]
            wrong_action = "promote" if kind.bad else "roll_back"
            wrong = sum(a[0].rstrip("*") == wrong_action or (kind.bad and a[0].rstrip("*") in ("hold", "none"))
                        for a in acts)
            undecided = sum(a[0].endswith("*") or a[0] == "none" for a in acts)
            decided = [a for a in acts if a[0] != "none"]
            med_n = int(np.median([a[1] for a in decided])) if decided else 0
            med_s = float(np.median([a[2] for a in decided])) if decided else 0.0
            what = "missed rollback" if kind.bad else "false rollback"
            print(f"{kind.name:9} {label:4} {100 * wrong / len(acts):6.1f}% {100 * undecided / len(acts):8.1f}% "
                  f"{med_n:15,} {med_s:9,.0f}   ({what})", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
