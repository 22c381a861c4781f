"""What the agent says when it cannot go on: its errors (each with its exit code) and the hint for a refused
model; and how a process starts its MQTT session (the state dir remembers what it subscribed)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import orjson

from edge_agent import exits


class AgentError(exits.Failure, RuntimeError):
    """A condition the agent cannot work around (no model, bad configuration)."""

    exit_code = exits.MODEL


DATA_FAULT = "that the source does not provide"  # bundle.verify_bundle: the data lacks what the model reads


def refusal_hint(reason: str) -> str:
    """What to do about a refused bundle, by its reason."""
    if "no trusted key is configured" in reason:
        return "Pass --trusted-key with the hub's public key (the .pub.pem of `cloud-hub keygen`)."
    if "unsigned" in reason:
        return "Publish it signed (`cloud-hub publish --signing-key KEY`), or allow unsigned models in development."
    if "not the trusted key" in reason:
        return "Give --trusted-key the public key of the key that signs the models."
    if DATA_FAULT in reason:
        return ("The data is at fault, not the model: the source lacks channels the model was trained on; "
                "give it those columns, or train a model on the channels it has.")
    return "Publish a good model with `cloud-hub publish`, or pass --model FILE."


def session_start(state: Path, client_id: str, broker: object,
                   subscriptions: list[tuple[str, int]]) -> bool | Literal["first"]:
    """How this process starts its MQTT session: resumed (``False``: clean start off from the first connect, the
    only session mosquitto keeps across its own restart) when the last process of this state dir subscribed
    the same filters as the same client; else a new session (``"first"``), since an old one could hold
    filters of another prefix or model. The state dir remembers what this process subscribes."""
    mark = state / "mqtt-session.json"
    now = orjson.dumps({"client_id": client_id, "broker": str(broker), "subscriptions": sorted(subscriptions)})
    try:
        same = mark.read_bytes() == now
    except OSError:
        same = False
    if not same:
        with contextlib.suppress(OSError):  # a read-only state dir: a new session every start, nothing worse
            mark.write_bytes(now)
    return False if same else "first"


class StateConflict(AgentError):
    """The state dir holds results made for another broker or prefix."""

    exit_code = exits.USAGE


class BadSetting(AgentError):
    """A setting the agent cannot start with: a trusted key or model file that is not there or not a key, no
    device id for ``run``. The operator's to fix (exit 2), not a model the fleet sent."""

    exit_code = exits.USAGE


class Interrupted(exits.Failure, RuntimeError):
    """SIGTERM/SIGINT before a replay finished; what was produced is safe in the outbox."""

    exit_code = exits.INTERRUPTED
