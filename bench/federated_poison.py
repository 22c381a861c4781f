"""Research script: one of the 8 devices poisons every federated round; FedAvg against the robust rules.

    python bench/federated_poison.py                     # s02 attacks; fedavg, centered-clip; seeds 0, 1
    python bench/federated_poison.py --rules fedavg,centered-clip,trimmed-mean,median
    python bench/federated_poison.py --rules centered-clip --attackers all   # s02..s08, one at a time

Protocol
--------
* The rounds are ``bench/federated_watch.py``'s, run by its own ``federated()``: devices s01-s08 (one
  subject each), first model trained on s01, SGD lr 0.03, 5 local epochs, batch 64, INT8 deltas through
  the contract's encoding, INT8 re-quantized from the devices' ranges, accuracy of the INT8 model on
  s09, s10 (never trained on). For a run, two of the functions it calls are swapped (:func:`poisoned`):
  the attacker's ``learn.fine_tune`` and the hub's ``fedavg.aggregate``, which then clips every delta
  to ``federate``'s default clip (10) as the hub does and combines them by the rule under test.
* The attacker (``--attackers``: a list, or ``all``, s02-s08, each in its own runs; default: the device
  with the most windows other than s01, the pilot: s02) answers every round with one of
  - ``label-flip``: it trains on its windows with every label replaced by the next class;
  - ``scale``: its honest delta scaled to 0.99 x the clip (s02's honest norms are 1.3-2.8: 3.5-8x);
  - ``sign-flip``: its honest delta negated and scaled to 0.99 x the clip.
  Its example count and activation ranges are its honest ones (the hub caps counts at 3x the median
  and bounds ranges: :func:`cloud_hub.rounds.fedavg.capped_examples`, ``merge_ranges``).
* Rules: ``fedavg`` (weighted by windows), ``federate``'s robust rules ``centered-clip`` and
  ``trimmed-mean`` (``fedavg.aggregate``), and for comparison ``median`` (the coordinate-wise median:
  the trimmed mean with ``trim=0.5``; not a ``federate`` option). Clean FedAvg always runs: the reference.
* Reported: INT8 accuracy on s09, s10, the mean of rounds ``R-2``..``R`` (as ``federated_watch`` reports
  a short run: one round's accuracy moves by about 1 point) and over the seeds, and round R's alone.
  Beside them, per attacker, FedAvg with its update left out (``absent``): what a perfect defence would
  keep, the most any rule can against that device. Then per robust rule a matrix attacker x attack of
  its points against clean FedAvg / against the attacker absent, and how many cases are within 1 point
  of each. Target (issue #26): the poisoned robust rule loses at most 1 point against clean FedAvg. A case
  where leaving the attacker out alone costs more than 1 point cannot meet it under any rule: it is
  ``UNREACHABLE`` (and said so) when the rule is within 1 point of that perfect defence, else it fails.
  The exit code is 0 when no case fails.

Measured: docs/benchmarks.md, "Poisoned rounds" (the tables, the commands, and which targets are met).
About 23 CPU-s a run (more on a loaded machine): ``--attackers all`` with one robust rule and 2 seeds is
60 runs, ~20 min on the shared 2-core machine with ``--jobs 2``.

Usage: python bench/federated_poison.py [--rounds 10] [--seeds 2] [--attacks label-flip,scale,sign-flip]
       [--rules fedavg,centered-clip] [--attackers s02,s04|all] [--jobs 2]
       [--center-radius 2] [--norm-bound 1.5] [--norm-outlier 0|4 [--outlier-to 1]]
                                                # centered-clip's variants (federate: 2, none, 4)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import federated_watch as fw  # bench/ is not a package: its scripts import each other by name

from cloud_hub.rounds import fedavg
from cloud_hub.rounds.config import FederateConfig

ATTACKS = ("label-flip", "scale", "sign-flip")
ROBUST = "centered-clip"  # federate's robust rule (fedavg.RULES), the default one measured
# name -> fedavg.aggregate's rule and keywords; the median is not a federate option (the trimmed mean at 0.5)
RULES: dict[str, tuple[str, dict]] = {r: (r, {}) for r in fedavg.RULES} | {"median": ("trimmed-mean", {"trim": 0.5})}
CLIP = FederateConfig().clip
INIT = "s01"


def local() -> fw.Config:
    """``federate``'s local training, as federated_watch runs it by default."""
    c = FederateConfig()
    return fw.Config("poison", epochs=float(c.epochs), lr=c.lr, batch=c.batch, optimizer="sgd")


