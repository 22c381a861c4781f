"""On-device fine-tuning of the hub's ``StandardScaler -> MLP`` for federated rounds (numpy only).

A model is a dict of arrays named as the hub keeps them (:mod:`cloud_hub.models.weights`):

* ``coef_i`` float[in, out] and ``intercept_i`` float[out] for the layers ``i = 0 .. L-1``
  (hidden layers ReLU; output softmax for a classifier, identity for a regressor);
* ``scaler_mean``, ``scaler_scale`` float[f]: the frozen input standardization
  ``z = (x - mean) * (1 / scale)`` computed in float32 as the exported ONNX graph's ``Sub``/``Mul``
  (a scale of 0 counts as 1, as scikit-learn's ``StandardScaler`` stores it);
* regressors only, ``target_mu``, ``target_sd`` float[outputs]: the frozen target scale. The stored
  last layer predicts real units (the scale is folded into it, as ``cloud_hub.models.training`` does);
  training unfolds it and minimizes the loss in standardized target units, as the hub trains.

Loss: mean cross-entropy (classifier) or mean over windows of half the squared error summed over the
outputs in standardized units (regressor), plus scikit-learn's L2 ``alpha / (2 n_batch) * sum ||coef||^2``
and FedProx's ``mu / 2 * ||w - w_start||^2`` over the trained tensors. Optimizer: SGD with momentum 0.9
(default) or Adam, its state restarted at every call.

``ranges`` (what the hub calibrates the INT8 model with, no data needed): per layer ``i`` a list
``[in_lo, in_hi, out_lo, out_hi]`` of the input of its matrix product (standardized features for
layer 0, post-ReLU activations for the others) and of its pre-activation output (real units for a
regressor's last layer), observed on the device's windows with the new weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_agent.contract import rounds
from edge_agent.device.shuffle import Shuffler

__all__ = ["LocalResult", "activation_ranges", "fine_tune", "loss_and_grad", "metric", "n_layers", "predict",
           "score", "trainable_names"]

Tensors = Mapping[str, np.ndarray]
# Rows per forward pass outside training: it bounds the activation memory (256 rows x 512 units float32 is
# 0.5 MB a layer; 1024 rows put 5 MB on a device's peak RSS in a round) and costs no measurable time.
_CHUNK = 256


@dataclass
class LocalResult:
    tensors: dict[str, np.ndarray]  # all tensors, the trained ones updated (unclipped)
    delta: dict[str, np.ndarray]  # trained tensors only: new - start, clipped to ``clip``
    n: int  # windows trained on
    loss_before: float  # data loss (no penalty) on all n windows
    loss_after: float
    metric_before: float  # accuracy, or a regressor's mean Euclidean error in real units
    metric_after: float
    norm: float  # L2 norm of the delta before clipping
    epochs: float  # passes done (fewer than asked when the time budget ran out)
    seconds: float
    ranges: list[list[float]]


def n_layers(tensors: Tensors) -> int:
    n = 0
    while f"coef_{n}" in tensors:
        n += 1
    if n == 0:
        raise ValueError("no coef_0 in the tensors")
    return n


def trainable_names(tensors: Tensors, train_layers: int | None = None) -> list[str]:
    """Names of the tensors ``train_layers`` (default: all layers) trains, i.e. of the delta."""
    L = n_layers(tensors)
    k = L if train_layers is None else int(train_layers)
    if not 1 <= k <= L:
        raise ValueError(f"train_layers must be in 1..{L}, got {train_layers}")
    return list(rounds.trainable_names(L, k))


def _dtype(tensors: Tensors) -> np.dtype:
    return np.dtype(np.float64 if np.asarray(tensors["coef_0"]).dtype == np.float64 else np.float32)


def _standardize(tensors: Tensors, X: np.ndarray) -> np.ndarray:
    dt = _dtype(tensors)
    scale = np.asarray(tensors["scaler_scale"], np.float64)
    factor = (1.0 / np.where(scale == 0, 1.0, scale)).astype(dt)
    X = np.asarray(X, dt)
    if X.ndim != 2 or X.shape[1] != factor.shape[0]:
        raise ValueError(f"X must be [n, {factor.shape[0]}], got {X.shape}")
    return (X - np.asarray(tensors["scaler_mean"], dt)) * factor


def _target(tensors: Tensors, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    dt = _dtype(tensors)
    mu = np.broadcast_to(np.asarray(tensors.get("target_mu", 0.0), dt), (outputs,))
    sd = np.broadcast_to(np.asarray(tensors.get("target_sd", 1.0), dt), (outputs,))
    return mu, sd


def _layers(tensors: Tensors, task: str, unfold: bool, copy: bool = False) -> list[list[np.ndarray]]:
    """[[W, b], ...] (copies when ``copy``: training updates them in place; else the tensors themselves when
    they have the dtype); a regressor's last layer in standardized target units when ``unfold``."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    dt = _dtype(tensors)
    as_array = np.array if copy else np.asarray
    out = [[as_array(tensors[f"coef_{i}"], dt), as_array(tensors[f"intercept_{i}"], dt)]
           for i in range(n_layers(tensors))]
    if unfold and task == "regression":
        mu, sd = _target(tensors, out[-1][0].shape[1])
        out[-1] = [out[-1][0] / sd, (out[-1][1] - mu) / sd]
    return out


