"""Replaying recorded logs: :func:`pace` releases readings at their recorded (scaled) time.

(Parsing the next chunks in a thread while the agent works on the current one was measured and
dropped: no gain beyond the run-to-run noise, the GIL serializes more than numpy releases, and
2.5 MB more peak memory.)"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.sources.chunk import ReadingChunk

_PACE_SLACK = 1e-4  # seconds: readings due this soon are released now


def pace(chunks: Iterable[ReadingChunk], speed: float, *, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], Any] = time.sleep) -> Iterator[ReadingChunk]:
    """Release readings according to their recorded timestamps.

    A reading with timestamp ``t`` is released at ``start + (t - t_first) / speed`` (``t`` taken as
    a running max, so a log not sorted by time never moves the schedule back).  Readings due at the
    same moment are released together as a sub-chunk.  ``speed <= 0`` or infinite: no pacing.
    """
    if speed != speed:
        raise ValueError("speed is NaN")
    if speed <= 0 or math.isinf(speed):
        yield from chunks
        return
    t0_rec, t0_clock, run_max = None, 0.0, -math.inf
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        if t0_rec is None:
            t0_rec, t0_clock = float(chunk.ts[0]), clock()
        rec = np.maximum(np.maximum.accumulate(chunk.ts), run_max)
        run_max = float(rec[-1])
        due = (rec - t0_rec) / speed
        i = 0
        while i < n:
            now = clock() - t0_clock
            j = int(np.searchsorted(due, now + _PACE_SLACK, side="right"))
            if j > i:
                yield chunk if (i == 0 and j == n) else chunk.take(slice(i, j))
                i = j
            else:
                sleep(float(due[i]) - now)
