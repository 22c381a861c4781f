"""The wire contract of federated rounds: the hub's announcement and a device's update.

A round is announced **retained** (QoS 1) on ``{prefix}/rounds/{model}``, so a device that connects
mid-round still sees it; an empty retained message ends the announcements. A device answers on its
own ``{prefix}/devices/{id}/update`` (QoS 1, not retained).

Both are binary: a 4-byte magic, a 4-byte header length, a JSON header, then the tensors' bytes in
the header's order (little-endian, C order). The announcement carries the base version's trainable
FP32 weights, and the whole header (with the sha256 of those bytes) is Ed25519-signed like a model
manifest; the device checks it against the model it runs before it trains. An ``evaluate``
announcement also carries, after the weights, the INT8 ONNX model the hub will ship if it passes
(header ``int8``: its size and sha256, so the signature covers it): the devices score that model
itself, not only its FP32 weights, and answer with both scores. An update carries the
**INT8-quantized delta** of the tensors the round trains (one symmetric scale per tensor) and the
activation ranges the device saw, from which the hub calibrates the next INT8 model without data.

Decoding is strict, as in :mod:`edge_agent.contract`: shapes, sizes and finiteness are checked here;
whether an update fits its round (selected device, base version, deadline) is the hub's judgement.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Self

import numpy as np
import orjson

from edge_agent.contract.bundles import TASKS, signature_bytes
from edge_agent.contract.privacy import DpParams
from edge_agent.contract.wire import (
    MAX_HEADER_DEPTH,
    SCHEMA_VERSION,
    ContractError,
    Delivery,
    check_choice,
    check_id,
    check_keys,
    float_field,
    hex64,
    int_field,
    load_json,
    opt_str,
    show,
)

MAX_ROUND_BYTES: Final = 32 << 20
MAX_UPDATE_BYTES: Final = 16 << 20
MAX_TENSORS: Final = 64
_HEADER: Final = struct.Struct(">4sI")
_ROUND_MAGIC: Final = b"EMLR"
_UPDATE_MAGIC: Final = b"EMLU"
ROUND_DELIVERY: Final = Delivery(qos=1, retain=True)  # reconnecting devices see the open round
UPDATE_DELIVERY: Final = Delivery(qos=1, retain=False)
KINDS: Final = ("train", "evaluate")
ENCODINGS: Final[dict[str, np.dtype]] = {"int8": np.dtype("<i1"), "float32": np.dtype("<f4")}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    scale: float | None = None  # int8 deltas: value = int8 * scale

    def size(self) -> int:
        return math.prod(self.shape)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.scale is not None:
            obj["scale"] = self.scale
        return obj


def _specs(value: Any, what: str, scaled: bool, least: int = 1) -> tuple[TensorSpec, ...]:
    if type(value) is not list or not least <= len(value) <= MAX_TENSORS:
        raise ContractError(f"{what}.tensors must be a list of {least} to {MAX_TENSORS} tensors")
    out = []
    for i, t in enumerate(value):
        w = f"{what}.tensors[{i}]"
        if type(t) is not dict:
            raise ContractError(f"{w} must be an object")
        check_keys(t, frozenset({"name", "shape"} | ({"scale"} if scaled else set())),
                    frozenset({"name", "shape", "scale"}), w)
        check_id(t["name"], "tensor name")
        shape = t["shape"]
        if type(shape) is not list or not 1 <= len(shape) <= 4 or any(type(d) is not int or not 0 < d <= 1 << 20
                                                                       for d in shape):
            raise ContractError(f"{w}.shape must be 1 to 4 positive integers, got {show(shape)}")
        scale = float_field(t, "scale", w) if scaled else None
        if scale is not None and scale < 0:
            raise ContractError(f"{w}.scale must not be negative")
        out.append(TensorSpec(t["name"], tuple(shape), scale))
    if len({s.name for s in out}) != len(out):
        raise ContractError(f"{what}.tensors repeats a name")
    return tuple(out)


def frame(magic: bytes, header: dict[str, Any], body: bytes, limit: int) -> bytes:
    """magic, header length, JSON header, body: the framing of rounds' binary messages; ContractError past ``limit``."""
    head = orjson.dumps(header)
    payload = _HEADER.pack(magic, len(head)) + head + body
    if len(payload) > limit:
        raise ContractError(f"payload of {len(payload)} bytes is over the {limit}-byte limit")
    return payload


