"""The wire messages of a secure round (:mod:`edge_agent.contract.secagg`): the hub's steps, the devices' answers.

A secure round is announced like any round (``{prefix}/rounds/{model}``, signed, retained) with ``secure`` in
its plan. Then:

* a device answers on its update topic (``{prefix}/devices/{id}/update``, QoS 1) with :class:`Answer`
  messages (magic ``EMLS``): ``advert`` (its two public keys, at once), ``shares`` (its Shamir shares sealed
  for each peer), ``masked`` (its masked integer vectors: the delta on the round's grid and its statistics),
  ``reveal`` (its shares of the survivors' self-mask seeds and of the dropped devices' mask keys); a masked
  answer names the senders whose sealed shares did not open for it (``unopened``): the hub leaves their
  vectors out of the sum, as if they had dropped, and says which device named which;
* the hub tells each device what to do next on ``{prefix}/devices/{id}/round`` (retained, QoS 1, signed like
  the announcement; the broker's ACL lets a device read only its own) with :class:`Step` messages (magic
  ``EMLT``): ``share`` (every advert), ``mask`` (the shares sealed for it, from the devices whose shares
  reached the hub), ``reveal`` (who survived, who dropped). An empty retained message ends the round's steps.

Both are framed like the other round messages: magic, header length, JSON header; an answer's masked vectors
follow the header as packed ring elements (:func:`edge_agent.contract.secagg.pack`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final

from edge_agent.contract.round_frames import SignedHeader, frame, unframe
from edge_agent.contract.rounds import RoundPlan
from edge_agent.contract.secagg import KEY_BYTES, SHARE_BYTES, Advert, Session, packed_size
from edge_agent.contract.secure_codec import STAT_NAMES, Grid, grid_for
from edge_agent.contract.wire import (
    SCHEMA_VERSION,
    ContractError,
    Delivery,
    check_choice,
    check_id,
    check_keys,
    float_field,
    int_field,
    opt_str,
    show,
)

STEP_MAGIC: Final = b"EMLT"
ANSWER_MAGIC: Final = b"EMLS"
MAX_STEP_BYTES: Final = 4 << 20
MAX_ANSWER_BYTES: Final = 16 << 20
MAX_PEERS: Final = 1000
STEP_DELIVERY: Final = Delivery(qos=1, retain=True)  # a device that reconnects sees the step it is at
ANSWER_DELIVERY: Final = Delivery(qos=1, retain=False)
STATS_BITS: Final = 32  # the statistics' ring: fixed point, 1/256, |value| < 2**24 / 256 per device
SEALED_BYTES: Final = 12 + 2 * SHARE_BYTES + 16  # nonce, the two shares, the tag
_HEX: Final = re.compile(f"[0-9a-f]{{1,{2 * SHARE_BYTES}}}")


def secure_sessions(plan: RoundPlan) -> tuple[Session, Session]:
    """The (delta, statistics) sessions of a secure round: the same devices and threshold, their own masks."""
    if plan.secure is None:
        raise ContractError(f"round {plan.round_id} is not secure")
    base = f"{plan.model}/round {plan.round_id}/{plan.base_sha256}".encode()
    return (Session(base + b"/delta", plan.participants, plan.secure.threshold, plan.secure.bits),
            Session(base + b"/stats", plan.participants, plan.secure.threshold, STATS_BITS))


def secure_grid(plan: RoundPlan) -> Grid:
    """The round's integer grid over the tensors it trains, in the announcement's order."""
    if plan.secure is None:
        raise ContractError(f"round {plan.round_id} is not secure")
    specs = [(t.name, t.shape) for t in plan.tensors if t.name in plan.trainable]
    return grid_for(specs, plan.clip, peak=plan.secure.peak, spread=plan.secure.spread, seed=plan.secure.seed)


def stats_size(plan: RoundPlan) -> int:
    """How many values a masked answer's statistics hold: :data:`STAT_NAMES`, then 4 a layer."""
    return len(STAT_NAMES) + 4 * sum(1 for t in plan.tensors if t.name.startswith("coef_"))


