"""Opening a federated round: which devices are asked, with what plan, announced how.

:func:`open_round` opens the next round of a model: the devices that report running its current version
(:func:`available_devices`, as ``serve`` recorded their statuses) are sampled (``fraction``, at least
``min_available``), the plan is made (the local training, a secure round's numbers, a DP round's noise once
the budget allows it), written to ``fl_rounds`` with the signed announcement and only then published, retained,
on ``{prefix}/rounds/{model}``. It refuses, with a :class:`~cloud_hub.rounds.config.RoundError`, what an
operator must fix first: no model, a forecast model, an open canary, too few devices, a secure round that
cannot be secure.

The coordinator (:mod:`cloud_hub.rounds.coordinator`) lends it its link: how to sign an announcement and how to
publish it.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.store import Store
from cloud_hub.rounds import privacy
from cloud_hub.rounds.config import FederateConfig, RoundError
from cloud_hub.rounds.store import RoundRow, RoundStore
from cloud_hub.settings import HubSettings
from edge_agent.contract import secagg
from edge_agent.contract.rounds import Announcement, RoundPlan, SecureParams, trainable_names

SECURE_PEAK = 63  # the integer grid of secure rounds: [-63, 63] (secure_codec: 10-bit ring up to 8 devices)
SECURE_SPREAD = 3.0


def open_round(settings: HubSettings, engine: sa.Engine, store: Store, cfg: FederateConfig,
               budget: privacy.Budget | None, *, available: Callable[[int], list[str]],
               announce: Callable[[RoundPlan, dict[str, np.ndarray]], Announcement],
               send: Callable[..., None], say: Callable[[str], None]) -> RoundRow:
    """Open the next round of ``settings.model_name`` and announce it; the round as stored.

    ``available(version)`` names the devices to sample from (:func:`available_devices`), ``announce`` signs the
    announcement of a plan, ``send`` publishes it retained and waits for the broker's PUBACK."""
    from cloud_hub.models import weights
    from cloud_hub.models.lifecycle import current_model

    rounds = RoundStore()
    name = settings.model_name
    with sessions.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, name)
    if not rows:
        raise RoundError(f"no model {name!r} to federate: run `cloud-hub train` and `publish` first")
    base = current_model(rows, name)
    if (base.manifest.get("preprocess") or {}).get("forecast"):
        raise RoundError(f"{name} v{base.version} forecasts (train --forecast): federated rounds do not train "
                         "forecasts yet (the devices would learn levels, not changes); retrain it with "
                         "`cloud-hub train` on logs instead")
    _no_canary(engine, store, name)
    if budget is not None:  # a spent budget stops here, not after waiting for devices
        budget.check(_spent(engine, name))
    devices = available(base.version)
    rng = random.Random(f"{cfg.seed}/{base.version}/{time.time_ns()}")
    k = max(1, round(cfg.fraction * len(devices)))
    chosen = sorted(rng.sample(devices, min(k, len(devices))))
    secure = _secure_params(cfg, chosen, len(devices), rng)
    with sessions.transaction(engine, write=False) as conn:
        blob = store.get_weights(conn, name, base.version)
        round_id = rounds.next_round_id(conn)
    if blob is None:
        raise RoundError(f"model {name} v{base.version} has no stored FP32 weights to start a round from")
    tensors = weights.tensors(blob)  # the arrays, without scikit-learn
    n_layers = sum(1 for t in tensors if t.startswith("coef_"))
    trainable = trainable_names(n_layers, cfg.train_layers)
    dp, spent_text = None, ""
    if budget is not None:
        before = _spent(engine, name)  # one read of the model's rounds for the check and the line
        spent_text = budget.spent_text(before)
        try:
            secure, dp = budget.plan(before, secure, [(k, tensors[k].shape) for k in trainable],
                                     cfg.clip, len(chosen))
        except ValueError as exc:  # a ring past 32 bits
            raise RoundError(f"differential privacy at this noise: {exc}; fewer devices or less noise") from None
    now = time.time()
    plan = RoundPlan(
        round_id=round_id, model=name, base_version=base.version, base_sha256=base.sha256,
        task=str(base.manifest["task"]), participants=tuple(chosen), deadline=now + cfg.deadline_s,
        epochs=cfg.epochs, lr=cfg.lr, batch=cfg.batch, mu=cfg.mu, alpha=_alpha(blob, cfg.batch),
        clip=cfg.clip, min_windows=cfg.min_windows, min_new=cfg.min_new,
        min_updates=min(cfg.min_updates or len(chosen), len(chosen)),
        max_staleness=0 if dp else cfg.max_staleness, encoding=cfg.encoding, budget_s=cfg.budget_s,
        created=now, trainable=trainable, secure=secure, dp=dp, weights_dtype=cfg.weights_dtype,
    )
    ann = announce(plan, tensors)
    payload = ann.encode()
    with sessions.transaction(engine) as conn:
        rounds.add_round(conn, round_id=round_id, name=name, base_version=base.version, participants=chosen,
                         plan=ann.plan.header() | {  # and the hub's own part: its gate, its rule
                             "announcement_bytes": len(payload), "tolerance": cfg.tolerance,
                             "holdout_logs": [str(Path(p).resolve()) for p in cfg.holdout_logs],
                             "aggregate": cfg.aggregate}
                         | ({"dp_seed": secrets.randbits(63)} if dp and dp.mode == "central" else {}),
                         announcement=payload, opened_at=now, deadline=plan.deadline)
    # a copy queued for an offline device's session expires with the round: it could no longer answer
    send(settings.topics.rounds(name), payload, expiry_s=plan.deadline - time.time())
    say(f"round {round_id}: v{base.version} to {len(chosen)} of {len(devices)} devices "
        + (f"(secure: the hub learns only the sum, once {secure.threshold} of them reveal their shares) "
           if secure else "")
        + (f"(differential privacy, {dp.mode} noise x{dp.noise:.3g}; {spent_text}) " if dp else "")
        + f"({', '.join(chosen)}; the announcement with the base's FP32 weights: {len(payload) / 1e6:.2f} MB), "
          f"closes at {plan.min_updates} updates or in {cfg.deadline_s:g} s")
    with sessions.transaction(engine, write=False) as conn:
        row = rounds.get_round(conn, round_id)
    assert row is not None
    return row


