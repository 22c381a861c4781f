"""Differential privacy of a federated round: what a round's plan says (:class:`DpParams`) and the device's part.

Two modes, one meaning: the sum a round releases is differentially private with respect to any one device's
update (replaced by zero, the devices that answered being the same: who answered is not hidden), at the plan's
noise.

- **distributed** (with secure aggregation): every device clips its delta, puts it on the round's integer grid
  with *conditional* stochastic rounding (rounded again until the integer vector's L2 norm is at most the
  plan's ``bound``, so the sensitivity holds exactly, not on average), and adds discrete Gaussian noise of
  ``sigma`` grid steps to every coordinate. The hub only ever sees the masked vectors and then their sum: the
  sum of ``n`` devices' noise is (very nearly) a discrete Gaussian of ``sigma * sqrt(n)``, which the plan
  sizes for the threshold, the fewest devices a sum can have. The mechanism is Kairouz, Liu and Steinke's
  distributed discrete Gaussian (ICML 2021); its sampler is Canonne, Kamath and Steinke's (NeurIPS 2020).
- **central** (without secure aggregation): devices send their updates as in any round; the hub, trusted with
  them, clips each, gives each the same weight, and adds Gaussian noise of ``noise x clip`` to their sum.

The accounting (:mod:`cloud_hub.rounds.privacy`, Google's ``dp-accounting``) is the hub's. This module holds only
what a device needs: numpy, nothing else.

The sampler uses numpy's PCG64 seeded from the OS and floating-point arithmetic: it samples the discrete
Gaussian as the paper's algorithm does, but not in constant time nor with exact arithmetic; an attacker who
sees a device's timings or exploits floating-point rounding (Mironov 2012) is outside this module's claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edge_agent.contract.wire import ContractError, check_choice, check_keys, float_field

MODES: Final = ("distributed", "central")
TAIL: Final = 12.0  # noise past TAIL standard deviations is taken as impossible when sizing rings (p < 1e-32)


MAX_NOISE: Final = 1e6
"""The largest noise multiplier a device accepts in a round's plan: past it the round learns nothing."""

@dataclass(frozen=True, slots=True)
class DpParams:
    """A round's differential privacy: its mode, its noise multiplier (noise standard deviation over the
    sensitivity, for the sum of the fewest devices it may have), its delta; distributed: the per-device noise
    ``sigma`` and the integer vector's L2 ``bound``, both in grid steps."""

    mode: str
    noise: float
    delta: float
    sigma: float = 0.0
    bound: float = 0.0

    def to_obj(self) -> dict[str, Any]:
        return {"mode": self.mode, "noise": float(self.noise), "delta": float(self.delta), "sigma": float(self.sigma),
                "bound": float(self.bound)}

    @staticmethod
    def from_obj(obj: Any) -> DpParams:
        what = "round.dp"
        if type(obj) is not dict:
            raise ContractError(f"{what} must be an object")
        keys = frozenset({"mode", "noise", "delta", "sigma", "bound"})
        check_keys(obj, keys, keys, what)
        out = DpParams(check_choice(obj, "mode", MODES, what), float_field(obj, "noise", what),
                       float_field(obj, "delta", what), float_field(obj, "sigma", what), float_field(obj, "bound", what))
        if not (0 < out.noise <= MAX_NOISE and 0 < out.delta < 1 and 0 <= out.sigma <= 1e9 and 0 <= out.bound <= 1e12):
            raise ContractError(f"{what}: noise in (0, {MAX_NOISE:g}], delta in (0, 1), sigma and bound not negative")
        if out.mode == "distributed" and not (out.sigma > 0 and out.bound > 0):
            raise ContractError(f"{what}: a distributed round needs a positive sigma and bound")
        return out


def rounding_bound(c: float, d: int, beta: float = math.exp(-0.5)) -> float:
    """The L2 norm that conditional stochastic rounding keeps a vector of norm at most ``c`` (grid steps) in ``d``
    coordinates within: ``sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2))``; an unconditioned rounding stays
    within it with probability at least ``1 - beta`` (Kairouz et al. 2021, Theorem 5), so a few tries suffice."""
    return math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))


def conditional_round(w: np.ndarray, bound: float, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """``w`` rounded stochastically to integers (unbiased per coordinate), drawn again until the result's L2 norm is
    at most ``bound``. ValueError when ``tries`` draws all land outside (``w`` itself is past the bound)."""
    low = np.floor(w)
    frac = w - low
    limit = bound * bound
    for _ in range(tries):
        z = (low + (rng.random(w.size, dtype=np.float32) < frac)).astype(np.int64)
        if float(np.dot(z.astype(np.float64), z.astype(np.float64))) <= limit:
            return z
    raise ValueError(f"no rounding within the L2 bound {bound:.1f} in {tries} tries: the vector's norm is "
                     f"{float(np.linalg.norm(w)):.1f}")


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian of scale ``sigma`` on the integers (P(x) proportional to
    exp(-x^2 / (2 sigma^2))): a discrete Laplace proposal of scale ``t = floor(sigma) + 1``, accepted with
    probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)) (Canonne, Kamath, Steinke 2020, Algorithm 3)."""
    out = np.zeros(size, np.int64)
    if sigma <= 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # geometric success odds: a difference of two is discrete Laplace of scale t
    todo = np.arange(size)
    while todo.size:
        m = todo.size
        y = rng.geometric(p, m) - rng.geometric(p, m)
        keep = rng.random(m) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out


def sum_limit(n_devices: int, peak: int, sigma: float) -> int:
    """The largest magnitude a sum of ``n_devices`` noised grid vectors may reach: ``n x peak`` plus the noise's
    ``TAIL`` standard deviations (``sigma x sqrt(n)``)."""
    return int(n_devices * peak + math.ceil(TAIL * sigma * math.sqrt(n_devices)))


__all__ = ["MODES", "DpParams", "conditional_round", "discrete_gaussian", "rounding_bound", "sum_limit"]
