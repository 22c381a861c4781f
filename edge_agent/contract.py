"""The wire contract: topics, payloads, encoding, QoS and retain, in one module.

Both the edge agent and the cloud hub import this module and nothing else decides what goes on the
wire. Every payload carries the schema version ``v``; decoding is strict and raises
:class:`ContractError` with a readable reason for anything it does not accept (bad JSON, wrong
types, missing or unknown fields, non-finite numbers, unknown versions, oversized payloads).

JSON is encoded with orjson: it decodes a 200-byte message in under 1 µs (the stdlib takes ~5 µs),
and it refuses ``NaN``/``Infinity`` and numbers that overflow to infinity, so every float that
survives :func:`orjson.loads` is finite.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import reprlib
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

import orjson

SCHEMA_VERSION: Final = 1
MAX_RESULTS_BYTES: Final = 1 << 20  # a results batch; the agent stays far below (see outbox batching)
MAX_STATUS_BYTES: Final = 16 << 10
MAX_BUNDLE_BYTES: Final = 32 << 20
MAX_RESULTS_PER_BATCH: Final = 10_000
MAX_RECEIPT_BYTES: Final = 256 << 10
MAX_RECEIPT_RUNS: Final = 10_000

MAX_HEADER_DEPTH: Final = 32  # nesting of a signed header's JSON (a manifest's metrics, a round's plan)

_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
# Error messages quote what a payload held through this: bounded in depth and length, so a value
# nested 1,000 deep or a megabyte long makes a short message, not a RecursionError (plain repr recurses).
_SHOWN: Final = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 4, 4, 60, 60, 40


def show(value: object) -> str:
    """A short, always-safe quotation of a decoded value for an error message."""
    return _SHOWN.repr(value)


class ContractError(ValueError):
    """A payload or topic that the contract does not accept; ``reason`` says why."""

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
        """The retained announcement of a model's open federated round (edge_agent/contract_rounds.py)."""
        return f"{self.prefix}/rounds/{check_id(name, 'model name')}"

    def update(self, device_id: str) -> str:
        """A device's answer to a federated round: its INT8 delta and what it measured."""
        return f"{self.prefix}/devices/{check_id(device_id)}/update"

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


def _loads(payload: bytes, limit: int, what: str, max_depth: int | None = None) -> dict[str, Any]:
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
    if max_depth is not None and _depth(obj, max_depth) > max_depth:
        raise ContractError(f"{what} is nested more than {max_depth} levels deep")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, not 1.0
        raise ContractError(f"{what} has unsupported schema version {show(version)} (this build speaks {SCHEMA_VERSION})")
    return obj


def _depth(value: Any, stop: int) -> int:
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


def _check_keys(obj: dict[str, Any], required: frozenset[str], allowed: frozenset[str], what: str) -> None:
    keys = obj.keys()
    if not required <= keys:
        raise ContractError(f"{what} is missing {', '.join(sorted(required - keys))}")
    if not keys <= allowed:
        unknown = sorted(keys - allowed)
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ContractError(f"{what} has unknown field(s) {', '.join(show(k)[1:-1] for k in unknown[:5])}{more}")


def _choice(obj: dict[str, Any], key: str, allowed: Iterable[str], what: str) -> str:
    """A string field with a fixed set of values (a list or an object there is refused, not hashed)."""
    value = obj[key]
    if type(value) is not str or value not in allowed:
        raise ContractError(f"{what}.{key} must be one of {', '.join(allowed)}, got {show(value)}")
    return value


def _hex64(obj: dict[str, Any], key: str, what: str) -> str:
    """A sha256 digest field: 64 lowercase hex digits."""
    value = obj[key]
    if type(value) is not str or not _HEX64.fullmatch(value):
        raise ContractError(f"{what}.{key} must be 64 lowercase hex digits, got {show(value)}")
    return value


