"""INT8 post-training static quantization of the exported models, and evaluation.

Format choice
-------------
``quantize_int8`` uses ``onnxruntime.quantization.quantize_static`` in the
**QDQ** format (QuantizeLinear/DequantizeLinear pairs around float ops):

* it is the format onnxruntime recommends and optimizes: at session creation
  the graph optimizer fuses each ``Q -> DQ -> Gemm -> Q`` group into an
  integer kernel (``com.microsoft.QGemm``: u8 activations x s8 weights, int32
  accumulation, VNNI/AVX2/NEON paths), so a device runs integer arithmetic,
  while the file stays a standard-opset ONNX graph that any runtime or viewer
  can read (QOperator format would hard-code onnxruntime's contrib ops);
* weights are stored as int8 initializers (bias int32), so the artifact is
  ~1/4 of the FP32 one;
* ops that are not quantized (the input standardization ``Sub``/``Mul``,
  ``Softmax``, ``ArgMax`` and the label lookup) simply stay float.

*Static* (calibrated) rather than dynamic quantization: dynamic quantization
computes activation ranges at run time, which for batch-of-one inference costs
more than it saves (2.4x slower than FP32 on a 1D CNN on this project's 2-core
machine, where static QDQ was 2-4x faster).  Activation ranges are calibrated
offline (MinMax) on REAL training windows' features.  Activations are uint8,
weights int8 (the u8s8 layout of the fast kernels).  ``Relu`` is quantized
too, which folds its range into the preceding GEMM's output, so consecutive
layers chain uint8 -> uint8 with a single Quantize at the input and a single
Dequantize before the softmax.

Weight scales are per layer or per output unit, whichever the calibration
data says is needed (see ``quantize_int8``).  INT8 pays only where the model
is compute-bound: for a 99->512->512->7 MLP it is ~1.8x faster per window
than FP32 with per-layer scales (~1.4x per-unit); for a 36->64->64 MLP it is
slower (fixed Q/DQ overhead), so keep hidden layers of a few hundred units.
"""

from __future__ import annotations

import collections
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "evaluate",
    "op_counts",
    "quantize_int8",
    "session",
]

log = logging.getLogger(__name__)

#: Node types that show the quantized graph runs integer kernels.
INTEGER_OPS = frozenset(
    {
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QLinearConv",
        "ConvInteger",
        "QLinearAdd",
    }
)


def session(onnx_bytes: bytes, *, threads: int = 1, optimized_path: str | Path | None = None,
            lean: bool = False) -> Any:
    """An onnxruntime CPU session as on a small device (the device's own helper, so both agree).

    ``lean``: without onnxruntime's memory arena and memory patterns (the same graph, kernels and results:
    only how its buffers are allocated differs), for a process that scores a few hundred windows once and
    watches its peak memory (``federate``'s hold-out gate); slower per run, so not for ``train``."""
    from edge_agent.runner import cpu_session

    return cpu_session(onnx_bytes, threads=threads, lean=lean,
                       optimized_path=None if optimized_path is None else str(optimized_path))