def unframe(payload: bytes, magic: bytes, limit: int, what: str) -> tuple[dict[str, Any], bytes]:
    obj, end = _unframe(payload, magic, limit, what)
    return obj, payload[end:]


def _unframe(payload: bytes, magic: bytes, limit: int, what: str) -> tuple[dict[str, Any], int]:
    """:func:`unframe`'s header and where the body starts (no copy of the body)."""
    if len(payload) > limit:
        raise ContractError(f"{what} of {len(payload)} bytes is over the {limit}-byte limit")
    if len(payload) < _HEADER.size or payload[:4] != magic:
        raise ContractError(f"not a {what} (bad magic)")
    _, head_len = _HEADER.unpack_from(payload)
    end = _HEADER.size + head_len
    if end > len(payload):
        raise ContractError(f"{what} header length points past the end of the payload")
    return load_json(payload[_HEADER.size:end], 1 << 20, what, MAX_HEADER_DEPTH), end


def _arrays(specs: tuple[TensorSpec, ...], body: bytes | memoryview, dtype: np.dtype, what: str) -> dict[str, np.ndarray]:
    need = sum(s.size() for s in specs) * dtype.itemsize
    if len(body) != need:
        raise ContractError(f"{what} carries {len(body)} bytes of tensors, its header describes {need}")
    flat = np.frombuffer(body, dtype=dtype)
    out, at = {}, 0
    for s in specs:
        out[s.name] = flat[at:at + s.size()].reshape(s.shape)
        at += s.size()
    return out


# --------------------------------------------------------------------------- announcements


class WeightsRangeError(ContractError):
    """Weights that do not fit the announcement's ``weights_dtype`` (float16: past 65,504)."""


def trainable_names(n_layers: int, train_layers: int | None = None) -> tuple[str, ...]:
    """The tensors a round trains (:attr:`RoundPlan.trainable`, the names of an update's delta): ``coef_i``
    and ``intercept_i`` of the last ``train_layers`` of a model's ``n_layers`` layers (None: all of them),
    clamped to ``1..n_layers`` (the hub's ``--train-layers`` may exceed a model's depth). The device's trainer
    (``edge_agent.device.learn.trainable_names``) takes its names from here after refusing a count outside
    that range."""
    k = n_layers if train_layers is None else max(1, min(train_layers, n_layers))
    return tuple(name for i in range(n_layers - k, n_layers) for name in (f"coef_{i}", f"intercept_{i}"))


@dataclass(frozen=True, slots=True)
class SecureParams:
    """A secure round's numbers (:mod:`edge_agent.contract.secagg`, :mod:`edge_agent.contract.secure_codec`): the
    share threshold, the integer grid (``peak``, ``spread``, the rotation's ``seed``) and the ring's width."""

    threshold: int
    peak: int
    spread: float
    seed: int
    bits: int

    def to_obj(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "peak": self.peak, "spread": float(self.spread), "seed": self.seed,
                "bits": self.bits}

    @staticmethod
    def from_obj(obj: Any, participants: int) -> SecureParams:
        what = "round.secure"
        if type(obj) is not dict:
            raise ContractError(f"{what} must be an object")
        keys = frozenset({"threshold", "peak", "spread", "seed", "bits"})
        check_keys(obj, keys, keys, what)
        spread = float_field(obj, "spread", what)
        if not 0 < spread <= 100:
            raise ContractError(f"{what}.spread must be in (0, 100]")
        return SecureParams(threshold=int_field(obj, "threshold", what, 1, max(1, participants)),
                            peak=int_field(obj, "peak", what, 1, 1 << 15), spread=spread,
                            seed=int_field(obj, "seed", what, 0), bits=int_field(obj, "bits", what, 2, 32))


class SignedHeader:
    """A header that carries its own Ed25519 signature (a round's plan, a secure round's step): signed over its
    canonical JSON without the signature (keys sorted, its key id included), as a manifest is."""

    __slots__ = ()
    signed_as: ClassVar[str]
    signature: str | None

    def header(self) -> dict[str, Any]:
        raise NotImplementedError

    def signing_bytes(self) -> bytes:
        obj = self.header()
        obj.pop("signature")
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    def with_signature(self, signature: bytes, key_id: str) -> Self:
        return replace(self, key_id=key_id, signature=base64.b64encode(signature).decode())  # type: ignore[type-var]

    def signature_bytes(self) -> bytes | None:
        return signature_bytes(self.signature, self.signed_as)


