"""`cloud-hub federate` keeps its memory down (issue 26 §5): large arrays are handed back to the system when freed
(cloud_hub.cli.rounds.lean_malloc), in a process of their own (the setting is per process); a hold-out log is
scored in a child process, with the scores of the same code run in place (cloud_hub.rounds.finish._score_apart)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_hub.models import quantize, training
from cloud_hub.rounds import finish
from tests.helpers import DEVICES, SMALL, make_bundle, make_log

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
    if _given_back("plain") >= 10.0:  # numpy 2.4's allocations do not raise glibc's mmap threshold: nothing to show
        pytest.skip("this numpy and glibc give the freed arrays back without lean_malloc (the test's premise fails)")
    assert _given_back("lean") >= 35.0  # the 40 MB


SCORE_APART = textwrap.dedent("""
    import json, sys
    import numpy as np
    from cloud_hub.rounds import finish

    models = [open(p, 'rb').read() for p in sys.argv[1:]]
    data = np.load(sys.argv[1] + '.npz')
    scores = finish._score_apart(models, data['X'], data['y'])
    print(json.dumps({'loaded': 'onnxruntime' in sys.modules, 'scores': scores}))
""")


def _trained(kind: str, tmp_path: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """An FP32 model and its INT8 one of a small classifier or regressor, and windows' features to score."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    y = np.array(["walk", "run", "sit"])[rng.integers(0, 3, 300)] if kind == "classes" else rng.normal(size=300)
    fp32 = training.export_onnx(training.train(X, y, config=SMALL), X.shape[1])
    paths = [tmp_path / f"{kind}.fp32.onnx", tmp_path / f"{kind}.int8.onnx"]
    paths[0].write_bytes(fp32)
    paths[1].write_bytes(quantize.quantize_int8(fp32, X, per_channel=False))
    np.savez(str(paths[0]) + ".npz", X=X, y=y)
    return paths, X, y


def _quality(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not k.startswith("latency")}


@pytest.mark.parametrize("kind", ["classes", "regression"])
def test_the_hold_out_is_scored_apart_with_the_same_scores_and_federate_never_loads_onnxruntime(
        kind: str, tmp_path: Path) -> None:
    paths, X, y = _trained(kind, tmp_path)
    out = subprocess.run([sys.executable, "-c", SCORE_APART, *map(str, paths)], capture_output=True, text=True,
                         check=True, timeout=120)
    got = json.loads(out.stdout)
    assert got["loaded"] is False, "the process that asked for the scores loaded onnxruntime"
    here = [quantize.evaluate(p.read_bytes(), X, y, latency_runs=20, warmup=2) for p in paths]
    assert [_quality(m) for m in got["scores"]] == [_quality(m) for m in here]  # to the last digit
    assert all(m["latency_ms"] > 0 for m in got["scores"])


def test_a_lean_session_in_small_batches_scores_as_the_default_one(tmp_path: Path) -> None:
    paths, X, y = _trained("classes", tmp_path)
    for p in paths:
        plain = quantize.evaluate(p.read_bytes(), X, y, latency_runs=5, warmup=1)
        lean = quantize.evaluate(p.read_bytes(), X, y, latency_runs=5, warmup=1, batch=7, lean=True)
        assert _quality(lean) == _quality(plain)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        quantize.evaluate(paths[0].read_bytes(), X, y, batch=0)


def test_a_model_the_child_cannot_score_is_an_error_in_federate(tmp_path: Path) -> None:
    _paths, X, y = _trained("classes", tmp_path)
    with pytest.raises(Exception, match=r"(?i)protobuf|invalid|load"):
        finish._score_apart([b"not an onnx model"], X, y)


def test_the_hold_out_logs_are_read_again_only_when_they_change(tmp_path: Path) -> None:
    log = make_log(tmp_path / "holdout.csv", seconds=30.0)
    pre = make_bundle(log).manifest.preprocess
    X, y, devices = finish._holdout_features([str(log)], pre)
    assert finish._holdout_features([str(log)], pre)[0] is X  # the same arrays: the log was not read again
    make_log(log, seconds=20.0)  # the log changed: its windows are read again
    X2, y2, _ = finish._holdout_features([str(log)], pre)
    assert X2 is not X and 0 < len(y2) < len(y)
    assert set(devices.tolist()) == set(DEVICES)


def test_a_scoring_child_that_hangs_is_killed_and_federate_goes_on(tmp_path: Path, monkeypatch) -> None:
    """A forked child could hang (a lock another thread held at the fork): federate must not hang with it."""
    import os
    import time

    _paths, X, y = _trained("classes", tmp_path)
    monkeypatch.setattr(finish, "SCORE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(finish.quantize, "evaluate", lambda *a, **k: time.sleep(3600))  # the child's work, hung
    forked: list[int] = []
    fork = os.fork

    def recorded() -> int:
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(finish.os, "fork", recorded)
    with pytest.raises(RuntimeError, match="no scores from its process within 1 s"):
        finish._score_apart([b"model"], X, y)
    assert len(forked) == 1
    with pytest.raises(ChildProcessError):  # killed and reaped already: no child left behind
        os.waitpid(forked[0], os.WNOHANG)
