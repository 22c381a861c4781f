"""Drift: devices measure their features against the training distribution the manifest carries, report
the PSI in their status, and the hub flags drifting devices (`cloud-hub devices`)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import orjson
import pytest

from edge_agent.drift import DRIFTING, MIN_WINDOWS, DriftMeter, feature_bins


def test_psi_is_near_zero_on_the_training_distribution_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 4)).astype(np.float32)
    bins = feature_bins(train)
    assert np.array(bins["edges"]).shape == (4, 9) and np.allclose(np.sum(bins["expected"], axis=1), 1.0)
    same = DriftMeter.of({"feature_bins": bins})
    assert same is not None and same.psi() is None  # too few windows yet
    same.add(rng.normal(size=(MIN_WINDOWS - 1, 4)).astype(np.float32))
    assert same.psi() is None
    same.add(rng.normal(size=(1000, 4)).astype(np.float32), confidence=np.full(1000, 0.8))
    assert same.psi() < 0.05 and same.mean_confidence() == pytest.approx(0.8)
    shifted = DriftMeter.of({"feature_bins": bins})
    assert shifted is not None
    shifted.add(rng.normal(loc=1.0, size=(1000, 4)).astype(np.float32))
    assert shifted.psi() > DRIFTING
    # counts forget: after a long stretch of training-like windows the shift fades
    for _ in range(6):
        shifted.add(rng.normal(size=(1000, 4)).astype(np.float32))
    assert shifted.psi() < 0.1
    assert DriftMeter.of({}) is None and DriftMeter.of({"feature_bins": {"edges": [[1.0]]}}) is None


def test_the_device_counts_its_windows_into_the_bins_as_the_hub_counted_the_training_windows() -> None:
    """Values on an edge, NaN and the outer bins land where ``feature_bins`` put them: a device fed the
    training windows themselves reports exactly the training shares (PSI 0)."""
    rng = np.random.default_rng(1)
    train = np.round(rng.normal(size=(1500, 6)), 1).astype(np.float32)  # many values exactly on an edge
    bins = feature_bins(train)
    meter = DriftMeter.of({"feature_bins": bins})
    assert meter is not None
    meter.add(train[:700])
    meter.add(train[700:])
    assert np.allclose(meter.counts / len(train), bins["expected"], atol=1e-6)
    assert meter.psi() == pytest.approx(0.0, abs=1e-5)
    meter.add(np.full((1, 6), np.nan, np.float32))  # NaN is above no edge: the first bin, as in training
    assert meter.counts[:, 0].sum() == pytest.approx(sum(e[0] for e in bins["expected"]) * 1500 + 6)


@pytest.mark.slow
def test_a_device_whose_inputs_moved_is_flagged_drifting(procs, broker, prefix, tmp_path: Path) -> None:
    from cloud_hub import db, lifecycle
    from cloud_hub.store import Store
    from tests.helpers import SMALL, make_log, run_agent
    from tests.test_hub_cli import ServeProcess, invoke

    train = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2", "trn-3"), seconds=120)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'train.sqlite'}")
    lifecycle.train_from_logs(engine, [str(train)], holdout=["trn-3"], config=SMALL)
    with engine.connect() as conn:
        bundle = Store(engine).get_model(conn, "default").bundle
    engine.dispose()
    model = tmp_path / "v1.emlb"
    model.write_bytes(bundle)
    normal = make_log(tmp_path / "normal.csv", devices=("calm",), seconds=120, seed=0, start_ts=10_000.0)
    lines = make_log(tmp_path / "raw.csv", devices=("moved",), seconds=120, seed=0,
                     start_ts=10_000.0).read_text().splitlines()
    # the same kind of recording with its sensor mounted upside down: two axes flipped
    moved = tmp_path / "moved.csv"
    header = lines[0].split(",")
    flip = [header.index(ch) for ch in ("az", "wz")]
    rows = []
    for line in lines[1:]:
        f = line.split(",")
        for i in flip:
            f[i] = repr(-float(f[i]))
        rows.append(",".join(f))
    moved.write_text("\n".join([lines[0], *rows]) + "\n")

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    for log, state in ((normal, "s1"), (moved, "s2")):
        res = run_agent("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                        "--state-dir", str(tmp_path / state), "--json")
        assert res.returncode == 0, res.stderr
    assert hub.signal(signal.SIGTERM) == 0
    code, out, err = invoke("devices", "--db", url, "--json")
    assert code == 0, err
    devices = orjson.loads(out)
    assert devices["calm"]["drift_psi"] < 0.1 and not devices["calm"]["drifting"], devices["calm"]
    assert devices["moved"]["drift_psi"] > DRIFTING and devices["moved"]["drifting"], devices["moved"]
    assert 0 < devices["calm"]["mean_confidence"] <= 1
    code, out, _ = invoke("devices", "--db", url)
    assert code == 0 and "DRIFTING" in out.split("moved")[1].splitlines()[0]
