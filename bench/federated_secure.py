"""Secure rounds against plain INT8 rounds: upload per device, round time, accuracy (issue 26 §1).

    python bench/federated_secure.py [--agents 8] [--rounds 3] [--workdir /tmp/edgeml-secure-bench]

Runs ``cloud-hub demo --federated`` twice with the same agents, data and rounds (real processes: mosquitto,
the hub, one ``edge-agent run`` per device following its own recording; the watch recordings of
``../shared/data`` when present, else the generated IMU log): plain INT8 rounds, then secure rounds
(``--secure``: pairwise masks, Shamir shares, the hub sums what it cannot read). Per round, from the hub's
database: the bytes each device uploaded for its training answer (plain: its update; secure: its keys, its
sealed shares, its masked vectors, its revealed shares) and the collect time (announcement to the round's close:
training plus the secure steps). Targets: secure <= 1.3x the bytes and <= 1.5x the time of plain (Flower's
SecAgg+ measured x1.94 and x3.4 on the same recordings).

Down per device per round: the round's announcement (its plan and the base weights, float16 by default) plus,
when the round published a version, its signed INT8 bundle, which every device fetches. ``--fp32`` adds a third
run, plain with ``--fp32-announcements``, for the bytes down before float16 announcements. Target (issue 26 §5):
down <= Flower's 1,289 kB per device per round on these recordings.

Where a secure round's time goes: per round, the time from the last training answer the hub received (plain: the
last update; secure: the last masked vector) to the round's close (secure: the reveal step and its answers), and
one device's CPU for its part of a secure round, measured in this process on the last secure round's plan (its
tensors, its 8 devices; thread CPU, not wall) against the encoding of a plain INT8 update.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.data import tables
from cloud_hub.tools.demo_federated import FederatedDemo

TRAINING = ("accepted", "late", "advert", "shares", "masked", "revealed")  # a device's answers to a training round


FLOWER_DOWN = 1_289e3  # bytes down per device per round, Flower 1.42 on the same recordings (issue 26)


def run(work: Path, agents: int, rounds: int, secure: bool, fp32: bool = False) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    out = FederatedDemo(work, broker=None, agents=agents, rounds=rounds, secure=secure,
                        config={"weights_dtype": "float32"} if fp32 else None,
                        say=lambda line: print(f"  {line}", file=sys.stderr), show=lambda rows: None).run()
    engine = out["engine"]
    u, r = tables.fl_updates.c, tables.fl_rounds.c
    with engine.connect() as conn:
        sent = conn.execute(sa.select(u.round_id, u.device_id, sa.func.sum(u.bytes))
                            .where(u.status.in_(TRAINING)).group_by(u.round_id, u.device_id)).all()
        times = conn.execute(sa.select(r.id, r.opened_at, r.closed_at, r.outcome).order_by(r.id)).all()
        last = dict(conn.execute(sa.select(u.round_id, sa.func.max(u.received_at))
                                 .where(u.status.in_(("accepted", "masked"))).group_by(u.round_id)).all())
        announcement = conn.execute(sa.select(r.announcement).order_by(r.id.desc()).limit(1)).scalar_one()
        plans = conn.execute(sa.select(r.plan, r.new_version, r.state).order_by(r.id)).all()
        m = tables.models.c
        bundles = dict(conn.execute(sa.select(m.version, sa.func.length(m.bundle))).all())
    engine.dispose()
    down = [orjson.loads(plan)["announcement_bytes"] + (bundles.get(v, 0) if state == "published" else 0)
            for plan, v, state in plans]
    return {"bytes": statistics.mean(b for _, _, b in sent),
            "collect_s": [c - o for _, o, c, _ in times],
            "tail_s": [c - last[i] if i in last else float("nan") for i, _, c, _ in times],
            "announcement": announcement,
            "holdout": [orjson.loads(o or b"{}").get("holdout_after") for *_, o in times],
            "total_s": out["seconds"], "down": statistics.mean(down)}


def device_cpu(announcement: bytes) -> dict[str, float]:
    """One device's CPU (ms, thread time) for each part of a secure round of ``announcement``'s plan, every device
    of it answering in this process on random deltas; and a plain round's INT8 encoding of the same delta."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from edge_agent.contract.rounds import decode_announcement

    p = decode_announcement(announcement).plan
    rng = np.random.default_rng(0)
    delta = {t.name: rng.normal(0, 0.01, t.shape).astype(np.float32) for t in p.tensors if t.name in p.trainable}
    stats = dict.fromkeys(("n_examples", "loss_before", "loss_after", "metric_before", "metric_after", "norm"), 1.0)
    ranges = [[-1.0, 1.0, -1.0, 1.0]] * sum(1 for t in p.trainable if t.startswith("coef_"))
    cpu: dict[str, list[float]] = {}

    def timed(part: str, work: Any) -> None:
        t0 = time.thread_time()
        refused = work()
        cpu.setdefault(part, []).append(1000 * (time.thread_time() - t0))
        if isinstance(refused, str):  # a step a device refused
            raise RuntimeError(refused)

    with threadpool_limits(limits=1, user_api="blas"):  # as the agent trains (and thread time sees one thread)
        _device_round(p, delta, stats, ranges, timed)
    return {part: statistics.median(ms) for part, ms in cpu.items()}