@contextmanager
def poisoned(rule: str, attack: str, attacker: str) -> Iterator[None]:
    """For the block: device ``attacker`` answers with ``attack`` (``none``: honestly; ``absent``: honestly,
    but its update is left out, as a perfect defence would), and the hub clips to ``CLIP`` and aggregates
    by ``rule`` (a key of ``RULES``)."""
    from edge_agent.device import learn

    honest_fine_tune, honest_aggregate = learn.fine_tune, fedavg.aggregate
    name, params = RULES[rule]
    data = fw.load(INIT)["fed"]
    rows = data.X[data.devices == attacker]  # fine_tune is told the device's windows, not its name

    def fine_tune(tensors, task, X, y, **kw):  # type: ignore[no-untyped-def]
        if attack in ("none", "absent") or X.shape != rows.shape or not np.array_equal(X, rows):
            return honest_fine_tune(tensors, task, X, y, **kw)
        if attack == "label-flip":
            classes = tensors[f"coef_{learn.n_layers(tensors) - 1}"].shape[1]
            return honest_fine_tune(tensors, task, X, (np.asarray(y) + 1) % classes, **kw)
        res = honest_fine_tune(tensors, task, X, y, **kw)
        factor = np.float32((-1 if attack == "sign-flip" else 1) * 0.99 * CLIP / max(res.norm, 1e-12))
        return dataclasses.replace(res, delta={k: v * factor for k, v in res.delta.items()})

    def aggregate(master, updates, **_kw):  # type: ignore[no-untyped-def]
        if attack == "absent":  # every device answers every round (no dropout), in DEVICES order
            assert len(updates) == len(fw.DEVICES)
            updates = [u for d, u in zip(fw.DEVICES, updates, strict=True) if d != attacker]
        return honest_aggregate(master, updates, clip=CLIP, rule=name, **params)

    learn.fine_tune, fedavg.aggregate = fine_tune, aggregate
    try:
        yield
    finally:
        learn.fine_tune, fedavg.aggregate = honest_fine_tune, honest_aggregate


def run(job: tuple[str, str, int, int, str]) -> dict:
    rule, attack, seed, rounds, attacker = job
    t0 = time.perf_counter()
    with poisoned(rule, attack, attacker):
        res = fw.federated(local(), seed, rounds, fw.DEVICES, fw.TEST, max(1, rounds - 2), True)
    return {"rule": rule, "attack": attack, "attacker": attacker, "seed": seed, "acc": res["acc"],
            "last": res["curve"][rounds], "seconds": time.perf_counter() - t0}


def _init(radius: float = fedavg.CENTER_RADIUS, norm_bound: float | None = fedavg.CENTER_NORM_BOUND,
          norm_outlier: float | None = fedavg.CENTER_NORM_OUTLIER, outlier_to: float = fedavg.CENTER_OUTLIER_TO) -> None:
    fw.ARGS = argparse.Namespace(init=INIT)  # federated() reads the pilot subject from it
    fedavg.CENTER_RADIUS, fedavg.CENTER_NORM_BOUND = radius, norm_bound  # centered-clip's variants (research)
    fedavg.CENTER_NORM_OUTLIER, fedavg.CENTER_OUTLIER_TO = norm_outlier, outlier_to


