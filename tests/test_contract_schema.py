"""The published contract (contract/asyncapi.json) and the contract module never disagree: the file is
current, every message the encoders produce validates, and every payload a schema refuses, the
decoders refuse too (property tests on both sides). The schemas validate with common tools as they come:
Python's jsonschema as it picks the dialect (the schemas' $schema, draft-07) and as 2020-12 (its default
without one), and JavaScript's ajv (Debian's node-ajv 6, run by node), with the same verdicts."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import contract as c
from edge_agent.contract import asyncapi as cs
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract import secure_rounds as sr

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS: dict[str, Any] = json.loads((ROOT / "contract" / "asyncapi.json").read_text())["components"]["schemas"]
DRAFT_07 = "http://json-schema.org/draft-07/schema#"


class Both:
    """A schema as a validator reads it by its ``$schema`` (draft-07) and as a 2020-12 validator reads it (the
    default of Python's jsonschema, and of any tool that ignores ``$schema``): every verdict must agree."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.validators = (jsonschema.validators.validator_for(schema)(schema), jsonschema.Draft202012Validator(schema))

    def validate(self, obj: Any) -> None:
        for validator in self.validators:
            validator.validate(obj)

    def is_valid(self, obj: Any) -> bool:
        verdicts = {validator.is_valid(obj) for validator in self.validators}
        assert len(verdicts) == 1, f"draft-07 and 2020-12 read the schema differently on {obj!r}"
        return verdicts.pop()


VALIDATORS = {name: Both(schema) for name, schema in SCHEMAS.items()}
DECODERS = {
    "results": lambda p: c.decode_results(p),
    "status": lambda p: c.decode_status(p),
    "receipt": lambda p: c.decode_receipt(p),
    "manifest": lambda p: c.decode_bundle(b"EMLB" + struct.pack(">I", len(p)) + p + b"onnx bytes"),
}


def test_the_published_document_is_current() -> None:
    assert (ROOT / "contract" / "asyncapi.json").read_text() == cs.render(), \
        "regenerate: python -m edge_agent.contract.asyncapi > contract/asyncapi.json"


def test_the_document_is_asyncapi_3_with_every_channel_and_valid_schemas() -> None:
    doc = cs.asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["channels"]) == {"results", "status", "receipts", "model", "deviceModel", "rounds", "update",
                                    "roundStep", "answered"}
    topics = c.Topics("edgeml")
    addresses = {name: ch["address"].format(prefix="edgeml", device_id="d1", model_name="default")
                 for name, ch in doc["channels"].items()}
    assert addresses == {"results": topics.results("d1"), "status": topics.status("d1"),
                         "receipts": topics.receipts("d1"), "model": topics.model("default"),
                         "deviceModel": topics.device_model("d1"), "rounds": topics.rounds("default"),
                         "update": topics.update("d1"), "roundStep": topics.round_step("d1"),
                         "answered": topics.answered("d1")}
    ops = doc["operations"]
    for op, delivery in (("sendResults", c.RESULTS_DELIVERY), ("sendStatus", c.STATUS_DELIVERY),
                         ("receiveReceipts", c.RECEIPT_DELIVERY), ("receiveModels", c.MODEL_DELIVERY),
                         ("receiveDeviceModel", c.MODEL_DELIVERY), ("receiveRounds", cr.ROUND_DELIVERY),
                         ("sendUpdate", cu.UPDATE_DELIVERY), ("receiveRoundStep", sr.STEP_DELIVERY),
                         ("sendSecureAnswer", sr.ANSWER_DELIVERY), ("receiveAnswered", cu.UPDATE_DELIVERY)):
        assert ops[op]["bindings"]["mqtt"]["qos"] == delivery.qos
        assert ops[op]["bindings"]["mqtt"]["retain"] == delivery.retain


