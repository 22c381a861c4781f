"""The wire contract as a document: JSON Schemas of every payload and an AsyncAPI 3 description.

For the authors of devices that are not our agent (a microcontroller, a Node-RED flow): what to
send, on which topic, with which QoS and retain flag, and what comes back. Built from the limits in
:mod:`edge_agent.contract`, so the two cannot drift apart; ``contract/asyncapi.json`` in the
repository is this module's output, and a test checks that it is current, that everything the
encoders produce validates, and that every payload a schema refuses, the decoders refuse too (the
decoders may be stricter: ``end >= start``, the payload size, the topic's device id).

    python -m edge_agent.contract.asyncapi > contract/asyncapi.json

The agent never imports this module: it is documentation and tests, not the runtime path.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from edge_agent import contract as c
from edge_agent.contract import round_frames as crf
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract import secure_rounds as sr

# The schemas' dialect: JSON Schema draft-07, the one AsyncAPI 3 builds its Schema Object on and the one that
# validators read by default before 2020-12 (ajv 6, older Python jsonschema). Each schema says so in $schema, and
# uses only keywords that draft-07 and 2020-12 read alike, so that a validator forced to 2020-12 (or one that
# ignores $schema) reaches the same verdict. That rules out a tuple: draft-07 writes one "items": [..], 2020-12
# "prefixItems": [..], and each reads the other's wrongly; so a position's own rule (a receipt run's step >= 1)
# is in its description, and the decoders check it (they may be stricter than the schemas anyway).
# Patterns have no "$" either: Python's re (Python's jsonschema) lets "$" match before a final newline, ECMA-262
# (ajv) does not; "no character outside the set" (not: pattern: [^...]) with lengths reads the same in both.
DIALECT = "http://json-schema.org/draft-07/schema#"


def _only(chars: str, min_length: int = 1, max_length: int | None = None) -> dict[str, Any]:
    """A string of ``min_length``-``max_length`` characters, each in the regex class ``chars``."""
    length = {"minLength": min_length} | ({} if max_length is None else {"maxLength": max_length})
    return {"type": "string", **length, "not": {"pattern": f"[^{chars}]"}}


ID = {**_only("A-Za-z0-9_.:-", 1, 64),
      "description": "1-64 of A-Z a-z 0-9 _ . : - (no MQTT wildcards, no slash)"}
U63 = {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1}
NUMBER = {"type": "number", "description": "finite (JSON has no NaN or Infinity)"}
VERSION = {"const": c.SCHEMA_VERSION, "description": "schema version; other versions are refused"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional fields may be left out or be null."""
    return {"oneOf": [{"type": "null"}, schema]}


def _text(limit: int, **more: Any) -> dict[str, Any]:
    """A string a device writes: at most ``limit`` characters, no NUL (PostgreSQL's text cannot hold one)."""
    return {"type": "string", "maxLength": limit, "not": {"pattern": "\u0000"}, **more}


def _numbers(limit: int) -> dict[str, Any]:
    return {"type": "array", "maxItems": limit, "items": NUMBER}


RESULT: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["seq", "start", "end", "model_version", "latency_ms"],
    "properties": {
        "seq": {**U63, "description": "unique per device: (device_id, seq) is the result's key. Our agent "
                "uses the window start in ms, so a replay of the same log has the same keys"},
        "start": {**NUMBER, "description": "window start, epoch seconds (device clock)"},
        "end": {**NUMBER, "description": "window end, epoch seconds; not before start"},
        "model_version": {**U63, "description": "the model version that produced the result"},
        "latency_ms": {"type": "number", "minimum": 0, "description": "inference time in milliseconds"},
        "label": _nullable(_text(c.MAX_LABEL_CHARS, description="predicted class")),
        "confidence": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "value": _nullable({**_numbers(256), "description": "regression output, one number per output "
                                                             "(e.g. x, y of a position)"}),
        "truth": _nullable(_text(c.MAX_LABEL_CHARS, description="ground truth, when known: a class, or for a regressor its "
                                 "targets as numbers separated by ';' (the window mean)")),
        "features": _nullable({"type": "array", "maxItems": 4096,
                               "items": {"type": "number", "exclusiveMinimum": -c.FLOAT32_OVERFLOW,
                                         "exclusiveMaximum": c.FLOAT32_OVERFLOW,
                                         "description": "finite, and one a float32 can hold (the hub stores "
                                                        "features as float32)"},
                               "description": "the model input, for retraining at the hub"}),
    },
}

