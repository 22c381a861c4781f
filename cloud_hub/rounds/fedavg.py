"""Federated rounds' math at the hub: model tensors, clipping, FedAvg or a robust rule, and INT8 without data.

Tensors are named as the devices' trainer (``edge_agent/device/learn.py``) names them: ``coef_i``,
``intercept_i`` (the stored layers; a regressor's last layer predicts real units), and the frozen
``scaler_mean``, ``scaler_scale`` and, for a regressor, ``target_mu``, ``target_sd``.

The INT8 model of an aggregated master is calibrated from the activation ranges the devices observed
on their own windows (``LocalResult.ranges``: per layer ``[in_lo, in_hi, out_lo, out_hi]``), merged
over the devices: the hub needs no feature rows. (This module does not import ``edge_agent.device.learn``:
the hub imports only the agent's shared modules, so the tiny INT8 delta decoding is repeated here.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud_hub.rounds.robust import (
    TRIM,
    centered_clip,
    coordinate_start,
    norm_bounded,
    norm_outliers_bounded,
    trimmed,
    trimmed_mean,
)

__all__ = ["CENTER_NORM_OUTLIER", "CENTER_RADIUS", "RULES", "TRIM", "Contribution", "aggregate", "capped_examples",
           "clip", "delta_norm", "evaluation", "merge_ranges", "mlp_tensors", "quantize_from_ranges",
           "staleness_weight", "trimmed", "trimmed_mean", "with_tensors"]

if TYPE_CHECKING:  # the hub's rounds read weights blobs (cloud_hub.models.weights); these take pipelines
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline

Tensors = Mapping[str, np.ndarray]


def _parts(pipeline: Pipeline) -> tuple[Any, MLPClassifier | MLPRegressor]:
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    mlp = pipeline.steps[-1][1]
    if not isinstance(mlp, (MLPClassifier, MLPRegressor)):
        raise TypeError("expected a Pipeline(StandardScaler -> MLPClassifier/MLPRegressor)")
    return pipeline.steps[0][1], mlp


def mlp_tensors(pipeline: Pipeline) -> dict[str, np.ndarray]:
    """The float32 tensors of a ``StandardScaler -> MLP`` pipeline (as ``weights.from_bytes`` returns it; without
    scikit-learn, from a weights blob: ``weights.tensors``)."""
    from sklearn.neural_network import MLPRegressor

    scaler, mlp = _parts(pipeline)
    out = {"scaler_mean": np.asarray(scaler.mean_, np.float32),
           "scaler_scale": np.asarray(scaler.scale_, np.float32)}
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_, strict=True)):
        out[f"coef_{i}"] = np.asarray(w, np.float32)
        out[f"intercept_{i}"] = np.asarray(b, np.float32)
    if isinstance(mlp, MLPRegressor):
        outputs = mlp.coefs_[-1].shape[1]
        mu, sd = getattr(mlp, "target_scale_", (0.0, 1.0))
        out["target_mu"] = np.broadcast_to(np.asarray(mu, np.float32), (outputs,)).copy()
        out["target_sd"] = np.broadcast_to(np.asarray(sd, np.float32), (outputs,)).copy()
    return out


def with_tensors(pipeline: Pipeline, tensors: Tensors) -> Pipeline:
    """A copy of ``pipeline`` with its layers' coefs/intercepts replaced by ``tensors`` (the frozen
    scaler and target scale are the pipeline's own; any in ``tensors`` must equal them)."""
    new = copy.deepcopy(pipeline)
    scaler, mlp = _parts(new)
    for name, ref in (("scaler_mean", scaler.mean_), ("scaler_scale", scaler.scale_)):
        if name in tensors and not np.allclose(np.asarray(tensors[name], np.float64), ref, rtol=1e-6, atol=1e-6):
            raise ValueError(f"{name} differs from the pipeline's: the scaler is frozen")
    for i in range(len(mlp.coefs_)):
        for kind, arrays in (("coef", mlp.coefs_), ("intercept", mlp.intercepts_)):
            name = f"{kind}_{i}"
            if name not in tensors:
                raise KeyError(f"tensor {name} missing")
            value = np.asarray(tensors[name])
            if value.shape != arrays[i].shape:
                raise ValueError(f"{name} has shape {value.shape}, the model {arrays[i].shape}")
            arrays[i] = value.astype(arrays[i].dtype, copy=True)
    return new


