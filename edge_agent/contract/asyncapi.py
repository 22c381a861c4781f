"""The wire contract as a document: an AsyncAPI 3 description, with the JSON Schemas of every payload.

For the authors of devices that are not our agent (a microcontroller, a Node-RED flow): what to
send, on which topic, with which QoS and retain flag, and what comes back. Built from the limits in
:mod:`edge_agent.contract`, so the two cannot drift apart; ``contract/asyncapi.json`` in the
repository is this module's output, and a test checks that it is current, that everything the
encoders produce validates, and that every payload a schema refuses, the decoders refuse too (the
decoders may be stricter: ``end >= start``, the payload size, the topic's device id).

    python -m edge_agent.contract.asyncapi > contract/asyncapi.json

This module lays out the document (channels, operations, messages and their MQTT bindings); the
payloads' schemas are in :mod:`edge_agent.contract.schemas` (results, status, receipt, manifest) and
:mod:`edge_agent.contract.round_schemas` (federated rounds).

The agent never imports this module: it is documentation and tests, not the runtime path.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from edge_agent import contract as c
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract import secure_rounds as sr
from edge_agent.contract.round_schemas import ANSWERED, ROUND, ROUND_FORMAT, SECURE_ANSWER, STEP, UPDATE
from edge_agent.contract.schemas import BUNDLE_FORMAT, DIALECT, MANIFEST, RECEIPT, RESULTS, STATUS


def schemas() -> dict[str, dict[str, Any]]:
    """Every JSON payload's schema, each declaring its dialect (:data:`edge_agent.contract.schemas.DIALECT`)."""
    found = {"results": RESULTS, "status": STATUS, "receipt": RECEIPT, "manifest": MANIFEST, "round": ROUND,
             "update": UPDATE, "step": STEP, "secureAnswer": SECURE_ANSWER, "answered": ANSWERED}
    return {name: {"$schema": DIALECT, **schema} for name, schema in found.items()}


def _mqtt(delivery: c.Delivery) -> dict[str, Any]:
    return {"mqtt": {"qos": delivery.qos, "retain": delivery.retain, "bindingVersion": "0.2.0"}}


_PREFIX = {"description": "topic prefix of the deployment (settings `prefix`, default `edgeml`)",
           "default": "edgeml"}
_DEVICE = {"description": "the device id: the same as in the payload (and the broker username under the "
                          "deployment ACL)"}
_MODEL_NAME = {"description": "model name (settings `model_name`, default `default`)"}


def _channel(address: str, message: str, **params: Any) -> dict[str, Any]:
    return {"address": address, "parameters": {"prefix": _PREFIX, **params},
            "messages": {message: {"$ref": f"#/components/messages/{message}"}}}


def _operation(action: str, chan: str, delivery: c.Delivery, summary: str) -> dict[str, Any]:
    return {"action": action, "channel": {"$ref": f"#/channels/{chan}"}, "summary": summary,
            "bindings": _mqtt(delivery)}


def _message(name: str, summary: str, content: str = "application/json") -> dict[str, Any]:
    """A JSON message points at its schema; a binary one carries its framing in prose."""
    body: dict[str, Any] = {"name": name, "summary": summary, "contentType": content}
    body["payload"] = ({"$ref": f"#/components/schemas/{name}"} if content == "application/json"
                       else {"type": "string", "format": "binary",
                             "description": BUNDLE_FORMAT if name == "bundle" else ROUND_FORMAT})
    return body


