"""The hub's verdict on one device's answer to a federated round, and what it keeps of it.

:func:`judge_update` decides, for a plain round's update, in this order: it decodes, a round is open and it
answers one the hub knows (:func:`_misfit`), it is not a second answer, it is not too late, its delta and
ranges are sound (:func:`_unsound`). :mod:`cloud_hub.rounds.answers` commits the
verdict before it acknowledges the message; a secure round's answers are judged in
:mod:`cloud_hub.rounds.secure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_hub.rounds.store import RoundRow
from edge_agent.contract import ContractError
from edge_agent.contract.round_updates import Update, decode_update


@dataclass
class Verdict:
    status: str  # accepted | late | refused | duplicate (a redelivery, already counted)
    reason: str | None = None
    round_id: int = 0
    staleness: int = 0
    update: Update | None = field(default=None, repr=False)


def judge_update(payload: bytes, topic_device: str, *, current: RoundRow | None,
                 rounds: Callable[[int], RoundRow | None], prior: Callable[[str, int], str | None], digest: str,
                 refuse_factor: float, rounds_since: Callable[[str, int, int], int]) -> Verdict:
    """The hub's verdict on one update. ``prior(device, round)``: the sha256 of the update of that device
    for that round already counted (in any round: a late one counts in a later round), or None.
    ``rounds_since(model, after, upto)``: that model's rounds with ``after < id <= upto``.

    In this order, the first that fails refuses it: it decodes, a round is open and it trains for one the
    hub knows; it answers that round (:func:`_misfit`); it is not a second answer; it is not too late; its
    delta and ranges are sound (:func:`_unsound`)."""
    try:
        u = decode_update(payload, topic_device)
    except ContractError as exc:
        return Verdict("refused", f"malformed: {exc.reason}", current.id if current else 0)
    except Exception as exc:  # an update never acknowledged comes back at every restart of federate
        return Verdict("refused", f"malformed ({type(exc).__name__}: {exc})", current.id if current else 0)
    if current is None:
        return Verdict("refused", f"round {u.round_id} is closed and no round is open", u.round_id, update=u)
    if u.kind != "train":
        return Verdict("refused", f"an evaluation for round {u.round_id}, which is not being evaluated", current.id,
                       update=u)
    own = rounds(u.round_id)
    if own is None or u.round_id > current.id:
        return Verdict("refused", f"unknown round {u.round_id}", current.id, update=u)
    why = _misfit(u, own, current)
    if why is not None:
        return Verdict("refused", why, current.id, update=u)
    before = prior(u.device_id, u.round_id)
    if before is not None:
        same = before == digest
        return Verdict("duplicate" if same else "refused", None if same else
                       f"a second update for round {u.round_id}", current.id, update=u)
    staleness = 0 if own.id == current.id else rounds_since(current.model_name, own.id, current.id)
    if staleness > int(current.plan["max_staleness"]):
        return Verdict("refused", f"after the deadline of round {u.round_id} ({staleness} rounds late, "
                       f"at most {current.plan['max_staleness']} count)", current.id, update=u)
    why = _unsound(u, own, current, refuse_factor)
    if why is not None:
        return Verdict("refused", why, current.id, update=u)
    return Verdict("late" if staleness else "accepted", None, current.id, staleness, u)


def _misfit(u: Update, own: RoundRow, current: RoundRow) -> str | None:
    """Why ``u`` does not answer its round ``own`` (its model, the open round's model, its devices, its base
    version), or None."""
    if u.model != own.model_name:
        return f"model {u.model!r}, round {u.round_id} trains {own.model_name!r}"
    if "secure" in current.plan:  # its sum is masked: a plain update cannot be added to it
        return f"a plain update while secure round {current.id} runs (only masked answers add up in it)"
    if own.model_name != current.model_name:  # a late answer to another model's round: never mixed in
        return f"round {u.round_id} trained {own.model_name!r}; the open round {current.id} trains {current.model_name!r}"
    if u.device_id not in own.participants:
        return f"{u.device_id} was not selected for round {u.round_id}"
    if u.base_version != own.base_version:
        return f"base version v{u.base_version}, round {u.round_id} trains v{own.base_version}"
    return None


def _unsound(u: Update, own: RoundRow, current: RoundRow, refuse_factor: float) -> str | None:
    """Why the delta of ``u`` (an answer to ``own``, counted in ``current``) cannot be aggregated, or None:
    the trained tensors' shapes, finite values, one sound range per layer, a late one still fitting the
    current model, believable accuracies, a norm not far above the clip."""
    want = {t["name"]: tuple(t["shape"]) for t in own.plan["tensors"] if t["name"] in own.plan["trainable"]}
    got = {t.name: t.shape for t in u.tensors}
    if got != want:
        return f"wrong shape: tensors {sorted(got.items())} but the round trains {sorted(want.items())}"
    delta = u.dequantized()
    finite = all(np.isfinite(d).all() for d in delta.values()) and all(np.isfinite(r).all() for r in u.ranges)
    if not finite:
        return "NaN or inf in the delta or the ranges"
    layers = sum(1 for t in current.plan["tensors"] if t["name"].startswith("coef_"))
    if len(u.ranges) != layers or any(lo > hi or ilo > ihi for ilo, ihi, lo, hi in u.ranges):
        return (f"activation ranges of {len(u.ranges)} layers, or a minimum over its maximum "
                f"(the model has {layers} layers)")
    if own.id != current.id:  # late: it must still fit the model this round trains
        now = {t["name"]: tuple(t["shape"]) for t in current.plan["tensors"]}
        if any(now.get(name) != shape for name, shape in got.items()):
            return f"late, and its tensors no longer fit v{current.base_version}"
    if (unbelievable := scores_unbelievable(current, u)) is not None:
        return unbelievable
    norm = float(np.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values())))
    clip = float(own.plan["clip"])
    if norm > refuse_factor * clip:
        return f"delta norm {norm:.3g} is far above the clip {clip:g}"
    return None


def scores_unbelievable(r: RoundRow, u: Update) -> str | None:
    """Why the scores an answer states cannot be true, or None. A classifier's scores are accuracies, in
    [0, 1]; a regressor's are mean errors, finite and not negative. Every score counts, the INT8 models'
    too: a round whose devices evaluate its candidate is gated on those (one device stating an INT8
    accuracy of 1e300 carried the mean of every honest device's drop)."""
    scores = [u.metric_before, u.metric_after] + [x for x in (u.int8_before, u.int8_after) if x is not None]
    if r.plan["task"] == "classification":
        if not all(0 <= x <= 1 for x in scores):
            return "an accuracy outside [0, 1]"
    elif not all(math.isfinite(x) and x >= 0 for x in scores):
        return "a mean error that is negative or not finite"
    return None


def answer_metrics(u: Update) -> dict[str, Any]:
    """What ``fl_updates.metrics`` keeps of an answer (the evaluation reads its scores back from there)."""
    out: dict[str, Any] = {
        "loss_before": u.loss_before, "loss_after": u.loss_after, "metric_before": u.metric_before,
        "metric_after": u.metric_after, "norm": u.norm, "epochs": u.epochs, "seconds": u.seconds}
    if u.int8_before is not None:
        out |= {"int8_before": u.int8_before, "int8_after": u.int8_after}
    return out