def delta_norm(delta: Tensors) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(d, np.float64) ** 2)) for d in delta.values()))


def clip(delta: Tensors, max_norm: float | None) -> dict[str, np.ndarray]:
    """``delta`` scaled down to an L2 norm (over all its tensors) of at most ``max_norm``."""
    norm = delta_norm(delta)
    factor = 1.0 if max_norm is None or norm <= max_norm else max_norm / norm
    return {k: (np.asarray(d, np.float32) * np.float32(factor)) for k, d in delta.items()}


def staleness_weight(staleness: float) -> float:
    """FedBuff's down-weighting of an update computed from a master ``staleness`` rounds old."""
    if staleness < 0:
        raise ValueError("staleness must be >= 0")
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class Contribution:
    """One device's share of an aggregation (:func:`aggregate`): its dequantized delta and its weight's
    ingredients (the wire message it came in is ``edge_agent.contract.round_updates.Update``)."""

    delta: Mapping[str, np.ndarray]  # dequantized, the trained tensors only
    n_examples: int
    staleness: float = 0.0  # rounds between the master it started from and the current one


def capped_examples(counts: Sequence[int]) -> list[int]:
    """Devices' stated example counts, each capped at 3x the median: one device must not outvote a round
    (its average, its evaluation) by claiming a billion windows. Of two devices the median is their mean, and
    caps neither: a round of fewer than 3 devices is gated on each of them (``finish.GATE_MIN_DEVICES``)."""
    cap = 3 * int(np.median(counts)) if len(counts) else 0
    return [min(int(k), cap) for k in counts]


def evaluation(answers: Mapping[str, tuple[int, Mapping[str, Any]]]) -> dict[str, Any] | None:
    """The devices' evaluation of a round's candidate (device -> (held-out windows, its scores)), weighted by
    :func:`capped_examples`: ``before``/``after``, the base's and the candidate's FP32 weights; ``int8_before``/
    ``int8_after``, the INT8 models (the one running, the one that ships) over the devices that scored them
    (``int8_devices``). None when no device evaluated it."""
    weights = dict(zip(answers, capped_examples([k for k, _ in answers.values()]), strict=True))

    def mean(key: str, devices: Sequence[str]) -> float:
        return sum(weights[d] * float(answers[d][1][key]) for d in devices) / sum(weights[d] for d in devices)

    every = sorted(d for d in answers if weights[d] > 0)
    if not every:
        return None
    out: dict[str, Any] = {"devices": sorted(answers), "windows": int(sum(k for k, _ in answers.values())),
                           "before": mean("metric_before", every), "after": mean("metric_after", every)}
    int8 = [d for d in every if answers[d][1].get("int8_after") is not None]
    if int8:
        out |= {"int8_before": mean("int8_before", int8), "int8_after": mean("int8_after", int8),
                "int8_devices": int8, "int8_windows": int(sum(answers[d][0] for d in int8)),
                "int8_each": {d: (float(answers[d][1]["int8_before"]), float(answers[d][1]["int8_after"]))
                              for d in int8}}
    return out


# how :func:`aggregate` combines the updates; a round's plan names one (``trimmed-mean`` stays for the rounds
# whose plans name it)
RULES = ("fedavg", "trimmed-mean", "centered-clip")


