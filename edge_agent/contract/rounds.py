"""The wire contract of a federated round's announcement: the hub's plan and the base weights.

A round is announced **retained** (QoS 1) on ``{prefix}/rounds/{model}``, so a device that connects
mid-round still sees it; an empty retained message ends the announcements. A device answers on its
own ``{prefix}/devices/{id}/update`` (:mod:`edge_agent.contract.round_updates`).

The announcement is binary, framed as every round message (:mod:`edge_agent.contract.round_frames`):
a 4-byte magic, a 4-byte header length, a JSON header, then the tensors' bytes in the header's order
(little-endian, C order). It carries the base version's trainable FP32 weights, and the whole header
(with the sha256 of those bytes) is Ed25519-signed like a model manifest; the device checks it against
the model it runs before it trains. An ``evaluate`` announcement also carries, after the weights, the
INT8 ONNX model the hub will ship if it passes (header ``int8``: its size and sha256, so the signature
covers it): the devices score that model itself, not only its FP32 weights, and answer with both scores.
The plan also says what an update holds (:data:`KINDS`, :data:`ENCODINGS`).

Decoding is strict, as in :mod:`edge_agent.contract`: shapes, sizes and finiteness are checked here;
whether an update fits its round (selected device, base version, deadline) is the hub's judgement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final

import numpy as np

from edge_agent.contract.bundles import TASKS
from edge_agent.contract.privacy import DpParams
from edge_agent.contract.round_frames import (
    SignedHeader,
    TensorSpec,
    frame,
    tensor_arrays,
    tensor_body,
    tensor_specs,
    unframe_offset,
)
from edge_agent.contract.wire import (
    SCHEMA_VERSION,
    ContractError,
    Delivery,
    check_choice,
    check_id,
    check_keys,
    float_field,
    hex64,
    int_field,
    opt_str,
)

MAX_ROUND_BYTES: Final = 32 << 20
_ROUND_MAGIC: Final = b"EMLR"
ROUND_DELIVERY: Final = Delivery(qos=1, retain=True)  # reconnecting devices see the open round
KINDS: Final = ("train", "evaluate")
# what an update's delta is sent as (the plan's ``encoding``; edge_agent.contract.round_updates)
ENCODINGS: Final[dict[str, np.dtype]] = {"int8": np.dtype("<i1"), "float32": np.dtype("<f4")}


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
        body = tensor_body(self.plan.tensors, self.weights, WEIGHTS_DTYPES[self.plan.weights_dtype]) + self.int8
        return frame(_ROUND_MAGIC, self.plan.header(), body, MAX_ROUND_BYTES)


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
        body = tensor_body(specs, weights, dtype)
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
    return unframe_offset(payload, _ROUND_MAGIC, MAX_ROUND_BYTES, "round announcement")[0]  # no copy of the weights


def decode_announcement(payload: bytes) -> Announcement:
    """Parse an announcement and check its weights against the digest. The signature is checked by the
    receiver (``edge_agent.device.bundle.verify_signed``), the fit to its running model by the device.

    The weights are read-only views of ``payload`` in the dtype they were sent in (``plan.weights_dtype``:
    float32, or float16, federate's default): a device holds the announcement anyway, and a float32 copy put
    1.3 MB more on an agent's peak in a round (#26 §5). A caller converts where it computes (float16 to
    float32 is exact), as the device's fine-tune and scores do, and copies what it changes (``np.array``)."""
    obj, end = unframe_offset(payload, _ROUND_MAGIC, MAX_ROUND_BYTES, "round announcement")
    body: memoryview = memoryview(payload).toreadonly()[end:]
    what = "round"
    check_keys(obj, _ROUND_KEYS - _ROUND_OPTIONAL, _ROUND_KEYS | _ROUND_OPTIONAL, what)
    body, int8 = _int8_part(obj, body)
    task, encoding = check_choice(obj, "task", TASKS, what), check_choice(obj, "encoding", ENCODINGS, what)
    parts = obj["participants"]
    if type(parts) is not list or len(parts) > 100_000:
        raise ContractError("round.participants must be a list of device ids")
    specs = tensor_specs(obj["tensors"], what, scaled=False)
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
    weights = tensor_arrays(specs, body, WEIGHTS_DTYPES[weights_dtype], "round announcement")
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
