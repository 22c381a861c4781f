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
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
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
        plans = conn.execute(sa.select(r.plan, r.new_version, r.state).order_by(r.id)).all()
        m = tables.models.c
        bundles = dict(conn.execute(sa.select(m.version, sa.func.length(m.bundle))).all())
    engine.dispose()
    down = [orjson.loads(plan)["announcement_bytes"] + (bundles.get(v, 0) if state == "published" else 0)
            for plan, v, state in plans]
    return {"bytes": statistics.mean(b for _, _, b in sent),
            "collect_s": [c - o for _, o, c, _ in times],
            "holdout": [orjson.loads(o or b"{}").get("holdout_after") for *_, o in times],
            "total_s": out["seconds"], "down": statistics.mean(down)}


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
    print(f"secure / plain: bytes x{b:.2f} (target <= 1.3: {'met' if b <= 1.3 else 'NOT met'}), "
          f"collect time x{t:.2f} (target <= 1.5: {'met' if t <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
