"""Research script: accuracy of federated rounds with differential privacy at epsilon 1, 4, 8 and without it.

    python bench/federated_dp.py                        # 10 rounds, seed 0, epsilon 1,4,8, both modes
    python bench/federated_dp.py --epsilons 8 --modes central --train-layers 1 --clip 1

Protocol
--------
* The rounds are ``bench/federated_watch.py``'s, run by its own ``federated()``: devices s01-s08 (one subject
  each), first model trained on s01 (the hub's pilot), SGD lr 0.03, 5 local epochs, batch 64, INT8 deltas
  through the contract's encoding; INT8 accuracy on s09, s10 (never trained on), the mean of rounds R-2..R.
* The hub's ``fedavg.aggregate`` is swapped for the round's mechanism (:func:`mechanism`), with ``federate``'s
  code and numbers:
  - ``none``: FedAvg weighted by windows, each delta clipped to ``--clip``, the devices' merged ranges;
  - ``central``: every delta clipped, each weighing the same, Gaussian noise of ``z x clip`` on their sum
    (``cloud_hub.rounds.privacy.central_noise``);
  - ``distributed``: each delta put on the secure round's integer grid with conditional rounding
    (``secure_codec.encode`` with the round's ``DpParams``), discrete Gaussian noise of ``sigma`` grid steps
    added (``privacy.discrete_gaussian``), the integer vectors summed and decoded (``secure_codec.decode``).
    The masks are left out: they cancel exactly (tests/test_secagg.py, bit for bit), so the sum is the same.
    ``sigma`` is sized, as ``federate`` sizes it, for the threshold (a majority: 5 of 8); all 8 answer, so the
    epsilon spent is below the target (printed).
  With DP the INT8 model is quantized with the pilot's ranges (on s01, the hub's data), not the devices'.
* The gate, as ``federate``'s devices' own evaluation: a round's model replaces the master only when its FP32
  accuracy on the 8 devices' windows is no worse (a noised model that fails it is not published, and the next
  round starts from the last one that passed; the gate's decision is outside the accountant, docs: Federated
  rounds). Without it one bad round's noise makes the devices' SGD diverge. ``passed``: rounds that passed.
* The noise multiplier ``z`` is ``federate --target-epsilon E --rounds R``'s: the zCDP that spends ``E`` at
  delta 1e-5 (Google's dp-accounting), split over the rounds (``privacy.Budget``).
* Also printed: how large a cohort would need to be for the noise on the mean (``z x clip x sqrt(d) / n``) to
  be no larger than one clipped update (``clip``): ``n = z sqrt(d)``, ``d`` the trained weights.

Measured: docs/benchmarks.md (Differential privacy).

Usage: python bench/federated_dp.py [--rounds 10] [--seeds 1] [--epsilons 1,4,8] [--modes central,distributed]
       [--clip 2] [--train-layers K] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
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

from cloud_hub.rounds.config import FederateConfig

INIT = "s01"
DELTA = 1e-5
THRESHOLD = 5  # secagg.threshold(8): a majority


def noise_multiplier(epsilon: float, rounds: int) -> float:
    from cloud_hub.rounds import privacy

    return privacy.noise_for(privacy.rho_for(epsilon, DELTA) / rounds)


@contextmanager
def mechanism(mode: str, z: float, clip: float, seed: int) -> Iterator[dict]:
    """For the block, the hub aggregates by ``mode`` at noise multiplier ``z``; yields what it spent."""
    from cloud_hub.rounds import fedavg, privacy
    from edge_agent.contract import secure_codec
    from edge_agent.contract.privacy import DpParams, discrete_gaussian
    from edge_agent.device import learn

    honest_aggregate, honest_merge = fedavg.aggregate, fedavg.merge_ranges
    rng = np.random.default_rng([seed, 0xD9])
    spent: dict = {"rho": 0.0, "rounds": 0, "d": 0, "passed": 0}
    pilot_ranges: list = []
    data = fw.load(INIT)["fed"]
    own = data.devices == INIT
    fleet = np.isin(data.devices, fw.DEVICES)
    classes = sorted(set(data.y.tolist()))
    y_fleet = np.array([classes.index(c) for c in data.y[fleet]])

    def gated(master, new):  # type: ignore[no-untyped-def]
        def acc(t):  # type: ignore[no-untyped-def]
            p = learn.predict(t, "classification", data.X[fleet])
            return float(np.mean(p.argmax(1) == y_fleet)) if np.isfinite(p).all() else -1.0
        if acc(new) >= acc(master):
            spent["passed"] += 1
            return new
        return master

    def merge_ranges(ranges, **kw):  # type: ignore[no-untyped-def]
        return pilot_ranges[0] if mode != "none" and pilot_ranges else honest_merge(ranges, **kw)

    def aggregate(master, updates, **_kw):  # type: ignore[no-untyped-def]
        if not pilot_ranges:  # the first master is the pilot: its ranges on s01 are the hub's
            pilot_ranges.append(learn.activation_ranges(master, data.X[own]))
        names = sorted(updates[0].delta)
        spent["d"] = sum(updates[0].delta[k].size for k in names)
        if mode == "none":
            return gated(master, honest_aggregate(master, updates, clip=clip))
        if mode == "central":
            new = honest_aggregate(master, [fedavg.Contribution(u.delta, 1) for u in updates], clip=clip)
            spent["rho"] += privacy.central_rho(z)
            spent["rounds"] += 1
            return gated(master, privacy.central_noise(new, names, z, clip, len(updates), rng))
        grid = secure_codec.grid_for([(k, updates[0].delta[k].shape) for k in names], clip, seed=spent["rounds"])
        bound = grid.dp_bound()
        dp = DpParams("distributed", z, DELTA, z * bound / math.sqrt(THRESHOLD), bound)
        total = np.zeros(grid.padded, np.int64)
        for u in updates:
            ints, _held = secure_codec.encode(u.delta, grid, rng, dp)
            total += ints + discrete_gaussian(dp.sigma, ints.size, rng)
        mean = secure_codec.decode(total, grid)
        spent["rho"] += privacy.distributed_rho(bound, dp.sigma, len(updates), grid.padded)
        spent["rounds"] += 1
        return gated(master, {k: (v + mean[k] / len(updates)).astype(np.float32) if k in mean else v
                              for k, v in master.items()})

    fedavg.aggregate, fedavg.merge_ranges = aggregate, merge_ranges
    try:
        yield spent
    finally:
        fedavg.aggregate, fedavg.merge_ranges = honest_aggregate, honest_merge


def run(job: tuple[str, float | None, int, int, float, int | None]) -> dict:
    from cloud_hub.rounds import privacy

    mode, epsilon, seed, rounds, clip, train_layers = job
    z = noise_multiplier(epsilon, rounds) if epsilon is not None else 0.0
    c = FederateConfig()
    cfg = fw.Config("dp", epochs=float(c.epochs), lr=c.lr, batch=c.batch, optimizer="sgd", train_layers=train_layers)
    t0 = time.perf_counter()
    with mechanism(mode, z, clip, seed) as spent:
        res = fw.federated(cfg, seed, rounds, fw.DEVICES, fw.TEST, max(1, rounds - 2), True)
    return {"mode": mode, "target": epsilon, "seed": seed, "z": z, "acc": res["acc"], "first": res["curve"][0],
            "spent": privacy.epsilon(spent["rho"], DELTA) if spent["rounds"] else None, "d": spent["d"],
            "passed": spent["passed"],
            "seconds": time.perf_counter() - t0}


def _init() -> None:
    fw.ARGS = argparse.Namespace(init=INIT)  # federated() reads the pilot subject from it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epsilons", default="1,4,8")
    ap.add_argument("--modes", default="central,distributed")
    ap.add_argument("--clip", type=float, default=2.0, help="the deltas' L2 clip (federate --clip; s02's honest "
                    "norms are 1.3-2.8)")
    ap.add_argument("--train-layers", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if not fw.DATA.is_file():
        print(f"federated_dp: {fw.DATA} is absent: this bench runs on the watch recordings", file=sys.stderr)
        return 2
    _init()
    fw.load(INIT)  # loaded once, before the workers fork
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    modes = [m for m in args.modes.split(",") if m]
    seeds = list(range(args.seeds))
    jobs = [("none", None, s, args.rounds, args.clip, args.train_layers) for s in seeds]
    jobs += [(m, e, s, args.rounds, args.clip, args.train_layers) for m in modes for e in epsilons for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_init) as ex:
        results = list(ex.map(run, jobs))
    wall = time.perf_counter() - t0
    clean = statistics.mean(r["acc"] for r in results if r["mode"] == "none")
    d = results[0]["d"]
    print(f"devices {', '.join(fw.DEVICES)} (first model on {INIT}), held out {', '.join(fw.TEST)}; {args.rounds} "
          f"rounds, seeds {seeds}, clip {args.clip:g}, {d:,} trained weights, delta {DELTA:g}; wall {wall:.0f} s")
    print(f"{'mode':12s} {'target eps':>10s} {'spent eps':>10s} {'noise z':>8s} {'INT8 s09,s10':>13s} {'vs no DP':>9s} "
          f"{'passed':>7s} {'cohort for noise <= clip':>25s}")
    rows = []
    for mode in ["none", *modes]:
        for e in ([None] if mode == "none" else epsilons):
            rs = [r for r in results if r["mode"] == mode and r["target"] == e]
            acc = statistics.mean(r["acc"] for r in rs)
            z = rs[0]["z"]
            spent = rs[0]["spent"]
            cohort = math.ceil(z * math.sqrt(d)) if z else 0
            passed = statistics.mean(r["passed"] for r in rs)
            rows.append({"mode": mode, "target": e, "spent": spent, "z": z, "int8": acc, "cohort": cohort,
                         "passed": passed})
            print(f"{mode:12s} {'-' if e is None else f'{e:g}':>10s} {'-' if spent is None else f'{spent:.2f}':>10s} "
                  f"{z:8.2f} {acc * 100:12.2f}% {(acc - clean) * 100:+9.2f} {passed:7g} {cohort or '-':>25}")
    print(f"the first model (the pilot, before any round): {results[0]['first'] * 100:.2f}%")
    print(json.dumps({"rounds": args.rounds, "seeds": seeds, "clip": args.clip, "d": d, "wall_s": round(wall, 1),
                      "rows": rows}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
