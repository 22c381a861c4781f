"""Benchmark: how often the agent refuses a good model for non-finite outputs, on the watch recordings.

    python bench/model_refusal.py                # 10 models x 6 conditions, ~6 min
    python bench/model_refusal.py --holdouts s01,s02 --seed 1

The agent refuses a model for good when one of its batches gives a non-finite output
(:meth:`edge_agent.runner.ModelRunner.predict` raises ``ModelError``; the model slot refuses its sha256 and
the model before it serves again). Two kinds of error:

* **a good model refused**: a fleet would lose a new version on a device for nothing. Models trained as
  ``cloud-hub train`` trains (each subject s01..s10 held out in turn, INT8), each run as the agent runs it
  (``DeviceWindowers``, ``extract_features``, ``ModelRunner.predict`` on each chunk's windows) over the whole
  recording, all ten subjects, clean and with the faults a worn sensor has. Faults come in bursts, clustered by
  device and in time (each device's bursts start at random, 0.5-30 s long, covering ~10 % of its time):
  ``spike`` (readings x1000: a loose connector), ``rail`` (readings at float32's largest, +-3.4e38: their
  windows are dropped before inference, as the agent drops them, so a rail's figure counts the windows left),
  ``dropout`` (no readings: NaN), ``stuck`` (a channel frozen at one value: no variance), ``zeros``
  (a sensor reset);
* **a bad model kept**: each model made hostile the way a hostile peer's test does (its probabilities plus
  sqrt(-|x|) summed over the features: 0 on the warm-up's zeros, NaN on real readings). Counted: refused at
  its first batch of the clean recording.

Printed per model: batches and windows run per condition, batches refused; then both error rates, with a
95 % upper bound (the rule of three) where none was seen. Data: /work/shared/data/watch_shoulder_exercise
(absent: the bench says so and exits 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.models import datasets, lifecycle
from edge_agent.contract import Bundle
from edge_agent.preprocess import DeviceWindowers, extract_features
from edge_agent.preprocess.features import computed_rows
from edge_agent.runner import ModelError, ModelRunner
from edge_agent.sources import read_log

DATA = Path("/work/shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv")
SUBJECTS = [f"s{i:02d}" for i in range(1, 11)]
FAULTS = ("spike", "rail", "dropout", "stuck", "zeros")
F32_MAX = float(np.finfo(np.float32).max)
COVER = 0.10  # share of each device's time in fault bursts


def recording(path: Path, channels: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every device's readings (ts, values in ``channels`` order), in file order."""
    reader = read_log(path)
    cols = np.array([reader.channels.index(ch) for ch in channels])
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for chunk in reader:
        for device, (ts, values, _labels) in chunk.by_device().items():
            parts.setdefault(device, []).append((ts, values[:, cols]))
    return {d: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) for d, ps in parts.items()}