RESULTS: dict[str, Any] = {
    "title": "results", "type": "object", "additionalProperties": False,
    "description": f"A batch of results of one device (at most {c.MAX_RESULTS_BYTES} bytes). The device_id "
                   "must be the one in the topic.",
    "required": ["v", "device_id", "results"],
    "properties": {"v": VERSION, "device_id": ID,
                   "results": {"type": "array", "minItems": 1, "maxItems": c.MAX_RESULTS_PER_BATCH, "items": RESULT},
                   "mark_duplicates": {"type": "boolean", "description": "true: mark the results the hub had "
                                       "already stored in the receipt's dup (a device that reads dup says so; "
                                       "the hub writes dup to no other)"}},
}

STATUS: dict[str, Any] = {
    "title": "status", "type": "object", "additionalProperties": False,
    "description": f"The device's retained status (at most {c.MAX_STATUS_BYTES} bytes); its last will is the "
                   "same with state offline. A status without model fields keeps the model last reported.",
    "required": ["v", "device_id", "state", "ts"],
    "properties": {
        "v": VERSION, "device_id": ID, "state": {"enum": [c.ONLINE, c.OFFLINE]},
        "ts": {**NUMBER, "description": "epoch seconds (device clock)"},
        "model_name": _nullable(_text(64)),
        "model_version": _nullable(U63),
        "model_sha256": _nullable(_text(64)),
        "outbox_depth": {**U63, "description": "results on the device not yet receipted by the hub"},
        "last_error": _nullable(_text(2000)),
        "drift_psi": _nullable({**NUMBER, "description": "population stability index of the device's recent "
                                "windows' features against the training distribution in the manifest "
                                "(training.feature_bins), averaged over the features; above 0.25: drifting"}),
        "mean_confidence": _nullable({**NUMBER, "description": "mean confidence of its recent predictions"}),
    },
}

RUNS: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": c.MAX_RECEIPT_RUNS, "items": {
    "type": "array", "minItems": 3, "maxItems": 3, "items": U63,
    "description": "[first, step, count], step and count at least 1 (a rule on one position, which draft-07 and "
                   "2020-12 write differently: the decoders check it)"}}

RECEIPT: dict[str, Any] = {
    "title": "receipt", "type": "object", "additionalProperties": False,
    "description": "The hub's word that results of this device are committed (new rows and duplicates "
                   "alike). runs: [first, step, count] stands for the seqs first, first+step, ... (count of "
                   "them). A device deletes those results; applying a receipt twice is harmless. At most "
                   f"{c.MAX_RECEIPT_BYTES} bytes: the hub splits a commit's receipt into as many as it takes.",
    "required": ["v", "device_id", "runs"],
    "properties": {
        "v": VERSION, "device_id": ID, "runs": RUNS,
        "dup": {**RUNS, "description": "those of runs the hub had already stored before this delivery (a "
                "replay of the same log, a re-send): sent only to devices whose results say mark_duplicates"},
    },
}

MANIFEST: dict[str, Any] = {
    "title": "manifest", "type": "object", "additionalProperties": False,
    "description": "What travels with a model: identity, integrity, interface, preprocessing and metrics.",
    "required": ["v", "name", "version", "sha256", "task", "labels", "n_features", "input_name", "preprocess",
                 "created"],
    "properties": {
        "v": VERSION, "name": ID, "version": {**U63, "minimum": 1},
        "sha256": {**_only("0-9a-f", 64, 64), "description": "of the ONNX bytes"},
        "task": {"enum": list(c.TASKS)},
        "labels": {"type": "array", "items": _text(c.MAX_LABEL_CHARS), "description": "class names (classification)"},
        "n_features": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
        "input_name": {"type": "string", "minLength": 1},
        "preprocess": {"type": "object", "description": "window length, hop, channels, feature set and "
                       "normalization: edge_agent.preprocess.PreprocessParams"},
        "created": NUMBER,
        "metrics": {"type": "object"}, "training": {"type": "object"},
        "key_id": _nullable({"type": "string", "maxLength": 128}),
        "signature": _nullable({"type": "string", "maxLength": 256,
                                "description": "base64 Ed25519 signature of the manifest without this field"}),
    },
}