def aggregate(master: Tensors, updates: Sequence[Contribution], *, clip: float | None = None,
              server_lr: float = 1.0, rule: str = "fedavg", trim: float = TRIM) -> dict[str, np.ndarray]:
    """``master + server_lr * combine(clip(d_k))`` per tensor, over the updates that hold the tensor (and
    state ``n_examples > 0``); tensors no update holds are unchanged. Returns a new dict (float32 arrays).

    ``rule="fedavg"`` (the default): ``sum_k w_k clip(d_k) / sum_k w_k`` with
    ``w_k = n_examples_k * staleness_weight(staleness_k)``.

    The robust rules bound what any one device can do to a round, which FedAvg does not: one update scaled
    up to the clip moves a FedAvg by its share of the examples times the clip, in any direction it likes.
    Both take ``staleness_weight(staleness_k) * clip(d_k)``, every update one vote whatever its example count
    (a count is the device's word, and a weighted vote would let one device claim a larger share of the
    bound), a late one shrunk towards no change rather than weighted down. They need the individual updates,
    so they are for rounds without secure aggregation.

    ``rule="centered-clip"``: :func:`~cloud_hub.rounds.robust.centered_clip` (Karimireddy, He and Jaggi,
    "Learning from History for Byzantine Robust Optimization", ICML 2021) from the coordinate-wise trimmed
    mean, ``tau`` twice the updates' median distance from it (``CENTER_RADIUS``), 3 iterations: updates
    within ``tau`` of the centre count as in a mean, one further away is pulled in to ``tau``, so one device
    in n moves the round by at most ``tau / n`` an iteration.

    ``rule="trimmed-mean"`` (the first robust rule, kept for the rounds whose plans name it):
    :func:`trimmed_mean` per coordinate, ``trim`` of the values dropped at each end.

    Measured by ``bench/federated_poison.py`` (the watch data, 8 devices, 10 rounds, one device attacking
    every round, seeds 0 and 1; INT8 accuracy, ``docs/benchmarks.md``, "Poisoned rounds"): with no attacker
    centered clipping is 0.2 points behind FedAvg, the trimmed mean 1.6 (it drops the extreme values of the
    devices whose data differ most; adaptive norm clipping to the median norm cost as much). With s02
    attacking, centered clipping against the trimmed mean: its update scaled to the clip -0.4 and -1.3,
    negated -4.2 and -4.0, labels flipped -2.4 and -2.7 (FedAvg: -8.3, -11.5, -1.4; leaving s02 out: -1.4).
    Over the 7 attackers s02-s08 and the 3 attacks, centered clipping is within 1 point of clean FedAvg in 8
    of 21 cases and within 1 point of leaving the attacker out in 13; a negated update from s05 or s08
    still costs over 8 points (the trimmed mean: 8.5 and 5.8). Bounding every update to 1.5x the round's
    median norm first (``CENTER_NORM_BOUND``, off) costs 0.7 points without an attacker and is within 1 point
    of clean FedAvg in as many attacked cases (8 of 21): the scaled updates' worst cost falls (s06: -2.8 to
    -1.3), a label flip's rises (s05: -1.4 to -2.8).

    An update whose norm exceeds 4x the round's median norm (``CENTER_NORM_OUTLIER``) is first scaled down to the
    median norm: no honest update of the measured runs reaches it (without an attacker the result is the same to
    the last digit), and an update scaled to the clip then counts as one median update in its direction instead
    of one at ``tau``. Issue #26's cases (label-flip or scale, s02-s08): 11 of 14 within 1 point of clean FedAvg
    (7 without it; scale by s06 -2.8 to -0.4, s07 -1.3 to -0.3, s08 -2.2 to -0.6; the 3 left are label flips by
    s02, s04, s05, whose absence alone costs over 1 point). It does not hold against an attacker that knows the
    multiple: scaled to 0.95 x 4 x the others' median norm, s06, s07, s08 cost what the scale to the clip costs
    without it (-2.6, -1.3, -2.2)."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}: one of {', '.join(RULES)}")
    if rule != "fedavg":
        return _robust(master, updates, clip, server_lr, rule, trim)
    clip_norm = clip
    new = {k: np.array(v, np.float32) for k, v in master.items()}
    acc: dict[str, np.ndarray] = {}
    wsum: dict[str, float] = {}
    for u in updates:
        if u.n_examples <= 0:
            continue
        w = float(u.n_examples) * staleness_weight(u.staleness)
        for name, d in _checked(new, u.delta, clip_norm).items():
            acc[name] = acc.get(name, np.zeros(d.shape, np.float64)) + w * d.astype(np.float64)
            wsum[name] = wsum.get(name, 0.0) + w
    for name, total in acc.items():
        new[name] = (new[name] + server_lr * total / wsum[name]).astype(np.float32)
    return new


CENTER_RADIUS = 2.0  # centered clipping's tau over the updates' median distance from the trimmed mean
CENTER_ITERATIONS = 3
# centered clipping's updates first bounded to this multiple of their median norm (robust.norm_bounded); None: not
# (federate's rule). Research: bench/federated_poison.py --norm-bound; measured in docs/benchmarks.md
CENTER_NORM_BOUND: float | None = None
# centered clipping's updates whose norm exceeds this multiple of the round's median norm first scaled down to
# CENTER_OUTLIER_TO times the median norm (robust.norm_outliers_bounded); None: not. Honest updates reach ~3x the
# median (the first round), an update scaled to the clip 5-14x from the second round. Research: --norm-outlier
CENTER_NORM_OUTLIER: float | None = 4.0
CENTER_OUTLIER_TO = 1.0


def _robust(master: Tensors, updates: Sequence[Contribution], clip_norm: float | None, server_lr: float, rule: str,
            trim: float) -> dict[str, np.ndarray]:
    new = {k: np.array(v, np.float32) for k, v in master.items()}
    deltas: list[dict[str, np.ndarray]] = []
    for u in updates:
        if u.n_examples <= 0:
            continue
        shrink = np.float32(staleness_weight(u.staleness))
        deltas.append({name: d * shrink for name, d in _checked(new, u.delta, clip_norm).items()})
    if rule == "trimmed-mean":
        combined = coordinate_start(deltas, trim)
    else:
        if CENTER_NORM_BOUND is not None:
            deltas = norm_bounded(deltas, [1.0] * len(deltas), CENTER_NORM_BOUND)
        if CENTER_NORM_OUTLIER is not None:
            deltas = norm_outliers_bounded(deltas, [1.0] * len(deltas), CENTER_NORM_OUTLIER, CENTER_OUTLIER_TO)
        combined = centered_clip(deltas, [1.0] * len(deltas), start=coordinate_start(deltas, trim),
                                 radius=CENTER_RADIUS, iterations=CENTER_ITERATIONS)
    for name, step in combined.items():
        new[name] = (new[name] + server_lr * step).astype(np.float32)
    return new


def _checked(master: Mapping[str, np.ndarray], delta: Tensors, clip_norm: float | None) -> dict[str, np.ndarray]:
    """``delta`` clipped, each tensor one the master has, of its shape, finite."""
    out = _clip(delta, clip_norm)
    for name, d in out.items():
        if name not in master:
            raise KeyError(f"update has tensor {name} the master has not")
        if d.shape != master[name].shape:
            raise ValueError(f"update's {name} has shape {d.shape}, the master's {master[name].shape}")
        if not np.all(np.isfinite(d)):
            raise ValueError(f"update's {name} has NaN or inf")
    return out


_clip = clip


def merge_ranges(ranges: Sequence[Sequence[Sequence[float]]], *, spread: float = 4.0) -> list[list[float]]:
    """Devices' per-layer ``[in_lo, in_hi, out_lo, out_hi]`` merged: min of the lows, max of the highs, but
    never further out than ``spread`` times the median device's span past the medians: one device (a
    glitch, or a hostile one) must not stretch an 8-bit range until real values fall into a few steps."""
    if not ranges:
        raise ValueError("no ranges to merge")
    arr = [np.asarray(r, np.float64) for r in ranges]
    if len({a.shape for a in arr}) != 1 or arr[0].ndim != 2 or arr[0].shape[1] != 4:
        raise ValueError(f"ranges must all be [layers, 4], got {[a.shape for a in arr]}")
    stack = np.stack(arr)
    if not np.all(np.isfinite(stack)):
        raise ValueError("ranges contain NaN or inf")
    lo, hi = stack.min(axis=0), stack.max(axis=0)
    mid = np.median(stack, axis=0)  # of two devices their mean: one of two can stretch the ranges, and the round is
    for a, b in ((0, 1), (2, 3)):  # gated on each of them (finish.GATE_MIN_DEVICES); input and pre-activation bounds
        span = np.maximum(mid[:, b] - mid[:, a], 1e-6)
        lo[:, a] = np.maximum(lo[:, a], mid[:, a] - spread * span)
        hi[:, b] = np.minimum(hi[:, b], mid[:, b] + spread * span)
    return [[float(lo[i, 0]), float(hi[i, 1]), float(lo[i, 2]), float(hi[i, 3])] for i in range(stack.shape[1])]


def _overrides(model: Any, ranges: Sequence[Sequence[float]]) -> dict[str, tuple[float, float]]:
    """Range of every activation the QDQ quantizer may quantize, from the layers' ranges."""
    layers = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    if len(layers) != len(ranges):
        raise ValueError(f"the graph has {len(layers)} Gemm/MatMul layers, the ranges {len(ranges)}")
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, tuple[float, float]] = {}
    for node, (in_lo, in_hi, out_lo, out_hi) in zip(layers, ranges, strict=True):
        out.setdefault(node.input[0], (float(in_lo), float(in_hi)))  # a ReLU's output is set below
        nxt = consumers.get(node.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            relu = (0.0, max(float(out_hi), 0.0))  # the quantizer gives a Relu's input its output range
            out[node.output[0]] = out[nxt[0].output[0]] = relu
        else:
            out[node.output[0]] = (float(out_lo), float(out_hi))
    return out


def quantize_from_ranges(fp32_bytes: bytes, ranges: Sequence[Sequence[float]], *,
                         per_channel: bool = False) -> bytes:
    """Static QDQ INT8 as ``quantize.quantize_int8`` builds it (u8 activations, s8 weights, Gemm/MatMul/
    Relu, MinMax), each activation's range set from ``ranges`` (per layer ``[in_lo, in_hi, out_lo,
    out_hi]``, e.g. :func:`merge_ranges` of the devices') instead of calibration rows. Raises when an
    activation would be quantized with a range that did not come from ``ranges``. Per-layer weight
    scales by default (``quantize_int8`` picks per-channel only when data shows it helps)."""
    import onnx

    from cloud_hub.models.quantize import quantize_static

    model = onnx.load_from_string(fp32_bytes)
    if len(model.graph.input) != 1:
        raise ValueError("expected a model with a single input")
    inp = model.graph.input[0]
    n_features = inp.type.tensor_type.shape.dim[1].dim_value
    given: dict[str, tuple[float, float]] = {}

    def overrides(pre: Any) -> dict[str, tuple[float, float]]:
        given.update(_overrides(pre, ranges))
        return given

    # one row of zeros feeds the calibration pass; every range it would give is overridden
    out = quantize_static(fp32_bytes, np.zeros((1, n_features), np.float32), inp.name, per_channel, ranges=overrides)
    missing = sorted(set(quantized_activations(out)) - set(given))
    if missing:
        raise ValueError(f"activations {missing} were quantized without a range from the devices")
    return out


def ranges_of(int8_bytes: bytes) -> list[list[float]]:
    """The per-layer ``[in_lo, in_hi, out_lo, out_hi]`` a QDQ INT8 model was quantized with (each Gemm's input and
    output, from their scales and zero points, layers in graph order): a differentially private round keeps its
    base's ranges, since the devices' own are not noised. A layer output it does not quantize gets the input's."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(int8_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def span(node: Any) -> tuple[float, float]:  # a (De)QuantizeLinear's representable range
        scale = float(np.asarray(inits[node.input[1]]).reshape(-1)[0])
        zp = np.asarray(inits[node.input[2]]) if len(node.input) > 2 else np.zeros((), np.uint8)
        z, info = float(zp.reshape(-1)[0]), np.iinfo(zp.dtype)
        return (info.min - z) * scale, (info.max - z) * scale

    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    quantizes = {n.input[0]: n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    out = []
    for node in (n for n in graph.node if n.op_type in ("Gemm", "MatMul")):
        dq = dequantized.get(node.input[0])
        if dq is None:
            raise ValueError(f"layer {node.name or node.output[0]!r} takes an input the model does not quantize")
        lo, hi = span(dq)
        out_lo, out_hi = span(quantizes[node.output[0]]) if node.output[0] in quantizes else (lo, hi)
        out.append([lo, hi, out_lo, out_hi])
    if not out:
        raise ValueError("no quantized layer in the model")
    return out


def quantized_activations(int8_bytes: bytes) -> list[str]:
    """Names of the activations (not initializers) a QDQ model quantizes."""
    import onnx

    graph = onnx.load_from_string(int8_bytes).graph
    inits = {i.name for i in graph.initializer}
    return [n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