def with_faults(rec: dict[str, tuple[np.ndarray, np.ndarray]], kind: str, seed: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``rec`` with bursts of ``kind`` faults: per device, bursts of 0.5-30 s at random starts until they cover
    :data:`COVER` of its time; each burst hits one channel or all (half and half)."""
    rng = np.random.default_rng(seed)
    out = {}
    for device, (ts, values) in rec.items():
        v = values.copy()
        span = float(ts[-1] - ts[0])
        covered = 0.0
        while covered < COVER * span:
            length = float(rng.uniform(0.5, 30.0))
            t0 = float(rng.uniform(ts[0], ts[-1]))
            rows = np.flatnonzero((ts >= t0) & (ts < t0 + length))
            covered += length
            if not len(rows):
                continue
            cols = np.arange(v.shape[1]) if rng.random() < 0.5 else rng.integers(v.shape[1], size=1)
            at = np.ix_(rows, cols)
            if kind == "spike":
                v[at] *= 1000.0
            elif kind == "rail":
                v[at] = np.where(rng.random((len(rows), 1)) < 0.5, -F32_MAX, F32_MAX)
            elif kind == "dropout":
                v[at] = np.nan
            elif kind == "stuck":
                v[at] = v[rows[0], cols]
            elif kind == "zeros":
                v[at] = 0.0
        out[device] = (ts, v)
    return out


def outcomes(runner: ModelRunner, rec: dict[str, tuple[np.ndarray, np.ndarray]], chunk_s: float = 5.0
             ) -> Iterator[tuple[int, bool]]:
    """The agent's path over ``rec``, ``chunk_s`` of every device at a time: (windows, refused) per batch, one
    batch per device and chunk (a device's agent infers its own windows). Windows that cover a reading out of range
    (``MAX_NORMALIZED``) are dropped before inference, as the agent drops them."""
    windowers = DeviceWindowers(runner.params)
    t_end = max(float(ts[-1]) for ts, _ in rec.values())
    t = min(float(ts[0]) for ts, _ in rec.values())
    while t <= t_end:
        per_device = {}
        for device, (ts, values) in rec.items():
            lo, hi = np.searchsorted(ts, [t, t + chunk_s])
            if hi > lo:
                per_device[device] = (ts[lo:hi], values[lo:hi], None)
        for _, batch in windowers.push(per_device):
            feats = extract_features(batch, runner.params)
            feats = feats[computed_rows(feats)]  # out of range: dropped and counted, as the agent does
            if len(feats):
                try:
                    runner.predict(feats)
                except ModelError:
                    yield len(feats), True
                else:
                    yield len(feats), False
        t += chunk_s


def hostile(bundle: Bundle, version: int | None = None) -> Bundle:
    """``bundle`` plus sqrt(-|x|) summed over its features: 0 on the zeros of the agent's warm-up, NaN on anything
    else (a hostile peer's model), as ``version`` if given (tests/test_live_sources_e2e.py serves it too)."""
    import onnx
    from onnx import helper

    m = onnx.load_from_string(bundle.model)
    g = m.graph
    out = next((o for o in g.output if "prob" in o.name.lower()), g.output[-1]).name
    for node in g.node:
        node.output[:] = [out + "_orig" if o == out else o for o in node.output]
        node.input[:] = [out + "_orig" if i == out else i for i in node.input]
    g.node.extend([helper.make_node("Abs", [g.input[0].name], ["h_abs"]), helper.make_node("Neg", ["h_abs"], ["h_neg"]),
                   helper.make_node("Sqrt", ["h_neg"], ["h_sqrt"]),
                   helper.make_node("ReduceSum", ["h_sqrt"], ["h_sum"], keepdims=1),
                   helper.make_node("Add", [out + "_orig", "h_sum"], [out])])
    model = m.SerializeToString()
    return Bundle(dataclasses.replace(bundle.manifest, version=bundle.manifest.version if version is None else version,
                                      sha256=hashlib.sha256(model).hexdigest()), model)


def upper(errors: int, n: int) -> str:
    return f"{errors / n:.3%}" if errors else f"0 (95 % upper bound {3 / n:.4%})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--holdouts", default=",".join(SUBJECTS))
    ap.add_argument("--seed", type=int, default=0, help="the faults' draw")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"no data at {args.data}: nothing measured")
        return 0
    t0 = time.perf_counter()
    holdouts = args.holdouts.split(",")
    totals = {"batches": 0, "windows": 0, "refused": 0, "models refused": 0, "runs": 0}
    caught = 0
    recs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    print(f"{'hold-out':8s} {'INT8':>6s}  " + "  ".join(f"{k:>14s}" for k in ("clean", *FAULTS)) + "  hostile")
    for h in holdouts:
        ds = datasets.dataset_from_logs([str(args.data)], window_s=None, hop_s=None, holdout=[h])
        train, test = datasets.split(ds, [h])
        bundle, _fp32, int8, _blob = lifecycle.build(train, test, name="default", version=1,
                                                     config=datasets.default_config(ds.params))
        runner = ModelRunner(bundle)
        if not recs:
            recs["clean"] = recording(args.data, runner.params.channels)
            for i, kind in enumerate(FAULTS):
                recs[kind] = with_faults(recs["clean"], kind, args.seed * 100 + i)
        cells = []
        for rec in recs.values():
            seen = list(outcomes(runner, rec))
            batches, windows, refused = len(seen), sum(w for w, _ in seen), sum(r for _, r in seen)
            totals["batches"] += batches
            totals["windows"] += windows
            totals["refused"] += refused
            totals["models refused"] += refused > 0
            totals["runs"] += 1
            cells.append(f"{refused:>3d}/{batches:<4d}({windows:>5d})")
        hit = next(outcomes(ModelRunner(hostile(bundle)), recs["clean"]))[1]
        caught += hit
        print(f"{h:8s} {100 * int8['accuracy']:5.1f}%  " + "  ".join(f"{c:>14s}" for c in cells)
              + f"  {'refused' if hit else 'KEPT'}", flush=True)
    print("cells: batches refused / batches run (windows run)")
    print(f"good models refused: {totals['models refused']} of {totals['runs']} runs "
          f"({len(holdouts)} models x {len(recs)} conditions); batches refused: "
          f"{upper(totals['refused'], totals['batches'])} of {totals['batches']:,} "
          f"({totals['windows']:,} windows)")
    print(f"hostile models kept: {len(holdouts) - caught} of {len(holdouts)} (refused at their first batch: {caught}) "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if totals["refused"] == 0 and caught == len(holdouts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
