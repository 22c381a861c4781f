"""A device's seat in the secure rounds (``edge-agent run``): the round it joined and the hub's steps for it.

The :class:`~edge_agent.device.learner.Learner` answers rounds; when a round is secure it hands this seat the
plan (:meth:`SecureSeat.join`: the device's secrets made, its keys sent), every step that arrives on
``{prefix}/devices/{id}/round`` (:meth:`SecureSeat.offer`: verified and done at once, on a thread of its own,
one at a time and in order) and its training result (:meth:`SecureSeat.trained`: on the round's grid, masked
and sent once the peers' shares are in). The cryptography (:mod:`edge_agent.device.secure`) is loaded only
when a device joins a secure round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contract.rounds import RoundPlan
from edge_agent.device.bundle import BundleRejected, check_step

if TYPE_CHECKING:  # cryptography's keys: loaded for secure rounds only
    from edge_agent.device.secure import SecureAnswerer

log = logging.getLogger(__name__)


class SecureSeat:
    def __init__(self, device_id: str, send: Callable[[bytes], None], *, trusted_key: Any, allow_unsigned: bool,
                 audit_dir: Path | None) -> None:
        self.device_id, self.send, self.audit_dir = device_id, send, audit_dir
        self.trusted_key, self.allow_unsigned = trusted_key, allow_unsigned
        self.answerer: SecureAnswerer | None = None  # the secure round this device takes part in
        self._step: bytes | None = None  # the hub's latest step for this device
        self._steps = 0
        self._steps_seen = 0
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()

    def joined(self, round_id: int) -> bool:
        return self.answerer is not None and self.answerer.plan.round_id == round_id

    def join(self, plan: RoundPlan) -> None:
        """Take part in ``plan``'s secure round: make its secrets and send its keys (once per round)."""
        if self.joined(plan.round_id):
            return
        from edge_agent.device.secure import SecureAnswerer

        self.answerer = SecureAnswerer(plan, self.device_id, self.send, audit_dir=self.audit_dir)
        self.answerer.advertise()
        log.info("round %d: a secure round (threshold %d of %d): sent this device's keys", plan.round_id,
                 plan.secure.threshold if plan.secure else 0, len(plan.participants))

    def offer(self, payload: bytes) -> None:
        """The hub's next step for this device arrived (paho's thread); empty: none. It is done at once on a thread
        of its own (the round waits for every device at each step: a step left for the next tick would cost every
        round that tick's delay, four times)."""
        with self._lock:
            self._step = payload or None
            self._steps += 1
        if payload and self.answerer is not None:
            threading.Thread(target=self.take_step, name="edge-agent-step", daemon=True).start()

    def take_step(self) -> None:
        with self._step_lock:  # one step at a time, in order
            self._take_one_step()

    def _take_one_step(self) -> None:
        with self._lock:
            payload, steps = self._step, self._steps
        if steps == self._steps_seen:
            return
        self._steps_seen = steps
        if payload is None or self.answerer is None:
            return
        try:
            step = check_step(payload, self.device_id, trusted_key=self.trusted_key, allow_unsigned=self.allow_unsigned)
        except BundleRejected as exc:
            log.warning("secure round step refused: %s", exc)
            return
        except Exception as exc:  # a retained message: dying here would die again at every start
            log.warning("secure round step refused (%s: %s)", type(exc).__name__, exc)
            return
        why = self.answerer.on_step(step)
        if why is not None:
            log.warning("%s", why)

    def trained(self, p: RoundPlan, delta: Mapping[str, np.ndarray], stats: Mapping[str, float],
                ranges: Sequence[Sequence[float]]) -> int:
        """The round's training result, masked and sent once the peers' shares are in; how many values were held
        to the grid."""
        assert self.answerer is not None and self.answerer.plan.round_id == p.round_id
        return self.answerer.trained({k: delta[k] for k in p.trainable}, stats, ranges)


__all__ = ["SecureSeat"]
