"""A round's INT8 model written into its base's INT8 graph (cloud_hub/models/int8.py) is, byte for byte, the model
onnxruntime's quantizer makes (fedavg.quantize_from_ranges), so `cloud-hub federate` need not load onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_hub.models import int8, quantize, training, weights
from cloud_hub.rounds import fedavg
from tests.helpers import SMALL

KINDS = ["binary", "classes", "regression", "outputs", "two hidden layers"]


def _model(kind: str, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    X = rng.normal(size=(200, 6)).astype(np.float32)
    y = {"binary": lambda: np.array(["walk", "run"])[rng.integers(0, 2, 200)],
         "regression": lambda: rng.normal(size=200), "outputs": lambda: rng.normal(size=(200, 2))}.get(
        kind, lambda: np.array(["walk", "run", "sit"])[rng.integers(0, 3, 200)])()
    config = training.TrainConfig(hidden=(16, 8), max_iter=30) if kind == "two hidden layers" else SMALL
    model = training.train(X, y, config=config)
    fp32 = training.export_onnx(model, X.shape[1])
    return weights.to_bytes(model, fp32), X


def _moved(t: dict[str, np.ndarray], rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (v + rng.normal(0, scale, v.shape).astype(np.float32) if k[:4] in ("coef", "inte") else v)
            for k, v in t.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ["federated", "trained per layer"])
def test_the_requantized_model_is_the_quantizers_byte_for_byte(kind: str, template: str) -> None:
    rng = np.random.default_rng(KINDS.index(kind))
    blob, X = _model(kind, rng)
    fp32 = weights.graph(blob)
    t = weights.tensors(blob)
    layers = sum(k.startswith("coef_") for k in t)
    base = (fedavg.quantize_from_ranges(fp32, [[-3.0, 3.0, -2.0, 4.0]] * layers) if template == "federated" else
            quantize.quantize_int8(fp32, X, per_channel=False))
    relu = int8.relu_outputs(fp32)
    for scale in (0.01, 0.3):  # small steps, and large ones (weights far past the base's range)
        new = _moved(t, rng, scale)
        ranges = [[-abs(rng.normal(0, 3)), abs(rng.normal(0, 3)), -abs(rng.normal(0, 5)), abs(rng.normal(0, 5))]
                  for _ in range(layers)]
        refilled = weights.fill_graph(fp32, new)
        assert int8.requantize(base, new, ranges, relu) == fedavg.quantize_from_ranges(refilled, ranges)


def test_a_bias_too_large_for_int32_raises_its_weights_scale_as_the_quantizer_does() -> None:
    rng = np.random.default_rng(7)
    blob, _ = _model("classes", rng)
    fp32, t = weights.graph(blob), weights.tensors(blob)
    layers = sum(k.startswith("coef_") for k in t)
    new = {**t, "coef_0": t["coef_0"] * np.float32(1e-6), "intercept_0": t["intercept_0"] + np.float32(1e4)}
    ranges = [[-1e-3, 1e-3, -1.0, 1.0]] * layers
    base = fedavg.quantize_from_ranges(fp32, ranges)
    got = int8.requantize(base, new, ranges, int8.relu_outputs(fp32))
    assert got == fedavg.quantize_from_ranges(weights.fill_graph(fp32, new), ranges)


def test_a_template_quantized_per_output_unit_or_of_other_layers_is_not_read() -> None:
    rng = np.random.default_rng(8)
    blob, X = _model("classes", rng)
    fp32, t = weights.graph(blob), weights.tensors(blob)
    relu = int8.relu_outputs(fp32)
    ranges = [[-3.0, 3.0, -2.0, 4.0]] * 2
    per_unit = quantize.quantize_int8(fp32, X, per_channel=True)
    assert int8.requantize(per_unit, t, ranges, relu) is None  # the round quantizes with onnxruntime
    other, _ = _model("two hidden layers", rng)
    assert int8.requantize(fedavg.quantize_from_ranges(weights.graph(other), [[-1, 1, -1, 1]] * 3), t, ranges,
                           relu) is None
