"""Results, receipts and statuses: what a device and the hub say to each other about inference."""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson

from edge_agent.contract.wire import (
    FLOAT32_OVERFLOW,
    MAX_INT,
    MAX_LABEL_CHARS,
    MAX_RECEIPT_BYTES,
    MAX_RECEIPT_RUNS,
    MAX_RESULTS_BYTES,
    MAX_RESULTS_PER_BATCH,
    MAX_STATUS_BYTES,
    SCHEMA_VERSION,
    ContractError,
    check_choice,
    check_finite,
    check_id,
    check_keys,
    device_of,
    fits_label,
    float_field,
    int_field,
    load_json,
    opt_floats,
    opt_str,
)

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
                check_finite(getattr(self, name), f"result.{name}")
        obj: dict[str, Any] = {
            "seq": self.seq, "start": self.start, "end": self.end,
            "model_version": self.model_version, "latency_ms": self.latency_ms,
        }
        if self.label is not None:
            if not fits_label(self.label):
                raise ContractError(f"result.label must be at most {MAX_LABEL_CHARS} characters, without NUL")
            obj["label"] = self.label
        if self.confidence is not None:
            check_finite(self.confidence, "result.confidence")
            obj["confidence"] = self.confidence
        if self.value is not None:
            if not all(map(isfinite, self.value)):
                raise ContractError("result.value must hold only finite numbers")
            obj["value"] = list(self.value)
        if self.truth is not None:
            if not fits_label(self.truth):
                raise ContractError(f"result.truth must be at most {MAX_LABEL_CHARS} characters, without NUL")
            obj["truth"] = self.truth
        if self.features is not None:
            if not all(map(isfinite, self.features)):
                raise ContractError("result.features must hold only finite numbers")
            if self.features and max(map(abs, self.features)) >= FLOAT32_OVERFLOW:
                raise ContractError(f"result.features must hold numbers a float32 can hold (|x| < {FLOAT32_OVERFLOW!r})")
            obj["features"] = list(self.features)
        return obj


_RESULT_REQUIRED: Final = frozenset({"seq", "start", "end", "model_version", "latency_ms"})
_RESULT_ALLOWED: Final = _RESULT_REQUIRED | {"label", "confidence", "value", "truth", "features"}


