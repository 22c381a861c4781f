"""Robust combinations of a round's updates: pure numpy over the devices' (clipped, checked) deltas.

:func:`cloud_hub.rounds.fedavg.aggregate` clips and checks every update, then hands the deltas here by
the round's rule. A delta is a dict of tensors; an update may hold only some of the tensors (a device
training only the last layers), so every mean is taken per tensor over the updates that hold it, and a
distance over the tensors an update holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["TRIM", "centered_clip", "coordinate_start", "distances", "norm_bounded", "norm_outliers_bounded", "trimmed",
           "trimmed_mean", "weighted_mean"]

Delta = Mapping[str, np.ndarray]
TRIM = 0.125  # the trimmed mean's share dropped at each end per coordinate: 1 of 8 devices


def trimmed(n: int, trim: float = TRIM) -> int:
    """How many of ``n`` values :func:`trimmed_mean` drops at each end: ``floor(trim * n)``, at least 1
    from 3 values on when ``trim > 0`` (so 3 to 15 updates tolerate one outlier), and always leaving 1 or 2
    (the median)."""
    if not 0.0 <= trim <= 0.5:
        raise ValueError("trim must be in [0, 0.5]")
    if n < 3 or trim == 0:
        return 0
    return min((n - 1) // 2, max(1, math.floor(trim * n)))


def trimmed_mean(stack: np.ndarray, trim: float = TRIM) -> np.ndarray:
    """Coordinate-wise trimmed mean over axis 0 (float64): per coordinate, the :func:`trimmed` largest and
    smallest values dropped, the rest averaged. ``trim=0.5`` is the coordinate-wise median."""
    n = stack.shape[0]
    k = trimmed(n, trim)
    kept = np.sort(stack, axis=0)[k:n - k] if k else stack
    return np.asarray(np.mean(kept, axis=0, dtype=np.float64))


def weighted_mean(deltas: Sequence[Delta], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per tensor, ``sum_i w_i d_i / sum_i w_i`` over the deltas holding it (float64)."""
    acc: dict[str, np.ndarray] = {}
    wsum: dict[str, float] = {}
    for d, w in zip(deltas, weights, strict=True):
        for name, x in d.items():
            acc[name] = acc.get(name, np.zeros(x.shape, np.float64)) + w * np.asarray(x, np.float64)
            wsum[name] = wsum.get(name, 0.0) + w
    return {name: total / wsum[name] for name, total in acc.items()}


def coordinate_start(deltas: Sequence[Delta], trim: float = TRIM) -> dict[str, np.ndarray]:
    """Per tensor, the coordinate-wise :func:`trimmed_mean` of the deltas holding it."""
    held: dict[str, list[np.ndarray]] = {}
    for d in deltas:
        for name, x in d.items():
            held.setdefault(name, []).append(np.asarray(x, np.float64))
    return {name: trimmed_mean(np.stack(xs), trim) for name, xs in held.items()}


def distances(deltas: Sequence[Delta], center: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each delta's L2 distance from ``center`` over the tensors it holds."""
    return np.array([math.sqrt(sum(float(np.sum((np.asarray(x, np.float64) - center[n]) ** 2)) for n, x in d.items()))
                     for d in deltas])


def norm_bounded(deltas: Sequence[Delta], weights: Sequence[float], multiple: float = 1.0) -> list[dict[str, np.ndarray]]:
    """Every delta scaled down to an L2 norm of at most ``multiple`` times the deltas' weighted median norm
    (adaptive norm bounding: Sun et al., "Can You Really Backdoor Federated Learning?", 2019): a delta
    scaled up counts no more than a median one. Deltas within the bound are returned as they are (float64)."""
    if not deltas:
        return []
    norms = distances(deltas, {n: np.zeros((), np.float64) for d in deltas for n in d})
    bound = multiple * _weighted_median(norms, np.asarray(weights, np.float64))
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-30))
    return [{n: s * np.asarray(x, np.float64) for n, x in d.items()} for d, s in zip(deltas, scale, strict=True)]


def norm_outliers_bounded(deltas: Sequence[Delta], weights: Sequence[float], outlier: float = 4.0,
                          to: float = 1.0) -> list[dict[str, np.ndarray]]:
    """Every delta whose L2 norm exceeds ``outlier`` times the deltas' weighted median norm scaled down to
    ``to`` times that median norm; the others returned as they are (float64). Unlike :func:`norm_bounded`,
    honest updates a few times the median (heterogeneous devices, the first rounds) are left whole: only a
    norm no honest update of the round reaches is cut, and cut to a typical one, so that an update scaled up
    to the clip counts as one median update in its direction."""
    if not deltas:
        return []
    norms = distances(deltas, {n: np.zeros((), np.float64) for d in deltas for n in d})
    median = _weighted_median(norms, np.asarray(weights, np.float64))
    scale = np.where(norms > outlier * median, to * median / np.maximum(norms, 1e-30), 1.0)
    return [{n: s * np.asarray(x, np.float64) for n, x in d.items()} for d, s in zip(deltas, scale, strict=True)]


def centered_clip(deltas: Sequence[Delta], weights: Sequence[float], *, start: Mapping[str, np.ndarray] | None = None,
                  radius: float = 1.0, iterations: int = 3) -> dict[str, np.ndarray]:
    """Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021): from a starting point ``v``, ``iterations`` times
    ``v <- v + sum_i w_i clip(d_i - v, tau) / sum_i w_i``, where ``clip(x, tau)`` scales ``x`` down to an L2
    norm of at most ``tau``. ``tau`` is ``radius`` times the weighted median of the deltas' distances from
    the start (fixed for the iterations). ``start`` defaults to zero (no change: then one iteration is every
    delta bounded to ``tau`` and averaged). One delta moves the result by at most its weight's share times
    ``tau`` per iteration, whatever its norm."""
    v = {n: np.zeros(x.shape, np.float64) for d in deltas for n, x in d.items()}
    if start is not None:
        v |= {n: np.asarray(x, np.float64) for n, x in start.items() if n in v}
    if not deltas:
        return v
    tau = radius * _weighted_median(distances(deltas, v), np.asarray(weights, np.float64))
    for _ in range(iterations):
        dist = distances(deltas, v)
        scale = np.minimum(1.0, tau / np.maximum(dist, 1e-30))
        steps = [{n: s * (np.asarray(x, np.float64) - v[n]) for n, x in d.items()} for d, s in zip(deltas, scale, strict=True)]
        v = {n: v[n] + step for n, step in weighted_mean(steps, weights).items()}
    return v


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])
