"""A small labelled multi-device log, generated (the demo and the tests need no downloaded data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_agent.sources import SimulatedSensor

CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
LABELS = ("idle", "walk", "run", "lift")


def write_sample_log(
    path: str | Path, *, devices: Sequence[str] = ("dev-a", "dev-b", "dev-c"), seconds: float = 60.0,
    recordings: int = 2, gap_s: float = 5.0, rate_hz: float = 50.0, seed: int = 0, start_ts: float = 0.0,
    labels: Sequence[str] | None = LABELS,
) -> int:
    """Write ``ts,device_id,<channels>[,label]`` CSV, sorted by ts; returns the number of readings.

    Each device records ``recordings`` sessions of ``seconds / recordings`` with ``gap_s`` of silence
    in between (windows must not span those gaps), with a seeded synthetic signal per activity class.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per = seconds / recordings
    rows = 0
    with open(path, "w") as f:
        f.write(",".join(["ts", "device_id", *CHANNELS, *(["label"] if labels else [])]) + "\n")
        for r in range(recordings):
            sensor = SimulatedSensor(list(devices), CHANNELS, rate_hz, seed + r, labels, speed=0,
                                     duration_s=per, start_ts=start_ts + r * (per + gap_s), chunk_s=5.0)
            for chunk in sensor:
                names = np.asarray(chunk.device_names)[chunk.device_codes]
                cols = [np.char.mod("%.2f", chunk.ts), names]
                cols += [np.char.mod("%.5f", chunk.values[:, i]) for i in range(len(CHANNELS))]
                if chunk.labels is not None:
                    cols.append(chunk.labels)
                lines = cols[0]
                for col in cols[1:]:
                    lines = np.char.add(np.char.add(lines, ","), col)
                f.write("\n".join(lines.tolist()) + "\n")
                rows += len(chunk)
    return rows
