"""The model behind one class: an onnxruntime session built from a verified bundle.

A model update builds a new :class:`ModelRunner` (which validates and warms up), and only then is
one reference swapped: a bad model never replaces a good one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edge_agent import exits
from edge_agent.contract import Bundle, Manifest
from edge_agent.preprocess import PreprocessParams


class ModelError(exits.Failure, ValueError):
    """A model that cannot serve (bad ONNX, wrong input shape, outputs we cannot read)."""

    exit_code = exits.MODEL


@dataclass(frozen=True, slots=True)
class Prediction:
    labels: list[str] | None  # classifier: predicted class per window
    confidence: np.ndarray | None  # classifier: its probability
    values: np.ndarray | None  # regressor: float32[k, outputs]
    latency_ms: float  # per window: batch wall time / batch size


# Windows per onnxruntime run: its arena grows with the batch (measured with the default model:
# +3 MB at 300 windows, +14 MB at 2,600) while a run costs ~10 us of overhead. 128 rather than 256:
# -0.3 MB anonymous in a replay for no CPU that the bench can see (#27 §4).
INFER_SLICE = 128


def cpu_session(onnx_bytes: bytes, *, threads: int = 1, optimized_path: str | None = None,
                lean: bool = False) -> ort.InferenceSession:
    """The one way we open an onnxruntime session, on the device and on the hub alike: CPU,
    ``threads`` intra-op threads (1 on a small device), sequential, every graph optimization.

    The memory arena and memory patterns stay on (#27 §4, the default model, batches of 1-256): without
    the arena the process held 0.6-1.1 MB more anonymous memory (freed blocks left in malloc's heap)
    and ran 25 % slower; without patterns it held as much and ran slower; without weight prepacking
    it held as much once it had run, 10-20 % slower; the basic optimization level held 4 MB more, 4x slower.
    ``lean`` turns both off for a process that scores once and watches its peak (``federate``'s hold-out gate,
    through ``cloud_hub.models.quantize.session``): the same graph, kernels and results."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if lean:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


class ModelRunner:
    """Wraps one ``InferenceSession``; ``predict`` takes a float32[k, n_features] batch."""

    def __init__(self, bundle: Bundle, *, intra_op_threads: int = 1) -> None:
        m: Manifest = bundle.manifest
        self.manifest = m
        try:
            self.params = PreprocessParams.from_dict(m.preprocess)
        except ValueError as exc:
            raise ModelError(f"manifest preprocessing parameters: {exc}") from exc
        if not self.params.is_fitted:
            raise ModelError("manifest preprocessing parameters carry no normalization statistics")
        if self.params.n_features != m.n_features:
            raise ModelError(
                f"manifest says {m.n_features} features but its preprocessing produces {self.params.n_features}"
            )
        try:
            self.session = cpu_session(bundle.model, threads=intra_op_threads)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != m.input_name:
            raise ModelError(f"model inputs {[i.name for i in inputs]} do not match manifest input {m.input_name!r}")
        shape = inputs[0].shape
        if len(shape) != 2 or shape[1] != m.n_features:
            raise ModelError(f"model input shape {shape} does not take {m.n_features} features")
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"model input type {inputs[0].type} is not float32")
        outputs = self.session.get_outputs()
        names = [o.name for o in outputs]
        if m.task == "regression" and outputs[0].type not in ("tensor(float)", "tensor(double)"):
            raise ModelError(f"a regressor's output {names[0]!r} is {outputs[0].type}, not numbers: is the task right?")
        if m.task == "classification":
            self._prob_output = next((n for n in names if "prob" in n), None)
            if self._prob_output is None:
                raise ModelError(f"classifier outputs {names} have no probabilities")
            if not m.labels:
                raise ModelError("classifier manifest has no labels")
        else:
            self._prob_output = None
        self._wanted = [self._prob_output or names[0]]
        self._labels = np.asarray(m.labels, dtype=object)
        self.warm_up()

    @property
    def version(self) -> int:
        return self.manifest.version

    def warm_up(self, runs: int = 3) -> None:
        """First runs allocate and pick kernels; do that before serving, and prove the model runs."""
        x = np.zeros((4, self.manifest.n_features), dtype=np.float32)
        for _ in range(runs):
            pred = self.predict(x)
        width = len(self.manifest.labels)
        if pred.confidence is not None and (not np.all(np.isfinite(pred.confidence)) or width < 1):
            raise ModelError("model produced non-finite probabilities on warm-up")
        if pred.values is not None and not np.all(np.isfinite(pred.values)):
            raise ModelError("model produced non-finite values on warm-up")

    def predict(self, features: np.ndarray) -> Prediction:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.manifest.n_features:
            raise ModelError(f"expected a batch of shape (k, {self.manifest.n_features}), got {x.shape}")
        t0 = time.perf_counter()
        try:  # only the output used (a classifier's probabilities, a regressor's values), slice by slice
            parts = [self.session.run(self._wanted, {self.manifest.input_name: x[i : i + INFER_SLICE]})[0]
                     for i in range(0, max(len(x), 1), INFER_SLICE)]
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        except Exception as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        latency = (time.perf_counter() - t0) * 1000.0 / max(len(x), 1)
        if self._prob_output is not None:
            prob = np.asarray(out, dtype=np.float32)
            if prob.ndim != 2 or prob.shape[1] != len(self._labels):
                raise ModelError(f"probabilities of shape {prob.shape} do not match {len(self._labels)} labels")
            if not np.isfinite(prob).all():
                raise ModelError(f"model v{self.version} gave non-finite probabilities for "
                                 f"{int((~np.isfinite(prob).all(axis=1)).sum())} of {len(prob)} windows")
            idx = prob.argmax(axis=1)
            conf = np.clip(prob[np.arange(len(idx)), idx], 0.0, 1.0)
            return Prediction(list(self._labels[idx]), conf, None, latency)
        values = np.asarray(out, dtype=np.float32).reshape(len(x), -1)
        if not np.isfinite(values).all():
            raise ModelError(f"model v{self.version} gave non-finite values for "
                             f"{int((~np.isfinite(values).all(axis=1)).sum())} of {len(values)} windows")
        return Prediction(None, None, values, latency)
