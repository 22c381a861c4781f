"""The JSON Schemas of federated rounds' headers: the announcement's plan, the update, a secure round's
steps and answers, and the hub's receipt for an answer; with the prose of their binary framing.

Written from :mod:`edge_agent.contract.rounds`, :mod:`edge_agent.contract.round_updates`,
:mod:`edge_agent.contract.secure_rounds` and :mod:`edge_agent.contract.answers` (their limits, kinds and
encodings), with the building blocks of :mod:`edge_agent.contract.schemas`.

Apart from the everyday payloads' schemas because they change with the rounds' contract, not with the
results, statuses and bundles; and from :mod:`edge_agent.contract.asyncapi`, which places them in the
published document. The agent never imports this module: documentation and tests only.
"""

from __future__ import annotations

from typing import Any

from edge_agent import contract as c
from edge_agent.contract import round_frames as crf
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract.schemas import ID, NUMBER, U63, VERSION, nullable, only_chars

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
        "key_id": nullable({"type": "string", "maxLength": 128}),
        "signature": nullable({"type": "string", "maxLength": 256, "description": "base64 Ed25519 signature of "
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
        "key_id": nullable({"type": "string", "maxLength": 128}),
        "signature": nullable({"type": "string", "maxLength": 256}),
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
        "unopened": {**_IDS, "description": "masked, when not empty: the senders whose sealed shares did not "
                     "open for this device (the hub leaves their vectors out of the sum and names them)"},
        "revealed": {"type": "object", "maxProperties": 1000, "additionalProperties": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": only_chars("0-9a-fs"),
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
        "sha256": {**only_chars("0-9a-f", 64, 64), "description": "of the answer's payload, as you sent it"},
        "verdict": {"enum": ["accepted", "late", "refused", "duplicate", "evaluated"]},
    },
}