def _b64(value: Any, what: str, size: int | None = None) -> bytes:
    if type(value) is not str or len(value) > 4096:
        raise ContractError(f"{what} must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(f"{what} is not base64") from None
    if size is not None and len(raw) != size:
        raise ContractError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _text(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _ids(value: Any, what: str) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_PEERS:
        raise ContractError(f"{what} must be a list of device ids")
    out = tuple(check_id(v) for v in value)
    if len(set(out)) != len(out):
        raise ContractError(f"{what} repeats a device")
    return out


def _sealed(value: Any, what: str) -> dict[str, bytes]:
    if type(value) is not dict or len(value) > MAX_PEERS:
        raise ContractError(f"{what} must be an object of device id -> sealed shares")
    return {check_id(k): _b64(v, f"{what}[{k}]", SEALED_BYTES) for k, v in value.items()}


def _advert(value: Any, what: str) -> Advert:
    if type(value) is not dict:
        raise ContractError(f"{what} must be an object")
    keys = frozenset({"device_id", "c", "s"})
    check_keys(value, keys, keys, what)
    return Advert(check_id(value["device_id"]), _b64(value["c"], f"{what}.c", KEY_BYTES),
                  _b64(value["s"], f"{what}.s", KEY_BYTES))


def _advert_obj(a: Advert) -> dict[str, str]:
    return {"device_id": a.device_id, "c": _text(a.c_public), "s": _text(a.s_public)}


def _head(obj: dict[str, Any], what: str, kinds: dict[str, frozenset[str]], common: frozenset[str],
          topic_device: str | None, optional: dict[str, frozenset[str]] | None = None) -> tuple[str, int, str, str]:
    """(kind, round, model, device) of a step or an answer: its kind read first, then its keys checked
    against that kind's (``optional``: keys a kind may leave out), its device against the topic's."""
    step = check_choice(obj, "step", tuple(kinds), what)
    keys = common | kinds[step]
    check_keys(obj, keys, keys | (optional or {}).get(step, frozenset()), what)
    if type(obj.get("v")) is not int or obj["v"] != SCHEMA_VERSION:
        raise ContractError(f"{what}.v must be {SCHEMA_VERSION}, got {show(obj.get('v'))}")
    device = check_id(obj["device_id"])
    if topic_device is not None and device != topic_device:
        raise ContractError(f"{what}: device id {device!r} differs from {topic_device!r} in the topic")
    return step, int_field(obj, "round", what, 1), check_id(obj["model"], "model name"), device


# --------------------------------------------------------------------------- the hub's steps


@dataclass(frozen=True, slots=True)
class Step(SignedHeader):
    """What the hub asks of one device next, in one secure round."""

    signed_as: ClassVar[str] = "step"

    round_id: int
    model: str
    device_id: str  # the device it is for (its topic's)
    step: str  # share | mask | reveal
    adverts: tuple[Advert, ...] = ()  # share: every device that advertised, this one included
    sealed: dict[str, bytes] = field(default_factory=dict)  # mask: sender -> the shares it sealed for this device
    senders: tuple[str, ...] = ()  # mask: every device whose shares reached the hub (its masks are in the sum)
    survivors: tuple[str, ...] = ()  # reveal: whose masked vectors reached the hub
    dropped: tuple[str, ...] = ()  # reveal: who sent shares but no masked vector
    key_id: str | None = None
    signature: str | None = None

    def header(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"v": SCHEMA_VERSION, "round": self.round_id, "model": self.model,
                               "device_id": self.device_id, "step": self.step, "key_id": self.key_id,
                               "signature": self.signature}
        if self.step == "share":
            obj["adverts"] = [_advert_obj(a) for a in self.adverts]
        elif self.step == "mask":
            obj |= {"sealed": {k: _text(v) for k, v in sorted(self.sealed.items())}, "senders": list(self.senders)}
        else:
            obj |= {"survivors": list(self.survivors), "dropped": list(self.dropped)}
        return obj

    def encode(self) -> bytes:
        return frame(STEP_MAGIC, self.header(), b"", MAX_STEP_BYTES)


_STEP_KEYS: Final = {"share": frozenset({"adverts"}), "mask": frozenset({"sealed", "senders"}),
                     "reveal": frozenset({"survivors", "dropped"})}
_STEP_COMMON: Final = frozenset({"v", "round", "model", "device_id", "step", "key_id", "signature"})


def step_header(payload: bytes) -> dict[str, Any]:
    """A step's header as decoded JSON, not yet interpreted: the device checks its signature first."""
    return unframe(payload, STEP_MAGIC, MAX_STEP_BYTES, "secure round step")[0]


def decode_step(payload: bytes, topic_device: str | None = None) -> Step:
    obj, body = unframe(payload, STEP_MAGIC, MAX_STEP_BYTES, "secure round step")
    what = "step"
    if body:
        raise ContractError("a secure round step carries no body")
    step, round_id, model, device = _head(obj, what, _STEP_KEYS, _STEP_COMMON, topic_device)
    out = Step(round_id, model, device, step, key_id=opt_str(obj, "key_id", what, 128),
               signature=opt_str(obj, "signature", what, 256))
    if step == "share":
        adverts = obj["adverts"]
        if type(adverts) is not list or not 0 < len(adverts) <= MAX_PEERS:
            raise ContractError("step.adverts must be a list of adverts")
        got = tuple(_advert(a, f"step.adverts[{i}]") for i, a in enumerate(adverts))
        if len({a.device_id for a in got}) != len(got):
            raise ContractError("step.adverts repeats a device")
        return replace(out, adverts=got)
    if step == "mask":
        senders = _ids(obj["senders"], "step.senders")
        sealed = _sealed(obj["sealed"], "step.sealed")
        if not set(sealed) <= set(senders) or device in sealed:
            raise ContractError("step.sealed must come from the senders, none from the device itself")
        return replace(out, sealed=sealed, senders=senders)
    survivors, dropped = _ids(obj["survivors"], "step.survivors"), _ids(obj["dropped"], "step.dropped")
    if set(survivors) & set(dropped):
        raise ContractError("step names a device both as a survivor and as dropped")
    return replace(out, survivors=survivors, dropped=dropped)


# --------------------------------------------------------------------------- the devices' answers


@dataclass(frozen=True, slots=True)
class Answer:
    """One device's message in one secure round."""

    round_id: int
    model: str
    device_id: str
    step: str  # advert | shares | masked | reveal
    advert: Advert | None = None
    sealed: dict[str, bytes] = field(default_factory=dict)  # shares: peer -> its sealed shares
    size: int = 0  # masked: values in the delta vector (the round's padded grid)
    bits: int = 0  # masked: the delta vector's ring width (the round's)
    stats: int = 0  # masked: values in the statistics vector
    body: bytes = field(default=b"", repr=False)  # masked: the two packed vectors, delta first
    revealed: dict[str, tuple[str, int]] = field(default_factory=dict)  # reveal: device -> ("b" | "s", share)
    sent: float = 0.0
    unopened: tuple[str, ...] = ()  # masked: the senders whose sealed shares did not open for this device

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"v": SCHEMA_VERSION, "round": self.round_id, "model": self.model,
                               "device_id": self.device_id, "step": self.step, "sent": self.sent}
        if self.step == "advert":
            assert self.advert is not None
            obj |= {"c": _text(self.advert.c_public), "s": _text(self.advert.s_public)}
        elif self.step == "shares":
            obj["sealed"] = {k: _text(v) for k, v in sorted(self.sealed.items())}
        elif self.step == "masked":
            obj |= {"size": self.size, "stats": self.stats, "bits": self.bits}
            if self.unopened:  # only then: a hub that predates the field reads every other masked answer
                obj["unopened"] = list(self.unopened)
        else:
            obj["revealed"] = {k: [kind, f"{share:x}"] for k, (kind, share) in sorted(self.revealed.items())}
        return frame(ANSWER_MAGIC, obj, self.body, MAX_ANSWER_BYTES)

    def vectors(self) -> tuple[bytes, bytes]:
        """A masked answer's (delta, statistics) packed vectors: ``bits`` and :data:`STATS_BITS` wide."""
        cut = packed_size(self.size, self.bits)
        return self.body[:cut], self.body[cut:]


_ANSWER_KEYS: Final = {"advert": frozenset({"c", "s"}), "shares": frozenset({"sealed"}),
                       "masked": frozenset({"size", "stats", "bits"}), "reveal": frozenset({"revealed"})}
_ANSWER_COMMON: Final = frozenset({"v", "round", "model", "device_id", "step", "sent"})
_ANSWER_OPTIONAL: Final = {"masked": frozenset({"unopened"})}


def is_answer(payload: bytes) -> bool:
    """Whether an update topic's message is a secure round's answer (else a plain update or evaluation)."""
    return payload[:4] == ANSWER_MAGIC


def decode_answer(payload: bytes, topic_device: str | None = None) -> Answer:
    obj, body = unframe(payload, ANSWER_MAGIC, MAX_ANSWER_BYTES, "secure round answer")
    what = "answer"
    step, round_id, model, device = _head(obj, what, _ANSWER_KEYS, _ANSWER_COMMON, topic_device, _ANSWER_OPTIONAL)
    out = Answer(round_id, model, device, step, sent=float_field(obj, "sent", what))
    if step != "masked" and body:
        raise ContractError(f"a {step} answer carries no body")
    if step == "advert":
        return replace(out, advert=Advert(device, _b64(obj["c"], "answer.c", KEY_BYTES),
                                          _b64(obj["s"], "answer.s", KEY_BYTES)))
    if step == "shares":
        sealed = _sealed(obj["sealed"], "answer.sealed")
        if device in sealed:
            raise ContractError("answer.sealed holds shares for the device itself")
        return replace(out, sealed=sealed)
    if step == "masked":
        size, stats = int_field(obj, "size", what, 1, 1 << 26), int_field(obj, "stats", what, 0, 1 << 16)
        bits = int_field(obj, "bits", what, 2, 32)
        if len(body) != packed_size(size, bits) + packed_size(stats, STATS_BITS):
            raise ContractError(f"answer carries {len(body)} bytes of vectors, its header describes "
                                f"{packed_size(size, bits) + packed_size(stats, STATS_BITS)}")
        unopened = _ids(obj.get("unopened", []), "answer.unopened")
        if device in unopened:
            raise ContractError("answer.unopened names the device itself")
        return replace(out, size=size, bits=bits, stats=stats, body=body, unopened=unopened)
    revealed = obj["revealed"]
    if type(revealed) is not dict or len(revealed) > MAX_PEERS:
        raise ContractError("answer.revealed must be an object of device id -> [kind, share]")
    got: dict[str, tuple[str, int]] = {}
    for k, v in revealed.items():
        if type(v) is not list or len(v) != 2 or v[0] not in ("b", "s") or type(v[1]) is not str \
                or not _HEX.fullmatch(v[1]):
            raise ContractError(f"answer.revealed[{show(k)}] must be [\"b\" or \"s\", a share in hex]")
        got[check_id(k)] = (v[0], int(v[1], 16))
    return replace(out, revealed=got)