def _result_from_obj(obj: Any, i: int) -> Result:
    """Validate one result object. The hub's hot path: checks are inlined and the readable error is
    only built when a check fails (about 2 µs per result instead of 3)."""
    if type(obj) is not dict:
        raise ContractError(f"results[{i}] must be an object")
    keys = obj.keys()
    if not (keys >= _RESULT_REQUIRED and keys <= _RESULT_ALLOWED):
        check_keys(obj, _RESULT_REQUIRED, _RESULT_ALLOWED, f"results[{i}]")
    seq, version = obj["seq"], obj["model_version"]
    start, end, latency = obj["start"], obj["end"], obj["latency_ms"]
    if type(seq) is not int or not 0 <= seq <= MAX_INT:
        int_field(obj, "seq", f"results[{i}]")
    if type(version) is not int or not 0 <= version <= MAX_INT:
        int_field(obj, "model_version", f"results[{i}]")
    if type(start) is not float:
        start = float_field(obj, "start", f"results[{i}]")
    if type(end) is not float:
        end = float_field(obj, "end", f"results[{i}]")
    if type(latency) is not float:
        latency = float_field(obj, "latency_ms", f"results[{i}]")
    if end < start:
        raise ContractError(f"results[{i}]: end {end} is before start {start}")
    if latency < 0:
        raise ContractError(f"results[{i}].latency_ms must not be negative")
    confidence = obj.get("confidence")
    if confidence is not None:
        if type(confidence) is not float:
            confidence = float_field(obj, "confidence", f"results[{i}]")
        if not 0.0 <= confidence <= 1.0:
            raise ContractError(f"results[{i}].confidence must be in [0, 1], got {confidence}")
    label, truth = obj.get("label"), obj.get("truth")
    if label is not None and (type(label) is not str or len(label) > MAX_LABEL_CHARS or "\x00" in label):
        opt_str(obj, "label", f"results[{i}]", MAX_LABEL_CHARS)
    if truth is not None and (type(truth) is not str or len(truth) > MAX_LABEL_CHARS or "\x00" in truth):
        opt_str(obj, "truth", f"results[{i}]", MAX_LABEL_CHARS)
    value, features = obj.get("value"), obj.get("features")
    return Result(
        seq, start, end, version, latency, label, confidence,
        None if value is None else opt_floats(obj, "value", f"results[{i}]", 256),
        truth,
        None if features is None else opt_floats(obj, "features", f"results[{i}]", overflow=FLOAT32_OVERFLOW),
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
    """One result as JSON bytes (how the agent's outbox stores it), in an object of its own size: orjson's
    ``dumps`` returns its 4 kB working buffer, and a chunk's ~300 results waiting for the outbox held 1.3 MB
    instead of 60 kB (#27 §4)."""
    return memoryview(orjson.dumps(result.to_obj())).tobytes()


def join_results(device_id: str, encoded: list[bytes], mark_duplicates: bool = False) -> bytes:
    """A results payload built from results encoded one by one with :func:`encode_result_obj`."""
    head = orjson.dumps({"v": SCHEMA_VERSION, "device_id": device_id,
                         **({"mark_duplicates": True} if mark_duplicates else {})})[:-1]
    return head + b',"results":[' + b",".join(encoded) + b"]}"


def decode_results(payload: bytes, topic_device: str | None = None) -> ResultBatch:
    """Decode and validate a results payload; ``topic_device`` must match the payload's device id."""
    obj = load_json(payload, MAX_RESULTS_BYTES, "results")
    check_keys(obj, _RESULTS_REQUIRED, _RESULTS_ALLOWED, "results")
    device_id = device_of(obj, topic_device)
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
            dup_runs = _runs([s for s in part if s in already]) if already else ()
            payloads.append(Receipt(device_id, _runs(part), dup_runs).encode())
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
    """Sorted distinct ``seqs`` as runs ``(first, step, count)`` of constant step (greedy: each run as long
    as it goes, the next starting at the seq after it)."""
    return _runs(sorted(set(seqs)))


def _runs(ordered: list[int]) -> tuple[tuple[int, int, int], ...]:
    """:func:`seq_runs` of seqs already sorted and distinct, with no Python step per seq: a hub receipts
    every stored result (200,000 a second on a busy hub), and a device's seqs are nearly always one run."""
    n = len(ordered)
    if n < 2:
        return ((ordered[0], 1, 1),) if n else ()
    first, last = ordered[0], ordered[-1]
    step = ordered[1] - first
    if last - first == step * (n - 1) and ordered == list(range(first, last + 1, step)):
        return ((first, step, n),)  # one run (compared in C)
    diffs = list(map(operator.sub, ordered[1:], ordered[:-1]))
    ends = list(itertools.accumulate(len(list(same)) for _, same in itertools.groupby(diffs)))  # of equal steps
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < n:
        if i + 1 == n:
            runs.append((ordered[i], 1, 1))
            break
        end = ends[bisect.bisect_right(ends, i)]  # the steps i..end-1 are diffs[i]: seqs i..end are one run
        runs.append((ordered[i], diffs[i], end - i + 1))
        i = end + 1
    return tuple(runs)


_RECEIPT_REQUIRED: Final = frozenset({"v", "device_id", "runs"})
_RECEIPT_ALLOWED: Final = _RECEIPT_REQUIRED | {"dup"}
_MAX_RECEIPT_SEQS: Final = 1_000_000


def decode_receipt(payload: bytes, topic_device: str | None = None) -> Receipt:
    obj = load_json(payload, MAX_RECEIPT_BYTES, "receipt")
    check_keys(obj, _RECEIPT_REQUIRED, _RECEIPT_ALLOWED, "receipt")
    device_id = device_of(obj, topic_device)
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
        if not (0 <= first <= MAX_INT and 1 <= step <= MAX_INT and count >= 1
                and first + step * (count - 1) <= MAX_INT):  # a step past int64 too, even of a run of one
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
        check_finite(self.ts, "status.ts")
        check_finite(self.drift_psi, "status.drift_psi")
        check_finite(self.mean_confidence, "status.mean_confidence")
        obj = {"v": SCHEMA_VERSION, **asdict(self)}
        if (error := self.last_error) is not None and (len(error) > _MAX_ERROR_CHARS or "\x00" in error):
            # an error's text is whatever an exception said: fitted to what the hub takes, not refused
            obj["last_error"] = error[:_MAX_ERROR_CHARS].replace("\x00", "\ufffd")
        return orjson.dumps({k: v for k, v in obj.items() if v is not None})


_MAX_ERROR_CHARS: Final = 2000  # a status's last_error
_STATUS_REQUIRED: Final = frozenset({"v", "device_id", "state", "ts"})
_STATUS_ALLOWED: Final = _STATUS_REQUIRED | {"model_name", "model_version", "model_sha256", "outbox_depth", "last_error",
                                              "drift_psi", "mean_confidence"}


def decode_status(payload: bytes, topic_device: str | None = None) -> Status:
    obj = load_json(payload, MAX_STATUS_BYTES, "status")
    check_keys(obj, _STATUS_REQUIRED, _STATUS_ALLOWED, "status")
    device_id = device_of(obj, topic_device)
    return Status(
        device_id=device_id, state=check_choice(obj, "state", (ONLINE, OFFLINE), "status"), ts=float_field(obj, "ts", "status"),
        model_name=opt_str(obj, "model_name", "status", 64),
        model_version=None if obj.get("model_version") is None else int_field(obj, "model_version", "status"),
        model_sha256=opt_str(obj, "model_sha256", "status", 64),
        outbox_depth=int_field(obj, "outbox_depth", "status") if "outbox_depth" in obj else 0,
        last_error=opt_str(obj, "last_error", "status", _MAX_ERROR_CHARS),
        drift_psi=_in_range(obj, "drift_psi", 0.0, math.inf),  # a PSI is never negative
        mean_confidence=_in_range(obj, "mean_confidence", 0.0, 1.0),  # a mean of probabilities
    )


def _in_range(obj: dict[str, Any], key: str, low: float, high: float) -> float | None:
    """An optional status number within [low, high]: a device stating a confidence of 5 or a PSI of -3 was
    stored and shown on its page and in Prometheus."""
    if obj.get(key) is None:
        return None
    value = float_field(obj, key, "status")
    if not low <= value <= high:
        raise ContractError(f"status.{key} must be in [{low:g}, {high:g}], got {value}")
    return value


# --------------------------------------------------------------------------- model bundles