def jobs_for(rules: list[str], attacks: list[str], attackers: list[str], seeds: list[int],
             rounds: int) -> list[tuple[str, str, int, int, str]]:
    """Every rule without an attacker once; every rule under every attack by every attacker; FedAvg with each
    attacker left out (the reference of that attacker's row). Clean FedAvg is always run: every target's
    reference."""
    jobs = [(r, "none", s, rounds, attackers[0]) for r in dict.fromkeys(["fedavg", *rules]) for s in seeds]
    for who in attackers:
        jobs += [(r, a, s, rounds, who) for r in rules for a in attacks for s in seeds]
        jobs += [("fedavg", "absent", s, rounds, who) for s in seeds]
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (first model, local shuffles)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--rules", default=f"fedavg,{ROBUST}", help=f"of {', '.join(RULES)}")
    ap.add_argument("--attackers", "--attacker", dest="attackers", default=None,
                    help="the poisoning devices, one at a time: a list, or 'all' (every device but s01; default: "
                         "the largest but s01)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--center-radius", type=float, default=fedavg.CENTER_RADIUS,
                    help="centered-clip's tau over the median distance (research; federate's: %(default)s)")
    ap.add_argument("--norm-bound", type=float, default=fedavg.CENTER_NORM_BOUND,
                    help="centered-clip: every update first bounded to this multiple of the median norm "
                         "(research; federate's: %(default)s)")
    ap.add_argument("--norm-outlier", type=float, default=fedavg.CENTER_NORM_OUTLIER,
                    help="centered-clip: an update whose norm exceeds this multiple of the median norm first scaled "
                         "down to --outlier-to x the median norm; 0: not (federate's: %(default)s)")
    ap.add_argument("--outlier-to", type=float, default=fedavg.CENTER_OUTLIER_TO,
                    help="see --norm-outlier (default: %(default)s)")
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    rules = [r for r in args.rules.split(",") if r]
    if unknown := sorted(set(attacks) - set(ATTACKS)) + sorted(set(rules) - set(RULES)):
        ap.error(f"unknown attack or rule: {', '.join(unknown)}")
    if not fw.DATA.is_file():
        print(f"federated_poison: {fw.DATA} is absent: this bench runs on the watch recordings", file=sys.stderr)
        return 2
    variant = (args.center_radius, args.norm_bound, args.norm_outlier or None, args.outlier_to)
    _init(*variant)
    data = fw.load(INIT)["fed"]  # loaded once, before the workers fork
    windows = {d: int(np.sum(data.devices == d)) for d in fw.DEVICES}
    others = [d for d in fw.DEVICES if d != INIT]
    if args.attackers == "all":
        attackers = others
    elif args.attackers:
        attackers = [d for d in args.attackers.split(",") if d]
    else:
        attackers = [max(others, key=windows.__getitem__)]
    if not attackers or set(attackers) - set(others):
        ap.error(f"--attackers must be 'all' or some of {', '.join(others)}")
    seeds = list(range(args.seeds))
    jobs = jobs_for(rules, attacks, attackers, seeds, args.rounds)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=variant) as ex:
        results = list(ex.map(run, jobs))
    wall = time.perf_counter() - t0
    return report(results, rules, attacks, attackers, seeds, args.rounds, windows, wall,
                  busy=sum(r["seconds"] for r in results))