class _Reader:
    """CalibrationDataReader over feature rows, in small batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 64):
        self._it = iter([{input_name: data[i : i + batch]} for i in range(0, data.shape[0], batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        raise NotImplementedError


def quantize_int8(
    fp32_bytes: bytes,
    calibration: np.ndarray,
    *,
    per_channel: bool | None = None,
    max_calibration: int = 2000,
    seed: int = 0,
) -> bytes:
    """Statically quantize an FP32 ONNX model (from ``training.export_onnx``) to INT8 QDQ.

    Args:
        fp32_bytes: the FP32 model.
        calibration: float32[n, f] REAL feature rows (training windows'
            features) used to calibrate activation ranges; at most
            ``max_calibration`` rows are used (a seeded random subset).
        per_channel: one weight scale per output unit (True), one per layer
            (False), or ``None`` (default): per-channel only where it helps,
            i.e. both are built and per-channel is kept only if it follows the
            FP32 model clearly better on the calibration rows (label
            disagreement lower by more than 0.5% of rows; for a regressor,
            mean error lower by more than 1% of the output spread).  Per-layer
            scales are cheaper to run (no per-column requantization in the
            integer GEMM: ~25% faster batch-of-1 on the watch MLP) and, with
            L2-regularized MLP weights, usually just as accurate.
    """
    cal, input_name = _check_calibration(fp32_bytes, calibration, max_calibration, seed)
    if per_channel is not None:
        return quantize_static(fp32_bytes, cal, input_name, per_channel)
    per_tensor = quantize_static(fp32_bytes, cal, input_name, False)
    channel = quantize_static(fp32_bytes, cal, input_name, True)
    ref = _outputs(fp32_bytes, cal)
    e_tensor, tol = _infidelity(ref, _outputs(per_tensor, cal))
    e_channel, _ = _infidelity(ref, _outputs(channel, cal))
    use_channel = e_channel + tol < e_tensor
    log.info(
        "INT8 weight scales: per-tensor error %.4f, per-channel error %.4f -> %s",
        e_tensor,
        e_channel,
        "per-channel" if use_channel else "per-tensor",
    )
    return channel if use_channel else per_tensor


def _check_calibration(
    fp32_bytes: bytes, calibration: np.ndarray, max_calibration: int, seed: int
) -> tuple[np.ndarray, str]:
    import onnx

    model = onnx.load_from_string(fp32_bytes)
    if len(model.graph.input) != 1:
        raise ValueError("expected a model with a single input")
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    n_features = dims[1].dim_value if len(dims) == 2 else 0
    cal = np.asarray(calibration, dtype=np.float32)
    if cal.ndim != 2 or cal.shape[0] == 0 or (n_features and cal.shape[1] != n_features):
        raise ValueError(f"calibration must be float32[n, {n_features or 'f'}] with n > 0, got {cal.shape}")
    if not np.all(np.isfinite(cal)):
        raise ValueError("calibration contains NaN or inf")
    if cal.shape[0] > max_calibration:
        idx = np.random.default_rng(seed).choice(cal.shape[0], max_calibration, replace=False)
        cal = cal[np.sort(idx)]
    return np.ascontiguousarray(cal), inp.name


def quantize_static(fp32_bytes: bytes, cal: np.ndarray, input_name: str, per_channel: bool,
              ranges: Callable[[Any], dict[str, tuple[float, float]]] | None = None) -> bytes:
    """Static QDQ INT8, activation ranges calibrated (MinMax) on ``cal``, or set by ``ranges``: a function
    of the pre-processed graph giving ``{tensor: (min, max)}`` (the hub's federated rounds use the ranges
    the devices observed, with no data)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgeml-quant-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32_bytes)
        # ONNX shape inference + graph cleanup (MatMul+Add -> Gemm) so the
        # quantizer sees every tensor's type.  (Symbolic shape inference would
        # need sympy; the MLP graphs have only standard ops, which ONNX shape
        # inference covers.)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        overrides = {} if ranges is None else {
            name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges(onnx.load(str(pre))).items()}
        quantize_static(
            str(pre),
            str(dst),
            _Reader(input_name, cal),
            quant_format=QuantFormat.QDQ,
            # Relu is listed so that its Q/DQ pair is folded into the GEMM's
            # output range: the layers then chain uint8 -> uint8 with no
            # requantization in between.
            op_types_to_quantize=["MatMul", "Gemm", "Relu"],
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"TensorQuantOverrides": overrides} if overrides else {},
        )
        return dst.read_bytes()


def _outputs(onnx_bytes: bytes, X: np.ndarray) -> tuple[np.ndarray, str]:
    """The numeric output (probabilities or regression value) for rows X."""
    sess = session(onnx_bytes)
    outs = sess.get_outputs()
    name = next((o.name for o in outs if o.name != "label"), outs[0].name)
    kind = "proba" if any(o.name == "label" for o in outs) else "value"
    res = sess.run([name], {sess.get_inputs()[0].name: X})[0]
    return np.asarray(res, dtype=np.float64).reshape(X.shape[0], -1), kind


def _infidelity(ref: tuple[np.ndarray, str], got: tuple[np.ndarray, str]) -> tuple[float, float]:
    """Disagreement of a quantized model with FP32, and the tolerance to use."""
    (a, kind), (b, _) = ref, got
    if kind == "proba":
        return float(np.mean(a.argmax(axis=1) != b.argmax(axis=1))), 0.005
    spread = float(np.std(a)) or 1.0
    return float(np.mean(np.abs(a - b))) / spread, 0.01


