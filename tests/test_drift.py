"""Drift: devices measure their features against the training distribution the manifest carries, report
the PSI in their status, and the hub flags drifting devices (`cloud-hub devices`)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import orjson
import pytest

from edge_agent.drift import DRIFTING, MIN_WINDOWS, DeviceDrift, DriftMeter, feature_bins


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


def test_each_device_of_one_process_has_its_own_figures() -> None:
    """One batch holding two devices' windows, one like the training and one shifted: each device reads
    what a meter of its own reads, with its own confidence; the oldest device is forgotten past the cap."""
    rng = np.random.default_rng(2)
    bins = feature_bins(rng.normal(size=(5000, 4)).astype(np.float32))
    meters = DeviceDrift.of({"feature_bins": bins})
    assert meters is not None and DeviceDrift.of({}) is None
    calm, moved = rng.normal(size=(600, 4)), rng.normal(loc=1.0, size=(500, 4))
    feats = np.concatenate([calm, moved]).astype(np.float32)
    conf = np.concatenate([np.full(600, 0.9), np.full(500, 0.5)])
    meters.add([("calm", slice(0, 600)), ("moved", slice(600, 1100))], feats, conf)
    for device, part in (("calm", slice(0, 600)), ("moved", slice(600, 1100))):
        alone = DriftMeter.of({"feature_bins": bins})
        assert alone is not None
        alone.add(feats[part], conf[part])
        assert meters.psi(device) == pytest.approx(alone.psi()) and np.array_equal(meters.meters[device].counts,
                                                                                   alone.counts)
    assert meters.psi("calm") < 0.05 < DRIFTING < meters.psi("moved")  # type: ignore[operator]
    assert meters.mean_confidence("calm") == pytest.approx(0.9) and meters.mean_confidence("moved") == pytest.approx(0.5)
    assert meters.psi("other") is None and meters.mean_confidence("other") is None
    small = DeviceDrift(meters.template, max_devices=2)
    for device in ("a", "b", "a", "c"):  # b is the least recently fed when c comes
        small.add([(device, slice(0, 10))], feats[:10])
    assert list(small.meters) == ["a", "c"] and small.meters["a"].windows == 20


def test_no_figure_below_the_minimum_count_and_a_device_on_its_training_data_is_not_flagged(tmp_path: Path) -> None:
    """PSI over a handful of windows is noise: below MIN_WINDOWS a device reports none. A device replaying
    the very recordings its model was trained on, in recorded order (a few minutes of one activity at a
    time), reads above DRIFTING on fewer windows and below it from MIN_WINDOWS on."""
    from cloud_hub.models import datasets
    from edge_agent.preprocess import extract_features
    from tests.helpers import make_log

    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=240)
    ds = datasets.dataset_from_logs([str(log)], window_s=None, hop_s=None, holdout=[])
    data, _y, devices, starts = datasets.windows_from_logs([str(log)], ds.params)
    own = (devices == "trn-1")
    feats = extract_features(data[own], ds.params)[np.argsort(starts[own], kind="stable")]
    assert len(feats) >= MIN_WINDOWS
    meters = DeviceDrift.of({"feature_bins": feature_bins(ds.X)})
    assert meters is not None
    said = []
    for i in range(0, len(feats), 20):  # as a replay feeds it, a chunk at a time
        meters.add([("trn-1", slice(0, len(feats[i:i + 20])))], feats[i:i + 20])
        said.append(meters.psi("trn-1"))
    assert said[:(MIN_WINDOWS - 1) // 20] == [None] * ((MIN_WINDOWS - 1) // 20)
    figures = [p for p in said if p is not None]
    assert figures and max(figures) < DRIFTING, figures


@pytest.mark.slow
def test_a_device_whose_inputs_moved_is_flagged_drifting(procs, broker, prefix, tmp_path: Path) -> None:
    from cloud_hub.data import db
    from cloud_hub.data.store import Store
    from cloud_hub.models import lifecycle
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
    # One log, one process, two devices (a replay of several device ids): "calm" recorded like the
    # training, "moved" the same kind of recording with its sensor mounted upside down (two axes flipped).
    seconds = 300  # ~590 windows each: past MIN_WINDOWS
    calm = make_log(tmp_path / "calm.csv", devices=("calm",), seconds=seconds, seed=0,
                    start_ts=10_000.0).read_text().splitlines()
    lines = make_log(tmp_path / "raw.csv", devices=("moved",), seconds=seconds, seed=0,
                     start_ts=10_000.0).read_text().splitlines()
    header = lines[0].split(",")
    flip = [header.index(ch) for ch in ("az", "wz")]
    rows = []
    for line in lines[1:]:
        f = line.split(",")
        for i in flip:
            f[i] = repr(-float(f[i]))
        rows.append(",".join(f))
    both = tmp_path / "both.csv"
    interleaved = sorted([*calm[1:], *rows], key=lambda row: float(row.split(",", 1)[0]))  # each chunk holds both
    both.write_text("\n".join([calm[0], *interleaved]) + "\n")

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    res = run_agent("replay", str(both), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                    "--state-dir", str(tmp_path / "state"), "--json")
    assert res.returncode == 0, res.stderr
    assert hub.signal(signal.SIGTERM) == 0
    code, out, err = invoke("devices", "--db", url, "--json")
    assert code == 0, err
    devices = orjson.loads(out)
    assert devices["calm"]["drift_psi"] < 0.1 and not devices["calm"]["drifting"], devices["calm"]
    assert devices["moved"]["drift_psi"] > DRIFTING and devices["moved"]["drifting"], devices["moved"]
    assert 0 < devices["calm"]["mean_confidence"] <= 1 and 0 < devices["moved"]["mean_confidence"] <= 1
    assert devices["calm"]["mean_confidence"] != devices["moved"]["mean_confidence"]  # each its own windows'
    code, out, _ = invoke("devices", "--db", url)
    assert code == 0 and "DRIFTING" in out.split("moved")[1].splitlines()[0]