BUNDLE_FORMAT = """\
A model bundle is binary: the 4 bytes `EMLB`, the manifest length as a 4-byte big-endian unsigned
integer, the manifest (UTF-8 JSON, the `manifest` schema), then the INT8 ONNX model bytes to the end.
At most 32 MiB. To verify one, a device: (1) checks the magic and lengths; (2) checks that the
sha256 of the ONNX bytes equals `manifest.sha256`; (3) checks `manifest.signature` (base64 Ed25519)
against the hub's public key over the signing bytes: the manifest as a JSON object without its
`signature` field, keys sorted, no spaces (orjson OPT_SORT_KEYS: separators `,` and `:`), UTF-8;
(4) checks that `n_features` and `preprocess.channels` fit its sensors; only then loads the model,
warms it up and swaps it in. A bundle that fails any step is refused and the running model stays.
The topic is retained: a device that connects gets the current bundle at once."""


_TENSORS = {"type": "array", "minItems": 1, "maxItems": crf.MAX_TENSORS, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "shape"],
    "properties": {"name": ID, "shape": {"type": "array", "minItems": 1, "maxItems": 4,
                                         "items": {"type": "integer", "minimum": 1, "maximum": 1 << 20}},
                   "scale": {"type": "number", "minimum": 0, "description": "int8 deltas: value = int8 x scale"}}}}

ROUND: dict[str, Any] = {
    "title": "round", "type": "object", "additionalProperties": False,
    "description": "The header of a federated round's announcement (signed like a manifest).",
    "required": sorted(set(cr.RoundPlan(0, "m", 1, "", "classification", (), 0.0).header()) - {"key_id", "signature"}),
    "properties": {
        "v": VERSION, "round": {**U63, "minimum": 1}, "model": ID, "base_version": {**U63, "minimum": 1},
        "base_sha256": {"type": "string", "description": "the sha256 of the model a device must run to answer"},
        "task": {"enum": list(c.TASKS)},
        "participants": {"type": "array", "items": ID, "description": "the devices asked; the others ignore it"},
        "deadline": {**NUMBER, "description": "epoch seconds (hub clock): later answers count only as late"},
        "epochs": {"type": "integer", "minimum": 1, "maximum": 1000}, "lr": NUMBER,
        "batch": {"type": "integer", "minimum": 1, "maximum": 1 << 16},
        "mu": {**NUMBER, "description": "FedProx proximal weight; 0 = FedAvg"},
        "alpha": {**NUMBER, "description": "L2 penalty, as the hub trained with"},
        "clip": {**NUMBER, "description": "clip the delta's L2 norm to this; far above it is refused"},
        "min_windows": {"type": "integer", "minimum": 1, "description": "answer only holding this many labelled windows"},
        "min_new": {"type": "integer", "minimum": 0, "description": "...this many new since the last answer"},
        "min_updates": {"type": "integer", "minimum": 1}, "max_staleness": {"type": "integer", "minimum": 0},
        "encoding": {"enum": sorted(cr.ENCODINGS)}, "budget_s": NUMBER, "created": NUMBER,
        "weights_sha256": {"type": "string", "description": "of the tensor bytes after the header"},
        "tensors": _TENSORS,
        "trainable": {"type": "array", "items": ID, "description": "the tensors to train and send (none when "
                      "kind is evaluate)"},
        "kind": {"enum": list(cr.KINDS), "description": "train: fine-tune and send the delta; evaluate: score "
                 "these weights (the round's candidate) on your held-out windows and send no tensors"},
        "int8": {"type": "object", "additionalProperties": False, "required": ["bytes", "sha256"],
                 "description": "evaluate only: the INT8 ONNX model the hub will ship if it passes, after the "
                 "weights; score it too (and the INT8 model you run) and answer with both scores",
                 "properties": {"bytes": {"type": "integer", "minimum": 1}, "sha256": {"type": "string"}}},
        "secure": {"type": "object", "additionalProperties": False,
                   "required": ["threshold", "peak", "spread", "seed", "bits"],
                   "description": "a secure round (train only): answer with the secure messages on your update "
                   "topic (advert at once, then what each step on {prefix}/devices/{device_id}/round asks), never "
                   "with a plain update; the hub learns only the sum",
                   "properties": {
                       "threshold": {"type": "integer", "minimum": 1, "description": "Shamir threshold: this many "
                                     "devices must reveal their shares for the sum to come out"},
                       "peak": {"type": "integer", "minimum": 1, "maximum": 1 << 15,
                                "description": "the integer grid's bound: each value in [-peak, peak]"},
                       "spread": {**NUMBER, "description": "the grid's step is spread * clip / sqrt(padded size) "
                                  "/ peak (edge_agent/contract/secure_codec.py)"},
                       "seed": {**U63, "description": "the rotation's seed (public)"},
                       "bits": {"type": "integer", "minimum": 2, "maximum": 32,
                                "description": "the ring: masked values are modulo 2**bits"}}},
        "dp": {"type": "object", "additionalProperties": False, "required": ["mode", "noise", "delta", "sigma", "bound"],
               "description": "differential privacy (train only; edge_agent/contract/privacy.py). distributed (with "
               "secure): put your delta on the grid with conditional rounding (L2 norm of the integer vector at most "
               "bound) and add discrete Gaussian noise of sigma grid steps to every value before you mask; send "
               "zeros for your statistics and ranges. central (without secure): answer as usual, the hub adds noise",
               "properties": {
                   "mode": {"enum": ["distributed", "central"]},
                   "noise": {**NUMBER, "description": "noise multiplier: the noise's standard deviation over the "
                             "sensitivity, for the sum of the fewest devices it may have"},
                   "delta": {**NUMBER, "description": "the delta every epsilon of the round is stated at"},
                   "sigma": {**NUMBER, "description": "distributed: each device's noise, in grid steps"},
                   "bound": {**NUMBER, "description": "distributed: the L2 bound of each integer vector, in grid "
                             "steps"}}},
        "weights_dtype": {"enum": ["float32", "float16"], "description": "the body's weights (absent: float32)"},
        "key_id": _nullable({"type": "string", "maxLength": 128}),
        "signature": _nullable({"type": "string", "maxLength": 256, "description": "base64 Ed25519 signature of "
                                "the header without this field, keys sorted, as for a manifest"}),
    },
}

