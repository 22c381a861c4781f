"""The canary judge's statistics: is a version worse than the one it would replace, and how sure are we?

Pure numpy, no clock, no database: :mod:`cloud_hub.rollout.canary` gathers the rows and acts on the verdict,
``bench/canary_judge.py`` measures its error rates on simulated fleets.

Why it is built this way (README: Canary rollouts; every choice was measured with the bench):

- **Each cohort device is compared with itself.** Devices differ (one is hard all the time), so a
  cohort of two against a fleet of twenty compares devices, not versions. Each cohort device's results on
  the canary are compared with its own latest results on the previous version (``paired``). A device
  with no such history is compared with the control fleet, with the spread between devices added to its
  uncertainty (``unpaired``).
- **Errors come in stretches.** A hard minute gives ten mistakes in a row, so results are not
  independent draws: the variance of a mean is the per-result variance times a design effect measured
  on blocks of ``block`` consecutive results of one device (pooled over every device and version, so
  the long history on the previous version estimates it well from the first check on).
- **It checks every few seconds without inflating its error.** The interval is a confidence *sequence*
  (Robbins' normal mixture, in its asymptotic form: Waudby-Smith et al. 2021): with probability 1 - alpha
  it holds at every check at once, so the judge may look as often as it likes.
- **It acts only on evidence.** Roll back when the whole interval is worse than ``-tolerance``; promote
  when the whole interval is above it; otherwise wait, up to ``max_results`` cohort results or ``max_s``
  seconds, then do what ``on_undecided`` says.

Scores are "higher is better": a hit (accuracy), a regressor's error divided by the device's own mean
error on the previous version and negated (so the tolerance is a fraction: 0.1 = 10 % more error), or
the model's confidence when results carry no ground truth (then the predicted classes' histogram shift
is reported too).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

_NORMAL = statistics.NormalDist()
MIN_BASELINE = 20  # results of a device on the previous version before it counts as paired
PRIOR_WEIGHT = 10  # pseudo-results of the baseline's variance mixed into the canary's (no zero variance)


@dataclass(frozen=True)
class Rules:
    """What the judge compares with and when it acts."""

    tolerance: float  # accuracy or confidence points, or a regressor's relative error (0.1 = 10 % more)
    alpha: float = 0.05  # chance of a wrong decision in each direction, over all checks together
    min_results: int = 50  # cohort results before the first decision
    max_results: int = 20_000  # cohort results after which on_undecided applies
    max_s: float = 0.0  # seconds after which on_undecided applies (0: no time limit)
    on_undecided: str = "rollback"
    block: int = 200  # consecutive results of one device: much longer than a hard stretch


@dataclass(frozen=True)
class Series:
    """Per-result scores (higher is better) with their device, in each device's own order."""

    device: np.ndarray  # str per result
    score: np.ndarray  # float per result

    @staticmethod
    def of(devices: Sequence[str], scores: Sequence[float]) -> Series:
        return Series(np.asarray(devices, dtype=object), np.asarray(scores, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.score.size)

    @cached_property
    def parts(self) -> dict[Any, np.ndarray]:
        """Each device's scores, in order (a stable sort keeps each device's own order); computed once,
        since a device's history is judged again at every check."""
        if not self.score.size:
            return {}
        names, codes = np.unique(self.device, return_inverse=True)
        order = np.argsort(codes, kind="stable")
        parts = np.split(self.score[order], np.cumsum(np.bincount(codes, minlength=len(names)))[:-1])
        return dict(zip(names.tolist(), parts, strict=True))


@dataclass(frozen=True)
class Estimate:
    """Cohort minus baseline (higher is better), with an always-valid interval."""

    delta: float
    low: float
    high: float
    cohort_n: int
    baseline_n: int
    paired: int  # cohort devices compared with their own history
    unpaired: int  # cohort devices compared with the control fleet
    design_effect: float
    floor: float = 0.0  # the half-width with endless cohort results: the references' own uncertainty
    se: float = 0.0  # the standard error of ``delta`` (for the one fixed-sample test at the limit)

    def to_obj(self) -> dict[str, Any]:
        return {"delta": self.delta, "low": self.low, "high": self.high, "cohort_results": self.cohort_n,
                "baseline_results": self.baseline_n, "paired_devices": self.paired,
                "unpaired_devices": self.unpaired, "design_effect": self.design_effect}


def design_effect(series: Sequence[np.ndarray], block: int) -> float:
    """How many times the variance of a mean exceeds the independent-draws one (batch means: the spread
    of means of ``block`` consecutive results within each series). Blocks must be long next to a hard
    stretch, so ``block`` is halved only until there are enough of them to tell (1 when never)."""
    per_result = _pooled_var(series)
    while block >= 4 and per_result > 0:
        dev2 = dof = 0.0
        for x in series:
            k = x.size // block
            if k >= 2:
                means = x[: k * block].reshape(k, block).mean(axis=1)
                dev2 += float(np.sum((means - means.mean()) ** 2))
                dof += k - 1
        if dof >= 16:
            return float(np.clip(block * (dev2 / dof) / per_result, 1.0, block))
        block //= 2
    return 1.0


def radius(se: float, alpha: float, rhos: Sequence[float]) -> float:
    """Half-width of a one-sided-``alpha`` confidence sequence for an estimate with standard error ``se``.

    Robbins' normal mixture: with information I = 1/se^2, the boundary
    sqrt(2 (I + rho) log(sqrt((I + rho) / rho) / alpha)) / I holds at every I at once (Ville's inequality).
    ``rho`` (in information units) sets where it is tightest; the narrowest of several, each at
    alpha / len(rhos) (a union bound), is tight early for a clearly bad model and late for a close call.
    """
    if se <= 0:
        return 0.0
    if not se < 1e100:  # no spread a score can have (inf, nan): no bound; 1/se^2 divided by zero
        return math.inf
    se = max(se, 1e-100)  # scores a hair apart: 1/se^2 overflowed (a NaN interval, promoted at the limit)
    info, a = 1.0 / se**2, alpha / len(rhos)
    return min(math.sqrt(2 * (info + rho) * math.log(math.sqrt((info + rho) / rho) / a)) / info for rho in rhos)


def _pooled_var(groups: Sequence[np.ndarray]) -> float:
    ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if g.size >= 2)
    dof = sum(g.size - 1 for g in groups if g.size >= 2)
    return ss / dof if dof else 0.0


