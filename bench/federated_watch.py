"""Research script: federated rounds on the watch shoulder-exercise data, in process (no MQTT).

Protocol
--------
* Windows and features exactly as ``cloud-hub train`` makes them by default
  (``datasets.dataset_from_logs``: 2.5 s windows every 0.5 s, ``stats-v1``, 99 features, no mirror).
* Devices: s01-s08, one per subject, each training on all its own windows. s09, s10 are held out
  and never used for choosing anything (``--study`` tunes on s01-s06 with s07, s08 as validation).
* First model: trained centrally (``training.train``, default config) on ONE subject, s01 (``--init``):
  the hub's pilot recordings; its preprocessing normalization is fitted on s01 only, as the hub would
  (the other devices' data never reaches it). s01 is also one of the 8 devices.
* Each round every device (or a random 70 % with ``--dropout 0.3``) fine-tunes the current master on
  its windows (``edge_agent.device.learn.fine_tune``: SGD, momentum 0.9, lr 0.03, 5 local epochs, batch 64, L2
  with the central training's effective strength ``alpha * 64 / 256``), sends its delta as INT8 (or FP32) and its activation
  ranges; the hub aggregates (FedAvg weighted by windows, ``cloud_hub.rounds.fedavg.aggregate``), re-quantizes
  to static INT8 from the merged ranges (``quantize_from_ranges``: no data at the hub) and the INT8
  model is evaluated on s09, s10 in onnxruntime (``quantize.evaluate``).
* Reference: ``training.train`` on s01-s08 with the same defaults (normalization fitted on s01-s08,
  as ``cloud-hub train --holdout-devices s09,s10``), INT8 by ``quantize_int8`` on its training rows.
* Reported: INT8 accuracy on s09, s10 averaged over rounds 30-40 (11 rounds) and the seeds.

Local optimizer study (``--study``: 15 rounds, s01-s06 as devices, validation s07, s08, FP32): SGD
momentum 0.9 lr 0.1 E=5 85.3 %; SGD lr 0.03 E=5 83.4 %; Adam (restarted each round) at best 80.2 %
(lr 3e-3 E=2) with the central L2 and 83.8 % without it; batch 32/64/128 within 2 points. lr 0.1 won
the 15-round study but diverged (NaN) in the 40-round runs on all 8 devices, so the default is 0.03.

Upload bytes: an INT8 delta is its int8 values + a float32 scale per tensor (raw, no container); an
FP32 delta 4 bytes a value; features as the agent sends them (orjson of ``feats.tolist()``: no
rounding, float32 values printed as float64) for each of the device's windows in a round's span.

Usage: python bench/federated_watch.py [--quick] [--configs fedavg,fedprox,...] [--jobs 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path("/work/shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv")
DEVICES = tuple(f"s{i:02d}" for i in range(1, 9))
TEST = ("s09", "s10")
ALL = DEVICES + TEST


@dataclass(frozen=True)
class Config:
    name: str
    epochs: float = 2.0
    lr: float = 1e-3
    batch: int = 64
    optimizer: str = "adam"
    mu: float = 0.0
    int8: bool = True
    dropout: float = 0.0
    train_layers: int | None = None
    alpha_scale: float = 1.0  # x the central training's effective L2 strength
    fp16: bool = False  # the devices get the master as a float16 announcement (federate's default) and train from it


def configs(args: argparse.Namespace) -> dict[str, Config]:
    base = dict(epochs=args.epochs, lr=args.lr, batch=args.batch, optimizer=args.optimizer)
    return {
        "fedavg": Config("fedavg", **base),
        "fedprox": Config("fedprox", mu=args.mu, **base),
        "fp32": Config("fp32", int8=False, **base),
        "fp16": Config("fp16", fp16=True, **base),
        "dropout": Config("dropout", dropout=0.3, **base),
        "layers": Config(f"layers{args.train_layers}", train_layers=args.train_layers, **base),
    }


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def load(init: str) -> dict:
    from cloud_hub.models import datasets

    # the federated world: normalization fitted on the pilot subject only
    fed = datasets.dataset_from_logs([str(DATA)], window_s=None, hop_s=None,
                                      holdout=[d for d in ALL if d != init])
    central = datasets.dataset_from_logs([str(DATA)], window_s=None, hop_s=None, holdout=list(TEST))
    return {"fed": fed, "central": central}


def _blas1():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# ----------------------------------------------------------------------------- runs


def central(seed: int) -> dict:
    from cloud_hub.models import quantize, training
    data = load(ARGS.init)["central"]
    tr, te = ~np.isin(data.devices, TEST), np.isin(data.devices, TEST)
    with _blas1():
        t0 = time.perf_counter()
        model = training.train(data.X[tr], data.y[tr], seed=seed)
        seconds = time.perf_counter() - t0
        fp32 = training.export_onnx(model, data.X.shape[1])
        int8 = quantize.quantize_int8(fp32, data.X[tr], seed=seed)
        return {"seed": seed, "fp32": quantize.evaluate(fp32, data.X[te], data.y[te], latency_runs=1)["accuracy"],
                "int8": quantize.evaluate(int8, data.X[te], data.y[te], latency_runs=1)["accuracy"],
                "bytes": len(int8), "seconds": seconds}


def federated(cfg: Config, seed: int, rounds: int, devices: tuple[str, ...] = DEVICES,
              evaluate_on: tuple[str, ...] = TEST, eval_from: int = 30, int8_eval: bool = True) -> dict:
    from cloud_hub.models import quantize, training
    from cloud_hub.rounds import fedavg
    from edge_agent.device import learn

    data = load(ARGS.init)["fed"]
    with _blas1():
        init = data.devices == ARGS.init
        pilot = training.train(data.X[init], data.y[init], seed=seed)
        classes = [str(c) for c in pilot[-1].classes_]
        yi = np.array([classes.index(c) for c in data.y])
        alpha = training.TrainConfig().alpha * cfg.alpha_scale * cfg.batch / training.TrainConfig().batch_size
        master = fedavg.mlp_tensors(pilot)
        rng = np.random.default_rng(seed)
        te = np.isin(data.devices, evaluate_on)
        curve, up_bytes, t_round, t_dev, t_hub = {}, [], [], [], []

        def score(tensors, ranges) -> float:
            if not int8_eval:
                return float(np.mean(learn.predict(tensors, "classification", data.X[te]).argmax(1) == yi[te]))
            fp32 = training.export_onnx(fedavg.with_tensors(pilot, tensors), data.X.shape[1])
            int8 = fedavg.quantize_from_ranges(fp32, fedavg.merge_ranges(ranges))
            return quantize.evaluate(int8, data.X[te], data.y[te], latency_runs=1, warmup=0)["accuracy"]

        curve[0] = score(master, [learn.activation_ranges(master, data.X[data.devices == d]) for d in devices])
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            active = [d for d in devices if rng.random() >= cfg.dropout] or [devices[int(rng.integers(len(devices)))]]
            updates, ranges = [], []
            for i, d in enumerate(active):
                m = data.devices == d
                base = {k: v.astype(np.float16).astype(np.float32) for k, v in master.items()} if cfg.fp16 else master
                res = learn.fine_tune(base, "classification", data.X[m], yi[m], epochs=cfg.epochs, lr=cfg.lr,
                                      batch=cfg.batch, mu=cfg.mu, alpha=alpha, train_layers=cfg.train_layers,
                                      optimizer=cfg.optimizer, seed=seed * 100_000 + r * 100 + i)
                t_dev.append(res.seconds)
                delta, size = _on_the_wire(res, "int8" if cfg.int8 else "float32", r, d)
                up_bytes.append(size)
                updates.append(fedavg.Contribution(delta, res.n))
                ranges.append(res.ranges)
            t1 = time.perf_counter()
            master = fedavg.aggregate(master, updates)
            if r >= eval_from or r % 5 == 0 or r == rounds:
                curve[r] = score(master, ranges)
            t_hub.append(time.perf_counter() - t1)
            t_round.append(time.perf_counter() - t0)
    final = [curve[r] for r in curve if r >= eval_from] or [curve[rounds]]
    return {"config": cfg.name, "seed": seed, "acc": statistics.mean(final), "curve": curve,
            "bytes_per_device_round": statistics.mean(up_bytes), "round_s": statistics.mean(t_round),
            "device_s": statistics.mean(t_dev), "hub_s": statistics.mean(t_hub)}


def _job(job: tuple) -> dict:
    kind, *rest = job
    return central(*rest) if kind == "central" else federated(*rest)


# ----------------------------------------------------------------------------- device-side figures


def _on_the_wire(res, encoding: str, round_id: int, device: str) -> tuple[dict, int]:
    """The delta as the hub gets it (the contract's update, encoded and decoded) and the payload's bytes."""
    from edge_agent.contract import round_updates as cu

    specs, arrays = cu.encode_update_delta(res.delta, encoding)
    payload = cu.Update(round_id, device, "default", 1, res.n, res.loss_before, res.loss_after, res.metric_before,
                        res.metric_after, res.norm, int(res.epochs), res.seconds,
                        tuple(tuple(x) for x in res.ranges), encoding, specs, arrays, time.time()).encode()
    return cu.decode_update(payload).dequantized(), len(payload)


DEVICE_SCRIPT = r"""
import sys, time, numpy as np
from edge_agent.device import learn
z = np.load(sys.argv[1])
t = {k[2:]: z[k] for k in z.files if k.startswith("t_")}
r = learn.fine_tune(t, "classification", z["X"], z["y"], epochs=float(sys.argv[2]), lr=0.03, batch=64, alpha=0.025)
from edge_agent.contract import round_updates as cu
q = cu.encode_update_delta(r.delta, "int8")
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
mods = sorted(m.split(".")[0] for m in sys.modules)
print(int(hwm), r.seconds, "sklearn" in mods or "onnxruntime" in mods or "cloud_hub" in mods)
"""


def device_rss(epochs: float) -> dict:
    """Peak RSS of a process that imports only numpy + edge_agent.device.learn and fine-tunes the largest device."""
    import tempfile

    from cloud_hub.models import training
    from cloud_hub.rounds import fedavg
    data = load(ARGS.init)["fed"]
    big = max(DEVICES, key=lambda d: int(np.sum(data.devices == d)))
    init = data.devices == ARGS.init
    with _blas1():
        pilot = training.train(data.X[init], data.y[init], seed=0)
    classes = [str(c) for c in pilot[-1].classes_]
    m = data.devices == big
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dev.npz"
        np.savez(path, X=data.X[m], y=np.array([classes.index(c) for c in data.y[m]]),
                 **{f"t_{k}": v for k, v in fedavg.mlp_tensors(pilot).items()})
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(path), str(epochs)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    return {"device": big, "windows": int(m.sum()), "peak_rss_mb": int(out[0]) / 1024, "seconds": float(out[1]),
            "heavy_imports": out[2] == "True"}


def features_json_bytes() -> float:
    """Bytes a window's features take in a result message, as the agent sends them."""
    import orjson

    data = load(ARGS.init)["fed"]
    rows = data.X[data.devices == DEVICES[0]]
    return statistics.mean(len(orjson.dumps({"features": list(tuple(r.tolist()))})) - len(b'{"features":}')
                           for r in rows)


# ----------------------------------------------------------------------------- main


def study(args: argparse.Namespace) -> None:
    """Local optimizer/epochs/lr on s01-s06, validated on s07, s08 (FP32, 15 rounds): never s09, s10."""
    # stage 1 (printed in the docstring's study notes): optimizer x lr x epochs, batch, L2 strength
    grid = [Config(f"{o} lr={lr:g} E={e:g} B={b}", epochs=e, lr=lr, batch=b, optimizer=o)
            for o, lr in (("adam", 3e-4), ("adam", 1e-3), ("adam", 3e-3), ("sgd", 0.01), ("sgd", 0.03))
            for e in (1, 2, 5) for b in (64,)]
    grid += [Config("adam lr=0.001 E=2 B=32", epochs=2, lr=1e-3, batch=32),
             Config("adam lr=0.001 E=2 B=128", epochs=2, lr=1e-3, batch=128),
             Config("adam lr=0.001 E=2 alpha x0", epochs=2, lr=1e-3, alpha_scale=0.0),
             Config("adam lr=0.001 E=2 alpha x4", epochs=2, lr=1e-3, alpha_scale=4.0)]
    if args.stage == 2:  # around stage 1's best: no L2, SGD lr, more epochs
        grid = [Config(f"{o} lr={lr:g} E={e:g} alpha x{a:g}", epochs=e, lr=lr, optimizer=o, alpha_scale=a)
                for o, lr, e, a in (("sgd", 0.03, 5, 0.0), ("sgd", 0.1, 2, 1.0), ("sgd", 0.1, 5, 1.0),
                                    ("sgd", 0.1, 5, 0.0), ("sgd", 0.03, 10, 1.0), ("adam", 3e-3, 5, 0.0),
                                    ("adam", 1e-3, 5, 0.0), ("sgd", 0.1, 2, 0.0))]
    jobs = [("fed", c, 0, 15, DEVICES[:6], DEVICES[6:], 10, False) for c in grid]
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(args,)) as ex:
        for c, res in zip(grid, ex.map(_job, jobs), strict=True):
            print(f"{c.name:32s} val s07,s08 rounds 10-15: {res['acc'] * 100:6.2f}%  "
                  f"round 5: {res['curve'][5] * 100:6.2f}%  device {res['device_s']:.2f}s", flush=True)


