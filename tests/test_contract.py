"""The wire contract: round trips, property tests, and strict decoding errors."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import contract as c

ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
small_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)  # NUL: refused


@st.composite
def results(draw: st.DrawFn) -> c.Result:
    start = draw(st.floats(0, 2e9, allow_nan=False))
    classifier = draw(st.booleans())
    return c.Result(
        seq=draw(st.integers(0, 2**62)), start=start, end=start + draw(st.floats(0, 3600)),
        model_version=draw(st.integers(0, 10_000)), latency_ms=draw(st.floats(0, 1e4)),
        label=draw(small_text) if classifier else None,
        confidence=draw(st.floats(0, 1)) if classifier else None,
        value=None if classifier else tuple(draw(st.lists(finite, min_size=1, max_size=4))),
        truth=draw(st.none() | small_text),
        features=draw(st.none() | st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=50).map(tuple)),
    )


@given(ids, st.lists(results(), min_size=1, max_size=20))
def test_results_round_trip(device_id: str, items: list[c.Result]) -> None:
    batch = c.ResultBatch(device_id, tuple(items))
    assert c.decode_results(batch.encode(), device_id) == batch


@given(ids, st.lists(results(), min_size=1, max_size=5))
def test_join_results_equals_batch_encoding(device_id: str, items: list[c.Result]) -> None:
    joined = c.join_results(device_id, [c.encode_result_obj(r) for r in items])
    assert c.decode_results(joined) == c.ResultBatch(device_id, tuple(items))


@given(ids, st.sampled_from([c.ONLINE, c.OFFLINE]), finite, st.none() | st.integers(1, 1000),
       st.integers(0, 10**9), st.none() | small_text)
def test_status_round_trip(device_id: str, state: str, ts: float, version: int | None, depth: int,
                           err: str | None) -> None:
    status = c.Status(device_id, state, ts, model_name="m" if version else None, model_version=version,
                      model_sha256="ab" * 32 if version else None, outbox_depth=depth, last_error=err)
    assert c.decode_status(status.encode(), device_id) == status


def _manifest(**kw: object) -> c.Manifest:
    base: dict = dict(name="watch", version=3, sha256="0" * 64, task="classification", labels=("A", "B"),
                      n_features=12, input_name="X", preprocess={"window_s": 2.0}, created=1.5,
                      metrics={"accuracy": 0.9})
    base.update(kw)
    return c.Manifest(**base)


@given(st.binary(max_size=2000), st.integers(1, 10**6), st.lists(small_text, max_size=8))
def test_bundle_round_trip(model: bytes, version: int, labels: list[str]) -> None:
    bundle = c.Bundle(_manifest(version=version, labels=tuple(labels)), model)
    assert c.decode_bundle(bundle.encode()) == bundle


def test_signature_covers_everything_but_itself() -> None:
    m = _manifest()
    signed = m.with_signature(b"\x01" * 64, "key1")
    assert signed.signature_bytes() == b"\x01" * 64
    assert signed.signing_bytes() == _manifest(key_id="key1").signing_bytes()
    assert _manifest(version=4, key_id="key1").signing_bytes() != signed.signing_bytes()


def _valid_obj() -> dict:
    return orjson.loads(c.ResultBatch("dev1", (c.Result(1, 0.0, 1.0, 1, 0.5, "A", 0.9),)).encode())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.update(v=2), "unsupported schema version 2"),
        (lambda o: o.pop("v"), "unsupported schema version None"),
        (lambda o: o.pop("device_id"), "missing device_id"),
        (lambda o: o.update(extra=1), "unknown field(s) extra"),
        (lambda o: o.update(results=[]), "list of 1.."),
        (lambda o: o["results"][0].update(seq="1"), "results[0].seq must be an integer"),
        (lambda o: o["results"][0].update(seq=-1), "results[0].seq must be an integer"),
        (lambda o: o["results"][0].update(start="x"), "results[0].start must be a finite number"),
        (lambda o: o["results"][0].update(end=-5.0), "end -5.0 is before start"),
        (lambda o: o["results"][0].update(confidence=1.5), "confidence must be in [0, 1]"),
        (lambda o: o["results"][0].update(features=[1, "a"]), "features must hold only finite numbers"),
        (lambda o: o["results"][0].pop("model_version"), "results[0] is missing model_version"),
        (lambda o: o.update(device_id="a/b"), "invalid device id"),
        (lambda o: o.update(device_id="other"), "differs from 'dev1' in the topic"),
    ],
)
def test_results_decoding_is_strict(mutate, reason: str) -> None:
    obj = _valid_obj()
    mutate(obj)
    with pytest.raises(c.ContractError) as err:
        c.decode_results(orjson.dumps(obj), "dev1")
    assert reason in err.value.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "must be a JSON object"),
        (b'{"v":1,"device_id":"d","results":[{"seq":1,"start":NaN}]}', "not valid JSON"),
        (b'{"v":1,"device_id":"d","results":[{"seq":1,"start":1e999}]}', "not valid JSON"),
        (b"x" * (c.MAX_RESULTS_BYTES + 1), "over the"),
    ],
)
def test_garbage_is_refused_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(c.ContractError, match=None) as err:
        c.decode_results(payload)
    assert reason in str(err.value)


def test_encoding_refuses_non_finite() -> None:
    bad = c.Result(1, 0.0, math.inf, 1, 0.5)
    with pytest.raises(c.ContractError, match="result.end must be finite"):
        c.ResultBatch("d", (bad,)).encode()
    with pytest.raises(c.ContractError, match="features must hold only finite"):
        c.encode_result_obj(c.Result(1, 0.0, 1.0, 1, 0.5, features=(1.0, math.nan)))


def test_bundle_and_status_errors() -> None:
    with pytest.raises(c.ContractError, match="bad magic"):
        c.decode_bundle(b"PK\x03\x04whatever")
    good = c.Bundle(_manifest(), b"onnx").encode()
    with pytest.raises(c.ContractError, match="past the end"):
        c.decode_bundle(good[:12])
    obj = _manifest().to_obj()
    obj["sha256"] = "XYZ"
    with pytest.raises(c.ContractError, match="sha256"):
        c.manifest_from_obj(obj)
    with pytest.raises(c.ContractError, match="state must be"):
        c.decode_status(b'{"v":1,"device_id":"d","state":"sleepy","ts":1}')


def test_topics() -> None:
    t = c.Topics("fleet/eu")
    assert t.results("d1") == "fleet/eu/devices/d1/results"
    assert t.parse(t.status("d1")) == ("status", "d1")
    assert t.parse(t.model("watch")) == ("model", "watch")
    assert t.shared(t.all_results, "hubs") == "$share/hubs/fleet/eu/devices/+/results"
    assert t.shared(t.all_results, None) == t.all_results
    for bad in ("a+b", "x#", "a/b", ""):
        with pytest.raises(c.ContractError):
            t.results(bad)
    with pytest.raises(c.ContractError, match="not part of the contract"):
        t.parse("other/devices/d1/results")
    with pytest.raises(c.ContractError):
        c.Topics("bad/#")
    assert (c.RESULTS_DELIVERY.qos, c.RESULTS_DELIVERY.retain) == (1, False)
    assert c.STATUS_DELIVERY.retain and c.MODEL_DELIVERY.retain


@pytest.mark.parametrize("bad", ["wa\x00lk", "x" * 257])
def test_text_no_result_can_carry_is_refused_where_it_would_enter(bad: str) -> None:
    """A NUL (PostgreSQL's text refuses it; SQLite kept it) or a label over 256 characters: the hub refuses the
    result, our encoder too, and a device refuses a model whose labels its results could not carry."""
    with pytest.raises(c.ContractError, match="label"):
        c.ResultBatch("d", (c.Result(1, 0.0, 1.0, 1, 0.5, bad),)).encode()
    with pytest.raises(c.ContractError, match="truth"):
        c.ResultBatch("d", (c.Result(1, 0.0, 1.0, 1, 0.5, truth=bad),)).encode()
    payload = c.ResultBatch("d", (c.Result(1, 0.0, 1.0, 1, 0.5, "ok"),)).encode().replace(
        b'"ok"', orjson.dumps(bad))
    with pytest.raises(c.ContractError, match=r"results\[0\]\.label must"):
        c.decode_results(payload)
    with pytest.raises(c.ContractError, match="manifest.labels"):
        c.Bundle(_manifest(labels=("A", bad)), b"onnx").encode()  # the hub does not make one
    if "\x00" in bad:  # and a device refuses one made elsewhere (same length: the manifest's length prefix holds)
        payload = c.Bundle(_manifest(labels=("A", "BBBBBBBB")), b"onnx").encode().replace(b'"BBBBBBBB"', b'"\\u0000BB"')
        with pytest.raises(c.ContractError, match="manifest.labels"):
            c.decode_bundle(payload)


def test_a_status_error_is_fitted_to_what_the_hub_takes_not_refused() -> None:
    """An error's text is whatever an exception said: the status carries it without NUL, cut at 2,000."""
    status = c.decode_status(c.Status("d", c.ONLINE, 1.0, last_error="bad\x00" + "e" * 3000).encode())
    assert status.last_error == "bad\ufffd" + "e" * 1996
    with pytest.raises(c.ContractError, match="status.last_error must not hold a NUL"):
        c.decode_status(b'{"v":1,"device_id":"d","state":"online","ts":1.0,"last_error":"a\\u0000"}')


def _greedy_runs(seqs: list[int]) -> tuple[tuple[int, int, int], ...]:
    """The reference: seq_runs as first written, a Python step per seq."""
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


_runs_of = st.lists(st.tuples(st.integers(0, 1 << 62), st.integers(1, 5000), st.integers(1, 40)), max_size=6)


@given(st.one_of(
    st.lists(st.integers(0, (1 << 63) - 1), max_size=60),
    st.lists(st.integers(0, 40), max_size=60),  # dense: runs that touch and steps that change often
    _runs_of.map(lambda rs: [f + s * k for f, s, n in rs for k in range(n)]),  # runs as devices send them
))
def test_seq_runs_are_the_greedy_runs_of_the_sorted_distinct_seqs(seqs: list[int]) -> None:
    """seq_runs finds its runs in C (one comparison for one run, then the steps grouped), not a Python
    step per seq: the same runs as the plain greedy walk, and they expand to exactly the seqs."""
    runs = c.seq_runs(seqs)
    assert runs == _greedy_runs(seqs)
    assert [f + s * k for f, s, n in runs for k in range(n)] == sorted(set(seqs))
    assert c.seq_runs(reversed(seqs)) == runs


def test_receipt_payloads_hold_the_seqs_and_the_duplicates_asked_for() -> None:
    seqs = list(range(1000, 3000, 20)) + [5000, 5001, 5003]
    [payload] = c.receipt_payloads("dev-1", reversed(seqs), dup=[1020, 5001, 99])
    receipt = c.decode_receipt(payload, "dev-1")
    assert receipt.seqs() == seqs
    assert receipt.dup_seqs() == [1020, 5001]  # 99 was not in the receipt


@pytest.mark.parametrize(("key", "value"), [("mean_confidence", 5.0), ("mean_confidence", -0.1), ("drift_psi", -3.0)])
def test_a_status_with_an_impossible_confidence_or_psi_is_refused(key: str, value: float) -> None:
    """A hostile peer's finding: a mean confidence of 5 and a PSI of -3 were stored and shown on the device's
    page and in Prometheus."""
    ok = {"v": 1, "device_id": "d1", "state": "online", "ts": 1.0, "mean_confidence": 1.0, "drift_psi": 0.0}
    assert c.decode_status(orjson.dumps(ok)).mean_confidence == 1.0
    with pytest.raises(c.ContractError, match=rf"status\.{key} must be in \["):
        c.decode_status(orjson.dumps({**ok, key: value}))
