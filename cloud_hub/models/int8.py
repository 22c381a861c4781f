"""A federated round's INT8 model without onnxruntime: the base's INT8 graph with the new numbers.

``fedavg.quantize_from_ranges`` quantizes a round's FP32 model with onnxruntime's QDQ quantizer (u8 activations
from the devices' ranges, s8 weights with one scale per layer, s32 biases), which costs ``cloud-hub federate``
onnxruntime and its quantization tool (about 60 MB with their working memory, issue 26 §5). Every version of a
model has the same graph, so the quantizer's output differs from one round to the next only in its numbers: the
activations' scales and zero points, the weights, their scales, the biases and theirs. :func:`requantize` takes
the base's INT8 model as the template and computes those numbers as onnxruntime 1.32 does (``compute_scale_zp``,
``quantize_nparray``, the bias at the input's scale times the weight's, a weight's scale raised where its bias
would not fit int32); a test compares its bytes with the quantizer's. A template it cannot read (a weight with a
scale per output unit, as ``quantize_int8`` picks when calibration shows it helps, or a graph of other layers)
gives None: the round quantizes with onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_INT32 = np.iinfo(np.int32)


def _scale_zp(rmin: Any, rmax: Any, qmin: Any, qmax: Any, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's ``quant_utils.compute_scale_zp`` (no minimum real range): (zero point, scale)."""
    rmin = np.minimum(rmin, np.array(0, dtype=rmin.dtype))
    rmax = np.maximum(rmax, np.array(0, dtype=rmax.dtype))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, +absmax
    dr = np.array(rmax, dtype=np.float64) - np.array(rmin, dtype=np.float64)
    dq = np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64)
    scale = np.array(dr / dq)
    stored = scale.astype(rmax.dtype)
    if scale < np.finfo(rmax.dtype).tiny:
        return np.array(0, dtype=qmin.dtype), np.array(1.0, dtype=rmax.dtype)
    if symmetric:
        zero = np.array(np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)), dtype=qmin.dtype)
    else:
        zero = np.array(np.round(qmin - rmin / scale), dtype=qmin.dtype)
    return zero, stored


def _quantize(arr: np.ndarray, scale: np.ndarray, zero: np.ndarray, dtype: Any) -> np.ndarray:
    """onnxruntime's ``quant_utils.quantize_nparray`` for an integer type."""
    info = np.iinfo(dtype)
    out = np.asarray((arr.astype(np.float32) / scale).round() + zero)
    np.clip(out, np.array(info.min, dtype=dtype), np.array(info.max, dtype=dtype), out=out)
    return out.astype(dtype)