def op_counts(onnx_bytes: bytes, *, optimized: bool = False) -> dict[str, int]:
    """Node-type counts of the stored graph, or of the graph onnxruntime actually runs.

    With ``optimized=True`` the model is loaded in a 1-thread session at
    ``ORT_ENABLE_ALL`` and the optimized graph is read back: QDQ groups show up
    as fused integer kernels (see ``INTEGER_OPS``).
    """
    import onnx

    if optimized:
        with tempfile.TemporaryDirectory(prefix="edgeml-opt-") as tmp:
            path = Path(tmp) / "optimized.onnx"
            session(onnx_bytes, optimized_path=path)
            model = onnx.load(str(path))
    else:
        model = onnx.load_from_string(onnx_bytes)
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def error_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """A regressor's errors: ``mae`` (mean absolute error, averaged over the outputs) and the mean,
    median and 90th percentile of each window's error, its Euclidean distance to the truth over
    the outputs (metres for an x, y position; the absolute error for one output)."""
    d = np.asarray(pred, np.float64).reshape(truth.shape[0], -1) - np.asarray(truth, np.float64).reshape(truth.shape[0], -1)
    err = np.sqrt(np.sum(d * d, axis=1))
    return {"mae": float(np.mean(np.abs(d))), "mean_error": float(np.mean(err)),
            "median_error": float(np.median(err)), "p90_error": float(np.percentile(err, 90)),
            "outputs": int(d.shape[1])}


def evaluate(
    onnx_bytes: bytes,
    X: np.ndarray,
    y: np.ndarray,
    *,
    latency_runs: int = 300,
    warmup: int = 30,
    batch: int = 1024,
    lean: bool = False,
) -> dict[str, Any]:
    """Quality, size and speed of an ONNX model on features ``X`` / labels ``y``.

    Runs in onnxruntime with 1 intra-op thread (as on a small device).

    Returns a dict with ``task``, ``n``, ``accuracy`` (classifier: share of
    correct labels) or for a regressor :func:`error_metrics` (``mae``, and the
    mean / median / p90 of the error), ``bytes`` (artifact size),
    ``latency_ms`` (median batch-of-1 inference time over ``latency_runs``
    runs after ``warmup`` runs, cycling over the rows of ``X``) and
    ``latency_p90_ms``.

    ``batch``: rows per run when scoring (the scores do not depend on it); ``lean``: a :func:`session`
    without memory arena, released before returning (``federate`` scores its hold-out log so).
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0 or y.shape[:1] != (X.shape[0],) or y.ndim > 2:
        raise ValueError(f"X must be [n, f] with n > 0 and y [n] or [n, outputs], got {X.shape} and {y.shape}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    sess = session(onnx_bytes, lean=lean)
    input_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    out: dict[str, Any] = {"n": int(X.shape[0]), "bytes": len(onnx_bytes)}

    pred_name = "label" if "label" in out_names else out_names[0]
    preds = []
    for i in range(0, X.shape[0], batch):
        preds.append(sess.run([pred_name], {input_name: X[i : i + batch]})[0])
    pred = np.concatenate(preds)
    if "label" in out_names:
        out["task"] = "classification"
        out["accuracy"] = float(np.mean(pred.reshape(-1).astype(str) == y.astype(str)))
    else:
        out["task"] = "regression"
        out.update(error_metrics(pred.reshape(X.shape[0], -1), y.reshape(X.shape[0], -1)))

    rows = [X[i % X.shape[0] : i % X.shape[0] + 1] for i in range(max(latency_runs, 1))]
    for i in range(warmup):
        sess.run(out_names, {input_name: rows[i % len(rows)]})
    times = []
    for r in rows:
        t0 = time.perf_counter()
        sess.run(out_names, {input_name: r})
        times.append(time.perf_counter() - t0)
    times.sort()
    out["latency_ms"] = statistics.median(times) * 1e3
    out["latency_p90_ms"] = times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3
    del sess  # its kernels' buffers go now, not at the next collection
    return out