def _binary_floor(groups: Sequence[np.ndarray]) -> float:
    """The variance of hits and misses when every result was a hit (or every one a miss): each device's p(1 - p)
    with one pseudo-hit and one pseudo-miss (p = (hits + 1) / (n + 2)), pooled within devices as
    :func:`_pooled_var` pools. Without it, 48 hits in a row on either version had variance 0, a zero-width
    interval, and a promotion at once; 48 hits bound the error rate only below ~6 %. Used only where the
    sample variance is 0 (applied always, it slowed a good canary's promotion by a tenth in the bench);
    0 for other scores."""
    if not groups or not all(np.isin(g, (0.0, 1.0)).all() for g in groups):
        return 0.0
    total = dof = 0.0
    for g in groups:
        if g.size >= 2:
            p = (float(g.sum()) + 1) / (g.size + 2)
            total += (g.size - 1) * p * (1 - p)
            dof += g.size - 1
    return total / dof if dof else 0.0


def estimate(cohort: Series, baseline: Series, control: Series, rules: Rules) -> Estimate | None:
    """The cohort's results on the canary against each device's own ``baseline`` (its results on the
    previous version), or against ``control`` (the other devices, now) for a device without one.
    None when the cohort has no result yet."""
    new = cohort.parts
    if not new:
        return None
    base = {d: x for d, x in baseline.parts.items() if x.size >= MIN_BASELINE}
    # the control fleet matters only to devices without their own history (the by-device split is costly)
    ctrl = control.parts if set(new) - set(base) else {}
    every = [*new.values(), *base.values(), *ctrl.values()]
    deff = design_effect(every, rules.block)  # for long stretches of results: the history
    # the cohort's few results per device so far are correlated over a shorter span: their own block length
    per_device = int(np.median([x.size for x in new.values()]))
    deff_new = design_effect(every, per_device) if per_device < rules.block else deff
    v_base = _pooled_var([*base.values(), *ctrl.values()]) or _binary_floor([*base.values(), *ctrl.values()])
    v_new_raw = _pooled_var(list(new.values())) or _binary_floor(list(new.values()))
    n_new = len(cohort)
    dof_new = max(n_new - len(new), 0)
    v_new = (v_new_raw * dof_new + v_base * PRIOR_WEIGHT) / (dof_new + PRIOR_WEIGHT) if v_base else v_new_raw
    ctrl_all = control.score
    refs = [x.mean() for x in [*base.values(), *ctrl.values()] if x.size]
    spread = float(np.var(refs)) if len(refs) >= 2 else v_base  # between devices, for unpaired ones
    deltas, variances, weights, ref_vars = [], [], [], []
    paired = unpaired = base_n = 0
    for d, x in new.items():
        if d in base:
            ref, ref_var = base[d].mean(), deff * v_base / base[d].size
            paired += 1
            base_n += base[d].size
        elif ctrl_all.size:
            ref, ref_var = ctrl_all.mean(), deff * v_base / ctrl_all.size + spread
            unpaired += 1
        else:
            continue
        deltas.append(x.mean() - ref)
        variances.append(deff_new * v_new / x.size + ref_var)
        ref_vars.append(ref_var)
        weights.append(x.size)
    if not deltas:
        return None
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    delta = float(w @ np.asarray(deltas))
    se = math.sqrt(float(w**2 @ np.asarray(variances)))
    r = radius(se, rules.alpha, _rhos(rules))
    floor = radius(math.sqrt(float(w**2 @ np.asarray(ref_vars))), rules.alpha, _rhos(rules))
    return Estimate(delta, delta - r, delta + r, n_new, base_n, paired, unpaired, deff, floor, se)


