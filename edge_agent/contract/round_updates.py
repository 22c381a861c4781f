"""The wire contract of a device's answer to a federated round: the update.

A device answers a round (:mod:`edge_agent.contract.rounds`) on its own ``{prefix}/devices/{id}/update``
(QoS 1, not retained), framed as every round message (:mod:`edge_agent.contract.round_frames`, magic
``EMLU``). An update carries the **INT8-quantized delta** of the tensors the round trains (one symmetric
scale per tensor), or float32 when the round asks so, and the activation ranges the device saw, from which
the hub calibrates the next INT8 model without data; an evaluation's answer carries no tensors, only scores.

Apart from the announcement because it travels the other way (device to hub) and changes with the device's
training and the hub's judgement, not with the round's plan. Decoding is strict, as in
:mod:`edge_agent.contract`: shapes, sizes and finiteness are checked here; whether an update fits its round
(selected device, base version, deadline) is the hub's judgement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

from edge_agent.contract.round_frames import (
    TensorSpec,
    frame,
    tensor_arrays,
    tensor_body,
    tensor_specs,
    unframe,
)
from edge_agent.contract.rounds import ENCODINGS, KINDS
from edge_agent.contract.wire import (
    SCHEMA_VERSION,
    ContractError,
    Delivery,
    check_choice,
    check_id,
    check_keys,
    float_field,
    int_field,
)

MAX_UPDATE_BYTES: Final = 16 << 20
_UPDATE_MAGIC: Final = b"EMLU"
UPDATE_DELIVERY: Final = Delivery(qos=1, retain=False)


@dataclass(frozen=True, slots=True)
class Update:
    """A device's answer to a round: its delta of the trainable tensors, and what it measured."""

    round_id: int
    device_id: str
    model: str
    base_version: int
    n_examples: int
    loss_before: float
    loss_after: float
    metric_before: float  # accuracy (classifier) or mean error (regressor) on its own windows
    metric_after: float
    norm: float  # of the delta before the device clipped it
    epochs: int
    seconds: float
    ranges: tuple[tuple[float, float, float, float], ...]  # per layer: input lo/hi, pre-activation lo/hi
    encoding: str
    tensors: tuple[TensorSpec, ...]
    delta: dict[str, np.ndarray] = field(repr=False)  # int8 (scaled by the spec) or float32
    sent: float = 0.0
    kind: str = "train"  # "evaluate": no tensors; metric_before/after = the base's/the candidate's score
    # evaluate: the INT8 models' scores, the running bundle's and the candidate's (what ships); metric_* are FP32
    int8_before: float | None = None
    int8_after: float | None = None

    def encode(self) -> bytes:
        header = {
            "v": SCHEMA_VERSION, "round": self.round_id, "device_id": self.device_id, "model": self.model,
            "base_version": self.base_version, "n": self.n_examples, "loss_before": self.loss_before,
            "loss_after": self.loss_after, "metric_before": self.metric_before, "metric_after": self.metric_after,
            "norm": self.norm, "epochs": self.epochs, "seconds": self.seconds,
            "ranges": [list(r) for r in self.ranges], "encoding": self.encoding,
            "tensors": [t.to_obj() for t in self.tensors], "sent": self.sent, "kind": self.kind,
        }
        if self.int8_before is not None and self.int8_after is not None:
            header["int8"] = [self.int8_before, self.int8_after]
        return frame(_UPDATE_MAGIC, header, tensor_body(self.tensors, self.delta, ENCODINGS[self.encoding]), MAX_UPDATE_BYTES)

    def dequantized(self) -> dict[str, np.ndarray]:
        """The delta as float32 (int8 times each tensor's scale)."""
        if self.encoding == "float32":
            return {k: v.astype(np.float32) for k, v in self.delta.items()}
        with np.errstate(over="ignore"):  # a huge scale overflows to inf, which the hub refuses
            return {t.name: self.delta[t.name].astype(np.float32) * np.float32(t.scale or 0.0) for t in self.tensors}