def _activation(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    return _scale_zp(np.array(np.float32(lo), dtype=np.float32), np.array(np.float32(hi), dtype=np.float32),
                     np.array(0, dtype=np.uint8), np.array(255, dtype=np.uint8), False)


def _weight_scale(w: np.ndarray, bias: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    """A weight's symmetric int8 scale, raised where its bias at ``input_scale * scale`` would not fit int32
    (``QDQQuantizer._adjust_weight_scale_for_int32_bias``, one scale per layer)."""
    _, scale = _scale_zp(np.array(w.min(), dtype=w.dtype), np.array(w.max(), dtype=w.dtype),
                         np.array(-127, dtype=np.int8), np.array(127, dtype=np.int8), True)
    qrange = np.array(_INT32.max, dtype=np.float64) - np.array(_INT32.min + 1, dtype=np.float64)
    rmin = np.minimum(bias.min(), np.array(0, dtype=np.float64))
    rmax = np.maximum(bias.max(), np.array(0, dtype=np.float64))
    smallest = 1.0001 * (2.0 * np.maximum(np.abs(rmin), np.abs(rmax))) / qrange
    candidate = np.array(input_scale.item(), dtype=np.float64) * np.array(scale.item(), dtype=np.float64)
    if 0.0 < candidate < smallest:
        scale = (np.array(scale.item(), dtype=np.float64) * (smallest / candidate)).astype(scale.dtype)
    return scale


def requantize(template: bytes, new: Mapping[str, np.ndarray], ranges: Sequence[Sequence[float]],
               relu_outputs: frozenset[str]) -> bytes | None:
    """The INT8 model ``quantize_from_ranges`` makes of the FP32 model with the layers ``new`` (``coef_i``,
    ``intercept_i``) and the per-layer ranges ``ranges`` (``[in_lo, in_hi, out_lo, out_hi]``), written into
    ``template``, an INT8 model of the same FP32 graph quantized per layer; ``relu_outputs``: the FP32 graph's
    tensors a Relu makes (a layer whose output one of them is gets ``(0, out_hi)``). None when the template is
    not such a model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(template)
    g = model.graph
    inits = {init.name: init for init in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    q = {n.input[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    layers = [n for n in g.node if n.op_type == "Gemm"]
    if not layers or len(layers) != len(ranges) or f"coef_{len(layers)}" in new:
        return None
    if any(n.op_type in ("MatMul", "QGemm", "MatMulInteger") for n in g.node):
        return None
    values: dict[str, np.ndarray] = {}
    act: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tensor -> (zero point, scale), first set wins

    def act_params(tensor: str, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray] | None:
        node = q.get(tensor)
        if node is None or len(node.input) != 3:
            return None
        act.setdefault(tensor, _activation(lo, hi))
        values[node.input[1]], values[node.input[2]] = act[tensor][1], act[tensor][0]
        return act[tensor]

    for i, (gemm, (in_lo, in_hi, out_lo, out_hi)) in enumerate(zip(layers, ranges, strict=True)):
        ins: list[Any] = [n for n in (dq.get(x) for x in gemm.input) if n is not None and len(n.input) == 3]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        if len(ins) != 3 or len(gemm.input) != 3 or attrs.get("transB", 0) or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        a_node, w_node, b_node = ins
        source = a_node.input[0]  # Q -> DQ: the quantized activation is the Q's input
        q_in = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.output[0] == source), None)
        if q_in is None:
            return None
        a = act_params(q_in.input[0], in_lo, in_hi)
        out = gemm.output[0]
        b = act_params(out, 0.0, max(float(out_hi), 0.0)) if out in relu_outputs else \
            act_params(out, float(out_lo), float(out_hi))
        if a is None or (b is None and out in q):
            return None
        if not all(x in inits for x in (*w_node.input, *b_node.input)):
            return None
        w_q, w_s, w_z = (inits[x] for x in w_node.input)
        b_q, b_s, b_z = (inits[x] for x in b_node.input)
        if list(w_s.dims) or list(w_z.dims):
            return None  # a scale per output unit: not a template this reads
        w = np.asarray(new[f"coef_{i}"], np.float32)
        bias = np.asarray(new[f"intercept_{i}"], np.float32)
        if tuple(w_q.dims) != w.shape or tuple(b_q.dims) != bias.shape:
            return None
        w_scale = _weight_scale(w, bias, a[1])
        values[w_q.name] = _quantize(w, w_scale, np.array(0, np.int8), np.int8)
        values[w_s.name], values[w_z.name] = w_scale, np.array(0, np.int8)
        bias_scale = np.asarray(a[1], np.float32) * w_scale * 1.0
        quantized = (np.asarray(bias, dtype=np.float64) / np.asarray(bias_scale, dtype=np.float64)).round()
        values[b_q.name] = np.clip(quantized, np.float64(_INT32.min), np.float64(_INT32.max)).astype(np.int32)
        values[b_s.name] = np.asarray(bias_scale, np.float32).reshape(-1)
        values[b_z.name] = np.array(0, np.int32)
    for name, value in values.items():
        init = inits[name]
        if tuple(init.dims) != tuple(np.shape(value)) or numpy_helper.to_array(init).dtype != np.asarray(value).dtype:
            return None
        _put(init, np.asarray(value))
    return bytes(model.SerializeToString())


def relu_outputs(fp32: bytes) -> frozenset[str]:
    """The tensors a Relu makes in an FP32 ONNX model (:func:`requantize`'s ``relu_outputs``)."""
    import onnx

    return frozenset(n.output[0] for n in onnx.load_from_string(fp32).graph.node if n.op_type == "Relu")


def _put(init: Any, value: np.ndarray) -> None:
    """``init`` holding ``value``, stored as it was (raw bytes, or the typed field: int8/uint8/int32 in int32_data)."""
    if init.raw_data:
        init.raw_data = value.tobytes()
    elif init.float_data:
        del init.float_data[:]
        init.float_data.extend(value.ravel().astype(np.float32).tolist())
    else:
        del init.int32_data[:]
        init.int32_data.extend(int(x) for x in value.ravel())
