"""The contract's ground floor: limits, the error type, ids, QoS/retain, topics, strict JSON decoding."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from edge_agent import exits

MAX_INT: Final = (1 << 63) - 1
"""The largest integer a message's count or key holds: a signed 64-bit integer, the databases' BIGINT."""

SCHEMA_VERSION: Final = 1
MAX_RESULTS_BYTES: Final = 1 << 20  # a results batch; the agent stays far below (see outbox batching)
MAX_STATUS_BYTES: Final = 16 << 10
MAX_BUNDLE_BYTES: Final = 32 << 20
MAX_RESULTS_PER_BATCH: Final = 10_000
MAX_LABEL_CHARS: Final = 256  # a result's label and truth
MAX_RECEIPT_BYTES: Final = 256 << 10
MAX_RECEIPT_RUNS: Final = 10_000

# The smallest magnitude that float32 rounds to infinity (2**128 - 2**103): a result's features are stored as
# float32, so from it on they are refused. Anything below rounds to a finite float32 (3.4028235e38 to its max).
FLOAT32_OVERFLOW: Final = 3.4028235677973366e38
MAX_HEADER_DEPTH: Final = 32  # nesting of a signed header's JSON (a manifest's metrics, a round's plan)

_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
# Error messages quote what a payload held through this: bounded in depth and length, so a value
# nested 1,000 deep or a megabyte long makes a short message, not a RecursionError (plain repr recurses).
SHOWN: Final = reprlib.Repr()
SHOWN.maxlevel, SHOWN.maxlist, SHOWN.maxdict, SHOWN.maxstring, SHOWN.maxother, SHOWN.maxlong = 2, 4, 4, 60, 60, 40


def show(value: object) -> str:
    """A short, always-safe quotation of a decoded value for an error message."""
    return SHOWN.repr(value)


class ContractError(exits.Failure, ValueError):
    """A payload or topic that the contract does not accept; ``reason`` says why."""

    exit_code = exits.INPUT

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Delivery:
    """QoS and retain flag of one message type."""

    qos: int
    retain: bool


RESULTS_DELIVERY: Final = Delivery(qos=1, retain=False)
STATUS_DELIVERY: Final = Delivery(qos=1, retain=True)
RECEIPT_DELIVERY: Final = Delivery(qos=1, retain=False)
MODEL_DELIVERY: Final = Delivery(qos=1, retain=True)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def fits_label(text: str) -> bool:
    """A label or truth a result can carry: at most MAX_LABEL_CHARS characters, no NUL (PostgreSQL's text cannot
    hold one). The one rule for the log parser, the encoders, a model's labels and retraining."""
    return len(text) <= MAX_LABEL_CHARS and "\x00" not in text


def check_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device id / model name (a string; no MQTT wildcards, no slash)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ContractError(f"invalid {what} {show(value)}: use 1-64 of A-Z a-z 0-9 _ . : -")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic layout under one prefix.

    ``{prefix}/devices/{device_id}/results`` result batches, ``.../status`` retained device status
    (last will: offline), ``.../receipts`` the hub's commit receipts for that device,
    ``{prefix}/models/{name}`` retained signed model bundles.
    """

    prefix: str = "edgeml"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("/") \
                or self.prefix.endswith("/") or self.prefix.startswith("$"):
            raise ContractError(f"invalid topic prefix {self.prefix!r}")

    def results(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{check_id(device_id)}/results"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{check_id(device_id)}/status"

    def receipts(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{check_id(device_id)}/receipts"

    def model(self, name: str) -> str:
        return f"{self.prefix}/models/{check_id(name, 'model name')}"

    def device_model(self, device_id: str) -> str:
        """A canary rollout's bundle for one device (retained; empty = follow the fleet's model topic)."""
        return f"{self.prefix}/devices/{check_id(device_id)}/model"

    def rounds(self, name: str) -> str:
        """The retained announcement of a model's open federated round (edge_agent/contract/rounds.py)."""
        return f"{self.prefix}/rounds/{check_id(name, 'model name')}"

    def update(self, device_id: str) -> str:
        """A device's answer to a federated round: its INT8 delta and what it measured."""
        return f"{self.prefix}/devices/{check_id(device_id)}/update"

    def round_step(self, device_id: str) -> str:
        """The hub's next step for one device in a secure round (retained; edge_agent/contract/secure_rounds.py)."""
        return f"{self.prefix}/devices/{check_id(device_id)}/round"

    def answered(self, device_id: str) -> str:
        """The hub's receipt for one device's answer to a round, once its verdict is committed
        (edge_agent/contract/answers.py): the device keeps the answer and sends it again until then."""
        return f"{self.prefix}/devices/{check_id(device_id)}/answered"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/devices/+/update"

    @property
    def events(self) -> str:
        """Rollout events the hub publishes (canary started, promoted, rolled back)."""
        return f"{self.prefix}/events"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}/devices/+/results"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    @property
    def all_receipts(self) -> str:
        return f"{self.prefix}/devices/+/receipts"

    def shared(self, topic_filter: str, group: str | None) -> str:
        """The filter as an MQTT 5 shared subscription when ``group`` is set."""
        return f"$share/{check_id(group, 'share group')}/{topic_filter}" if group else topic_filter

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a topic into (kind, id): ("results"|"status"|"receipts"|"update", device_id) or ("model", name)."""
        head = self.prefix + "/"
        if topic.startswith(head):
            parts = topic[len(head):].split("/")
            if len(parts) == 3 and parts[0] == "devices" and parts[2] in ("results", "status", "receipts", "update"):
                return parts[2], check_id(parts[1])
            if len(parts) == 2 and parts[0] == "models":
                return "model", check_id(parts[1], "model name")
        raise ContractError(f"topic {topic!r} is not part of the contract under prefix {self.prefix!r}")


# --------------------------------------------------------------------------- validation helpers


def load_json(payload: bytes, limit: int, what: str, max_depth: int | None = None) -> dict[str, Any]:
    """A JSON object of schema version 1. ``max_depth`` bounds its nesting: a signed header is written
    out again to check its signature (orjson refuses past 255 levels) and copied by ``asdict``."""
    if len(payload) > limit:
        raise ContractError(f"{what} payload is {len(payload)} bytes, over the {limit}-byte limit")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"{what} payload is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ContractError(f"{what} payload must be a JSON object, got {type(obj).__name__}")
    if max_depth is not None and json_depth(obj, max_depth) > max_depth:
        raise ContractError(f"{what} is nested more than {max_depth} levels deep")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, not 1.0
        raise ContractError(f"{what} has unsupported schema version {show(version)} (this build speaks {SCHEMA_VERSION})")
    return obj


def json_depth(value: Any, stop: int) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), counted without recursion; stops past ``stop``."""
    deepest, level = 0, [(value, 0)]
    while level:
        item, d = level.pop()
        if type(item) is dict:
            item = item.values()
        elif type(item) is not list:
            continue
        deepest = max(deepest, d + 1)
        if deepest > stop:
            return deepest
        level.extend((x, d + 1) for x in item)
    return deepest