_UPDATE_KEYS: Final = frozenset({"v", "round", "device_id", "model", "base_version", "n", "loss_before", "loss_after",
                                 "metric_before", "metric_after", "norm", "epochs", "seconds", "ranges", "encoding",
                                 "tensors", "sent", "kind"})


def decode_update(payload: bytes, topic_device: str | None = None) -> Update:
    obj, body = unframe(payload, _UPDATE_MAGIC, MAX_UPDATE_BYTES, "update")
    what = "update"
    check_keys(obj, _UPDATE_KEYS, _UPDATE_KEYS | {"int8"}, what)
    int8 = obj.get("int8")
    if int8 is not None and (type(int8) is not list or len(int8) != 2 or obj["kind"] != "evaluate"):
        raise ContractError("update.int8 must be [the base's, the candidate's] INT8 score, in an evaluation only")
    int8_before, int8_after = (None, None) if int8 is None else (float_field({"int8": int8[0]}, "int8", what),
                                                                 float_field({"int8": int8[1]}, "int8", what))
    device_id = check_id(obj["device_id"])
    if topic_device is not None and device_id != topic_device:
        raise ContractError(f"device id {device_id!r} in the update differs from {topic_device!r} in the topic")
    encoding, kind = check_choice(obj, "encoding", ENCODINGS, what), check_choice(obj, "kind", KINDS, what)
    specs = tensor_specs(obj["tensors"], what, scaled=encoding == "int8", least=1 if kind == "train" else 0)
    ranges = obj["ranges"]
    if type(ranges) is not list or len(ranges) > 64 or any(
            type(r) is not list or len(r) != 4 or any(type(x) not in (int, float) for x in r) for r in ranges):
        raise ContractError("update.ranges must be a list of [in_lo, in_hi, out_lo, out_hi] per layer")
    delta = tensor_arrays(specs, body, ENCODINGS[encoding], "update")
    if encoding == "float32" and not all(np.isfinite(a).all() for a in delta.values()):
        raise ContractError("update delta holds NaN or inf")
    return Update(
        round_id=int_field(obj, "round", what, 1), device_id=device_id, model=check_id(obj["model"], "model name"),
        base_version=int_field(obj, "base_version", what, 1), n_examples=int_field(obj, "n", what, 1, 1 << 40),
        loss_before=float_field(obj, "loss_before", what), loss_after=float_field(obj, "loss_after", what),
        metric_before=float_field(obj, "metric_before", what), metric_after=float_field(obj, "metric_after", what),
        norm=float_field(obj, "norm", what), epochs=int_field(obj, "epochs", what, 0, 1000),
        seconds=float_field(obj, "seconds", what),
        ranges=tuple((float(a), float(b), float(c), float(d)) for a, b, c, d in ranges),
        encoding=encoding, tensors=specs, delta=delta, sent=float_field(obj, "sent", what), kind=kind,
        int8_before=int8_before, int8_after=int8_after,
    )


def encode_update_delta(delta: dict[str, np.ndarray], encoding: str) -> tuple[tuple[TensorSpec, ...], dict[str, np.ndarray]]:
    """Specs and payload arrays of a float delta: symmetric INT8 per tensor (scale = max|d| / 127) or float32."""
    specs, arrays = [], {}
    for name, d in delta.items():
        d = np.asarray(d, dtype=np.float32)
        if not np.isfinite(d).all():  # a diverged training: say so rather than send zeros
            raise ContractError(f"delta {name} holds NaN or inf")
        shape = tuple(int(x) for x in d.shape)
        if encoding == "float32":
            specs.append(TensorSpec(name, shape))
            arrays[name] = d
            continue
        peak = float(np.max(np.abs(d))) if d.size else 0.0
        scale = peak / 127.0 if peak > 0 else 0.0
        if scale == 0:
            q = np.zeros(d.shape, np.int8)
        else:  # one float32 temporary, rounded and clipped in place (not three: 2 MB of a device's round, #26 §5)
            t = np.divide(d, scale, dtype=np.float32)
            np.rint(t, out=t)
            q = np.clip(t, -127, 127, out=t).astype(np.int8)
        specs.append(TensorSpec(name, shape, scale))
        arrays[name] = q
    return tuple(specs), arrays