def _device_round(p: Any, delta: Any, stats: Any, ranges: Any, timed: Any) -> None:
    from edge_agent.contract import secure_codec
    from edge_agent.contract.round_updates import encode_update_delta
    from edge_agent.contract.secure_rounds import Step, decode_answer, secure_grid
    from edge_agent.device.secure import SecureAnswerer

    sent: dict[str, list[bytes]] = {d: [] for d in p.participants}
    who = {d: SecureAnswerer(p, d, sent[d].append) for d in p.participants}
    for d in p.participants:
        timed("keys", who[d].advertise)
    adverts = tuple(a for d in p.participants if (a := decode_answer(sent[d][0]).advert) is not None)
    for d in p.participants:
        secure_codec.forget_rotation()  # one process per device: each works the rotation out
        timed("shares and rotation", lambda d=d: who[d].on_step(Step(p.round_id, p.model, d, "share", adverts=adverts)))
    sealed = {d: decode_answer(sent[d][1]).sealed for d in p.participants}
    for d in p.participants:
        timed("opening shares, masks", lambda d=d: who[d].on_step(Step(p.round_id, p.model, d, "mask", senders=p.participants,
                                                       sealed={u: sealed[u][d] for u in p.participants if u != d})))
    for d in p.participants:
        secure_grid(p).rotation()  # as each device holds it from its share step (one process each; untimed here)
        timed("after training", lambda d=d: who[d].trained(delta, stats, ranges))
        timed("reveal", lambda d=d: who[d].on_step(Step(p.round_id, p.model, d, "reveal", survivors=p.participants)))
    timed("plain INT8 encoding", lambda: encode_update_delta(delta, p.encoding))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgeml-secure-bench"))
    ap.add_argument("--fp32", action="store_true", help="also a plain run with float32 announcements")
    args = ap.parse_args()
    runs = {"plain": run(args.workdir / "plain", args.agents, args.rounds, secure=False),
            "secure": run(args.workdir / "secure", args.agents, args.rounds, secure=True)}
    if args.fp32:
        runs["plain fp32"] = run(args.workdir / "fp32", args.agents, args.rounds, secure=False, fp32=True)
    plain, secure = runs["plain"], runs["secure"]
    print(f"{args.agents} agents, {args.rounds} rounds each (collect time: announcement to close, per round)")
    print(f"{'':10} {'upload/device/round':>20} {'down/device/round':>18} {'collect s (median)':>19} "
          f"{'hold-out accuracy by round':>30}")
    for name, m in runs.items():
        acc = " ".join("-" if a is None else f"{100 * a:.1f}" for a in m["holdout"])
        print(f"{name:10} {m['bytes'] / 1e3:>17,.0f} kB {m['down'] / 1e3:>15,.0f} kB "
              f"{statistics.median(m['collect_s']):>19.2f} {acc:>30}")
    d = plain["down"] / FLOWER_DOWN
    print(f"plain down / Flower's {FLOWER_DOWN / 1e3:,.0f} kB: x{d:.2f} (target <= 1: {'met' if d <= 1 else 'NOT met'})")
    b = secure["bytes"] / plain["bytes"]
    t = statistics.median(secure["collect_s"]) / statistics.median(plain["collect_s"])
    print("collect s by round: " + "; ".join(f"{name} " + ", ".join(f"{c:.2f}" for c in m["collect_s"])
                                             for name, m in runs.items()))
    print("after the last training answer to the close, ms by round: " + "; ".join(
        f"{name} " + ", ".join(f"{1000 * t:.0f}" for t in m["tail_s"]) for name, m in runs.items()))
    cpu = device_cpu(secure["announcement"])
    print("one device's CPU in a secure round, ms (in this process, median of its devices): " + ", ".join(
        f"{part} {ms:.1f}" for part, ms in cpu.items()))
    print(f"secure / plain: bytes x{b:.2f} (target <= 1.3: {'met' if b <= 1.3 else 'NOT met'}), "
          f"collect time x{t:.2f} (target <= 1.5: {'met' if t <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
