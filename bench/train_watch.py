"""Research script: train on the watch shoulder-exercise data, compare FP32 vs INT8.

Data: /work/shared/data/watch_shoulder_exercise (see its README.md): 6-axis
smartwatch IMU at 50 Hz, 10 subjects (device_id s01..s10), 7 exercises, each
done once with each arm; recordings are separated by 5 s gaps in ``ts``.

Protocol (leave-subject-out, as the study's "unseen subjects" figure):

* train on s01-s08, evaluate on the held-out s09 and s10;
* windows and features come from ``edge_agent.preprocess`` (the code the
  devices run); normalization statistics are fitted on the training subjects;
* training windows may use a smaller hop than serving (``--train-hop``, data
  augmentation); evaluation always uses the serving params;
* arm-mirror augmentation (``--mirror``, default on): every training window is
  also added mirrored to the other arm.  Per-recording means show that
  between the left and the right wrist ``ax`` changes sign while ``ay``/``az``
  keep theirs (e.g. TRAP: ax = +0.99 g left, -1.02 g right), i.e. the two
  arms are mirror images through the watch's y-z plane.  A reflection negates
  that component of the accelerometer (a polar vector) and the two other
  components of the gyroscope (an axial vector): (ax, ay, az, wx, wy, wz) ->
  (-ax, ay, az, wx, -wy, -wz);
* the FP32 ONNX model is quantized to INT8 (static QDQ) with real training
  windows' features as calibration data;
* both are evaluated in onnxruntime with 1 intra-op thread: accuracy, bytes,
  median batch-of-1 latency (FP32 and INT8 measured alternately, several
  rounds, median of the rounds' medians).

Targets: INT8 accuracy >= 87.3% and within 1 point of FP32; INT8 bytes
<= 35% of FP32; INT8 not slower per window than FP32.

Usage: python bench/train_watch.py [--help]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.models.quantize import INTEGER_OPS, evaluate, op_counts, quantize_int8
from cloud_hub.models.training import TrainConfig, export_onnx, train
from edge_agent.preprocess import (
    PreprocessParams,
    WindowBatch,
    extract_features,
    fit_normalization,
    make_windows,
)

DATA = Path("/work/shared/data/watch_shoulder_exercise/watch_shoulder_exercise.csv")
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
MIRROR = np.array([-1, 1, 1, 1, -1, -1], np.float32)
TRAIN_SUBJECTS = tuple(f"s{i:02d}" for i in range(1, 9))
TEST_SUBJECTS = ("s09", "s10")
STUDY_ACCURACY = 0.873


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ts float64[n], device_id str[n], values float32[n, 6], label str[n]."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        expected = ["ts", "device_id", *CHANNELS, "label"]
        if header != expected:
            raise SystemExit(f"unexpected header {header}, expected {expected}")
        rows = list(reader)
    cols = list(zip(*rows, strict=True))
    ts = np.array(cols[0], dtype=np.float64)
    dev = np.array(cols[1])
    values = np.array(cols[2:8], dtype=np.float32).T.copy()
    label = np.array(cols[8])
    return ts, dev, values, label


def windows(data, subjects, params: PreprocessParams) -> WindowBatch:
    ts, dev, values, label = data
    out = []
    for s in subjects:
        m = dev == s
        if not m.any():
            raise SystemExit(f"no rows for subject {s}")
        out.append(make_windows(ts[m], values[m], label[m], params))
    return WindowBatch.concat(out)


def _per_channel(onnx_bytes: bytes) -> bool:
    """True when some DequantizeLinear has an axis (per-channel weight scales)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return any(
        a.name == "axis" for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--window", type=float, default=2.5, help="window length, s")
    ap.add_argument("--hop", type=float, default=0.5, help="serving (evaluation) hop, s")
    ap.add_argument("--train-hop", type=float, default=0.5, help="training hop, s")
    ap.add_argument("--features", default="stats-v1")
    ap.add_argument("--fft-max-hz", type=float, default=None)
    ap.add_argument("--hidden", default=",".join(map(str, TrainConfig.hidden)), help="hidden layer sizes")
    ap.add_argument("--alpha", type=float, default=TrainConfig.alpha)
    ap.add_argument("--epochs", type=int, default=TrainConfig.max_iter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mirror", dest="mirror", action="store_false")
    ap.add_argument(
        "--per-channel",
        choices=("auto", "on", "off"),
        default="auto",
        help="per-output-unit INT8 weight scales (auto: only where it helps)",
    )
    ap.add_argument("--runs", type=int, default=500, help="latency runs per round")
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds (FP32/INT8 alternate)")
    ap.add_argument("--out", type=Path, default=None, help="write fp32.onnx, int8.onnx, params.json here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    data = load(args.data)
    t_load = time.perf_counter() - t0
    ts, dev, values, _ = data
    params = PreprocessParams(
        sample_rate_hz=50.0,
        window_s=args.window,
        hop_s=args.hop,
        channels=CHANNELS,
        features=args.features,
        fft_max_hz=args.fft_max_hz,
    )
    params = params.with_normalization(*fit_normalization(values[np.isin(dev, TRAIN_SUBJECTS)]))
    train_params = dataclasses.replace(params, hop_s=args.train_hop)

    t0 = time.perf_counter()
    btr = windows(data, TRAIN_SUBJECTS, train_params)
    bte = windows(data, TEST_SUBJECTS, params)
    assert btr.labels is not None and bte.labels is not None
    Xtr = extract_features(btr.data, params)
    ytr = btr.labels
    yte = bte.labels
    if args.mirror:
        Xtr = np.concatenate([Xtr, extract_features(btr.data * MIRROR, params)])
        ytr = np.concatenate([ytr, ytr])
    Xte = extract_features(bte.data, params)
    t_feat = time.perf_counter() - t0

    cfg = TrainConfig(
        hidden=tuple(int(h) for h in args.hidden.split(",")), alpha=args.alpha, max_iter=args.epochs
    )
    t0 = time.perf_counter()
    model = train(Xtr, ytr, seed=args.seed, config=cfg)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp32 = export_onnx(model, Xtr.shape[1])
    per_channel = {"auto": None, "on": True, "off": False}[args.per_channel]
    # Calibration: the real (not mirrored) training windows' features.
    int8 = quantize_int8(fp32, Xtr[: len(btr)], per_channel=per_channel, seed=args.seed)
    t_quant = time.perf_counter() - t0

    # Accuracy/bytes once, latency in alternating rounds (the machine may be shared).
    res = {
        "fp32": evaluate(fp32, Xte, yte, latency_runs=args.runs),
        "int8": evaluate(int8, Xte, yte, latency_runs=args.runs),
    }
    lat = {"fp32": [res["fp32"]["latency_ms"]], "int8": [res["int8"]["latency_ms"]]}
    for _ in range(args.rounds - 1):
        for name, blob in (("fp32", fp32), ("int8", int8)):
            lat[name].append(evaluate(blob, Xte[:200], yte[:200], latency_runs=args.runs)["latency_ms"])
    for name in lat:
        res[name]["latency_ms"] = statistics.median(lat[name])

    # Single-window feature extraction on the device (numpy), for context.
    one = bte.data[:1]
    extract_features(one, params)
    t0 = time.perf_counter()
    for _ in range(200):
        extract_features(one, params)
    feat_ms = (time.perf_counter() - t0) / 200 * 1e3

    stored = op_counts(int8)
    scale_mode = "per-channel" if _per_channel(int8) else "per-tensor"
    optimized = op_counts(int8, optimized=True)
    integer = {k: v for k, v in optimized.items() if k in INTEGER_OPS}
    float_layers = {k: v for k, v in optimized.items() if k in ("Gemm", "FusedGemm", "MatMul", "MatMulNBits")}

    mlp = model[-1]
    n_train_subj = len(TRAIN_SUBJECTS)
    print(f"data: {len(ts)} rows, {len(np.unique(dev))} subjects (load {t_load:.1f}s)")
    print(
        f"params: window {params.window_s}s ({params.window_size} samples), serving hop {params.hop_s}s, "
        f"training hop {train_params.hop_s}s, features {params.features} ({params.n_features}), "
        f"mirror augmentation {'on' if args.mirror else 'off'}"
    )
    print(
        f"train: {n_train_subj} subjects, {len(Xtr)} windows ({btr.dropped} dropped); "
        f"test s09+s10: {len(Xte)} windows ({bte.dropped} dropped)"
    )
    print(
        f"model: MLP {Xtr.shape[1]}->{'->'.join(str(h) for h in cfg.hidden)}->{len(mlp.classes_)}, "
        f"alpha {cfg.alpha}, {mlp.n_iter_} epochs, seed {args.seed}"
    )
    print(
        f"time: features {t_feat:.1f}s, training {t_train:.1f}s, export+quantization {t_quant:.1f}s; "
        f"device feature extraction {feat_ms:.2f} ms/window"
    )
    print(f"INT8 graph: weight scales {scale_mode}; stored {stored}")
    print(
        f"INT8 graph as run by onnxruntime: integer kernels {integer}, float GEMMs {float_layers or 'none'}"
    )
    print()
    print(f"{'':6s} {'accuracy':>9s} {'bytes':>10s} {'latency (median, 1 thread)':>28s}")
    for name in ("fp32", "int8"):
        r = res[name]
        print(
            f"{name.upper():6s} {r['accuracy'] * 100:8.2f}% {r['bytes']:10d} {r['latency_ms'] * 1e3:25.1f} us"
        )
    f, q = res["fp32"], res["int8"]
    ratio = q["bytes"] / f["bytes"]
    speedup = f["latency_ms"] / q["latency_ms"]
    print(f"INT8/FP32: bytes {ratio * 100:.1f}%, speed-up {speedup:.2f}x, latency rounds {lat}")
    checks = {
        f"INT8 accuracy >= {STUDY_ACCURACY:.1%}": q["accuracy"] >= STUDY_ACCURACY,
        "INT8 within 1 point of FP32": abs(q["accuracy"] - f["accuracy"]) <= 0.01,
        "INT8 bytes <= 35% of FP32": ratio <= 0.35,
        "INT8 not slower than FP32": q["latency_ms"] <= f["latency_ms"],
        "integer kernels, no float GEMM": bool(integer) and not float_layers,
    }
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp32.onnx").write_bytes(fp32)
        (args.out / "int8.onnx").write_bytes(int8)
        (args.out / "params.json").write_text(json.dumps(params.to_dict(), indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