def check_keys(obj: dict[str, Any], required: frozenset[str], allowed: frozenset[str], what: str) -> None:
    keys = obj.keys()
    if not required <= keys:
        raise ContractError(f"{what} is missing {', '.join(sorted(required - keys))}")
    if not keys <= allowed:
        unknown = sorted(keys - allowed)
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ContractError(f"{what} has unknown field(s) {', '.join(show(k)[1:-1] for k in unknown[:5])}{more}")


def check_choice(obj: dict[str, Any], key: str, allowed: Iterable[str], what: str) -> str:
    """A string field with a fixed set of values (a list or an object there is refused, not hashed; a missing
    one is refused too: a message's kind is read before its keys are checked against it)."""
    value = obj.get(key)
    if type(value) is not str or value not in allowed:
        raise ContractError(f"{what}.{key} must be one of {', '.join(allowed)}, got {show(value)}")
    return value


def hex64(obj: dict[str, Any], key: str, what: str) -> str:
    """A sha256 digest field: 64 lowercase hex digits."""
    value = obj[key]
    if type(value) is not str or not _HEX64.fullmatch(value):
        raise ContractError(f"{what}.{key} must be 64 lowercase hex digits, got {show(value)}")
    return value


def int_field(obj: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    value = obj[key]
    if type(value) is not int or not lo <= value <= hi:
        raise ContractError(f"{what}.{key} must be an integer in [{lo}, {hi}], got {show(value)}")
    return value


def float_field(obj: dict[str, Any], key: str, what: str) -> float:
    value = obj[key]
    t = type(value)
    if t is float:
        return value  # orjson only yields finite floats
    if t is int:
        return float(value)
    raise ContractError(f"{what}.{key} must be a finite number, got {show(value)}")


def opt_str(obj: dict[str, Any], key: str, what: str, limit: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > limit:
        raise ContractError(f"{what}.{key} must be a string of at most {limit} characters, got {show(value)}")
    if "\x00" in value:  # PostgreSQL's text refuses it (SQLite kept it): one rule for every database
        raise ContractError(f"{what}.{key} must not hold a NUL character (\\u0000), got {show(value)}")
    return value


def opt_floats(obj: dict[str, Any], key: str, what: str, limit: int = 4096,
               overflow: float | None = None) -> tuple[float, ...] | None:
    """An optional list of finite numbers, as floats; with ``overflow``, each of magnitude below it."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not list or len(value) > limit:
        raise ContractError(f"{what}.{key} must be a list of at most {limit} numbers")
    for x in value:
        if type(x) is not float and type(x) is not int:
            raise ContractError(f"{what}.{key} must hold only finite numbers, got {show(x)}")
    out = tuple(float(x) for x in value)
    if overflow is not None and out and max(map(abs, out)) >= overflow:
        raise ContractError(f"{what}.{key} must hold numbers a float32 can hold (|x| < {overflow!r}), got "
                            f"{show(next(x for x in out if abs(x) >= overflow))}")
    return out


def device_of(obj: dict[str, Any], topic_device: str | None) -> str:
    """The payload's device id: valid, and the one in the topic when that is known."""
    device_id = check_id(obj["device_id"])
    if topic_device is not None and device_id != topic_device:
        raise ContractError(f"device id {device_id!r} in the payload differs from {topic_device!r} in the topic")
    return device_id


def check_finite(value: float | None, name: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ContractError(f"{name} must be finite, got {value!r}")