def test_round_announcements_and_updates_validate_and_decode_back() -> None:
    rng = np.random.default_rng(0)
    weights = {"coef_0": rng.normal(size=(5, 4)).astype(np.float32), "intercept_0": np.zeros(4, np.float32),
               "coef_1": rng.normal(size=(4, 3)).astype(np.float32), "intercept_1": np.ones(3, np.float32)}
    plan = cr.RoundPlan(3, "default", 2, "a" * 64, "classification", ("d1", "d2"), 1e9, trainable=("coef_1",
                                                                                                     "intercept_1"))
    payload = cr.announcement(plan, weights).encode()
    head_len = int.from_bytes(payload[4:8], "big")
    VALIDATORS["round"].validate(orjson.loads(payload[8:8 + head_len]))
    back = cr.decode_announcement(payload)
    assert back.plan.trainable == ("coef_1", "intercept_1") and back.plan.participants == ("d1", "d2")
    assert all(np.array_equal(back.weights[k], v) for k, v in weights.items())
    with pytest.raises(c.ContractError, match="sha256"):
        cr.decode_announcement(payload[:-1] + bytes([payload[-1] ^ 1]))  # a flipped weight bit
    delta = {"coef_1": rng.normal(0, 0.01, (4, 3)).astype(np.float32), "intercept_1": np.zeros(3, np.float32)}
    specs, arrays = cu.encode_update_delta(delta, "int8")
    update = cu.Update(3, "d1", "default", 2, 10, 1.0, 0.5, 0.5, 0.8, 0.1, 1, 0.2, ((0, 1, -1, 2),) * 2, "int8",
                       specs, arrays, 5.0)
    data = update.encode()
    assert len(data) < 8 + 400 + 15  # 12 + 3 bytes of int8 after the header
    VALIDATORS["update"].validate(orjson.loads(data[8:8 + int.from_bytes(data[4:8], "big")]))
    got = cu.decode_update(data, "d1").dequantized()
    scale = specs[0].scale
    assert np.max(np.abs(got["coef_1"] - delta["coef_1"])) <= scale / 2 + 1e-9
    assert not got["intercept_1"].any()
    with pytest.raises(c.ContractError, match="differs"):
        cu.decode_update(data, "d2")


def test_secure_round_steps_and_answers_validate() -> None:
    """Every kind of step and answer, as encoded, against its schema (and a secure plan against the round's)."""
    from dataclasses import replace

    from edge_agent.contract import secagg

    session = secagg.Session(b"m/round 3", ("d1", "d2", "d3"), 2, 10)
    keys = {d: secagg.DeviceSecrets(d) for d in session.participants}
    adverts = {d: k.advert() for d, k in keys.items()}
    sealed, _ = secagg.seal_shares(session, keys["d1"], adverts)
    header = lambda payload: orjson.loads(payload[8:8 + int.from_bytes(payload[4:8], "big")])  # noqa: E731
    for step in (sr.Step(3, "default", "d2", "share", adverts=tuple(adverts.values())),
                 sr.Step(3, "default", "d2", "mask", sealed={"d1": sealed["d2"]}, senders=("d1", "d2")),
                 sr.Step(3, "default", "d2", "reveal", survivors=("d1", "d2"), dropped=("d3",))):
        VALIDATORS["step"].validate(header(step.encode()))
    ring = np.zeros(4, np.uint32)
    for answer in (sr.Answer(3, "default", "d1", "advert", advert=adverts["d1"]),
                   sr.Answer(3, "default", "d1", "shares", sealed=sealed),
                   sr.Answer(3, "default", "d1", "masked", size=4, bits=10, stats=4,
                             body=secagg.pack(ring, 10) + secagg.pack(ring, 32)),
                   sr.Answer(3, "default", "d1", "masked", size=4, bits=10, stats=4,
                             body=secagg.pack(ring, 10) + secagg.pack(ring, 32), unopened=("d3",)),
                   sr.Answer(3, "default", "d1", "reveal", revealed={"d1": ("b", 7), "d3": ("s", 255)})):
        VALIDATORS["secureAnswer"].validate(header(answer.encode()))
    plan = replace(cr.RoundPlan(3, "default", 2, "a" * 64, "classification", ("d1", "d2", "d3"), 1e9,
                                trainable=("coef_0",)), secure=cr.SecureParams(2, 63, 3.0, 5, 10))
    VALIDATORS["round"].validate(header(cr.announcement(plan, {"coef_0": np.zeros((2, 2), np.float32)}).encode()))


# --------------------------------------------------------------------------- encoders -> schema

finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e12, max_value=1e12)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)  # NUL: refused
ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
u63 = st.integers(0, (1 << 63) - 1)


@st.composite
def results(draw: st.DrawFn) -> c.Result:
    start = draw(finite)
    return c.Result(
        seq=draw(u63), start=start, end=start + draw(st.floats(0, 1e6)), model_version=draw(u63),
        latency_ms=draw(st.floats(0, 1e6)), label=draw(st.none() | text),
        confidence=draw(st.none() | st.floats(0, 1)), value=draw(st.none() | st.tuples(finite, finite)),
        truth=draw(st.none() | text), features=draw(st.none() | st.lists(finite, max_size=8).map(tuple)))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(device=ids, items=st.lists(results(), min_size=1, max_size=5))