@dataclass(frozen=True, slots=True)
class RoundPlan(SignedHeader):
    """What a round asks of the devices (the signed header of the announcement, without tensors)."""

    signed_as: ClassVar[str] = "round"

    round_id: int
    model: str
    base_version: int
    base_sha256: str
    task: str
    participants: tuple[str, ...]
    deadline: float  # hub clock, unix seconds
    epochs: int = 1
    lr: float = 1e-3
    batch: int = 64
    mu: float = 0.0  # FedProx proximal weight; 0 = FedAvg
    alpha: float = 0.0  # L2, as the hub's training defines it
    clip: float = 1.0  # devices clip their delta's L2 norm to this; the hub refuses far above it
    min_windows: int = 32  # a device answers only when it holds at least this many labelled windows...
    min_new: int = 0  # ...of which at least this many arrived since it last answered
    min_updates: int = 1  # K: the hub closes the round once it has this many
    max_staleness: int = 2  # rounds an update's base may lag and still count (weighted down)
    encoding: str = "int8"
    budget_s: float = 60.0  # a device stops training after this much wall time
    created: float = 0.0
    weights_sha256: str = ""
    tensors: tuple[TensorSpec, ...] = ()
    trainable: tuple[str, ...] = ()  # the tensors a device trains and sends back
    kind: str = "train"  # or "evaluate": score these weights (the round's candidate) on held-out windows
    int8_sha256: str = ""  # evaluate: the INT8 ONNX model that ships, after the weights (int8_bytes long)
    int8_bytes: int = 0
    secure: SecureParams | None = None  # secure aggregation: the hub learns only the sum of the updates
    dp: DpParams | None = None  # differential privacy: clipped, noised (on the devices, or at the hub)
    weights_dtype: str = "float32"  # or "float16": the announcement's weights at half the bytes
    key_id: str | None = None
    signature: str | None = None

    def header(self) -> dict[str, Any]:
        # floats written as floats (10.0, not 10): a device re-serializes what it decoded to check the signature
        obj = {
            "v": SCHEMA_VERSION, "round": self.round_id, "model": self.model, "base_version": self.base_version,
            "base_sha256": self.base_sha256, "task": self.task, "participants": list(self.participants),
            "deadline": float(self.deadline), "epochs": self.epochs, "lr": float(self.lr), "batch": self.batch,
            "mu": float(self.mu), "alpha": float(self.alpha), "clip": float(self.clip), "min_windows": self.min_windows, "min_new": self.min_new,
            "min_updates": self.min_updates, "max_staleness": self.max_staleness, "encoding": self.encoding,
            "budget_s": float(self.budget_s), "created": float(self.created), "weights_sha256": self.weights_sha256,
            "tensors": [t.to_obj() for t in self.tensors], "trainable": list(self.trainable), "kind": self.kind,
            "key_id": self.key_id, "signature": self.signature,
        }
        if self.int8_bytes:  # only then: a round without it reads as before
            obj["int8"] = {"bytes": self.int8_bytes, "sha256": self.int8_sha256}
        if self.secure is not None:
            obj["secure"] = self.secure.to_obj()
        if self.dp is not None:
            obj["dp"] = self.dp.to_obj()
        if self.weights_dtype != "float32":  # only then: a round without it reads as before
            obj["weights_dtype"] = self.weights_dtype
        return obj



@dataclass(frozen=True, slots=True)
class Announcement:
    plan: RoundPlan
    weights: dict[str, np.ndarray] = field(repr=False)
    int8: bytes = field(default=b"", repr=False)  # evaluate: the INT8 ONNX model (plan.int8_sha256)

    def encode(self) -> bytes:
        body = _body(self.plan.tensors, self.weights, WEIGHTS_DTYPES[self.plan.weights_dtype]) + self.int8
        return frame(_ROUND_MAGIC, self.plan.header(), body, MAX_ROUND_BYTES)


def _body(specs: tuple[TensorSpec, ...], arrays: dict[str, np.ndarray], dtype: np.dtype) -> bytes:
    return b"".join(np.ascontiguousarray(arrays[s.name], dtype=dtype).tobytes() for s in specs)