_B64 = {"type": "string", "maxLength": 4096, "description": "base64"}
_IDS = {"type": "array", "items": ID, "maxItems": 1000, "uniqueItems": True}
_SEALED = {"type": "object", "maxProperties": 1000, "additionalProperties": _B64,
           "description": "device id -> the Shamir shares sealed for it (AES-256-GCM: nonce, ciphertext, tag)"}

STEP: dict[str, Any] = {
    "title": "step", "type": "object", "additionalProperties": False,
    "description": "The hub's next step for one device in a secure round (retained on the device's own round "
                   "topic, signed like the announcement).",
    "required": ["v", "round", "model", "device_id", "step", "key_id", "signature"],
    "properties": {
        "v": VERSION, "round": {**U63, "minimum": 1}, "model": ID, "device_id": ID,
        "step": {"enum": ["share", "mask", "reveal"], "description": "share: seal your shares for every advert; "
                 "mask: open the shares sent to you, mask your vectors with the senders' keys and send them; "
                 "reveal: send your shares of the survivors' self-mask seeds and of the dropped devices' keys"},
        "adverts": {"type": "array", "maxItems": 1000, "items": {
            "type": "object", "additionalProperties": False, "required": ["device_id", "c", "s"],
            "properties": {"device_id": ID, "c": _B64, "s": _B64}}, "description": "share: every advert"},
        "sealed": _SEALED, "senders": {**_IDS, "description": "mask: the devices whose shares reached the hub"},
        "survivors": {**_IDS, "description": "reveal: whose masked vectors reached the hub"},
        "dropped": {**_IDS, "description": "reveal: who sent shares but no masked vector"},
        "key_id": _nullable({"type": "string", "maxLength": 128}),
        "signature": _nullable({"type": "string", "maxLength": 256}),
    },
}

SECURE_ANSWER: dict[str, Any] = {
    "title": "secureAnswer", "type": "object", "additionalProperties": False,
    "description": "A device's message in a secure round (magic EMLS, on its update topic).",
    "required": ["v", "round", "model", "device_id", "step", "sent"],
    "properties": {
        "v": VERSION, "round": {**U63, "minimum": 1}, "model": ID, "device_id": ID, "sent": NUMBER,
        "step": {"enum": ["advert", "shares", "masked", "reveal"]},
        "c": {**_B64, "description": "advert: the X25519 public key peers seal its shares to"},
        "s": {**_B64, "description": "advert: the X25519 public key of its pairwise masks"},
        "sealed": _SEALED,
        "size": {"type": "integer", "minimum": 1, "description": "masked: values of the delta vector"},
        "bits": {"type": "integer", "minimum": 2, "maximum": 32, "description": "masked: its ring width"},
        "stats": {"type": "integer", "minimum": 0, "description": "masked: values of the statistics vector "
                  "(32-bit ring)"},
        "revealed": {"type": "object", "maxProperties": 1000, "additionalProperties": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": _only("0-9a-fs"),
            "description": "[b or s, the share in hex] (the decoders check each position's rule)"},
            "description": "reveal: device id -> [b (its self-mask seed) or s (its mask key), my share in hex]"},
    },
}