ARGS = argparse.Namespace(init="s01")


def _pct(values: list[float]) -> str:
    return " ".join(f"{v * 100:.2f}" for v in values)


def _init(args: argparse.Namespace) -> None:
    global ARGS
    ARGS = args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds, 1 seed, fedavg only")
    ap.add_argument("--study", action="store_true", help="tune the local optimizer on s01-s08 only")
    ap.add_argument("--stage", type=int, default=1, help="--study stage (1: broad grid, 2: around its best)")
    ap.add_argument("--configs", default="fedavg,fedprox,fp32,dropout,layers")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--init", default="s01", help="the subject the first model is trained on")
    ap.add_argument("--epochs", type=float, default=5.0, help="local epochs per round")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--optimizer", default="sgd", choices=("adam", "sgd"))
    ap.add_argument("--mu", type=float, default=0.1, help="FedProx mu")
    ap.add_argument("--train-layers", type=int, default=1)
    ap.add_argument("--no-central", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    _init(args)
    if args.study:
        study(args)
        return 0
    if args.quick:
        args.rounds, args.seeds = 5, 1
        args.configs = "fedavg" if args.configs == ap.get_default("configs") else args.configs
    eval_from = 30 if args.rounds >= 40 else max(1, args.rounds - 2)
    cfgs = configs(args)
    chosen = [cfgs[c] for c in args.configs.split(",")]
    seeds = list(range(args.seeds))
    jobs: list[tuple] = [] if args.no_central else [("central", s) for s in seeds]
    jobs += [("fed", c, s, args.rounds, DEVICES, TEST, eval_from, True) for c in chosen for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(args,)) as ex:
        results = list(ex.map(_job, jobs))
    wall = time.perf_counter() - t0
    rss = device_rss(args.epochs)
    feat = features_json_bytes()
    data = load(args.init)["fed"]
    windows = {d: int(np.sum(data.devices == d)) for d in DEVICES}

    cen = [r for r in results if "int8" in r]
    fed = [r for r in results if "config" in r]
    summary: dict = {"rounds": args.rounds, "seeds": args.seeds, "eval_rounds": f"{eval_from}-{args.rounds}",
                     "init": args.init, "local": {"epochs": args.epochs, "lr": args.lr, "batch": args.batch,
                                                  "optimizer": args.optimizer}, "wall_s": round(wall, 1)}
    print(f"devices {', '.join(DEVICES)} ({sum(windows.values())} windows), held out {', '.join(TEST)}; "
          f"first model trained on {args.init}; {args.rounds} rounds, seeds {seeds}; "
          f"local: {args.optimizer} lr {args.lr:g}, {args.epochs:g} epochs, batch {args.batch}")
    print(f"{'':24s} {'INT8 acc s09,s10':>17s} {'per seed':>16s} {'upload B/dev/round':>19s} "
          f"{'round s':>8s} {'device s':>9s}")
    if cen:
        acc = statistics.mean(r["int8"] for r in cen)
        summary["central"] = {"int8": acc, "fp32": statistics.mean(r["fp32"] for r in cen),
                              "per_seed": [r["int8"] for r in cen]}
        print(f"{'central (train s01-s08)':24s} {acc * 100:16.2f}% "
              f"{_pct([r['int8'] for r in cen]):>16s} {'-':>19s} "
              f"{statistics.mean(r['seconds'] for r in cen):7.1f}s (training)")
    for c in chosen:
        rs = [r for r in fed if r["config"] == c.name]
        acc = statistics.mean(r["acc"] for r in rs)
        b = statistics.mean(r["bytes_per_device_round"] for r in rs)
        summary[c.name] = {"int8": acc, "per_seed": [r["acc"] for r in rs], "bytes": b,
                           "round_s": statistics.mean(r["round_s"] for r in rs),
                           "device_s": statistics.mean(r["device_s"] for r in rs),
                           "hub_s": statistics.mean(r["hub_s"] for r in rs),
                           "curve": {k: round(statistics.mean(r["curve"][k] for r in rs), 4) for k in rs[0]["curve"]}}
        print(f"{c.name:24s} {acc * 100:16.2f}% {_pct([r['acc'] for r in rs]):>16s} "
              f"{b:19,.0f} {summary[c.name]['round_s']:7.2f}s {summary[c.name]['device_s']:8.2f}s")
    per_dev = statistics.mean(windows.values()) * feat
    summary["features_json"] = {"bytes_per_window": feat, "bytes_per_device_all_windows": per_dev}
    summary["device"] = rss
    print(f"features as JSON: {feat:.0f} B/window; a device's {statistics.mean(windows.values()):.0f} windows: "
          f"{per_dev:,.0f} B (every window once)")
    print(f"device fine-tune ({rss['device']}, {rss['windows']} windows, {args.epochs:g} epochs, numpy + learn only): "
          f"peak RSS {rss['peak_rss_mb']:.1f} MB, {rss['seconds']:.2f} s")
    for name in summary:
        if isinstance(summary[name], dict) and "curve" in summary[name]:
            print(f"curve {name}: " + " ".join(f"r{k}={v * 100:.1f}" for k, v in summary[name]["curve"].items()))
    checks = {}
    if cen and "fedavg" in summary:
        checks["fedavg within 2 points of central"] = summary["fedavg"]["int8"] >= summary["central"]["int8"] - 0.02
    if "fedavg" in summary and "fp32" in summary:
        checks["INT8 deltas within 0.5 point of FP32"] = abs(summary["fedavg"]["int8"] - summary["fp32"]["int8"]) <= 0.005
        checks["INT8 deltas >= 3.5x smaller"] = summary["fp32"]["bytes"] >= 3.5 * summary["fedavg"]["bytes"]
    if "fedavg" in summary and "dropout" in summary:
        checks["30% dropouts within 1 point"] = summary["dropout"]["int8"] >= summary["fedavg"]["int8"] - 0.01
    checks["device peak RSS <= 120 MB"] = rss["peak_rss_mb"] <= 120 and not rss["heavy_imports"]
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    summary["checks"] = checks
    print(json.dumps(summary, default=float))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