def announcement(plan: RoundPlan, weights: dict[str, np.ndarray], int8: bytes = b"") -> Announcement:
    """An announcement of ``weights`` (float32) and, for an evaluation, the ``int8`` ONNX model built from
    them, with their specs and digests filled into ``plan``."""
    specs = tuple(TensorSpec(n, tuple(int(d) for d in np.shape(a))) for n, a in weights.items())
    missing = [t for t in plan.trainable if t not in weights]
    if missing or (plan.kind == "train") != bool(plan.trainable):
        raise ContractError(f"a {plan.kind} round with trainable {list(plan.trainable)}; the weights lack {missing}")
    dtype = WEIGHTS_DTYPES.get(plan.weights_dtype)
    if dtype is None:
        raise ContractError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}")
    with np.errstate(over="ignore"):  # a value past float16's range becomes inf: refused just below
        body = _body(specs, weights, dtype)
        fits = all(np.isfinite(np.asarray(weights[s.name], dtype)).all() for s in specs)
    if not fits:
        raise WeightsRangeError(f"weights past the range of {plan.weights_dtype}: announce them as float32")
    if int8 and plan.kind != "evaluate":
        raise ContractError("only an evaluate round carries an INT8 model")
    plan = replace(plan, tensors=specs, weights_sha256=hashlib.sha256(body).hexdigest(), key_id=None, signature=None,
                   int8_sha256=hashlib.sha256(int8).hexdigest() if int8 else "", int8_bytes=len(int8))
    # as the devices will read them (float16: rounded)
    return Announcement(plan, {s.name: np.ascontiguousarray(np.asarray(weights[s.name], dtype), dtype=np.float32)
                               for s in specs}, int8)


