"""A device's part in a secure round: its secrets, its answers to the hub's steps, its masked delta.

:class:`SecureAnswerer` holds one round's secrets (:class:`~edge_agent.contract.secagg.DeviceSecrets`, in memory
only: a device that restarts mid-round has dropped out of it) and answers the hub's steps
(:mod:`edge_agent.contract.secure_rounds`) in order: its advert when the round is announced, its sealed shares
when it has every advert, its masked vectors when it has its peers' shares and its training is done, and its
shares of the survivors' self-mask seeds and of the dropped devices' mask keys when the hub says who is who.
A peer's sealed shares that do not open are named in its masked answer (``unopened``): it masks all the same,
and the hub leaves that peer's vector out of the sum.

What it checks, since the hub is not trusted with more than the sum: its own advert is in the hub's list
unchanged, every device named is one the signed plan selected, at least the threshold of devices take part at
each step, and it never reveals both secrets of one device (:func:`~edge_agent.contract.secagg.reveal`). The
plaintext checks the hub can no longer make (the norm, finite values, the range) are made here: the delta is
clipped to the round's norm and held to the grid before it is masked (:mod:`edge_agent.contract.secure_codec`).
With differential privacy (the plan's ``dp``) the device also adds its share of the noise before it masks
(:mod:`edge_agent.contract.privacy`), and sends zeros for what it measured (its losses, scores, example count and
activation ranges): those are not noised, so they stay home.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_agent.contract import privacy, secagg, secure_codec
from edge_agent.contract.rounds import RoundPlan
from edge_agent.contract.secure_rounds import (
    STATS_BITS,
    Answer,
    Step,
    secure_grid,
    secure_sessions,
    stats_size,
)

log = logging.getLogger(__name__)


class SecureAnswerer:
    """One device's answers in one secure round (thread-safe: steps come from the agent's thread, the trained
    delta from the training thread)."""

    def __init__(self, plan: RoundPlan, device_id: str, send: Callable[[bytes], None], *,
                 audit_dir: Path | None = None) -> None:
        assert plan.secure is not None
        self.plan, self.device_id, self.send, self.audit_dir = plan, device_id, send, audit_dir
        self.me = secagg.DeviceSecrets(device_id)
        self.delta_session, self.stats_session = secure_sessions(plan)
        self.adverts: dict[str, secagg.Advert] = {}
        self.held: dict[str, tuple[int, int]] = {}  # sender -> (its s share, its b share) that I hold
        self.senders: tuple[str, ...] = ()
        self.unopened: tuple[str, ...] = ()  # senders whose sealed shares did not open: named in the masked answer
        self.vectors: tuple[np.ndarray, np.ndarray] | None = None  # (delta, statistics) on their grids
        self.masks: tuple[np.ndarray, np.ndarray] | None = None  # what masking adds to them, made at the mask step
        self.noise: np.ndarray | None = None  # differential privacy: the noise in vectors[0]
        self.done: list[str] = []  # the answers sent, in order
        self._lock = threading.Lock()

    def _answer(self, step: str, **fields: object) -> None:
        payload = Answer(self.plan.round_id, self.plan.model, self.device_id, step, sent=time.time(),
                         **fields).encode()  # type: ignore[arg-type]
        self.send(payload)
        self.done.append(step)
        log.info("round %d: secure %s sent (%s bytes)", self.plan.round_id, step, f"{len(payload):,}")

    def advertise(self) -> None:
        with self._lock:
            if "advert" not in self.done:
                self._answer("advert", advert=self.me.advert())

    def trained(self, delta: Mapping[str, np.ndarray], stats: Mapping[str, float],
                ranges: Sequence[Sequence[float]]) -> int:
        """The training's result: put on the round's grid (clipped, rotated, rounded); masked and sent once the
        peers' shares are in. Returns how many coordinates were held to the grid's peak."""
        rng = np.random.default_rng(secrets.randbits(128))  # the rounding's and the noise's coins: the device's own
        ints, held = secure_codec.encode(delta, secure_grid(self.plan), rng, self.plan.dp)
        secure_codec.forget_rotation()  # worked out for this round alone
        noise = None
        if self.plan.dp is not None:  # its share of the noise; what it measured is not noised: it stays home
            noise = privacy.discrete_gaussian(self.plan.dp.sigma, ints.size, rng)
            stats = dict.fromkeys(stats, 0.0)
            ranges = [[0.0] * len(r) for r in ranges]
        stat_ints = secure_codec.encode_stats({**stats, "held": 0 if self.plan.dp else held}, ranges, len(self.plan.participants))
        with self._lock:
            self.vectors = (ints if noise is None else ints + noise, stat_ints)
            self.noise = noise
            self._mask()
        return held

    def on_step(self, step: Step) -> str | None:
        """Do what ``step`` asks, once; returns why it was refused (to log), or None."""
        p = self.plan
        if (step.round_id, step.model, step.device_id) != (p.round_id, p.model, self.device_id):
            return f"a step for round {step.round_id} of {step.model} for {step.device_id}: not this round's"
        with self._lock:
            try:
                if step.step == "share" and "shares" not in self.done:
                    why = self._share(step)
                elif step.step == "mask" and not self.senders:
                    return self._take_shares(step)
                elif step.step == "reveal" and "reveal" not in self.done:
                    return self._reveal(step)
                else:
                    return None
            except secagg.SecAggError as exc:
                return f"round {p.round_id}: {exc.reason}"
        if why is None and self.vectors is None:  # the shares are out: the grid's rotation while the training runs
            secure_grid(p).rotation()
        return why

    def _share(self, step: Step) -> str | None:
        adverts = {a.device_id: a for a in step.adverts}
        mine = self.me.advert()
        if adverts.get(self.device_id) != mine:
            return f"round {self.plan.round_id}: the hub's advert list does not hold this device's keys"
        if not set(adverts) <= set(self.plan.participants) or len(adverts) < self.delta_session.threshold:
            return (f"round {self.plan.round_id}: {len(adverts)} adverts (threshold {self.delta_session.threshold}), "
                    "or a device the plan did not select")
        sealed, own = secagg.seal_shares(self.delta_session, self.me, adverts)
        self.adverts = adverts
        self.held[self.device_id] = own
        self._answer("shares", sealed=sealed)
        return None

    def _take_shares(self, step: Step) -> str | None:
        senders = set(step.senders)
        if "shares" not in self.done or self.device_id not in senders or not senders <= set(self.adverts):
            return f"round {self.plan.round_id}: asked to mask, but this device's shares were not among the senders"
        if len(senders) < self.delta_session.threshold or set(step.sealed) != senders - {self.device_id}:
            return (f"round {self.plan.round_id}: shares from {sorted(step.sealed)} for senders {sorted(senders)} "
                    f"(threshold {self.delta_session.threshold})")
        unopened = []
        for sender, sealed in sorted(step.sealed.items()):
            try:
                self.held[sender] = secagg.open_shares(self.delta_session, self.me, self.adverts[sender], sealed)
            except secagg.SecAggError as exc:  # masks with it all the same (they need only its advert) and names it:
                # the hub leaves its vector out; refusing the step would make this device look dropped instead
                unopened.append(sender)
                log.warning("round %d: %s: named to the hub, which leaves %s out of the sum", self.plan.round_id,
                            exc.reason, sender)
        self.unopened = tuple(unopened)
        self.senders = tuple(sorted(senders))
        peers = {d: self.adverts[d] for d in self.senders}  # the masks, made before the vectors they hide are known
        self.masks = (secagg.masks(secure_grid(self.plan).padded, self.delta_session, self.me, peers),
                      secagg.masks(stats_size(self.plan), self.stats_session, self.me, peers))
        self._mask()
        return None

    def _mask(self) -> None:
        if self.vectors is None or not self.senders or "masked" in self.done:
            return
        peers = {d: self.adverts[d] for d in self.senders}
        ints, stat_ints = self.vectors
        added = self.masks or (None, None)
        y = secagg.mask(ints, self.delta_session, self.me, peers, added[0])
        s = secagg.mask(stat_ints, self.stats_session, self.me, peers, added[1])
        self.masks = None
        self._answer("masked", size=len(y), bits=self.delta_session.bits, stats=len(s),
                     body=secagg.pack(y, self.delta_session.bits) + secagg.pack(s, STATS_BITS), unopened=self.unopened)
        if self.audit_dir is not None:
            self._audit(ints, stat_ints)

    def _audit(self, ints: np.ndarray, stat_ints: np.ndarray) -> None:
        """What this device contributed, before the masks (``secure_audit``): the last 5 rounds kept."""
        assert self.audit_dir is not None
        path = self.audit_dir / f"secure-{self.plan.model}-{self.plan.round_id:08d}.npz"
        try:
            with open(path, "wb") as f:
                arrays = {"delta": ints, "stats": stat_ints, "masked_with": np.array(self.senders)}
                if self.noise is not None:  # differential privacy: the noise in delta
                    arrays["noise"] = self.noise
                np.savez(f, **arrays)  # type: ignore[arg-type]
            for old in sorted(self.audit_dir.glob(f"secure-{self.plan.model}-*.npz"))[:-5]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # a full disk: the round goes on without its audit copy
            log.warning("round %d: cannot keep the audit copy %s: %s", self.plan.round_id, path, exc)

    def _reveal(self, step: Step) -> str | None:
        if not self.senders:
            return f"round {self.plan.round_id}: asked to reveal before it had its peers' shares"
        if not set(step.survivors) | set(step.dropped) <= set(self.senders):
            return f"round {self.plan.round_id}: asked about devices whose shares it does not hold"
        revealed = secagg.reveal(self.delta_session, self.held, step.survivors, step.dropped)
        self._answer("reveal", revealed=revealed)
        return None
