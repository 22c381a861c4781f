"""The evaluate announcement carries the INT8 model that would ship, and the answer both INT8 scores:
round trips through the encoders, the published schema, the signature and every refusal."""

from __future__ import annotations

import dataclasses

import jsonschema
import numpy as np
import orjson
import pytest

from edge_agent import contract as c
from edge_agent.contract import round_schemas as rs
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr

WEIGHTS = {"coef_0": np.arange(6, dtype=np.float32).reshape(2, 3), "intercept_0": np.zeros(3, np.float32)}
PLAN = cr.RoundPlan(4, "default", 2, "a" * 64, "classification", ("d1",), 1e9, kind="evaluate")
ONNX = b"\x08\x07 an INT8 ONNX model's bytes"


def _header(payload: bytes) -> dict:
    return orjson.loads(payload[8:8 + int.from_bytes(payload[4:8], "big")])


def test_an_evaluate_announcement_carries_its_int8_model_under_its_digest(tmp_path) -> None:
    from cloud_hub.models.signing import keygen, load_private_key, sign_round
    from edge_agent.device.bundle import check_round, load_public_key

    ann = cr.announcement(PLAN, WEIGHTS, ONNX)
    payload = ann.encode()
    head = _header(payload)
    jsonschema.Draft7Validator(rs.ROUND).validate(head)
    assert head["int8"] == {"bytes": len(ONNX), "sha256": ann.plan.int8_sha256}
    back = cr.decode_announcement(payload)
    assert back.int8 == ONNX and back.plan == ann.plan
    assert all(np.array_equal(back.weights[k], v) for k, v in WEIGHTS.items())
    # signed: the model's digest is in the signed header, so a swapped model is refused
    priv, pub, _ = keygen(tmp_path / "k.pem")
    signed = dataclasses.replace(ann, plan=sign_round(ann.plan, load_private_key(priv)))
    assert check_round(signed.encode(), trusted_key=load_public_key(pub), allow_unsigned=False).int8 == ONNX
    other = b"\x08\x07 another model, same length."[:len(ONNX)]
    with pytest.raises(c.ContractError, match="INT8 model does not match its sha256"):
        cr.decode_announcement(signed.encode()[:-len(ONNX)] + other)
    with pytest.raises(c.ContractError, match="weights do not match"):  # the model's bytes are not the weights'
        cr.decode_announcement(payload[:-len(ONNX) - 1] + payload[-len(ONNX):])
    plain = cr.announcement(PLAN, WEIGHTS).encode()
    assert "int8" not in _header(plain) and cr.decode_announcement(plain).int8 == b""  # reads as before


def test_only_an_evaluate_round_carries_a_model() -> None:
    with pytest.raises(c.ContractError, match="only an evaluate round"):
        cr.announcement(dataclasses.replace(PLAN, kind="train", trainable=("coef_0",)), WEIGHTS, ONNX)
    train = cr.announcement(dataclasses.replace(PLAN, kind="train", trainable=("coef_0",)), WEIGHTS)
    head = _header(train.encode()) | {"int8": {"bytes": 1, "sha256": "0" * 64}}
    body = train.encode()[8 + int.from_bytes(train.encode()[4:8], "big"):]
    forged = b"EMLR" + len(orjson.dumps(head)).to_bytes(4, "big") + orjson.dumps(head) + body
    with pytest.raises(c.ContractError, match="in an evaluate round only"):
        cr.decode_announcement(forged)


def test_an_evaluation_answer_carries_both_int8_scores() -> None:
    answer = cu.Update(4, "d1", "default", 2, 30, 0.0, 0.0, 0.8, 0.9, 0.0, 0, 0.1, (), "int8", (), {},
                       kind="evaluate", int8_before=0.75, int8_after=0.85)
    payload = answer.encode()
    jsonschema.Draft7Validator(rs.UPDATE).validate(_header(payload))
    back = cu.decode_update(payload, "d1")
    assert (back.metric_before, back.metric_after, back.int8_before, back.int8_after) == (0.8, 0.9, 0.75, 0.85)
    old = dataclasses.replace(answer, int8_before=None, int8_after=None)  # an agent from before: still read
    assert "int8" not in _header(old.encode()) and cu.decode_update(old.encode()).int8_after is None
    for bad in ([0.5], [0.5, "x"], {"a": 1}):
        head = _header(payload) | {"int8": bad}
        raw = b"EMLU" + len(orjson.dumps(head)).to_bytes(4, "big") + orjson.dumps(head)
        with pytest.raises(c.ContractError, match="int8"):
            cu.decode_update(raw)