def _rhos(rules: Rules) -> tuple[float, ...]:
    """Tightest where the interval is about as wide as the tolerance (a close call), and at 3, 10 and 30
    times that width (a clearly bad model, decided from the first results)."""
    return tuple(1.0 / (k * max(rules.tolerance, 1e-3)) ** 2 for k in (1, 3, 10, 30))


@dataclass(frozen=True)
class Decision:
    action: str  # "wait", "promote", "roll_back" or "hold"
    reason: str
    deciding: str  # what would decide it, for the operator


def decide(est: Estimate | None, rules: Rules, *, elapsed_s: float, metric: str) -> Decision:
    """Act on the estimate: roll back, promote, wait, or (past the limits) apply ``on_undecided``."""
    n = 0 if est is None else est.cohort_n
    if est is None or n < rules.min_results:
        if rules.max_s > 0 and elapsed_s >= rules.max_s and rules.on_undecided != "hold":
            # a cohort that never reports (offline, or not running it) held every publish for ever; no evidence
            # promotes nothing, whatever on_undecided says
            return Decision("roll_back", f"only {n} of {rules.min_results} cohort results in the time limit "
                            f"({rules.max_s:g} s): the cohort's devices are offline or do not run it; rolled back "
                            "(never promoted without results)", "decided")
        return Decision("wait", f"{n} of {rules.min_results} cohort results so far",
                        f"{rules.min_results - n} more cohort results")
    shown = show(metric)
    low, high = (est.low, est.high) if metric == "error" else (max(est.low, -1.0), min(est.high, 1.0))  # hits, confidences
    where = (f"{metric}, cohort - previous {shown(est.delta)} [{shown(low)}, {shown(high)}] over {n} results "
             f"({est.paired} devices against their own history, {est.unpaired} against the fleet; "
             f"tolerance {shown(-rules.tolerance)}, {100 * (1 - rules.alpha):g}% always-valid)")
    if est.high < -rules.tolerance:
        return Decision("roll_back", f"worse: {where}", "decided")
    if est.low > -rules.tolerance:
        return Decision("promote", f"not worse: {where}", "decided")
    limit = n >= rules.max_results or (rules.max_s > 0 and elapsed_s >= rules.max_s)
    if limit:
        action = {"rollback": "roll_back", "promote": "promote", "hold": "hold"}[rules.on_undecided]
        if action == "promote" and worse_at_the_limit(est, rules):
            return Decision("roll_back", "undecided at the limit, but worse than the tolerance by a last fixed-sample "
                            f"test ({100 * (1 - rules.alpha):g}%): rolled back, not promoted: {where}", "decided")
        return Decision(action, f"undecided at the limit (on_undecided={rules.on_undecided}): {where}", "decided")
    return Decision("wait", f"undecided: {where}", _needed(est, rules, shown))


