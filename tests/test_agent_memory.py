"""The agent's own memory (#27 §4): an agent that joins no federated round does not carry the learner
nor the rounds' contract, and one without a config file does not carry the TOML parser.

Each case is a fresh interpreter (this one has imported everything by now): it builds the agent as
``edge-agent replay`` and ``run`` do, without starting it, and says which of the learner's modules it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

_PROBE = """
import json, sys
from edge_agent.device.agent import Agent
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import load_settings
s = load_settings(AgentSettings, env_prefix="EDGE_AGENT_PROBE", config=None,
                  flags=dict(broker="mqtt://127.0.0.1:9", state_dir=sys.argv[1], device_id=sys.argv[2] or None,
                             federated=sys.argv[3] == "on"))
agent = Agent(s, device_ids=(s.device_id,) if s.device_id else ())
print(json.dumps({"learner": agent.learner is not None,
                  "loaded": sorted(m for m in ("edge_agent.device.learner", "threadpoolctl", "edge_agent.contract.rounds",
                                              "edge_agent.contract.round_updates", "edge_agent.contract.round_frames",
                                              "tomllib") if m in sys.modules)}))
agent.outbox.close()
"""


def _agent_modules(state: Path, device_id: str, federated: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(state), device_id, federated],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("device_id", "federated"), [("", "on"), ("d-1", "off")],
                         ids=["replay-of-several-devices", "federated-off"])
def test_an_agent_that_joins_no_round_does_not_import_the_learner(tmp_path: Path, device_id: str,
                                                                  federated: str) -> None:
    out = _agent_modules(tmp_path / "state", device_id, federated)
    assert out == {"learner": False, "loaded": []}


def test_an_agent_that_joins_rounds_has_its_learner(tmp_path: Path) -> None:
    out = _agent_modules(tmp_path / "state", "d-1", "on")
    assert out == {"learner": True, "loaded": ["edge_agent.contract.round_frames", "edge_agent.contract.round_updates",
                                               "edge_agent.contract.rounds", "edge_agent.device.learner", "threadpoolctl"]}


# ------------------------------------------------------------------ buffers a replay holds (#27 §4)


def _watch_like_params(c: int = 6):
    from edge_agent.preprocess import PreprocessParams

    p = PreprocessParams(50.0, 2.5, 0.5, tuple(f"ch{i}" for i in range(c)), features="stats-v1")  # the default model's
    return p.with_normalization([0.0] * c, [1.0] * c)


def test_the_features_of_many_windows_keep_their_temporaries_to_a_slice() -> None:
    """The block sums are made per slice of windows, not over every reading of the batch at once."""
    import tracemalloc

    from edge_agent.preprocess import WindowBatch, extract_features

    p = _watch_like_params()
    k = 2048
    m = (k - 1) * p.hop_size + p.window_size
    values = np.random.default_rng(0).normal(size=(m, 6)).astype(np.float32)
    batch = WindowBatch(start=np.arange(k) * 0.5, end=np.arange(k) * 0.5 + 2.5, values=values,
                        offsets=np.arange(k, dtype=np.intp) * p.hop_size, size=p.window_size, labels=None, dropped=0)
    tracemalloc.start()
    try:
        out = extract_features(batch, p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # beyond the readings and the features: 0.8 MB in slices of 128 windows, 11.5 MB when the blocks of all
    # 51,275 readings were made at once
    assert peak - out.nbytes - values.nbytes < 2 * 2**20, peak


def test_sliced_block_sums_give_the_same_features_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.preprocess import WindowBatch, extract_features, features

    p = _watch_like_params(3)
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) * 40 + 7 for n in (700, 1303, 4001)]  # three devices
    offsets, row = [], 0
    for v in parts:
        offsets += list(range(row, row + v.shape[0] - p.window_size + 1, p.hop_size))
        row += v.shape[0]
    k = len(offsets)
    batch = WindowBatch(start=np.zeros(k), end=np.zeros(k), values=np.concatenate(parts),
                        offsets=np.array(offsets, dtype=np.intp), size=p.window_size, labels=None, dropped=0)
    monkeypatch.setattr(features, "FEATURE_SLICE", k)
    whole = extract_features(batch, p)
    for size in (1, 5, 128):
        monkeypatch.setattr(features, "FEATURE_SLICE", size)
        assert np.array_equal(extract_features(batch, p), whole), size


def test_an_encoded_result_holds_its_own_size_not_the_encoders_buffer() -> None:
    import tracemalloc

    from edge_agent.contract import Result, encode_result_obj

    tracemalloc.start()
    try:
        kept = [encode_result_obj(Result(seq=i, start=i * 0.5, end=i * 0.5 + 2.5, model_version=1, latency_ms=0.01,
                                         label="TRAP", confidence=0.9)) for i in range(300)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 300 * 400, held  # 4 kB each when orjson's working buffer was kept
    assert orjson.loads(kept[7])["seq"] == 7


def test_parsed_times_do_not_keep_the_other_columns_alive(tmp_path: Path) -> None:
    from edge_agent.sources import read_log
    from tests.helpers import make_log

    log = make_log(tmp_path / "fleet.csv", seconds=5)
    with read_log(log, chunk_rows=64) as reader:
        chunks = list(reader)
    assert chunks and all(c.ts.strides == (8,) and (c.ts.base is None or c.ts.base.nbytes == c.ts.nbytes)
                          for c in chunks)


_ARENAS = """
import ctypes, sys, threading
from edge_agent.device.cli import one_malloc_arena
applied = one_malloc_arena() if sys.argv[1] == "one" else None
barrier = threading.Barrier(4)
kept = []
def work():  # 100 kB: malloc's own (not Python's small-object allocator), below its mmap threshold
    kept.append(bytearray(100_000))
    barrier.wait()  # the four threads hold their memory at once
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(applied, flush=True)
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_agent_keeps_one_malloc_arena_for_all_its_threads() -> None:
    def arenas(mode: str) -> tuple[str, int]:
        proc = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip(), sum(line.startswith("Arena ") for line in proc.stderr.splitlines())

    assert arenas("one") == ("True", 1)
    assert arenas("default")[1] > 1  # what it prevents: the threads' arenas of their own