def _int(obj: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    value = obj[key]
    if type(value) is not int or not lo <= value <= hi:
        raise ContractError(f"{what}.{key} must be an integer in [{lo}, {hi}], got {show(value)}")
    return value


def _float(obj: dict[str, Any], key: str, what: str) -> float:
    value = obj[key]
    t = type(value)
    if t is float:
        return value  # orjson only yields finite floats
    if t is int:
        return float(value)
    raise ContractError(f"{what}.{key} must be a finite number, got {show(value)}")


def _opt_str(obj: dict[str, Any], key: str, what: str, limit: int = 256) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > limit:
        raise ContractError(f"{what}.{key} must be a string of at most {limit} characters, got {show(value)}")
    return value


def _opt_floats(obj: dict[str, Any], key: str, what: str, limit: int = 4096) -> tuple[float, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not list or len(value) > limit:
        raise ContractError(f"{what}.{key} must be a list of at most {limit} numbers")
    for x in value:
        if type(x) is not float and type(x) is not int:
            raise ContractError(f"{what}.{key} must hold only finite numbers, got {show(x)}")
    return tuple(float(x) for x in value)


def _device_of(obj: dict[str, Any], topic_device: str | None) -> str:
    """The payload's device id: valid, and the one in the topic when that is known."""
    device_id = check_id(obj["device_id"])
    if topic_device is not None and device_id != topic_device:
        raise ContractError(f"device id {device_id!r} in the payload differs from {topic_device!r} in the topic")
    return device_id


def _finite(value: float | None, name: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ContractError(f"{name} must be finite, got {value!r}")


# --------------------------------------------------------------------------- results


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 µs more per result on the hub's hot path
class Result:
    """One inference result. (device_id, seq) is its unique key.

    ``seq`` is the window start in milliseconds since the epoch of the log's clock: unique per device,
    increasing, stateless across restarts, and identical when the same log is replayed again.
    """

    seq: int
    start: float
    end: float
    model_version: int
    latency_ms: float
    label: str | None = None  # predicted class (classifier)
    confidence: float | None = None  # its probability
    value: tuple[float, ...] | None = None  # regression output
    truth: str | None = None  # ground truth reported by the source, when known
    features: tuple[float, ...] | None = None  # the model input, for retraining at the hub

    def to_obj(self) -> dict[str, Any]:
        # The agent encodes every result: attribute access is spelled out (no getattr loops).
        isfinite = math.isfinite
        if not (isfinite(self.start) and isfinite(self.end) and isfinite(self.latency_ms)):
            for name in ("start", "end", "latency_ms"):
                _finite(getattr(self, name), f"result.{name}")
        obj: dict[str, Any] = {
            "seq": self.seq, "start": self.start, "end": self.end,
            "model_version": self.model_version, "latency_ms": self.latency_ms,
        }
        if self.label is not None:
            obj["label"] = self.label
        if self.confidence is not None:
            _finite(self.confidence, "result.confidence")
            obj["confidence"] = self.confidence
        if self.value is not None:
            if not all(map(isfinite, self.value)):
                raise ContractError("result.value must hold only finite numbers")
            obj["value"] = list(self.value)
        if self.truth is not None:
            obj["truth"] = self.truth
        if self.features is not None:
            if not all(map(isfinite, self.features)):
                raise ContractError("result.features must hold only finite numbers")
            obj["features"] = list(self.features)
        return obj


_RESULT_REQUIRED: Final = frozenset({"seq", "start", "end", "model_version", "latency_ms"})
_RESULT_ALLOWED: Final = _RESULT_REQUIRED | {"label", "confidence", "value", "truth", "features"}
_MAX_INT: Final = (1 << 63) - 1


def _result_from_obj(obj: Any, i: int) -> Result:
    """Validate one result object. The hub's hot path: checks are inlined and the readable error is
    only built when a check fails (about 2 µs per result instead of 3)."""
    if type(obj) is not dict:
        raise ContractError(f"results[{i}] must be an object")
    keys = obj.keys()
    if not (keys >= _RESULT_REQUIRED and keys <= _RESULT_ALLOWED):
        _check_keys(obj, _RESULT_REQUIRED, _RESULT_ALLOWED, f"results[{i}]")
    seq, version = obj["seq"], obj["model_version"]
    start, end, latency = obj["start"], obj["end"], obj["latency_ms"]
    if type(seq) is not int or not 0 <= seq <= _MAX_INT:
        _int(obj, "seq", f"results[{i}]")
    if type(version) is not int or not 0 <= version <= _MAX_INT:
        _int(obj, "model_version", f"results[{i}]")
    if type(start) is not float:
        start = _float(obj, "start", f"results[{i}]")
    if type(end) is not float:
        end = _float(obj, "end", f"results[{i}]")
    if type(latency) is not float:
        latency = _float(obj, "latency_ms", f"results[{i}]")
    if end < start:
        raise ContractError(f"results[{i}]: end {end} is before start {start}")
    if latency < 0:
        raise ContractError(f"results[{i}].latency_ms must not be negative")
    confidence = obj.get("confidence")
    if confidence is not None:
        if type(confidence) is not float:
            confidence = _float(obj, "confidence", f"results[{i}]")
        if not 0.0 <= confidence <= 1.0:
            raise ContractError(f"results[{i}].confidence must be in [0, 1], got {confidence}")
    label, truth = obj.get("label"), obj.get("truth")
    if label is not None and (type(label) is not str or len(label) > 256):
        _opt_str(obj, "label", f"results[{i}]")
    if truth is not None and (type(truth) is not str or len(truth) > 256):
        _opt_str(obj, "truth", f"results[{i}]")
    value, features = obj.get("value"), obj.get("features")
    return Result(
        seq, start, end, version, latency, label, confidence,
        None if value is None else _opt_floats(obj, "value", f"results[{i}]", 256),
        truth,
        None if features is None else _opt_floats(obj, "features", f"results[{i}]"),
    )


@dataclass(frozen=True, slots=True)
class ResultBatch:
    """A batch of results of one device, the payload of ``{prefix}/devices/{id}/results``."""

    device_id: str
    results: tuple[Result, ...]
    mark_duplicates: bool = False  # the device reads receipts' ``dup`` (see Receipt); older devices do not

    def encode(self) -> bytes:
        check_id(self.device_id)
        if not 0 < len(self.results) <= MAX_RESULTS_PER_BATCH:
            raise ContractError(f"a batch holds 1..{MAX_RESULTS_PER_BATCH} results, not {len(self.results)}")
        return encode_results(self.device_id, [r.to_obj() for r in self.results], self.mark_duplicates)


def encode_results(device_id: str, result_objs: list[dict[str, Any]], mark_duplicates: bool = False) -> bytes:
    """Encode already-validated result objects (the outbox stores them encoded)."""
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "device_id": device_id, "results": result_objs}
    if mark_duplicates:
        obj["mark_duplicates"] = True
    payload = orjson.dumps(obj)
    if len(payload) > MAX_RESULTS_BYTES:
        raise ContractError(f"results payload of {len(payload)} bytes is over the {MAX_RESULTS_BYTES}-byte limit")
    return payload


def encode_result_obj(result: Result) -> bytes:
    """One result as JSON bytes (how the agent's outbox stores it)."""
    return orjson.dumps(result.to_obj())


def join_results(device_id: str, encoded: list[bytes], mark_duplicates: bool = False) -> bytes:
    """A results payload built from results encoded one by one with :func:`encode_result_obj`."""
    head = orjson.dumps({"v": SCHEMA_VERSION, "device_id": device_id,
                         **({"mark_duplicates": True} if mark_duplicates else {})})[:-1]
    return head + b',"results":[' + b",".join(encoded) + b"]}"


def decode_results(payload: bytes, topic_device: str | None = None) -> ResultBatch:
    """Decode and validate a results payload; ``topic_device`` must match the payload's device id."""
    obj = _loads(payload, MAX_RESULTS_BYTES, "results")
    _check_keys(obj, _RESULTS_REQUIRED, _RESULTS_ALLOWED, "results")
    device_id = _device_of(obj, topic_device)
    items = obj["results"]
    if type(items) is not list or not 0 < len(items) <= MAX_RESULTS_PER_BATCH:
        raise ContractError(f"results must be a list of 1..{MAX_RESULTS_PER_BATCH} objects")
    mark = obj.get("mark_duplicates", False)
    if type(mark) is not bool:
        raise ContractError(f"results.mark_duplicates must be true or false, got {mark!r:.40}")
    return ResultBatch(device_id, tuple(_result_from_obj(o, i) for i, o in enumerate(items)), mark)


_RESULTS_REQUIRED: Final = frozenset({"v", "device_id", "results"})
_RESULTS_ALLOWED: Final = _RESULTS_REQUIRED | {"mark_duplicates"}


# --------------------------------------------------------------------------- receipts


@dataclass(frozen=True, slots=True)
class Receipt:
    """The hub's word that results of one device are committed, the payload of ``.../receipts``.

    The stored keys are written as runs ``[first, step, count]``: the seqs ``first``,
    ``first + step``, ... (``count`` of them). A device's seqs are window starts, so the results of
    one batch are almost always one run (a constant hop): a receipt for 100 results is ~60 bytes.
    A receipt covers new rows and duplicates alike, and applying one twice is harmless.

    ``dup`` (optional, in the same runs) names those of them that were stored before this delivery
    (a replay of the same log, a re-send whose first receipt was lost): the device can tell the
    operator new from already stored. The hub writes it only for devices whose results say
    ``mark_duplicates``: a device of an older build refuses unknown fields, and gets receipts as before.
    Each receipt fits the decoder's limits; :func:`receipt_payloads` splits what does not.
    """

    device_id: str
    runs: tuple[tuple[int, int, int], ...]
    dup: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of(cls, device_id: str, seqs: Iterable[int], dup: Iterable[int] = ()) -> Receipt:
        return cls(device_id, seq_runs(seqs), seq_runs(dup))

    def seqs(self) -> list[int]:
        return _expand(self.runs)

    def dup_seqs(self) -> list[int]:
        return _expand(self.dup)

    def encode(self) -> bytes:
        check_id(self.device_id)
        if not 0 < len(self.runs) <= MAX_RECEIPT_RUNS or len(self.dup) > MAX_RECEIPT_RUNS:
            raise ContractError(f"a receipt holds 1..{MAX_RECEIPT_RUNS} runs (and dup runs), not "
                                f"{len(self.runs)} ({len(self.dup)})")
        if sum(count for *_, count in self.runs) + sum(count for *_, count in self.dup) > _MAX_RECEIPT_SEQS:
            raise ContractError(f"a receipt covers at most {_MAX_RECEIPT_SEQS} results")
        obj: dict[str, Any] = {"v": SCHEMA_VERSION, "device_id": self.device_id, "runs": self.runs}
        if self.dup:
            obj["dup"] = self.dup
        payload = orjson.dumps(obj)
        if len(payload) > MAX_RECEIPT_BYTES:
            raise ContractError(f"receipt of {len(payload)} bytes is over the {MAX_RECEIPT_BYTES}-byte limit")
        return payload


def receipt_payloads(device_id: str, seqs: Iterable[int], dup: Iterable[int] = ()) -> list[bytes]:
    """Encoded receipts for ``seqs`` (``dup``: those of them stored before), as many as it takes for each
    to fit the decoder's limits (runs, results, bytes): 14,000 irregular 19-digit seqs make 280 KB as
    one receipt, which a device would refuse, and those results would be sent again forever."""
    ordered = sorted(set(seqs))
    already = set(dup)
    payloads: list[bytes] = []

    def add(part: list[int]) -> None:
        try:
            payloads.append(Receipt.of(device_id, part, [s for s in part if s in already]).encode())
        except ContractError:
            if len(part) < 2:
                raise
            add(part[:len(part) // 2])  # halves of the seqs, in order: each half's runs are fewer
            add(part[len(part) // 2:])

    if ordered:
        add(ordered)
    return payloads


def _expand(runs: tuple[tuple[int, int, int], ...]) -> list[int]:
    return [first + step * i for first, step, count in runs for i in range(count)]


def seq_runs(seqs: Iterable[int]) -> tuple[tuple[int, int, int], ...]:
    """Sorted distinct ``seqs`` as runs ``(first, step, count)`` of constant step (greedy)."""
    ordered = sorted(set(seqs))
    runs: list[tuple[int, int, int]] = []
    i, n = 0, len(ordered)
    while i < n:
        first = ordered[i]
        if i + 1 == n:
            runs.append((first, 1, 1))
            break
        step = ordered[i + 1] - first
        j = i + 1
        while j + 1 < n and ordered[j + 1] - ordered[j] == step:
            j += 1
        runs.append((first, step, j - i + 1))
        i = j + 1
    return tuple(runs)


_RECEIPT_REQUIRED: Final = frozenset({"v", "device_id", "runs"})
_RECEIPT_ALLOWED: Final = _RECEIPT_REQUIRED | {"dup"}
_MAX_RECEIPT_SEQS: Final = 1_000_000


def decode_receipt(payload: bytes, topic_device: str | None = None) -> Receipt:
    obj = _loads(payload, MAX_RECEIPT_BYTES, "receipt")
    _check_keys(obj, _RECEIPT_REQUIRED, _RECEIPT_ALLOWED, "receipt")
    device_id = _device_of(obj, topic_device)
    runs, total = _receipt_runs(obj["runs"], "runs", least=1)
    dup, dups = _receipt_runs(obj["dup"], "dup", least=1) if "dup" in obj else ((), 0)
    if total + dups > _MAX_RECEIPT_SEQS:
        raise ContractError(f"receipt covers {total + dups} results, over the {_MAX_RECEIPT_SEQS} limit")
    return Receipt(device_id, runs, dup)


def _receipt_runs(items: Any, key: str, least: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """Validated runs ``[first, step, count]`` of a receipt's ``key`` and how many seqs they hold."""
    if type(items) is not list or not least <= len(items) <= MAX_RECEIPT_RUNS:
        raise ContractError(f"receipt.{key} must be a list of {least}..{MAX_RECEIPT_RUNS} runs")
    runs: list[tuple[int, int, int]] = []
    total = 0
    for i, run in enumerate(items):
        if type(run) is not list or len(run) != 3 or not all(type(x) is int for x in run):
            raise ContractError(f"receipt.{key}[{i}] must be [first, step, count] integers")
        first, step, count = run
        if not (0 <= first <= _MAX_INT and step >= 1 and count >= 1
                and first + step * (count - 1) <= _MAX_INT):
            raise ContractError(f"receipt.{key}[{i}] = {run} is out of range (first >= 0, step >= 1, count >= 1)")
        total += count
        runs.append((first, step, count))
    return tuple(runs), total


# --------------------------------------------------------------------------- status

ONLINE: Final = "online"
OFFLINE: Final = "offline"


@dataclass(frozen=True, slots=True)
class Status:
    """Retained device status; the last will carries ``state="offline"``."""

    device_id: str
    state: str
    ts: float
    model_name: str | None = None
    model_version: int | None = None
    model_sha256: str | None = None
    outbox_depth: int = 0
    last_error: str | None = None
    drift_psi: float | None = None  # PSI of its windows' features vs the training's (edge_agent/drift.py)
    mean_confidence: float | None = None  # of its recent predictions

    def encode(self) -> bytes:
        check_id(self.device_id)
        if self.state not in (ONLINE, OFFLINE):
            raise ContractError(f"status.state must be {ONLINE!r} or {OFFLINE!r}, got {self.state!r}")
        _finite(self.ts, "status.ts")
        _finite(self.drift_psi, "status.drift_psi")
        _finite(self.mean_confidence, "status.mean_confidence")
        obj = {"v": SCHEMA_VERSION, **asdict(self)}
        return orjson.dumps({k: v for k, v in obj.items() if v is not None})


_STATUS_REQUIRED: Final = frozenset({"v", "device_id", "state", "ts"})
_STATUS_ALLOWED: Final = _STATUS_REQUIRED | {"model_name", "model_version", "model_sha256", "outbox_depth", "last_error",
                                              "drift_psi", "mean_confidence"}


def decode_status(payload: bytes, topic_device: str | None = None) -> Status:
    obj = _loads(payload, MAX_STATUS_BYTES, "status")
    _check_keys(obj, _STATUS_REQUIRED, _STATUS_ALLOWED, "status")
    device_id = _device_of(obj, topic_device)
    return Status(
        device_id=device_id, state=_choice(obj, "state", (ONLINE, OFFLINE), "status"), ts=_float(obj, "ts", "status"),
        model_name=_opt_str(obj, "model_name", "status", 64),
        model_version=None if obj.get("model_version") is None else _int(obj, "model_version", "status"),
        model_sha256=_opt_str(obj, "model_sha256", "status", 64),
        outbox_depth=_int(obj, "outbox_depth", "status") if "outbox_depth" in obj else 0,
        last_error=_opt_str(obj, "last_error", "status", 2000),
        drift_psi=None if obj.get("drift_psi") is None else _float(obj, "drift_psi", "status"),
        mean_confidence=None if obj.get("mean_confidence") is None else _float(obj, "mean_confidence", "status"),
    )


# --------------------------------------------------------------------------- model bundles


def key_id(raw_public_key: bytes) -> str:
    """The id of an Ed25519 public key (its 32 raw bytes): the first 16 hex digits of their sha256."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


_BUNDLE_MAGIC: Final = b"EMLB"
_HEADER: Final = struct.Struct(">4sI")  # magic, manifest length
TASKS: Final = ("classification", "regression")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What travels with a model: identity, integrity, interface, preprocessing and metrics.

    ``signature`` is an Ed25519 signature (base64) over :meth:`signing_bytes`, i.e. the manifest
    without its signature; the manifest holds the sha256 of the ONNX bytes, so it covers those too.
    """

    name: str
    version: int
    sha256: str
    task: str
    labels: tuple[str, ...]
    n_features: int
    input_name: str
    preprocess: dict[str, Any]
    created: float
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    key_id: str | None = None
    signature: str | None = None

    def to_obj(self) -> dict[str, Any]:
        obj = {"v": SCHEMA_VERSION, **asdict(self)}
        obj["labels"] = list(self.labels)
        return obj

    def signing_bytes(self) -> bytes:
        obj = self.to_obj()
        obj.pop("signature")
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    def with_signature(self, signature: bytes, key_id: str) -> Manifest:
        unsigned = replace(self, key_id=key_id, signature=None)
        return replace(unsigned, signature=base64.b64encode(signature).decode())

    def signature_bytes(self) -> bytes | None:
        return signature_bytes(self.signature, "manifest")


def signature_bytes(signature: str | None, what: str) -> bytes | None:
    """The raw Ed25519 signature of a signed header (a manifest, a round announcement), or None if unsigned."""
    if signature is None:
        return None
    try:
        return base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise ContractError(f"{what}.signature is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class Signed:
    """What a signed header's signature covers, read from the header as it came, before any field is
    interpreted: its canonical bytes (sorted keys, without ``signature``), the signature and the key id."""

    data: bytes
    signature: bytes | None
    key_id: str | None


def signed_part(header: dict[str, Any], what: str) -> Signed:
    """The signed part of a decoded header (a manifest, a round announcement). The signer wrote the
    same canonical bytes from its object (``signing_bytes``), so they are equal for any header it made."""
    signature = _opt_str(header, "signature", what, 256)
    key = _opt_str(header, "key_id", what, 128)
    try:
        data = orjson.dumps({k: v for k, v in header.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # not reached for a header within MAX_HEADER_DEPTH: a guard
        raise ContractError(f"{what} cannot be written canonically: {exc}") from exc
    return Signed(data, signature_bytes(signature, what), key)


_MANIFEST_REQUIRED: Final = frozenset(
    {"v", "name", "version", "sha256", "task", "labels", "n_features", "input_name", "preprocess", "created"}
)
_MANIFEST_ALLOWED: Final = _MANIFEST_REQUIRED | {"metrics", "training", "key_id", "signature"}


def manifest_from_obj(obj: dict[str, Any]) -> Manifest:
    """A manifest from its decoded JSON (a bundle's header, or one the hub stored); ContractError if
    anything in it is not what the contract says, nesting past MAX_HEADER_DEPTH included."""
    what = "manifest"
    if type(obj) is not dict:
        raise ContractError(f"manifest must be an object, got {type(obj).__name__}")
    _check_keys(obj, _MANIFEST_REQUIRED, _MANIFEST_ALLOWED, what)
    if type(obj["v"]) is not int or obj["v"] != SCHEMA_VERSION:
        raise ContractError(f"manifest has unsupported schema version {show(obj['v'])}")
    sha = _hex64(obj, "sha256", what)
    task = _choice(obj, "task", TASKS, what)
    labels = obj["labels"]
    if type(labels) is not list or not all(type(x) is str for x in labels):
        raise ContractError("manifest.labels must be a list of strings")
    for key in ("preprocess", "metrics", "training"):
        if key in obj and type(obj[key]) is not dict:
            raise ContractError(f"manifest.{key} must be an object")
        if key in obj and _depth(obj[key], MAX_HEADER_DEPTH - 1) > MAX_HEADER_DEPTH - 1:
            raise ContractError(f"manifest.{key} is nested more than {MAX_HEADER_DEPTH - 1} levels deep")
    name = obj["name"]
    check_id(name, "model name")
    input_name = obj["input_name"]
    if type(input_name) is not str or not input_name:
        raise ContractError("manifest.input_name must be a non-empty string")
    return Manifest(
        name=name, version=_int(obj, "version", what, 1), sha256=sha, task=task, labels=tuple(labels),
        n_features=_int(obj, "n_features", what, 1, 1 << 20), input_name=input_name,
        preprocess=obj["preprocess"], created=_float(obj, "created", what),
        metrics=obj.get("metrics") or {}, training=obj.get("training") or {},
        key_id=_opt_str(obj, "key_id", what, 128), signature=_opt_str(obj, "signature", what, 256),
    )


@dataclass(frozen=True, slots=True)
class Bundle:
    """A model bundle: manifest + INT8 ONNX bytes, the retained payload of the model topic."""

    manifest: Manifest
    model: bytes

    def encode(self) -> bytes:
        head = orjson.dumps(self.manifest.to_obj())
        payload = _HEADER.pack(_BUNDLE_MAGIC, len(head)) + head + self.model
        if len(payload) > MAX_BUNDLE_BYTES:
            raise ContractError(f"bundle of {len(payload)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")
        return payload


def split_bundle(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A bundle's manifest as decoded JSON (not yet interpreted: see :func:`signed_part`) and its model bytes."""
    if len(payload) > MAX_BUNDLE_BYTES:
        raise ContractError(f"bundle of {len(payload)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")
    if len(payload) < _HEADER.size or payload[:4] != _BUNDLE_MAGIC:
        raise ContractError("not a model bundle (bad magic)")
    _, head_len = _HEADER.unpack_from(payload)
    end = _HEADER.size + head_len
    if end > len(payload):
        raise ContractError("bundle manifest length points past the end of the payload")
    return _loads(payload[_HEADER.size:end], MAX_STATUS_BYTES * 64, "manifest", MAX_HEADER_DEPTH), payload[end:]


def decode_bundle(payload: bytes) -> Bundle:
    """Parse a bundle. Integrity (sha256) and signature are checked by the receiver, not here."""
    header, model = split_bundle(payload)
    return Bundle(manifest_from_obj(header), model)