def _forward(layers: list[list[np.ndarray]], H: np.ndarray, last_is_output: bool = True) -> np.ndarray:
    for i, (W, b) in enumerate(layers):
        H = H @ W
        H += b  # in place: one activation array a layer, not two
        if i < len(layers) - 1 or not last_is_output:
            np.maximum(H, 0, out=H)
    return H


def _softmax(A: np.ndarray) -> np.ndarray:
    """Class probabilities of the output pre-activations: softmax, or for a two-class model (scikit-learn gives
    it one logistic output, the second class's log-odds) [1 - sigmoid, sigmoid]."""
    if A.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-np.clip(A[:, 0], -500, 500)))
        return np.stack([1.0 - p, p], axis=1)
    P = np.exp(A - A.max(axis=1, keepdims=True))
    return P / P.sum(axis=1, keepdims=True)


def predict(tensors: Tensors, task: str, X: np.ndarray) -> np.ndarray:
    """Class probabilities [n, classes] or outputs [n, outputs] in real units (as the FP32 ONNX)."""
    layers = _layers(tensors, task, unfold=False)
    out = []
    for i in range(0, len(X), _CHUNK):
        A = _forward(layers, _standardize(tensors, X[i:i + _CHUNK]))
        out.append(_softmax(A) if task == "classification" else A)
    return np.concatenate(out)


def activation_ranges(tensors: Tensors, X: np.ndarray, standardized: bool = False) -> list[list[float]]:
    """Per layer ``[in_lo, in_hi, out_lo, out_hi]`` observed on the rows X (see the module doc); ``standardized``:
    X is already ``_standardize(tensors, X)`` (element by element: the same numbers whole or a chunk at a time)."""
    layers = _layers(tensors, "classification", unfold=False)  # stored (folded) weights, as ONNX runs
    lo = np.full((len(layers), 2), np.inf)
    hi = np.full((len(layers), 2), -np.inf)
    for s in range(0, len(X), _CHUNK):
        H = X[s:s + _CHUNK] if standardized else _standardize(tensors, X[s:s + _CHUNK])
        for i, (W, b) in enumerate(layers):
            A = H @ W
            A += b
            lo[i] = np.minimum(lo[i], (H.min(), A.min()))
            hi[i] = np.maximum(hi[i], (H.max(), A.max()))
            H = np.maximum(A, 0, out=A)
    return [[float(lo[i, 0]), float(hi[i, 0]), float(lo[i, 1]), float(hi[i, 1])] for i in range(len(layers))]