def test_every_encoded_results_batch_validates(device: str, items: list[c.Result]) -> None:
    VALIDATORS["results"].validate(orjson.loads(c.ResultBatch(device, tuple(items)).encode()))
    encoded = [c.encode_result_obj(r) for r in items]  # the agent's own path: one by one, joined
    VALIDATORS["results"].validate(orjson.loads(c.join_results(device, encoded)))


@settings(max_examples=150)
@given(device=ids, state=st.sampled_from([c.ONLINE, c.OFFLINE]), ts=finite,
       model=st.none() | st.tuples(ids, u63, st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
       depth=u63, error=st.none() | st.text(max_size=100))
def test_every_encoded_status_validates(device, state, ts, model, depth, error) -> None:
    name, version, sha = model if model else (None, None, None)
    VALIDATORS["status"].validate(orjson.loads(c.Status(device, state, ts, name, version, sha, depth, error).encode()))


@settings(max_examples=150)
@given(device=ids, seqs=st.sets(st.integers(0, 10**13), min_size=1, max_size=200))
def test_every_encoded_receipt_validates_and_holds_exactly_its_seqs(device: str, seqs: set[int]) -> None:
    receipt = c.Receipt.of(device, seqs)
    payload = receipt.encode()
    VALIDATORS["receipt"].validate(orjson.loads(payload))
    assert sorted(c.decode_receipt(payload, device).seqs()) == sorted(seqs)


def test_a_real_bundle_manifest_validates(tmp_path) -> None:
    from tests.helpers import make_bundle, make_log

    bundle = make_bundle(make_log(tmp_path / "log.csv", seconds=20))
    obj = orjson.loads(orjson.dumps(bundle.manifest.to_obj()))
    VALIDATORS["manifest"].validate(obj)
    VALIDATORS["manifest"].validate({k: v for k, v in obj.items() if k not in ("signature", "key_id")})


# --------------------------------------------------------------------------- schema refuses -> decoder refuses

VALID = {
    "results": {"v": 1, "device_id": "d1", "results": [
        {"seq": 5, "start": 1.0, "end": 3.0, "model_version": 2, "latency_ms": 0.4, "label": "walk",
         "confidence": 0.9, "truth": "walk", "value": [1.0, 2.0], "features": [0.5, -1.5]}]},
    "status": {"v": 1, "device_id": "d1", "state": "online", "ts": 12.5, "model_name": "default",
               "model_version": 2, "model_sha256": "a" * 64, "outbox_depth": 3, "last_error": "x"},
    "receipt": {"v": 1, "device_id": "d1", "runs": [[0, 500, 4], [9000, 1, 1]]},
    "manifest": {"v": 1, "name": "default", "version": 3, "sha256": "b" * 64, "task": "classification",
                 "labels": ["a", "b"], "n_features": 4, "input_name": "x", "preprocess": {"window_s": 2},
                 "created": 5.0, "metrics": {}, "training": {}, "key_id": "k", "signature": "c2ln"},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64) | finite | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _paths(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*path, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> Any:
    """A valid payload with one thing changed: a value replaced, a key dropped, or a key added."""
    obj = copy.deepcopy(VALID[kind])
    path = draw(st.sampled_from(_paths(obj)[1:]))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "drop", "add"]))
    if how == "replace" or not isinstance(parent, dict):
        parent[path[-1]] = draw(json_values)
    elif how == "drop":
        del parent[path[-1]]
    else:
        parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return obj


def _refused_by_decoder(kind: str, obj: Any) -> bool:
    try:
        DECODERS[kind](json.dumps(obj).encode())  # the stdlib writes integers of any size
    except c.ContractError:
        return True
    return False


@pytest.mark.parametrize("kind", sorted(VALID))
def test_the_valid_examples_pass_both(kind: str) -> None:
    VALIDATORS[kind].validate(VALID[kind])
    assert not _refused_by_decoder(kind, VALID[kind])


@pytest.mark.parametrize("kind", sorted(VALID))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_what_a_schema_refuses_the_decoder_refuses(kind: str, data: st.DataObject) -> None:
    obj = data.draw(mutated(kind))
    if not VALIDATORS[kind].is_valid(obj):
        assert _refused_by_decoder(kind, obj), f"the schema refuses it, the decoder took it: {obj!r}"


# --------------------------------------------------------------------------- common tools as they come

