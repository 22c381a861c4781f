"""`cloud-hub federate` keeps its memory down (issue 26 §5): large arrays are handed back to the system when freed
(cloud_hub.cli.rounds.lean_malloc), in a process of their own (the setting is per process)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from cloud_hub.cli.rounds import lean_malloc

    def rss():
        return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024

    if sys.argv[1] == 'lean':
        assert lean_malloc()
    big = np.ones(2_000_000)  # 16 MB, freed: glibc raises its threshold for memory of their own past it
    del big
    arrays, kept = [], []
    for _ in range(40):
        arrays.append(np.ones(131_072))  # 1 MB each, as a round's layer sums or hold-out windows
        kept.append(np.ones(2_000))  # between them, a little that stays
    before = rss()
    del arrays
    print(before - rss())
""")


def _given_back(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60)
    return float(out.stdout)


def test_arrays_a_round_frees_go_back_to_the_system() -> None:
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc: no mallopt")
    assert _given_back("lean") >= 35.0  # the 40 MB
    assert _given_back("plain") < 10.0, "without it glibc keeps them (the test's premise)"