def _channels() -> dict[str, Any]:
    return {
        "results": _channel("{prefix}/devices/{device_id}/results", "results", device_id=_DEVICE),
        "status": _channel("{prefix}/devices/{device_id}/status", "status", device_id=_DEVICE),
        "receipts": _channel("{prefix}/devices/{device_id}/receipts", "receipt", device_id=_DEVICE),
        "model": _channel("{prefix}/models/{model_name}", "bundle", model_name=_MODEL_NAME),
        "deviceModel": _channel("{prefix}/devices/{device_id}/model", "bundle", device_id=_DEVICE),
        "rounds": _channel("{prefix}/rounds/{model_name}", "announcement", model_name=_MODEL_NAME),
        "update": {**_channel("{prefix}/devices/{device_id}/update", "update", device_id=_DEVICE),
                   "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in ("update", "secureAnswer")}},
        "roundStep": _channel("{prefix}/devices/{device_id}/round", "step", device_id=_DEVICE),
        "answered": _channel("{prefix}/devices/{device_id}/answered", "answered", device_id=_DEVICE),
    }


def _operations() -> dict[str, Any]:
    return {
        "sendResults": _operation("send", "results", c.RESULTS_DELIVERY,
                                  "Publish result batches; keep each result until its receipt, send it "
                                  "again if none comes (after a timeout and after every reconnect)."),
        "sendStatus": _operation("send", "status", c.STATUS_DELIVERY,
                                 "Publish the retained status on connect and now and then; set the same "
                                 "with state offline as the last will."),
        "receiveReceipts": _operation("receive", "receipts", c.RECEIPT_DELIVERY,
                                      "Subscribe to your receipts: the hub sends one after each commit."),
        "receiveModels": _operation("receive", "model", c.MODEL_DELIVERY,
                                    "Subscribe to the retained, signed model bundle; verify, then swap."),
        "receiveDeviceModel": _operation("receive", "deviceModel", c.MODEL_DELIVERY,
                                         "Canary rollouts: a retained bundle here is for this device only "
                                         "and wins over the model topic; an empty retained message ends it "
                                         "(run the model topic's bundle again). Verify it the same way."),
        "receiveRounds": _operation("receive", "rounds", cr.ROUND_DELIVERY,
                                    "Federated rounds: the retained, signed announcement of the open round "
                                    "(empty: none). Verify it as a bundle, then train if asked."),
        "sendUpdate": _operation("send", "update", cu.UPDATE_DELIVERY,
                                 "Answer a round once: the INT8 delta of the trainable tensors, the example "
                                 "count, scores before and after, the activation ranges seen. Keep the answer "
                                 "and send the same bytes again (a doubling wait) until its receipt comes on "
                                 "answered."),
        "receiveAnswered": _operation("receive", "answered", cu.UPDATE_DELIVERY,
                                      "The hub's receipt for one of your answers, once its verdict is committed: "
                                      "stop sending that answer (named by the sha256 of its payload)."),
        "receiveRoundStep": _operation("receive", "roundStep", sr.STEP_DELIVERY,
                                       "Secure rounds: the hub's next step for this device (retained, signed; "
                                       "empty: none). Verify it as the announcement, then do it once."),
        "sendSecureAnswer": _operation("send", "update", sr.ANSWER_DELIVERY,
                                       "Secure rounds: your advert, sealed shares, masked vectors and revealed "
                                       "shares, each once, on the update topic."),
    }


def _messages() -> dict[str, Any]:
    return {
        "results": _message("results", "a batch of results"),
        "status": _message("status", "device status (retained; the last will says offline)"),
        "receipt": _message("receipt", "the hub's commit receipt"),
        "bundle": _message("bundle", "a signed INT8 ONNX model bundle", "application/octet-stream"),
        "announcement": _message("announcement", "a signed federated round: its plan and the base "
                                 "weights", "application/octet-stream"),
        "update": _message("update", "a device's INT8 delta for a round", "application/octet-stream"),
        "step": _message("step", "the hub's next step for one device in a secure round",
                         "application/octet-stream"),
        "secureAnswer": _message("secureAnswer", "a device's message in a secure round", "application/octet-stream"),
        "answered": _message("answered", "the hub's receipt for an answer to a round"),
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3 document, from a device's point of view."""
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgeml-mqtt device contract", "version": str(c.SCHEMA_VERSION),
            "description": "What a device sends to the cloud hub and what it gets back, over MQTT 3.1.1 or 5. "
                           "Every JSON payload carries the schema version `v`; the hub refuses anything else "
                           "and keeps refused payloads in its dead-letter table with the reason. A result "
                           "is stored once per (device_id, seq), however often it is sent. The payloads' JSON "
                           "Schemas (components.schemas) are draft-07, as each says in $schema, and read the "
                           "same by a 2020-12 validator. One thing a schema cannot say: an integer field "
                           "(`v`, `seq`, a version, a count) is written without a fraction or an exponent. JSON "
                           "Schema counts 2.0 as an integer; the hub refuses it, naming the field.",
        },
        "defaultContentType": "application/json",
        "servers": {"broker": {"host": "localhost:1883", "protocol": "mqtt",
                               "description": "mosquitto with the project's config; production: mqtts on 8883 "
                                              "with a username per device (deploy/mosquitto)"}},
        "channels": _channels(),
        "operations": _operations(),
        "components": {"messages": _messages(), "schemas": schemas()},
    }


def render() -> str:
    return orjson.dumps(asyncapi(), option=orjson.OPT_INDENT_2).decode() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
