"""The hub's fast path for results (cloud_hub/data/result_rows.py) against the contract's decoder.

The fast path may decline anything, but what it accepts the contract must accept with exactly the same
rows; and it must take the batches devices really send, or it saves nothing."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.data.result_rows import fast_rows
from cloud_hub.data.sessions import pack_features
from edge_agent import contract as c
from edge_agent.contract import ContractError, decode_results

DEVICE = "dev-7"
NOW = 1_700_000_123.5


def contract_rows(payload: bytes, device: str = DEVICE) -> tuple[list[tuple], bool]:
    """What the hub stored before the fast path: the contract's results, as ingest.py makes rows."""
    batch = decode_results(payload, device)
    return [(device, r.seq, r.start, r.end, r.model_version, r.label, r.confidence,
             None if r.value is None else json.dumps(list(r.value), separators=(",", ":")), r.truth,
             r.latency_ms, None if r.features is None else pack_features(r.features), NOW)
            for r in batch.results], batch.mark_duplicates


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    """Equal row for row, field for field, with the type (1 is not 1.0) and the JSON of ``value`` compared
    as numbers (orjson and json write floats alike, but not in the same characters for every float)."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b, strict=True):
        for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
            if i == 7 and x is not None and y is not None:
                x, y = json.loads(x), json.loads(y)
            if type(x) is not type(y) or x != y or (type(x) is float and repr(x) != repr(y)):  # -0.0 is not 0.0
                return False
    return True


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
number = st.one_of(finite, st.integers(-(10**6), 10**6))
float32 = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6))
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)  # NUL: the contract refuses it


@st.composite
def result_obj(draw: Any) -> dict[str, Any]:
    start = draw(number)
    obj: dict[str, Any] = {
        "seq": draw(st.integers(0, (1 << 63) - 1)), "start": start,
        "end": draw(st.one_of(st.just(start), st.floats(min_value=float(start), allow_infinity=False))),
        "model_version": draw(st.integers(0, 1000)), "latency_ms": draw(st.floats(0, 1e6)),
    }
    for key, strat in (("label", st.none() | text), ("truth", st.none() | text),
                       ("confidence", st.none() | st.floats(0, 1) | st.sampled_from([0, 1])),
                       ("value", st.none() | st.lists(number, max_size=5)),
                       ("features", st.none() | st.lists(float32, max_size=8))):
        if draw(st.booleans()):
            obj[key] = draw(strat)
    return obj


@st.composite
def batch_obj(draw: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"v": 1, "device_id": DEVICE, "results": draw(st.lists(result_obj(), min_size=1, max_size=4))}
    if draw(st.booleans()):
        obj["mark_duplicates"] = draw(st.booleans())
    return obj


def encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_obj())
def test_the_fast_path_takes_valid_batches_and_gives_the_contracts_rows(obj: dict[str, Any]) -> None:
    payload = encode(obj)
    want, want_mark = contract_rows(payload)
    got = fast_rows(payload, DEVICE, NOW)
    assert got is not None, payload  # a fast path that declines what devices send would save nothing
    rows, mark = got
    assert mark is want_mark
    assert same_rows(rows, want), (rows, want)


HOSTILE: list[Any] = [None, True, False, 0, -1, 1.5, -0.0, "a\x00b", "\x00", (1 << 63) - 1, 1 << 63, 1 << 64, 10**400, 1e308, -1e308,
                      float("nan"), float("inf"), "", "x", "y" * 257, "é" * 256, [], [1], [1, "a"], [None], {}, {"a": 1},
                      [1.0] * 257, [0.5] * 4097, [3.5e38], [-3.5e38], [3.4028235e38],
                      [3.4028235677973366e38], [-3.4028235677973366e38]]
KEYS = ["seq", "start", "end", "model_version", "latency_ms", "label", "confidence", "truth", "value", "features",
        "extra", "SEQ"]
TOP_KEYS = ["v", "device_id", "results", "mark_duplicates", "extra"]


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid batch with one thing broken: a field of a result or of the batch set to a hostile value or
    removed, or the bytes cut or changed."""
    obj = draw(batch_obj())
    how = draw(st.sampled_from(["result", "top", "bytes"]))
    if how == "result":
        r = draw(st.sampled_from(obj["results"]))
        key = draw(st.sampled_from(KEYS))
        if draw(st.integers(0, 5)) == 0:
            r.pop(key, None)
        else:
            r[key] = draw(st.sampled_from(HOSTILE))
    elif how == "top":
        key = draw(st.sampled_from(TOP_KEYS))
        if draw(st.integers(0, 4)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(st.sampled_from(HOSTILE + [1.0, 2, "dev-8", DEVICE + "/x", [{}], [[]]]))
    payload = encode(obj)
    if how == "bytes" and payload:
        i = draw(st.integers(0, len(payload) - 1))
        payload = draw(st.sampled_from([payload[:i], payload[:i] + bytes([draw(st.integers(0, 255))]) + payload[i + 1:],
                                        payload[:i] + b'\\ud800' + payload[i:]]))
    return payload


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_what_the_fast_path_accepts_the_contract_accepts_alike(payload: bytes) -> None:
    got = fast_rows(payload, DEVICE, NOW)
    if got is None:
        return  # the contract decides (stores it or names the reason): covered by the ingest tests
    try:
        want, want_mark = contract_rows(payload)
    except ContractError as exc:
        pytest.fail(f"the fast path accepted what the contract refuses ({exc.reason}): {payload[:300]!r}")
    assert got[1] is want_mark
    assert same_rows(got[0], want), payload[:300]


@pytest.mark.parametrize("payload", [
    b'{"v":1,"device_id":"dev-7","results":[{"seq":1,"start":2.0,"end":1.0,"model_version":1,"latency_ms":0}]}',
    b'{"v":1,"device_id":"dev-8","results":[{"seq":1,"start":1.0,"end":2.0,"model_version":1,"latency_ms":0}]}',
    b'{"v":1,"device_id":"dev-7","results":[{"seq":1,"start":1e400,"end":2.0,"model_version":1,"latency_ms":0}]}',
    b'{"v":1,"device_id":"dev-7","results":[{"seq":1,"start":1,"end":2,"model_version":1,"latency_ms":0,"value":[1e999]}]}',
    b'{"v":1,"device_id":"dev-7","results":[{"seq":1,"start":1,"end":2,"model_version":1,"latency_ms":0,"features":[4e38]}]}',
    b'{"v":true,"device_id":"dev-7","results":[{"seq":1,"start":1,"end":2,"model_version":1,"latency_ms":0}]}',
    b'{"v":1,"device_id":"dev-7","results":[]}',
])
def test_the_fast_path_leaves_bad_batches_to_the_contract(payload: bytes) -> None:
    assert fast_rows(payload, DEVICE, NOW) is None
    with pytest.raises(ContractError):
        decode_results(payload, DEVICE)


def test_a_batch_over_the_size_limit_is_left_to_the_contract() -> None:
    one = {"seq": 1, "start": 1.0, "end": 2.0, "model_version": 1, "latency_ms": 0.0, "label": "x" * 200}
    results = [dict(one, seq=i) for i in range(c.MAX_RESULTS_BYTES // 200)]
    payload = encode({"v": 1, "device_id": DEVICE, "results": results})
    assert len(payload) > c.MAX_RESULTS_BYTES
    assert fast_rows(payload, DEVICE, NOW) is None
    with pytest.raises(ContractError, match="limit"):
        decode_results(payload, DEVICE)


@pytest.mark.parametrize(("x", "ok"), [(3.4028234663852886e38, True), (3.4028235e38, True), (-3.4028235e38, True),
                                       (3.4028235677973366e38, False), (-3.4028235677973366e38, False)])
def test_features_are_refused_from_where_float32_overflows(x: float, ok: bool) -> None:
    """3.4028235e38 is how float32 writers spell its largest value (numpy's finfo, Rust's ryu): it is
    above float32's max as a double, yet rounds to it; 2**128 - 2**103 is the first that rounds to inf."""
    payload = encode({"v": 1, "device_id": DEVICE, "results": [
        {"seq": 3, "start": 1.0, "end": 2.0, "model_version": 4, "latency_ms": 1.0, "features": [0.5, x]}]})
    if ok:
        rows, _ = fast_rows(payload, DEVICE, NOW) or ([], False)
        assert same_rows(rows, contract_rows(payload)[0]) and rows
        assert math.isfinite(float(np.frombuffer(rows[0][10], "<f4")[1]))
    else:
        assert fast_rows(payload, DEVICE, NOW) is None
        with pytest.raises(ContractError, match="a float32 can hold"):
            decode_results(payload, DEVICE)
        with pytest.raises(ContractError, match="a float32 can hold"):
            c.ResultBatch(DEVICE, (c.Result(3, 1.0, 2.0, 4, 1.0, features=(x,)),)).encode()  # the agent's side


def test_values_and_features_come_out_as_the_contract_makes_them() -> None:
    payload = encode({"v": 1, "device_id": DEVICE, "results": [
        {"seq": 3, "start": 1, "end": 2, "model_version": 4, "latency_ms": 1, "confidence": 1,
         "value": [1, 2.5, -3], "features": [0.1, 2, math.pi]}]})
    rows, _ = fast_rows(payload, DEVICE, NOW) or ([], False)
    assert same_rows(rows, contract_rows(payload)[0])
    assert rows[0][2] == 1.0 and type(rows[0][2]) is float and rows[0][7] == "[1.0,2.5,-3.0]"