def _targets(tensors: Tensors, task: str, y: np.ndarray, n: int, outputs: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape[:1] != (n,):
        raise ValueError(f"y must have {n} rows, got shape {y.shape}")
    if task == "classification":
        yi = y.astype(np.int64).reshape(n)
        classes = max(outputs, 2)  # one logistic output: two classes
        if yi.min() < 0 or yi.max() >= classes:
            raise ValueError(f"class indices must be in 0..{classes - 1}")
        return yi
    mu, sd = _target(tensors, outputs)
    return ((y.reshape(n, outputs) - mu) / sd).astype(_dtype(tensors))


def _data_loss(A: np.ndarray, Y: np.ndarray, task: str) -> tuple[float, np.ndarray]:
    """Mean loss of the output pre-activations A and its gradient with respect to A."""
    n = A.shape[0]
    if task == "classification":
        P = _softmax(A)
        loss = -float(np.mean(np.log(np.maximum(P[np.arange(n), Y], 1e-30))))
        if A.shape[1] == 1:  # the logistic output: d loss / d a = sigmoid(a) - y
            return loss, ((P[:, 1] - Y) / n).reshape(n, 1).astype(A.dtype)
        P[np.arange(n), Y] -= 1
        return loss, P / n
    D = A - Y
    return 0.5 * float(np.sum(D * D)) / n, D / n


def _step_grads(P: list[list[np.ndarray]], P0: list[list[np.ndarray]], H: np.ndarray, Y: np.ndarray,
                task: str, alpha: float, mu: float,
                apply: Callable[[int, int, np.ndarray], None] | None = None
                ) -> tuple[float, list[list[np.ndarray]]]:
    """Objective of the trained layers P on inputs H (outputs of the frozen ones) and its gradients; with
    ``apply``, the gradients are handed to it instead of being returned, as ``apply(j, row, g)`` (``g``: the
    gradient of rows ``row:row + len(g)`` of the ``j``-th array of P flattened as [W0, b0, W1, ...]) once the
    layer before no longer needs the layer's weights (it may update them), a block of rows of a layer's matrix at a
    time: no gradient the size of the 512x512 layer (#26 §5)."""
    n = H.shape[0]
    acts: list[np.ndarray | None] = [H]
    for i, (W, b) in enumerate(P):
        A = acts[-1] @ W  # type: ignore[operator]
        A += b  # in place: the same sums as ``@ W + b``, one array, not two
        if i < len(P) - 1:
            np.maximum(A, 0, out=A)
        acts.append(A)
    loss, delta = _data_loss(acts[-1], Y, task)  # type: ignore[arg-type]
    grads: list[list[np.ndarray]] = [[]] * len(P)
    for i in range(len(P) - 1, -1, -1):
        W, b = P[i]
        Ai: np.ndarray = acts[i]  # type: ignore[assignment]
        acts[i + 1] = None  # spent: its rectifier's mask was applied to delta
        if apply is not None:
            gb = delta.sum(axis=0)
            if mu:
                gb += mu * (b - P0[i][1])
            back = None
            if i:  # with the weights before their update
                back = delta @ W.T
                back *= Ai > 0
            rows = max(64, _GRAD_BLOCK // max(1, W.shape[1]))  # a row alone is a product BLAS sums otherwise
            for s in range(0, W.shape[0], rows):
                gW = Ai[:, s:s + rows].T @ delta  # rows s: of ``Ai.T @ delta`` (to rounding: BLAS's order; tested)
                if alpha:
                    _add_scaled(gW, alpha / n, W[s:s + rows])
                if mu:
                    _add_scaled(gW, mu, W[s:s + rows], P0[i][0][s:s + rows])
                apply(2 * i, s, gW)
            apply(2 * i + 1, 0, gb)
            if back is not None:
                delta = back
            continue
        gW, gb = Ai.T @ delta, delta.sum(axis=0)
        if alpha:
            _add_scaled(gW, alpha / n, W)
            loss += 0.5 * alpha / n * float(np.sum(W * W))
        if mu:
            _add_scaled(gW, mu, W, P0[i][0])
            db = b - P0[i][1]
            gb += mu * db
            dW = W - P0[i][0]
            loss += 0.5 * mu * float(np.sum(dW * dW) + np.sum(db * db))
        if i:
            delta = delta @ W.T
            delta *= Ai > 0
        grads[i] = [gW, gb]
    return loss, grads


# Elements of a layer's gradient made at a time in a round's descent: 256 kB of float32 (128 rows of the 512x512
# layer, 0.75 MB less than its whole gradient, about 5 % more CPU for the fine-tune).
_GRAD_BLOCK = 1 << 16


def _add_scaled(g: np.ndarray, scale: float, a: np.ndarray, b: np.ndarray | None = None, block: int = 1 << 14) -> None:
    """``g += scale * a`` (or ``scale * (a - b)``), the same operations element by element, a block of rows at a
    time: ``(alpha / n) * W`` or ``mu * (W - W0)`` of the 512x512 layer was a 1 MB temporary beside its gradient at
    every step, the fine-tune's peak (#26 §5)."""
    rows = max(1, block // max(1, g.size // max(1, g.shape[0])))
    for s in range(0, g.shape[0], rows):
        part = a[s:s + rows] if b is None else a[s:s + rows] - b[s:s + rows]
        g[s:s + rows] += scale * part


def loss_and_grad(tensors: Tensors, task: str, X: np.ndarray, y: np.ndarray, *, alpha: float = 0.0,
                  mu: float = 0.0, start: Tensors | None = None,
                  train_layers: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """The objective ``fine_tune`` minimizes on all rows at once, and its gradient with respect to the
    stored (folded) trained tensors (float64 tensors and X compute in float64)."""
    L = n_layers(tensors)
    names = trainable_names(tensors, train_layers)
    first = L - len(names) // 2
    layers = _layers(tensors, task, unfold=True)
    start_layers = _layers(start if start is not None else tensors, task, unfold=True)
    H = _forward(layers[:first], _standardize(tensors, X), last_is_output=False)
    Y = _targets(tensors, task, y, H.shape[0], layers[-1][0].shape[1])
    loss, grads = _step_grads(layers[first:], start_layers[first:], H, Y, task, alpha, mu)
    if task == "regression":  # chain rule through the unfolding W_u = W / sd, b_u = (b - mu) / sd
        sd = _target(tensors, layers[-1][0].shape[1])[1]
        grads[-1] = [grads[-1][0] / sd, grads[-1][1] / sd]
    return loss, {name: g for name, g in zip(names, (g for pair in grads for g in pair), strict=True)}


def metric(task: str, predicted: np.ndarray, y: np.ndarray) -> float:
    """The one definition of a device's score: a classifier's accuracy (``predicted``: class indices, or a
    score per class; ``y``: class indices), a regressor's mean Euclidean error in real units (``predicted``
    and ``y``: [n, outputs]). Whatever model made the predictions (these tensors, or an INT8 ONNX model)."""
    if task == "classification":
        p = np.asarray(predicted)
        if p.ndim == 2 and p.shape[1] == 1:  # a two-class model's one output: the second class's log-odds
            p = (p[:, 0] > 0).astype(np.int64)
        return float(np.mean((p.argmax(axis=1) if p.ndim == 2 else p) == np.asarray(y).reshape(len(p))))
    P = np.asarray(predicted, np.float64).reshape(len(predicted), -1)
    D = P - np.asarray(y, np.float64).reshape(P.shape)
    return float(np.mean(np.sqrt(np.sum(D * D, axis=1))))


def _evaluate(layers: list[list[np.ndarray]], H: np.ndarray, Y: np.ndarray, y_real: np.ndarray, task: str,
              target: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Data loss and :func:`metric` of the trained part."""
    loss, total = 0.0, 0.0
    for s in range(0, H.shape[0], _CHUNK):
        A = _forward(layers, H[s:s + _CHUNK])
        part, _ = _data_loss(A, Y[s:s + _CHUNK], task)
        loss += part * A.shape[0]
        if task == "classification":
            total += metric(task, A, Y[s:s + _CHUNK]) * A.shape[0]
        else:
            total += metric(task, A * target[1] + target[0], y_real[s:s + _CHUNK]) * A.shape[0]
    n = H.shape[0]
    return loss / n, total / n


def score(tensors: Tensors, task: str, X: np.ndarray, y: np.ndarray) -> float:
    """The metric ``fine_tune`` reports (accuracy, or mean Euclidean error in real units) of ``tensors``
    on windows X [n, f] with labels y as ``fine_tune`` takes them."""
    layers = _layers(tensors, task, unfold=True)
    H = _standardize(tensors, X)
    outputs = layers[-1][0].shape[1]
    Y = _targets(tensors, task, y, H.shape[0], outputs)
    y_real = np.asarray(y, H.dtype) if task == "regression" else Y
    return _evaluate(layers, H, Y, y_real, task, _target(tensors, outputs))[1]


def _descend(P: list[list[np.ndarray]], start: list[list[np.ndarray]], H: np.ndarray, Y: np.ndarray,
             task: str, *, epochs: float, lr: float, batch: int, mu: float, alpha: float, seed: int, t0: float,
             budget_s: float | None, optimizer: str, momentum: float) -> tuple[int, int]:
    """The minibatch loop of :func:`fine_tune`, updating the arrays of P in place; the optimizer state
    lives only here, so it restarts at every call. Returns (steps done, steps per epoch)."""
    n = H.shape[0]
    flat = [a for pair in P for a in pair]
    m1 = [np.zeros_like(a) for a in flat]
    m2 = [np.zeros_like(a) for a in flat] if optimizer == "adam" else []
    rng = Shuffler(seed)
    batch = max(1, min(int(batch), n))
    per_epoch = -(-n // batch)
    total = int(round(float(epochs) * per_epoch))
    done = 0
    while done < total and not (budget_s is not None and time.monotonic() - t0 >= budget_s):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            if done >= total or (budget_s is not None and time.monotonic() - t0 >= budget_s):
                break
            idx = order[s:s + batch]
            done += 1

            def update(j: int, row: int, g: np.ndarray, done: int = done) -> None:
                w, m = flat[j][row:row + len(g)], m1[j][row:row + len(g)]  # views: updated in place
                if optimizer == "adam":
                    v = m2[j][row:row + len(g)]
                    m *= 0.9
                    m += 0.1 * g
                    v *= 0.999
                    v += 0.001 * g * g
                    step = lr * np.sqrt(1 - 0.999 ** done) / (1 - 0.9 ** done)
                    w -= step * m / (np.sqrt(v) + 1e-8)
                else:
                    m *= momentum
                    m += g
                    w -= np.multiply(m, lr, out=g)  # g is spent: its buffer, not a new array

            # each layer updated as its gradients are made, a block of rows at a time (#26 §5)
            _step_grads(P, start, H[idx], Y[idx], task, alpha, mu, apply=update)
    return done, per_epoch


def _fold_delta(tensors: Tensors, task: str, names: list[str], P: list[list[np.ndarray]],
                target: tuple[np.ndarray, np.ndarray],
                clip: float | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """The trained layers P back in the stored form (a regressor's target scale folded in, the tensors'
    dtype), the delta the hub receives (float32, clipped) and its norm before clipping."""
    if task == "regression":  # fold the target scale back into the last layer
        P[-1] = [P[-1][0] * target[1], P[-1][1] * target[1] + target[0]]
    dt = _dtype(tensors)
    trained = dict(zip(names, (a.astype(dt, copy=False) for pair in P for a in pair), strict=True))  # P is ours
    # float16 (an announcement's, as sent) as float32: the other tensors of the trained model have their dtype
    new = {k: trained[k] if k in trained else np.array(v, np.result_type(v, np.float32)) for k, v in tensors.items()}
    delta = {}
    for name in names:
        delta[name] = (new[name] - np.asarray(tensors[name], dt)).astype(np.float32, copy=False)
    norm = float(np.sqrt(sum(_squares(d) for d in delta.values())))
    if clip is not None and norm > clip:
        delta = {k: (d * (clip / norm)).astype(np.float32, copy=False) for k, d in delta.items()}
    return new, delta, norm


def _squares(d: np.ndarray, block: int = 1 << 14) -> float:
    """The sum of the squares of ``d`` in float64, a block at a time: ``d.astype(np.float64) ** 2`` made two
    float64 copies of the largest tensor (4 MB of the 99-512-512-7 MLP) at the end of every round's training,
    the agent's peak (#26 §5)."""
    flat = d.reshape(-1)
    return sum((float(np.sum(np.square(flat[i:i + block], dtype=np.float64))) for i in range(0, flat.size, block)),
               0.0)


def fine_tune(tensors: Tensors, task: str, X: np.ndarray, y: np.ndarray, *, epochs: float, lr: float,
              batch: int = 64, mu: float = 0.0, alpha: float = 0.0, clip: float | None = None,
              train_layers: int | None = None, seed: int = 0, budget_s: float | None = None,
              optimizer: str = "sgd", momentum: float = 0.9) -> LocalResult:
    """Train the last ``train_layers`` layers (default all) on windows X [n, f] and labels y (int class
    indices, or float[n, outputs] targets in real units) from ``tensors``, which are not modified.

    ``epochs`` passes of minibatches of ``batch`` shuffled rows (seeded), stopping early once
    ``budget_s`` seconds have passed; SGD with ``momentum`` (default: it beat Adam in federated rounds
    on the watch data, ``bench/federated_watch.py --study``) or Adam (``optimizer="adam"``); the
    optimizer state restarts at every call. See the module doc for the objective and ``LocalResult`` for what is returned."""
    t0 = time.monotonic()
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    L = n_layers(tensors)
    names = trainable_names(tensors, train_layers)
    first = L - len(names) // 2
    layers = _layers(tensors, task, unfold=True, copy=True)
    P = layers[first:]
    # read only, by FedProx's term: the layers as given (the values P starts from), not a copy of them (#26 §5)
    start = _layers(tensors, task, unfold=True)[first:] if mu else P
    H = _forward(layers[:first], _standardize(tensors, X), last_is_output=False)  # frozen part, once
    if first == 0:  # H is the standardized X: the activation ranges read it, X can go (#26 §5)
        del X
    n = H.shape[0]
    outputs = P[-1][0].shape[1]
    Y = _targets(tensors, task, y, n, outputs)
    target = _target(tensors, outputs)
    y_real = np.asarray(y, H.dtype) if task == "regression" else Y
    loss_before, metric_before = _evaluate(P, H, Y, y_real, task, target)
    done, per_epoch = _descend(P, start, H, Y, task, epochs=epochs, lr=lr, batch=batch, mu=mu, alpha=alpha,
                               seed=seed, t0=t0, budget_s=budget_s, optimizer=optimizer, momentum=momentum)
    loss_after, metric_after = _evaluate(P, H, Y, y_real, task, target)
    if first:
        del H
    new, delta, norm = _fold_delta(tensors, task, names, P, target, clip)
    ranges = activation_ranges(new, H, standardized=True) if first == 0 else activation_ranges(new, X)
    return LocalResult(tensors=new, delta=delta, n=n, loss_before=loss_before, loss_after=loss_after,
                       metric_before=metric_before, metric_after=metric_after, norm=norm,
                       epochs=round(done / per_epoch, 4), seconds=time.monotonic() - t0, ranges=ranges)
