"""The JSON Schemas of a device's everyday payloads, and the pieces every payload's schema is built from.

The schemas of the results, the status, the receipt and the model manifest (with the prose of the binary
bundle that carries it), written from the limits in :mod:`edge_agent.contract` so the two cannot drift
apart; and the dialect and building blocks (ids, integers, finite numbers, bounded strings) that the rounds'
schemas (:mod:`edge_agent.contract.round_schemas`) use too.

Apart from :mod:`edge_agent.contract.asyncapi`, which places these schemas in the published document
(channels, operations, messages), because they change with the payloads (``messages.py``, ``bundles.py``),
not with the document's layout. The agent never imports this module: documentation and tests only.
"""

from __future__ import annotations

from typing import Any

from edge_agent import contract as c
from edge_agent.contract.wire import MAX_INT

# The schemas' dialect: JSON Schema draft-07, the one AsyncAPI 3 builds its Schema Object on and the one that
# validators read by default before 2020-12 (ajv 6, older Python jsonschema). Each schema says so in $schema, and
# uses only keywords that draft-07 and 2020-12 read alike, so that a validator forced to 2020-12 (or one that
# ignores $schema) reaches the same verdict. That rules out a tuple: draft-07 writes one "items": [..], 2020-12
# "prefixItems": [..], and each reads the other's wrongly; so a position's own rule (a receipt run's step >= 1)
# is in its description, and the decoders check it (they may be stricter than the schemas anyway).
# Patterns have no "$" either: Python's re (Python's jsonschema) lets "$" match before a final newline, ECMA-262
# (ajv) does not; "no character outside the set" (not: pattern: [^...]) with lengths reads the same in both.
DIALECT = "http://json-schema.org/draft-07/schema#"


def only_chars(chars: str, min_length: int = 1, max_length: int | None = None) -> dict[str, Any]:
    """A string of ``min_length``-``max_length`` characters, each in the regex class ``chars``."""
    length = {"minLength": min_length} | ({} if max_length is None else {"maxLength": max_length})
    return {"type": "string", **length, "not": {"pattern": f"[^{chars}]"}}


ID = {**only_chars("A-Za-z0-9_.:-", 1, 64),
      "description": "1-64 of A-Z a-z 0-9 _ . : - (no MQTT wildcards, no slash)"}
U63 = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
NUMBER = {"type": "number", "description": "finite (JSON has no NaN or Infinity)"}
VERSION = {"const": c.SCHEMA_VERSION, "description": "schema version; other versions are refused"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
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
        "label": nullable(_text(c.MAX_LABEL_CHARS, description="predicted class")),
        "confidence": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "value": nullable({**_numbers(256), "description": "regression output, one number per output "
                                                             "(e.g. x, y of a position)"}),
        "truth": nullable(_text(c.MAX_LABEL_CHARS, description="ground truth, when known: a class, or for a regressor its "
                                 "targets as numbers separated by ';' (the window mean)")),
        "features": nullable({"type": "array", "maxItems": 4096,
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
        "model_name": nullable(_text(64)),
        "model_version": nullable(U63),
        "model_sha256": nullable(_text(64)),
        "outbox_depth": {**U63, "description": "results on the device not yet receipted by the hub"},
        "last_error": nullable(_text(2000)),
        "drift_psi": nullable({**NUMBER, "minimum": 0, "description": "population stability index of the device's recent "
                                "windows' features against the training distribution in the manifest "
                                "(training.feature_bins), averaged over the features; above 0.25: drifting"}),
        "mean_confidence": nullable({**NUMBER, "minimum": 0, "maximum": 1,
                                     "description": "mean confidence of its recent predictions"}),
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
        "sha256": {**only_chars("0-9a-f", 64, 64), "description": "of the ONNX bytes"},
        "task": {"enum": list(c.TASKS)},
        "labels": {"type": "array", "items": _text(c.MAX_LABEL_CHARS), "description": "class names (classification)"},
        "n_features": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
        "input_name": {"type": "string", "minLength": 1},
        "preprocess": {"type": "object", "description": "window length, hop, channels, feature set and "
                       "normalization: edge_agent.preprocess.PreprocessParams"},
        "created": NUMBER,
        "metrics": {"type": "object"}, "training": {"type": "object"},
        "key_id": nullable({"type": "string", "maxLength": 128}),
        "signature": nullable({"type": "string", "maxLength": 256,
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