UPDATE: dict[str, Any] = {
    "title": "update", "type": "object", "additionalProperties": False,
    "description": "The header of a device's answer to a round.",
    "required": sorted(cu._UPDATE_KEYS),
    "properties": {
        "v": VERSION, "round": {**U63, "minimum": 1}, "device_id": ID, "model": ID,
        "base_version": {**U63, "minimum": 1},
        "n": {"type": "integer", "minimum": 1, "description": "labelled windows trained on"},
        "loss_before": NUMBER, "loss_after": NUMBER,
        "metric_before": {**NUMBER, "description": "accuracy (or mean error) of the base on the device's held-out "
                          "windows (one in five, never trained on)"},
        "metric_after": {**NUMBER, "description": "the same of its fine-tuned model (train) or of the candidate "
                         "(evaluate)"}, "norm": {**NUMBER, "description": "of the delta before clipping"},
        "epochs": {"type": "integer", "minimum": 0}, "seconds": NUMBER,
        "ranges": {"type": "array", "maxItems": 64, "items": {"type": "array", "minItems": 4, "maxItems": 4,
                   "items": NUMBER}, "description": "per layer: input min, max, pre-activation min, max"},
        "encoding": {"enum": sorted(cr.ENCODINGS)},
        "tensors": {**_TENSORS, "minItems": 0, "description": "the delta's tensors (none in an evaluate answer)"},
        "sent": NUMBER, "kind": {"enum": list(cr.KINDS), "description": "the kind of round it answers"},
        "int8": {"type": "array", "minItems": 2, "maxItems": 2, "items": NUMBER, "description": "evaluate only: "
                 "the INT8 models' scores on the same windows, the one the device runs and the round's (the "
                 "announcement's int8): what the hub gates on; metric_before/after are then the FP32 weights'"},
    },
}

ROUND_FORMAT = """\
Federated rounds use the bundle's framing: 4 magic bytes (`EMLR` for an announcement, `EMLU` for an
update), the header length as a 4-byte big-endian unsigned integer, the header (UTF-8 JSON: the
`round` or `update` schema), then the tensors in the header's order, C order, little-endian: float32
(or float16 with `weights_dtype` float16: train from them as float32, send the delta against them)
weights in an announcement (their sha256 is `weights_sha256`, covered by the signature; an evaluate
announcement then carries the INT8 ONNX model of its `int8` field), int8 (or
float32 with `encoding` float32) deltas in an update. A device answers a round only when it runs the
model of `base_version` and `base_sha256`, is among `participants` and holds enough labelled windows;
it sends the delta of the `trainable` tensors, never its data.

A secure round (`secure` in the plan) frames its messages the same way: a device's answers (magic `EMLS`,
the `secureAnswer` schema; a masked answer's header is followed by its two vectors as bit planes: for each
bit from the lowest, that bit of every value, little-endian, padded to a whole byte; `size` values of `bits`
bits, then `stats` values of 32 bits) and the hub's steps (magic `EMLT`, the `step` schema, no body)."""


ANSWERED: dict[str, Any] = {
    "title": "answered", "type": "object", "additionalProperties": False,
    "description": "The hub's receipt for one of your answers to a round (an update, an evaluation): its verdict is "
                   "committed, stop sending it again (edge_agent/contract/answers.py).",
    "required": ["v", "device_id", "round", "sha256", "verdict"],
    "properties": {
        "v": VERSION, "device_id": ID, "round": U63,
        "sha256": {**_only("0-9a-f", 64, 64), "description": "of the answer's payload, as you sent it"},
        "verdict": {"enum": ["accepted", "late", "refused", "duplicate", "evaluated"]},
    },
}


def schemas() -> dict[str, dict[str, Any]]:
    """Every JSON payload's schema, each declaring its dialect (:data:`DIALECT`)."""
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