def test_each_schema_declares_draft_07_and_reads_as_such_in_2020_12() -> None:
    from jsonschema.validators import validator_for

    assert set(SCHEMAS) == set(cs.schemas())
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == DRAFT_07, name
        assert validator_for(schema) is jsonschema.Draft7Validator, name  # the dialect is honoured
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.Draft202012Validator.check_schema(schema)
        undeclared = {k: v for k, v in schema.items() if k != "$schema"}  # a tool that ignores $schema
        assert validator_for(undeclared) is jsonschema.Draft202012Validator
        validator_for(undeclared).check_schema(undeclared)


def _header(payload: bytes) -> Any:
    """The JSON header of a framed message (4 magic bytes, its length, the header, a body)."""
    return orjson.loads(payload[8:8 + int.from_bytes(payload[4:8], "big")])


@pytest.fixture(scope="module")
def real_messages(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Any]]:
    """(schema, JSON) of a message of every kind, as the code encodes it."""
    from dataclasses import replace

    from edge_agent.contract import secagg
    from edge_agent.contract.answers import AnswerReceipt
    from edge_agent.contract.privacy import DpParams
    from tests.helpers import make_bundle, make_log

    results = (c.Result(10, 1.0, 3.5, 2, 0.4, "walk", 0.93, None, "walk", (0.5, -1.5)),
               c.Result(11, 1.5, 4.0, 2, 0.2, None, None, (1.25, -3.0), "1.5;2", None))
    out: list[tuple[str, Any]] = [
        ("results", orjson.loads(c.ResultBatch("d1", results).encode())),
        ("status", orjson.loads(c.Status("d1", c.ONLINE, 12.5, "default", 2, "a" * 64, 3, None).encode())),
        ("status", orjson.loads(c.Status("d1", c.OFFLINE, 13.0, None, None, None, 0, "lost").encode())),
        ("receipt", orjson.loads(c.Receipt.of("d1", [0, 500, 1000, 1001, (1 << 63) - 1], dup=[500]).encode())),
    ]
    bundle = make_bundle(make_log(tmp_path_factory.mktemp("contract") / "log.csv", seconds=20))
    out.append(("manifest", orjson.loads(orjson.dumps(bundle.manifest.to_obj()))))
    weights = {"coef_0": np.ones((2, 2), np.float32), "intercept_0": np.zeros(2, np.float32)}
    plan = cr.RoundPlan(3, "default", 2, "a" * 64, "classification", ("d1", "d2", "d3"), 1e9,
                        trainable=("coef_0",))
    out += [("round", _header(cr.announcement(plan, weights).encode())),
            ("round", _header(cr.announcement(replace(plan, secure=cr.SecureParams(2, 63, 3.0, 5, 10)),
                                              weights).encode())),
            ("round", _header(cr.announcement(replace(plan, secure=cr.SecureParams(2, 63, 3.0, 5, 20),
                                                      dp=DpParams("distributed", 1.5, 1e-5, 120.5, 300.25)),
                                              weights).encode())),
            ("round", _header(cr.announcement(replace(plan, dp=DpParams("central", 2.0, 1e-6),
                                                      weights_dtype="float16"), weights).encode()))]
    specs, arrays = cu.encode_update_delta({"coef_0": np.full((2, 2), 0.01, np.float32)}, "int8")
    update = cu.Update(3, "d1", "default", 2, 10, 1.0, 0.5, 0.5, 0.8, 0.1, 1, 0.2, ((0, 1, -1, 2),), "int8",
                       specs, arrays, 5.0)
    out.append(("update", _header(update.encode())))
    session = secagg.Session(b"m/round 3", ("d1", "d2", "d3"), 2, 10)
    keys = {d: secagg.DeviceSecrets(d) for d in session.participants}
    adverts = {d: k.advert() for d, k in keys.items()}
    sealed, _ = secagg.seal_shares(session, keys["d1"], adverts)
    out += [("step", _header(step.encode())) for step in (
        sr.Step(3, "default", "d2", "share", adverts=tuple(adverts.values())),
        sr.Step(3, "default", "d2", "mask", sealed={"d1": sealed["d2"]}, senders=("d1", "d2")),
        sr.Step(3, "default", "d2", "reveal", survivors=("d1", "d2"), dropped=("d3",)))]
    ring = np.zeros(4, np.uint32)
    out += [("secureAnswer", _header(answer.encode())) for answer in (
        sr.Answer(3, "default", "d1", "advert", advert=adverts["d1"]),
        sr.Answer(3, "default", "d1", "shares", sealed=sealed),
        sr.Answer(3, "default", "d1", "masked", size=4, bits=10, stats=4,
                  body=secagg.pack(ring, 10) + secagg.pack(ring, 32)),
        sr.Answer(3, "default", "d1", "masked", size=4, bits=10, stats=4,
                  body=secagg.pack(ring, 10) + secagg.pack(ring, 32), unopened=("d3",)),
        sr.Answer(3, "default", "d1", "reveal", revealed={"d1": ("b", 7), "d3": ("s", 255)}))]
    out.append(("answered", orjson.loads(AnswerReceipt("d1", 3, "b" * 64, "duplicate").encode())))
    assert {kind for kind, _ in out} == set(SCHEMAS), "a message of every schema"
    return out