def test_a_rounds_fine_tune_holds_one_layers_gradients_and_no_float64_copy_of_a_tensor() -> None:
    """#26 §5: the default model's training (99-512-512-7) held every layer's gradients at once, and its
    delta's norm was taken on float64 copies of the 512x512 tensor (two of 2 MB): the agent's peak in a round."""
    import tracemalloc

    from edge_agent.device import learn

    rng = np.random.default_rng(0)
    sizes = [99, 512, 512, 7]
    tensors = {"scaler_mean": np.zeros(99, np.float32), "scaler_scale": np.ones(99, np.float32)}
    for i in range(3):
        tensors[f"coef_{i}"] = (rng.normal(size=(sizes[i], sizes[i + 1])) * 0.05).astype(np.float32)
        tensors[f"intercept_{i}"] = np.zeros(sizes[i + 1], np.float32)
    X, y = rng.normal(size=(800, 99)).astype(np.float32), rng.integers(0, 7, 800)
    tracemalloc.start()
    try:
        res = learn.fine_tune(tensors, "classification", X, y, epochs=1, lr=0.03, clip=1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(a.nbytes for a in res.delta.values()) + sum(a.nbytes for k, a in res.tensors.items()
                                                           if k.startswith(("coef_", "intercept_")))
    # beyond what it returns (2.4 MB): 1.85 MB, 3.15 MB before
    assert peak - kept < 2.4 * 2**20, (peak, kept)
    assert res.norm > 0 and np.isfinite(res.norm)


_LAZY_PROBE = """
import json, sys
sys.modules["socks"] = None  # as on a device: PySocks is not a device dependency (the dev extras bring it)
from edge_agent.mqtt import MqttLink
from edge_agent.settings.broker import BrokerURL
link = MqttLink(BrokerURL.parse(sys.argv[1]), "lazy-probe")
link.start()
assert link.connected_within(30), "no connection"
link.stop()
seen = {"connected": sorted(m for m in ("http.client", "email.parser") if m in sys.modules)}
import urllib.request
from urllib.request import Request
seen["getproxies"] = type(urllib.request.getproxies()).__name__
seen["request"] = Request("http://example.invalid/").host
seen["after_use"] = sorted(m for m in ("http.client", "email.parser") if m in sys.modules)
print(json.dumps(seen))
"""


def test_paho_does_not_load_urllib_request_on_a_device_yet_it_works_when_used(broker) -> None:
    """paho imports ``urllib.request`` (with ``http.client`` and ``email``: 1.8 MB anonymous) for a SOCKS proxy
    lookup it makes only with PySocks installed: the agent stands in for it until first use (edge_agent/lazy.py)."""
    proc = subprocess.run([sys.executable, "-c", _LAZY_PROBE, broker.url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["connected"] == []  # connected to a real broker, and none of them ran
    assert seen == {"connected": [], "getproxies": "dict", "request": "example.invalid",
                    "after_use": ["email.parser", "http.client"]}


def test_model_messages_flooding_a_busy_agent_hold_one_payload_a_topic() -> None:
    """A hostile peer's finding: every model-topic message waited in an unbounded queue until the agent's next
    tick (15 messages of 30 MB: 84 -> 612 MB). The newest a topic replaces the older: what the agent installs is
    the newest anyway, and it takes them in arrival order."""
    import queue

    from edge_agent.device.model_slot import LatestUpdates

    updates = LatestUpdates()
    for i in range(1000):
        updates.put((False, b"fleet-%d" % i))
        if i % 100 == 0:
            updates.put((True, b"own-%d" % i))
    assert len(updates) == 2
    assert updates.get(timeout=0.1) == (True, b"own-900") and updates.get_nowait() == (False, b"fleet-999")
    with pytest.raises(queue.Empty):
        updates.get(timeout=0.01)
    updates.put((True, b""))  # the canary is over: an empty payload is news too
    assert updates.get_nowait() == (True, b"")


def test_a_refusal_that_cannot_be_written_keeps_the_earlier_ones(tmp_path, caplog) -> None:
    """The refused models' file is written aside and renamed: a write that fails (a full disk) left it truncated,
    and every model refused before was taken again at the next start (the review's catch)."""
    from edge_agent.device.model_slot import ModelSlot

    slot = ModelSlot.__new__(ModelSlot)
    slot.active_path = tmp_path / "model-default.emlb"
    slot._refuse("a" * 64, "NaN on this device's readings")
    (tmp_path / "model-default.emlb.refused.json.tmp").mkdir()  # the write fails, as on a full disk
    slot._refuse("b" * 64, "another")
    assert slot._refused() == {"a" * 64: "NaN on this device's readings"}
    assert "cannot keep the refusal" in caplog.text
