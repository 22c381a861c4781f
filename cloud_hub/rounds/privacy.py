"""The privacy accountant of federated rounds: what each differentially private round spends, what a model has spent.

A round with ``dp`` in its plan (:mod:`edge_agent.contract.privacy`) releases a sum of clipped device updates with
Gaussian noise; its cost is stated in zero-concentrated DP (rho), which adds up over rounds, and turned into an
epsilon at the plan's delta by Google's ``dp-accounting`` (its Renyi accountant; ``ZCDpEvent``), never by a
formula of ours:

- **central**: Gaussian noise of ``z x clip`` on a sum of updates clipped to ``clip``: ``rho = 1 / (2 z^2)``;
- **distributed**: discrete Gaussian noise of ``sigma`` grid steps from each of the ``n`` devices in the sum, on
  integer vectors whose L2 norm is at most ``bound`` steps: ``rho = (bound^2 / (n sigma^2) + tau d / 2) / 2`` with
  ``tau = 10 sum_{k<n} exp(-2 pi^2 sigma^2 k / (k + 1))``, the price of a sum of discrete Gaussians not being one
  (Kairouz, Liu, Steinke 2021, Theorem 1; ``tau`` is below 1e-300 at the sigmas rounds use).

What a model has spent is the sum over every round of that model whose sum the hub learned (published, rejected or
failed after it): a rejected round's noisy sum was seen all the same. The neighbouring relation is one device's update
replaced by zero (its data in or out), the devices that answered being the same; which devices answered is not hidden, and the rounds are not
subsampled (no amplification is claimed). Not covered: the gate's decision and the devices' federated evaluation of
a candidate (on their held-out windows), and every round run without ``dp``, counted apart (``plain_rounds``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_agent.contract import secagg
from edge_agent.contract.privacy import MAX_NOISE, DpParams, sum_limit
from edge_agent.contract.rounds import SecureParams
from edge_agent.contract.secure_codec import grid_for


class BudgetSpent(Exception):
    """The next round would spend past ``--target-epsilon``: federate stops there (not an error)."""


@dataclass
class Budget:
    """``federate``'s differential privacy: a noise multiplier given, or calibrated once from what is left of
    ``target`` (at ``delta``) so that ``rounds`` more rounds spend it; no round opens past the target."""

    noise: float | None
    target: float | None
    delta: float
    rounds: int

    def plan(self, before: tuple[float, int, int], secure: SecureParams | None,
             specs: Sequence[tuple[str, Sequence[int]]], clip: float, n_devices: int
             ) -> tuple[SecureParams | None, DpParams]:
        """(the secure numbers, their ring widened for the noise; the round's dp) for a round of ``n_devices``
        training ``specs`` clipped to ``clip``, after ``before`` (:func:`spent`) was spent."""
        rho_before = before[0]
        self.check(before)
        if self.noise is None:
            self.noise = self._calibrated(before)
        if secure is None:
            out, dp, rho = None, DpParams("central", self.noise, self.delta), central_rho(self.noise)
        else:
            grid = grid_for(specs, clip, peak=secure.peak, spread=secure.spread, seed=secure.seed)
            bound = grid.dp_bound()
            sigma = self.noise * bound / math.sqrt(secure.threshold)
            bits = secagg.ring_bits(n_devices, secure.peak, sum_limit(n_devices, secure.peak, sigma))
            out, dp = replace(secure, bits=bits), DpParams("distributed", self.noise, self.delta, sigma, bound)
            rho = distributed_rho(bound, sigma, secure.threshold, grid.padded)  # the ledger's formula, at its most
        if self.target is not None and epsilon(rho_before + rho, self.delta) > self.target * (1 + 1e-9):
            raise BudgetSpent(self.spent_text(before) + f": no more rounds (a round at noise x{self.noise:.3g} would "
                              f"reach epsilon {epsilon(rho_before + rho, self.delta):.3g})")
        return out, dp

    def check(self, before: tuple[float, int, int]) -> None:
        """:class:`BudgetSpent` when no round can open after ``before``: asked before waiting for devices."""
        if self.target is not None and epsilon(before[0], self.delta) >= self.target * (1 - 1e-9):
            raise BudgetSpent(self.spent_text(before) + ": no more rounds")  # whatever the noise (--dp-noise too)
        if self.noise is None and self.target is not None:
            self._calibrated(before)

    def _calibrated(self, before: tuple[float, int, int]) -> float:
        """The noise that spends what is left of the target in ``rounds`` rounds; BudgetSpent when spent, or so
        nearly that a round would take more noise than devices accept."""
        assert self.target is not None
        left = rho_for(self.target, self.delta) - before[0]
        noise = noise_for(left / max(1, self.rounds)) if left > 0 else math.inf
        if noise > MAX_NOISE:
            raise BudgetSpent(self.spent_text(before) + ": no more rounds" + (
                f" (what is left would take noise x{noise:.3g}, past the x{MAX_NOISE:g} devices accept)"
                if left > 0 else ""))
        return noise

    def spent_text(self, before: tuple[float, int, int]) -> str:
        rho, private, plain = before
        return (f"privacy budget: epsilon {epsilon(rho, self.delta):.3g} (delta {self.delta:g}) spent in {private} "
                f"round(s)" + (f" of a target {self.target:g}" if self.target is not None else "")
                + (f" ({plain} earlier round(s) without differential privacy are not in it)" if plain else ""))


def epsilon(rho: float, delta: float) -> float:
    """The epsilon at ``delta`` of ``rho``-zCDP (a composition of rounds: the sum of their rhos)."""
    if rho <= 0:
        return 0.0
    import dp_accounting  # 60 MB and 0.9 s (scipy): only a federate with differential privacy loads it
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ZCDpEvent(rho))
    return float(accountant.get_epsilon(delta))


def rho_for(target_epsilon: float, delta: float) -> float:
    """The largest rho whose epsilon at ``delta`` is at most ``target_epsilon`` (bisection on :func:`epsilon`)."""
    lo, hi = 0.0, 1.0
    while epsilon(hi, delta) < target_epsilon:
        hi *= 2
        if hi > 1e9:
            return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(mid, delta) <= target_epsilon else (lo, mid)
    return lo


def noise_for(rho: float) -> float:
    """The noise multiplier of a Gaussian mechanism that spends ``rho``."""
    return 1.0 / math.sqrt(2.0 * rho)


def central_rho(noise: float) -> float:
    return 1.0 / (2.0 * noise * noise)


def distributed_rho(bound: float, sigma: float, n: int, d: int) -> float:
    """What a sum of ``n`` devices' vectors (L2 norm at most ``bound``, ``d`` coordinates, each with discrete Gaussian
    noise of ``sigma``) spends."""
    tau = 10.0 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, n))
    return (bound * bound / (n * sigma * sigma) + tau * d / 2) / 2


def spent(outcomes: Iterable[Mapping[str, Any]]) -> tuple[float, int, int]:
    """(rho spent, differentially private rounds, rounds without dp) over rounds' outcomes: a round counts when the
    hub learned its sum (it has ``privacy``), or, without dp, when it counted an update."""
    rho, private, plain = 0.0, 0, 0
    for o in outcomes:
        if "privacy" in o:
            rho += float(o["privacy"]["rho"])
            private += 1
        elif int(o.get("counted", 0) or 0) > 0:
            plain += 1
    return rho, private, plain


def record(dp: DpParams, rho: float, before: tuple[float, int, int], n: int) -> dict[str, Any]:
    """A round's ``privacy`` (in its outcome, ``rounds``, the dashboard and its model's manifest): what it spent, and
    what the model has spent with it."""
    total, private, plain = before
    return {"mode": dp.mode, "noise": round(dp.noise, 6), "delta": dp.delta, "devices": n, "rho": rho,
            "epsilon": round(epsilon(rho, dp.delta), 4), "epsilon_total": round(epsilon(total + rho, dp.delta), 4),
            "rounds": private + 1, "plain_rounds": plain}


def central_noise(new: Mapping[str, np.ndarray], names: Iterable[str], noise: float, clip: float, n: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``new`` (the mean of ``n`` clipped updates on the master) with the central mechanism's noise: Gaussian of
    ``noise x clip`` on their sum, so ``noise x clip / n`` on the mean, in every coordinate of the ``names``."""
    scale = noise * clip / max(1, n)
    out = dict(new)
    for name in names:
        out[name] = (new[name] + rng.normal(0.0, scale, new[name].shape)).astype(np.float32)
    return out


__all__ = ["Budget", "BudgetSpent", "central_noise", "central_rho", "distributed_rho", "epsilon", "noise_for", "record",
           "rho_for", "spent"]
