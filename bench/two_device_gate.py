"""Benchmark: how often the gate of a two-device round is wrong, on the watch recordings.

A round that fewer than 3 devices score is gated on each of them (``cloud_hub.rounds.finish.GATE_MIN_DEVICES``):
the INT8 candidate must not be worse than the running INT8 model on either device's own held-out windows, where a
larger round pools them (weighted by their windows). The rule keeps one hostile device of two from pushing a model
through; this bench states what it costs honest rounds, next to the pooled gate on the same candidates.

Protocol: every pair of the watch recordings' subjects s01-s08 is a fleet of two devices; s09 and s10 are held out
and never seen by the gate. The first model is ``bench/federated_watch.py``'s (trained centrally on s01, its
normalization fitted on s01 alone). Each device keeps one minute in five of its windows out of training, as the
agent does, and scores the running INT8 model and the candidate on them. Each round both devices fine-tune with
``federate``'s defaults (``edge_agent.device.learn``: SGD, momentum 0.9, lr 0.03, 5 epochs, batch 64), send INT8
deltas through the contract, the hub aggregates (FedAvg) and makes the INT8 candidate from the devices' ranges.
The truth is the candidate against the running model on s09 and s10 (1,800 windows of two people the fleet never
saw). A gate is wrong when it rejects a candidate that is better there by more than a point (a false reject), or
passes one that is worse there by more than a point (a false pass); a candidate within a point either way is no
error whatever the gate says (1,800 windows: a point is about 3 standard errors of their difference). The master moves on when the shipped gate (each device) passes, as
``federate`` does. Errors cluster by pair and in time (a pair's rounds are not independent); the table gives
them per pair as well.

Usage: python bench/two_device_gate.py [--rounds 6] [--seeds 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import federated_watch as fw

MARGIN = 0.01  # a point: a false reject rejects a candidate better than this on the held-out subjects, a false pass
# passes one worse than this
MINUTE = 120  # windows of one minute at the 0.5 s hop: the agent keeps one minute in five out of training


def _own_holdout(order: np.ndarray) -> np.ndarray:
    """A device's evaluation windows: one minute in five, by time (its windows in ``order``)."""
    rank = np.argsort(np.argsort(order, kind="stable"), kind="stable")
    return (rank // MINUTE) % 5 == 4


def pair(job: tuple[tuple[str, str], int, int]) -> list[dict]:
    from cloud_hub.models import quantize, training
    from cloud_hub.rounds import fedavg
    from edge_agent.device import learn

    (a, b), seed, rounds = job
    data = fw.load("s01")["fed"]
    out = []
    with fw._blas1():
        init = data.devices == "s01"
        pilot = training.train(data.X[init], data.y[init], seed=seed)
        classes = [str(c) for c in pilot[-1].classes_]
        yi = np.array([classes.index(c) for c in data.y])
        alpha = training.TrainConfig().alpha * 64 / training.TrainConfig().batch_size
        master = fedavg.mlp_tensors(pilot)
        running = quantize.quantize_int8(training.export_onnx(pilot, data.X.shape[1]), data.X[init], seed=seed)
        test = np.isin(data.devices, fw.TEST)
        mine = {}
        for d in (a, b):
            rows = np.flatnonzero(data.devices == d)
            held = _own_holdout(data.order[rows] if data.order is not None else np.arange(rows.size))
            mine[d] = (rows[~held], rows[held])

        def acc(model: bytes, rows: np.ndarray) -> float:
            return float(quantize.evaluate(model, data.X[rows], data.y[rows], latency_runs=1, warmup=0)["accuracy"])

        for r in range(1, rounds + 1):
            updates, ranges = [], []
            for i, d in enumerate((a, b)):
                train = mine[d][0]
                res = learn.fine_tune(master, "classification", data.X[train], yi[train], epochs=5.0, lr=0.03,
                                      batch=64, alpha=alpha, seed=seed * 100_000 + r * 100 + i)
                delta, _ = fw._on_the_wire(res, "int8", r, d)
                updates.append(fedavg.Contribution(delta, res.n))
                ranges.append(res.ranges)
            candidate_tensors = fedavg.aggregate(master, updates, clip=10.0)  # federate's default clip
            fp32 = training.export_onnx(fedavg.with_tensors(pilot, candidate_tensors), data.X.shape[1])
            candidate = fedavg.quantize_from_ranges(fp32, fedavg.merge_ranges(ranges))
            each = {d: (acc(running, mine[d][1]), acc(candidate, mine[d][1])) for d in (a, b)}
            n = {d: mine[d][1].size for d in (a, b)}
            pooled_before = sum(n[d] * each[d][0] for d in each) / sum(n.values())
            pooled_after = sum(n[d] * each[d][1] for d in each) / sum(n.values())
            truth = (acc(running, np.flatnonzero(test)), acc(candidate, np.flatnonzero(test)))
            shipped = all(after >= before for before, after in each.values())
            out.append({"pair": f"{a}+{b}", "seed": seed, "round": r, "each": each, "truth": truth,
                        "pooled": pooled_after >= pooled_before, "shipped": shipped})
            if shipped:
                master, running = candidate_tensors, candidate
    return out


def _rates(rows: list[dict], rule: str) -> tuple[int, int, int, int]:
    """(false rejects, rounds whose candidate is better by more than MARGIN, false passes, rounds whose candidate
    is worse by more than MARGIN) of one rule."""
    good = [r for r in rows if r["truth"][1] > r["truth"][0] + MARGIN]
    bad = [r for r in rows if r["truth"][1] < r["truth"][0] - MARGIN]
    return sum(not r[rule] for r in good), len(good), sum(r[rule] for r in bad), len(bad)


def _ci(k: int, n: int) -> str:
    """k of n as a percentage with its 95 % Wilson interval."""
    if n == 0:
        return "-"
    z, p = 1.96, k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{k}/{n} = {100 * p:.1f} % (95 % CI {100 * max(mid - half, 0):.1f}-{100 * min(mid + half, 1):.1f} %)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every round's scores here")
    args = ap.parse_args()
    if not fw.DATA.exists():
        print(f"no watch recordings at {fw.DATA}", file=sys.stderr)
        return 2
    jobs = [(p, seed, args.rounds) for p in itertools.combinations(fw.DEVICES, 2) for seed in range(args.seeds)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = [row for result in pool.map(pair, jobs) for row in result]
    if args.json:
        args.json.write_text(json.dumps(rows))
    print(f"{len(jobs) // args.seeds} pairs of s01-s08 x {args.seeds} seeds x {args.rounds} rounds = {len(rows)} "
          f"two-device rounds, {time.perf_counter() - t0:.0f} s; truth: s09+s10; tolerance 0; errors: better (worse) "
          f"by more than {100 * MARGIN:g} point there and rejected (passed)")
    for rule, name in (("shipped", "each device must pass (shipped)"), ("pooled", "pooled, weighted by windows")):
        fr, good, fp, bad = _rates(rows, rule)
        print(f"  {name:34} false rejects {_ci(fr, good)}; false passes {_ci(fp, bad)}; "
              f"passed {sum(r[rule] for r in rows)}/{len(rows)}")
    print("  per pair, false rejects of the shipped gate / of the pooled one (of rounds better on s09+s10):")
    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    cells = []
    for p, rs in by_pair.items():
        s, good, _, _ = _rates(rs, "shipped")
        q = _rates(rs, "pooled")[0]
        cells.append(f"{p} {s}/{q} of {good}")
    for i in range(0, len(cells), 4):
        print("    " + "   ".join(cells[i:i + 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