_ROUND_KEYS: Final = frozenset(RoundPlan(0, "m", 1, "", "classification", (), 0.0).header())
_ROUND_OPTIONAL: Final = frozenset({"key_id", "signature", "int8", "secure", "dp", "weights_dtype"})
# An announcement's weights: float32, or float16 (half the bytes down; a device trains from the rounded base
# and sends its delta against it, so the hub's FP32 master loses nothing: bench/federated_watch.py --fp16).
WEIGHTS_DTYPES: Final[dict[str, np.dtype[Any]]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def _int8_part(obj: dict[str, Any], body: memoryview) -> tuple[memoryview, bytes]:
    """(the weights' bytes, the INT8 model's) of an announcement's body, the model checked against its digest."""
    if "int8" not in obj:
        return body, b""
    spec = obj["int8"]
    if type(spec) is not dict or obj.get("kind") != "evaluate":
        raise ContractError("round.int8 must be an object {bytes, sha256}, in an evaluate round only")
    check_keys(spec, frozenset({"bytes", "sha256"}), frozenset({"bytes", "sha256"}), "round.int8")
    size = int_field(spec, "bytes", "round.int8", 1, MAX_ROUND_BYTES)
    if size > len(body) or hashlib.sha256(body[len(body) - size:]).hexdigest() != spec["sha256"]:
        raise ContractError("round INT8 model does not match its sha256")
    return body[:len(body) - size], bytes(body[len(body) - size:])


def announcement_header(payload: bytes) -> dict[str, Any]:
    """An announcement's header as decoded JSON, not yet interpreted: the receiver checks its signature
    (``edge_agent.contract.signed_part``) before :func:`decode_announcement` reads a field of it."""
    return _unframe(payload, _ROUND_MAGIC, MAX_ROUND_BYTES, "round announcement")[0]  # no copy of the weights


def decode_announcement(payload: bytes) -> Announcement:
    """Parse an announcement and check its weights against the digest. The signature is checked by the
    receiver (``edge_agent.device.bundle.verify_signed``), the fit to its running model by the device.

    The weights are read-only views of ``payload`` in the dtype they were sent in (``plan.weights_dtype``:
    float32, or float16, federate's default): a device holds the announcement anyway, and a float32 copy put
    1.3 MB more on an agent's peak in a round (#26 §5). A caller converts where it computes (float16 to
    float32 is exact), as the device's fine-tune and scores do, and copies what it changes (``np.array``)."""
    obj, end = _unframe(payload, _ROUND_MAGIC, MAX_ROUND_BYTES, "round announcement")
    body: memoryview = memoryview(payload).toreadonly()[end:]
    what = "round"
    check_keys(obj, _ROUND_KEYS - _ROUND_OPTIONAL, _ROUND_KEYS | _ROUND_OPTIONAL, what)
    body, int8 = _int8_part(obj, body)
    task, encoding = check_choice(obj, "task", TASKS, what), check_choice(obj, "encoding", ENCODINGS, what)
    parts = obj["participants"]
    if type(parts) is not list or len(parts) > 100_000:
        raise ContractError("round.participants must be a list of device ids")
    specs = _specs(obj["tensors"], what, scaled=False)
    kind, trainable = check_choice(obj, "kind", KINDS, what), obj["trainable"]
    if type(trainable) is not list or not all(type(t) is str for t in trainable) \
            or not set(trainable) <= {s.name for s in specs} or (kind == "train") != bool(trainable):
        raise ContractError("round.trainable must name some of its tensors (none in an evaluate round)")
    if hashlib.sha256(body).hexdigest() != hex64(obj, "weights_sha256", what):
        raise ContractError("round weights do not match their sha256")
    plan = RoundPlan(
        round_id=int_field(obj, "round", what, 1), model=check_id(obj["model"], "model name"),
        base_version=int_field(obj, "base_version", what, 1), base_sha256=hex64(obj, "base_sha256", what),
        task=task, participants=tuple(check_id(p) for p in parts), deadline=float_field(obj, "deadline", what),
        epochs=int_field(obj, "epochs", what, 1, 1000), lr=float_field(obj, "lr", what), batch=int_field(obj, "batch", what, 1, 1 << 16),
        mu=float_field(obj, "mu", what), alpha=float_field(obj, "alpha", what), clip=float_field(obj, "clip", what),
        min_windows=int_field(obj, "min_windows", what, 1), min_new=int_field(obj, "min_new", what, 0),
        min_updates=int_field(obj, "min_updates", what, 1),
        max_staleness=int_field(obj, "max_staleness", what, 0, 1000), encoding=encoding,
        budget_s=float_field(obj, "budget_s", what), created=float_field(obj, "created", what),
        weights_sha256=obj["weights_sha256"], tensors=specs, trainable=tuple(trainable), kind=kind,
        key_id=opt_str(obj, "key_id", what, 128), signature=opt_str(obj, "signature", what, 256),
    )
    weights_dtype = check_choice(obj, "weights_dtype", WEIGHTS_DTYPES, what) if "weights_dtype" in obj else "float32"
    weights = _arrays(specs, body, WEIGHTS_DTYPES[weights_dtype], "round announcement")
    for a in weights.values():
        a.flags.writeable = False  # views of the payload: nothing writes into the retained message
    if not all(np.isfinite(a).all() for a in weights.values()):
        raise ContractError("round weights hold NaN or inf")
    if int8:
        plan = replace(plan, int8_sha256=obj["int8"]["sha256"], int8_bytes=len(int8))
    if weights_dtype != "float32":
        plan = replace(plan, weights_dtype=weights_dtype)
    if "secure" in obj:
        if kind != "train":
            raise ContractError("round.secure belongs to a train round")
        if list(plan.participants) != sorted(set(plan.participants)):  # the devices' Shamir x follows this order
            raise ContractError("round.participants of a secure round must be sorted and distinct")
        plan = replace(plan, secure=SecureParams.from_obj(obj["secure"], len(plan.participants)))
    if "dp" in obj:
        dp = DpParams.from_obj(obj["dp"])
        if kind != "train" or (dp.mode == "distributed") != (plan.secure is not None):
            raise ContractError("round.dp belongs to a train round; distributed noise with secure aggregation only")
        plan = replace(plan, dp=dp)
    return Announcement(plan, weights, int8)


# --------------------------------------------------------------------------- updates


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
        return frame(_UPDATE_MAGIC, header, _body(self.tensors, self.delta, ENCODINGS[self.encoding]), MAX_UPDATE_BYTES)

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
    specs = _specs(obj["tensors"], what, scaled=encoding == "int8", least=1 if kind == "train" else 0)
    ranges = obj["ranges"]
    if type(ranges) is not list or len(ranges) > 64 or any(
            type(r) is not list or len(r) != 4 or any(type(x) not in (int, float) for x in r) for r in ranges):
        raise ContractError("update.ranges must be a list of [in_lo, in_hi, out_lo, out_hi] per layer")
    delta = _arrays(specs, body, ENCODINGS[encoding], "update")
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