def available_devices(settings: HubSettings, engine: sa.Engine, store: Store, cfg: FederateConfig, version: int,
                      say: Callable[[str], None]) -> list[str]:
    """Online devices whose last status (as ``serve`` recorded it) says they run ``version``: a device
    whose last status is offline (its goodbye, or its last will) or that runs another version is
    never asked. Waits (up to wait_devices_s) for min_available of them, and for the last round's
    participants to swap to it: a round started the moment the first device swapped would leave the
    others out. What it waits for is said, naming the devices of the model it cannot ask and why."""
    with sessions.transaction(engine, write=False) as conn:
        last = RoundStore().rounds(conn, settings.model_name, limit=1)
    expected = set(last[-1].participants) if last else set()
    start = time.monotonic()
    until, said = start + cfg.wait_devices_s, False

    def few(items: list[str], then: str = "") -> list[str]:  # a fleet's worth of names stays one line
        more = [f"{len(items) - 5} more"] if len(items) > 5 else []
        return [", ".join(items[:5] + more) + then] if items else []

    while True:
        with sessions.transaction(engine, write=False) as conn:
            rows = store.device_rows(conn)
        mine = {d: r for d, r in rows.items() if r["model_name"] == settings.model_name}
        online = {d for d, r in mine.items() if r["state"] == "online"}
        found = sorted(d for d in online if mine[d]["model_version"] == version)
        lagging = sorted((expected & online) - set(found))
        if len(found) >= cfg.min_available and not lagging:
            return found
        others = "; ".join(few([f"{d} on v{mine[d]['model_version']}" for d in sorted(online - set(found))])
                           + few(sorted(set(mine) - online), " offline"))
        if not said and time.monotonic() - start > 3.0:
            said = True
            say(f"waiting up to {cfg.wait_devices_s:g} s for {max(cfg.min_available, len(expected))}"
                f" device(s) to report running {settings.model_name} v{version} (now {len(found)}"
                + (f"; {others}" if others else "") + ")")
        if time.monotonic() >= until:
            if len(found) >= cfg.min_available:
                say(f"going on without {', '.join(lagging)}: not on v{version} after "
                    f"{cfg.wait_devices_s:g} s")
                return found
            raise RoundError(f"only {len(found)} device(s) report running {settings.model_name} v{version} "
                             f"(need {cfg.min_available}) after {cfg.wait_devices_s:g} s"
                             + (f"; {others}" if others else f"; no device of {settings.model_name} has reported")
                             + f": are the agents and `cloud-hub serve` running on {settings.broker_url}?")
        time.sleep(0.2)


def _secure_params(cfg: FederateConfig, chosen: list[str], available: int, rng: random.Random) -> SecureParams | None:
    """A secure round's numbers for ``chosen`` (of ``available`` devices), or None for a plain round; RoundError
    when it cannot be secure."""
    if not cfg.secure:
        return None
    if len(chosen) < 3:
        fix = (f"raise --fraction ({cfg.fraction:g} of {available} asks {len(chosen)})" if available >= 3
               else "wait for more devices")  # it said "lower --fraction" when a higher one was the fix
        raise RoundError(f"a secure round needs at least 3 devices (its sum would give away a device's update); "
                         f"{len(chosen)} of the {available} available asked: {fix}")
    if cfg.aggregate != "fedavg":
        raise RoundError(f"--aggregate {cfg.aggregate} reads each update, which a secure round hides: "
                         "use one or the other")
    t = cfg.threshold or secagg.threshold(len(chosen))
    if not len(chosen) // 2 < t <= len(chosen):
        raise RoundError(f"--threshold {t} for {len(chosen)} devices: it must be a majority (over "
                         f"{len(chosen) // 2}) and at most {len(chosen)}")
    if cfg.min_updates is not None and cfg.min_updates < t:
        raise RoundError(f"--min-updates {cfg.min_updates} is under the threshold {t}: a secure round "
                         "needs that many masked updates to reveal its sum")
    return SecureParams(threshold=t, peak=SECURE_PEAK, spread=SECURE_SPREAD, seed=rng.randrange(1 << 62),
                        bits=secagg.ring_bits(len(chosen), SECURE_PEAK))


def _spent(engine: sa.Engine, name: str) -> tuple[float, int, int]:
    """What this model's rounds have spent (:func:`privacy.spent`)."""
    with sessions.transaction(engine, write=False) as conn:
        return privacy.spent(r.outcome or {} for r in RoundStore().rounds(conn, name))


def _no_canary(engine: sa.Engine, store: Store, name: str) -> None:
    with sessions.transaction(engine, write=False) as conn:
        canaries = store.rollouts(conn, name, state="canary")
    if canaries:
        raise RoundError(f"a canary rollout of {name} v{canaries[0].version} is open: rounds would train "
                         "beside it and its promotion would replace their model; let `serve` finish it or "
                         "`cloud-hub rollback`, then federate")


def _alpha(blob: bytes, batch: int) -> float:
    """The base's L2 penalty at the same strength per example: scikit-learn divides it by the batch size."""
    from cloud_hub.models import weights

    alpha, central = weights.penalty(blob)
    return alpha * batch / max(1, 200 if central is None else central)  # 200: scikit-learn's "auto" batch