def _needed(est: Estimate, rules: Rules, shown: Any = str) -> str:
    """Roughly how many more results decide it if the estimate holds (the width shrinks as 1/sqrt(n))."""
    gap = abs(est.delta + rules.tolerance)
    half = (est.high - est.low) / 2
    target = (est.delta < -rules.tolerance and "its upper bound below") or "its lower bound above"
    limits = f"limit {rules.max_results:,} results" + (f" or {rules.max_s:g} s" if rules.max_s else "")
    if est.floor >= gap:  # more cohort results shrink only their own part of the width
        refs = (f"the previous version's {est.baseline_n:,} results on the cohort's devices leave" if est.paired else
                "the fleet's spread between devices leaves")
        width = shown(est.floor) if not shown(est.floor).startswith("-") else shown(-est.floor)  # "error" flips signs
        return (f"{target} -tolerance; more cohort results cannot decide it: {refs} it ±{width.lstrip('+')} "
                f"wide at best; at the {limits}: {_at_limit(est, rules)}")
    # the cohort's part of the variance shrinks as 1/n, the references' part not at all
    cohort_half2 = max(half**2 - est.floor**2, 0.0)
    need2 = gap**2 - est.floor**2
    more = math.inf if need2 <= 0 else est.cohort_n * (cohort_half2 / need2 - 1)
    if not math.isfinite(more) or est.cohort_n + more > rules.max_results:
        return f"{target} -tolerance; at this estimate not before the {limits} ({_at_limit(est, rules)} then)"
    return f"{target} -tolerance: about {max(int(more), 1):,} more results at this estimate ({limits})"


def worse_at_the_limit(est: Estimate, rules: Rules) -> bool:
    """One fixed-sample test, once, where an undecided canary would be promoted: its one-sided upper bound
    (``delta + z * se``, narrower than the always-valid interval, which must hold at every check) is below
    -tolerance. A short history leaves the interval wide however many cohort results come (a new user's
    canary 20 points worse was promoted so); this test adds at most ``alpha`` to the false rollbacks, on
    canaries that reached the limit."""
    z = float(_NORMAL.inv_cdf(1 - rules.alpha))
    return est.se > 0 and est.delta + z * est.se < -rules.tolerance


def _at_limit(est: Estimate, rules: Rules) -> str:
    """What :func:`decide` does at the limit with this estimate."""
    if rules.on_undecided == "promote" and worse_at_the_limit(est, rules):
        return "roll back: worse than the tolerance by a last fixed-sample test"
    return rules.on_undecided


def show(metric: str) -> Any:
    """How a difference of the metric reads."""
    if metric == "accuracy":
        return lambda x: f"{100 * x:+.1f} pts"
    if metric == "error":
        return lambda x: f"{-100 * x:+.1f}% error"
    return lambda x: f"{x:+.3f}"


RELATIVE_ERROR_CAP = 1000.0  # a result's error counts as at most this many times its reference's (scores)


def relative_errors(cohort: Series, baseline: Series, control: Series) -> tuple[Series, Series, Series]:
    """A regressor's errors as scores: each divided by the mean error of its reference (the device's own
    history on the previous version, else the control fleet's) and negated, so that a difference of
    -0.1 reads "10 % more error" on an easy device and a hard one alike. A score is at least
    ``-RELATIVE_ERROR_CAP``: a device sending errors of 1e150 made the scores' variance inf and the judge
    divide by zero at every check (``rollout status`` a traceback, the live page a 503); so capped, such a
    canary is rolled back."""
    ref = {d: x.mean() for d, x in baseline.parts.items() if x.size >= MIN_BASELINE and x.mean() > 0}
    fleet = float(control.score.mean()) if len(control) and control.score.mean() > 0 else None
    fallback = fleet if fleet is not None else (float(np.mean(list(ref.values()))) if ref else 1.0)

    def scaled(s: Series, own: bool) -> Series:
        with np.errstate(over="ignore"):
            parts = {d: np.maximum(-x / (ref.get(d, fallback) if own else fallback), -RELATIVE_ERROR_CAP)
                     for d, x in s.parts.items()}
        if not parts:
            return s
        out = Series(np.repeat(np.array(list(parts), dtype=s.device.dtype), [x.size for x in parts.values()]),
                     np.concatenate(list(parts.values())))  # grouped by device, each in its own order
        out.__dict__["parts"] = parts  # already split: keep it
        return out

    return scaled(cohort, True), scaled(baseline, True), scaled(control, False)


def histogram_shift(labels_new: Sequence[str], labels_ref: Sequence[str]) -> float | None:
    """Total variation distance between two sets of predicted classes (0: same shares, 1: disjoint)."""
    if not labels_new or not labels_ref:
        return None
    classes = sorted(set(labels_new) | set(labels_ref))
    a = np.array([labels_new.count(c) for c in classes], dtype=np.float64) / len(labels_new)
    b = np.array([labels_ref.count(c) for c in classes], dtype=np.float64) / len(labels_ref)
    return float(0.5 * np.abs(a - b).sum())