def report(results: list[dict], rules: list[str], attacks: list[str], attackers: list[str], seeds: list[int],
           rounds: int, windows: dict[str, int], wall: float, busy: float) -> int:
    def cell(rule: str, attack: str, who: str | None) -> dict:
        rs = sorted((r for r in results if r["rule"] == rule and r["attack"] == attack
                     and (who is None or r["attacker"] == who)), key=lambda r: r["seed"])
        return {"int8": statistics.mean(r["acc"] for r in rs), "per_seed": [r["acc"] for r in rs],
                "last": statistics.mean(r["last"] for r in rs)}

    rows = [(rule, "none", "-", cell(rule, "none", None)) for rule in dict.fromkeys(["fedavg", *rules])]
    absent = {who: cell("fedavg", "absent", who) for who in attackers}
    for who in attackers:
        rows += [(rule, attack, who, cell(rule, attack, who)) for rule in rules for attack in attacks]
        rows.append(("fedavg", "absent", who, absent[who]))
    clean = rows[0][3]["int8"]
    print(f"devices {', '.join(fw.DEVICES)}; attackers {', '.join(f'{w} ({windows[w]})' for w in attackers)} of "
          f"{sum(windows.values())} windows, one at a time, every round; clip {CLIP:g}; held out "
          f"{', '.join(fw.TEST)}; first model on {INIT}; {rounds} rounds, seeds {seeds}; "
          f"{len(results)} runs, wall {wall:.0f} s, the runs' own times summed {busy / 60:.1f} min")
    if "centered-clip" in rules:
        bound, outlier = fedavg.CENTER_NORM_BOUND, fedavg.CENTER_NORM_OUTLIER
        print(f"centered-clip: tau {fedavg.CENTER_RADIUS:g}x the median distance, {fedavg.CENTER_ITERATIONS} iterations, "
              + (f"updates first bounded to {bound:g}x the median norm" if bound else "no norm bound")
              + (f", updates over {outlier:g}x the median norm first scaled to {fedavg.CENTER_OUTLIER_TO:g}x it"
                 if outlier else ""))
    print(f"{'rule':14s} {'attacker':8s} {'attack':11s} {f'INT8 s09,s10 r{max(1, rounds - 2)}-{rounds}':>20s} "
          f"{'vs clean FedAvg':>16s} {'vs absent':>10s} {'per seed':>{6 * len(seeds) + 2}s} {f'round {rounds}':>9s}")
    for rule, attack, who, v in rows:
        floor = absent[who]["int8"] if who != "-" else clean
        print(f"{rule:14s} {who:8s} {attack:11s} {v['int8'] * 100:19.2f}% {(v['int8'] - clean) * 100:+16.2f} "
              f"{(v['int8'] - floor) * 100:+10.2f} {' '.join(f'{x * 100:.2f}' for x in v['per_seed']):>{6 * len(seeds) + 2}s} "
              f"{v['last'] * 100:8.2f}%")
    print("absent: the attacker answers honestly and its update is left out (what a perfect defence keeps, the most "
          "any rule can keep against that attacker); vs absent of a row without attacker: vs clean FedAvg")
    # a case the target cannot be met in: leaving the attacker out alone costs over 1 point (no rule can do better
    # than a perfect defence); it is judged against that instead, and said so
    checks: dict[str, str] = {}
    for rule in (r for r in rules if r != "fedavg"):
        got = cell(rule, "none", None)["int8"]
        checks[f"{rule} without attacker within 1 point of clean FedAvg ({(got - clean) * 100:+.2f})"] = \
            "PASS" if got >= clean - 0.01 else "FAIL"
        print(f"{rule}, points vs clean FedAvg / vs the attacker absent:")
        print(f"  {'attacker':8s} {'absent':>7s} " + " ".join(f"{a:>15s}" for a in attacks))
        near_clean = near_absent = 0
        for who in attackers:
            cells = []
            for attack in attacks:
                got = cell(rule, attack, who)["int8"]
                ok_clean, ok_absent = got >= clean - 0.01, got >= absent[who]["int8"] - 0.01
                near_clean, near_absent = near_clean + ok_clean, near_absent + ok_absent
                unreachable = absent[who]["int8"] < clean - 0.01
                name = f"{rule} under {attack} by {who} within 1 point of clean FedAvg ({(got - clean) * 100:+.2f})"
                if not ok_clean and unreachable:
                    name += (f": no rule can, the attacker left out is at {(absent[who]['int8'] - clean) * 100:+.2f}; "
                             f"against that {(got - absent[who]['int8']) * 100:+.2f}")
                checks[name] = "PASS" if ok_clean else ("UNREACHABLE" if unreachable and ok_absent else "FAIL")
                cells.append(f"{(got - clean) * 100:+.1f}/{(got - absent[who]['int8']) * 100:+.1f}")
            print(f"  {who:8s} {(absent[who]['int8'] - clean) * 100:+7.2f} " + " ".join(f"{c:>15s}" for c in cells))
        n = len(attackers) * len(attacks)
        print(f"  {rule}: {near_clean} of {n} (attacker, attack) cases within 1 point of clean FedAvg, "
              f"{near_absent} of {n} within 1 point of FedAvg with the attacker left out")
    for name, status in checks.items():
        print(f"  [{status}] {name}")
    print(json.dumps({"rounds": rounds, "seeds": seeds, "attackers": attackers, "clip": CLIP, "wall_s": round(wall, 1),
                      "results": [{"rule": r, "attack": a, "attacker": w, **v} for r, a, w, v in rows],
                      "checks": checks}, default=float))
    return 0 if all(status != "FAIL" for status in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
