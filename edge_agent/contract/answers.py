"""The hub's receipt for a device's answer to a federated round (``{prefix}/devices/{id}/answered``).

A device keeps each answer it sends (its update, its evaluation) until the hub says it committed a verdict on
it, as results wait in the outbox for their receipt: the broker's PUBACK only says the broker has it, and a
broker that forgets everything, or a ``federate`` that was not subscribed, would lose it. The hub sends one
receipt per answer it has judged and committed, whatever the verdict (accepted, late, refused, a duplicate
of one already judged): the device stops sending that answer. The answer is named by the sha256 of its
payload, which is what the hub dedupes on. Applying a receipt twice, or one for an answer the device no
longer holds, is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

from edge_agent.contract.wire import (
    SCHEMA_VERSION,
    ContractError,
    check_choice,
    check_id,
    check_keys,
    hex64,
    int_field,
    load_json,
)

VERDICTS: Final = ("accepted", "late", "refused", "duplicate", "evaluated")
MAX_ANSWER_RECEIPT_BYTES: Final = 1024
_KEYS: Final = frozenset({"v", "device_id", "round", "sha256", "verdict"})


@dataclass(frozen=True, slots=True)
class AnswerReceipt:
    device_id: str
    round_id: int
    sha256: str  # of the answer's payload, as the device sent it
    verdict: str

    def encode(self) -> bytes:
        check_id(self.device_id)
        if self.verdict not in VERDICTS:
            raise ContractError(f"answer receipt verdict must be one of {', '.join(VERDICTS)}")
        return orjson.dumps({"v": SCHEMA_VERSION, "device_id": self.device_id, "round": self.round_id,
                             "sha256": self.sha256, "verdict": self.verdict})


def decode_answer_receipt(payload: bytes) -> AnswerReceipt:
    what = "answer receipt"
    obj = load_json(payload, MAX_ANSWER_RECEIPT_BYTES, what)
    check_keys(obj, _KEYS, _KEYS, what)
    verdict = check_choice(obj, "verdict", VERDICTS, what)
    return AnswerReceipt(check_id(obj["device_id"]), int_field(obj, "round", what, 0), hex64(obj, "sha256", what),
                         verdict)


__all__ = ["VERDICTS", "AnswerReceipt", "decode_answer_receipt"]