def test_real_messages_validate_as_draft_07_and_as_2020_12(real_messages) -> None:
    for kind, obj in real_messages:
        VALIDATORS[kind].validate(obj)


ODD_VALUES = [None, True, -1, 0, 1.5, 1 << 64, "", "x", "d1\n", "z" * 300, [], [1, 2, 3], {}, {"k": 1}]


def _changed(obj: Any) -> Iterator[Any]:
    """``obj`` with one value replaced by each of :data:`ODD_VALUES`, or one key dropped: at every place three
    levels deep at most, in the first three items of a list."""
    for path in _paths(obj)[1:]:
        if len(path) > 3 or any(isinstance(key, int) and key > 2 for key in path):
            continue
        for value in [*ODD_VALUES, "drop"]:
            copied = copy.deepcopy(obj)
            parent = copied
            for key in path[:-1]:
                parent = parent[key]
            if value == "drop" and isinstance(parent, dict):
                del parent[path[-1]]
            elif value != "drop":
                parent[path[-1]] = value
            else:
                continue
            yield copied


AJV = """
const Ajv = require('ajv');
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const ajv = new Ajv();  // as it comes: draft-07 by default
const out = {schemas: {}, verdicts: []};
const compiled = {};
for (const [name, schema] of Object.entries(input.schemas)) {
  const ok = ajv.validateSchema(schema);
  out.schemas[name] = ok ? null : ajv.errorsText();
  compiled[name] = ajv.compile(schema);
}
for (const [kind, obj] of input.messages) out.verdicts.push(compiled[kind](obj));
process.stdout.write(JSON.stringify(out));
"""


def test_ajv_reads_every_schema_and_agrees_with_python(real_messages) -> None:
    """JavaScript's ajv as it comes (Debian's node-ajv 6) takes the schemas, every real message, and gives the
    verdict Python's validators give on each message changed in one place."""
    node = shutil.which("node")
    assert node is not None and Path("/usr/share/nodejs/ajv").is_dir(), \
        "node and node-ajv are missing: ./dev setup installs them (apt-get install node-ajv)"
    changed = [(kind, obj) for kind, real in real_messages for obj in _changed(real)]
    messages = real_messages + changed
    res = subprocess.run([node, "-e", AJV], input=json.dumps({"schemas": SCHEMAS, "messages": messages}),
                         capture_output=True, text=True, timeout=120, env={"NODE_PATH": "/usr/share/nodejs"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["schemas"] == dict.fromkeys(SCHEMAS), f"ajv refuses a schema: {got['schemas']}"
    assert got["verdicts"][:len(real_messages)] == [True] * len(real_messages), "ajv refuses a real message"
    python = [VALIDATORS[kind].is_valid(obj) for kind, obj in changed]
    differ = [(kind, obj) for (kind, obj), js, py in zip(changed, got["verdicts"][len(real_messages):], python,
                                                         strict=True) if js != py]
    assert not differ, f"ajv and Python disagree on {len(differ)} of {len(changed)}, e.g. {differ[:3]}"
    assert python.count(True) > 0 and python.count(False) > len(changed) // 2, "the changes are mostly refused"


def test_a_receipt_run_whose_step_passes_int64_is_refused_by_both() -> None:
    """Found by the property test above: a run of one seq with a step of 2**63 (never used, but past the
    int64 the schema allows) was taken by the decoder."""
    obj = {"v": 1, "device_id": "d1", "runs": [[0, 500, 4], [9000, 2**63, 1]]}
    assert not VALIDATORS["receipt"].is_valid(obj)
    assert _refused_by_decoder("receipt", obj)
    obj["runs"][1][1] = 2**63 - 1
    assert VALIDATORS["receipt"].is_valid(obj) and not _refused_by_decoder("receipt", obj)
