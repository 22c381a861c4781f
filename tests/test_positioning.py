"""Phone positioning, the second scenario: generated scans, several numeric targets per label, a
regressor with two outputs end to end (reader, windows, training, baselines, broker, hub, stats)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import orjson
import pytest

from cloud_hub.tools import positioning
from edge_agent.sources import LogError, read_log


def _rows(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split(",") for line in path.read_text().splitlines()[1:]]


# ------------------------------------------------------------------------------------------ the data


def test_generated_scans_follow_the_ujiindoorloc_conventions_and_the_physics(tmp_path: Path) -> None:
    log = tmp_path / "pos.csv"
    n = positioning.write_positioning_log(log, phones=["p1", "p2"], seconds=300, seed=3)
    header = log.read_text().splitlines()[0].split(",")
    assert header == ["ts", "device_id", *[f"WAP{i:03d}" for i in range(1, 13)], "label"]
    rows = _rows(log)
    assert n == len(rows) == 600
    rssi = np.array([[int(v) for v in r[2:-1]] for r in rows])
    xy = np.array([[float(v) for v in r[-1].split(";")] for r in rows])
    heard = rssi != positioning.NOT_HEARD
    assert 0.2 < heard.mean() < 0.98  # weak access points go missing, most are heard
    assert rssi[heard].max() < 0 and rssi[heard].min() >= positioning.Radio().sensitivity_dbm
    floor = positioning.Floor()
    assert (xy >= 0).all() and (xy[:, 0] <= floor.width_m).all() and (xy[:, 1] <= floor.depth_m).all()
    # People walk at about 1.4 m/s and pause: steps between scans of one phone
    p1 = xy[[r[1] == "p1" for r in rows]]
    steps = np.linalg.norm(np.diff(p1, axis=0), axis=1)
    assert 1.0 < np.percentile(steps[steps > 0.05], 50) < 1.8 and (steps < 0.05).mean() > 0.1
    # Signal falls with distance: RSSI and log-distance to the access point correlate negatively
    aps = positioning.Building(positioning.Scenario(), 0).aps
    d = np.linalg.norm(xy[:, None, :] - aps[None, :, :], axis=2)
    assert np.corrcoef(np.log10(d[heard]), rssi[heard])[0, 1] < -0.6
    # Seeded: the same seed writes the same file; another seed other phones on the same floor
    again = tmp_path / "again.csv"
    positioning.write_positioning_log(again, phones=["p1", "p2"], seconds=300, seed=3)
    assert again.read_bytes() == log.read_bytes()
    assert (positioning.Building(positioning.Scenario(), 0).aps == aps).all()


def test_a_ujiindoorloc_csv_converts_to_a_log_the_reader_takes(tmp_path: Path) -> None:
    src = tmp_path / "trainingData.csv"
    head = "WAP001,WAP002,WAP003,LONGITUDE,LATITUDE,FLOOR,BUILDINGID,SPACEID,RELATIVEPOSITION,USERID,PHONEID,TIMESTAMP"
    src.write_text("\n".join([
        head,
        "-70,100,-85,-7541.2643,4864921.9045,2,1,106,2,2,23,1371713733",
        "100,-60,-91,-7536.6212,4864934.2246,2,1,106,2,2,23,1371713733",  # same second, same phone
        "-75,-80,100,-7519.1524,4864949.4058,2,1,103,2,2,13,1371713690",
        "-72,100,-85,-7600.0,4864900.0,1,1,106,2,2,23,1371713800",  # another floor
    ]) + "\n")
    out = tmp_path / "uji.csv"
    assert positioning.convert_ujiindoorloc(src, out, floor=2) == 3
    reader = read_log(out).labels_as_numbers()
    chunk = reader.read_all()
    assert reader.channels == ("WAP001", "WAP002", "WAP003")
    by = chunk.by_device()
    ts, values, labels = by["phone-23"]
    assert np.all(np.diff(ts) > 0) and values[0, 1] == 100
    assert labels.shape == (2, 2) and labels[0] == pytest.approx([0.0, 0.0], abs=0.01)
    assert by["phone-13"][2][0] == pytest.approx([22.11, 27.50], abs=0.01)  # metres from the south-west corner
    with pytest.raises(ValueError, match="not a UJIIndoorLoc CSV"):
        positioning.convert_ujiindoorloc(out, tmp_path / "x.csv")


# ------------------------------------------------------------------- several numbers in one label


def test_labels_of_several_numbers_are_read_as_targets_and_windows_average_each(tmp_path: Path) -> None:
    from edge_agent.preprocess import PreprocessParams, make_windows

    log = tmp_path / "xy.csv"
    log.write_text("ts,device_id,a,label\n" + "".join(f"{i},d,{i},{i}.5;{10 * i}\n" for i in range(6)))
    chunk = read_log(log).labels_as_numbers().read_all()
    assert chunk.labels.shape == (6, 2) and chunk.labels[2].tolist() == [2.5, 20.0]
    params = PreprocessParams(sample_rate_hz=1.0, window_s=3.0, hop_s=1.0, channels=("a",), features="mean-v1")
    batch = make_windows(chunk.ts, chunk.values, chunk.labels, params)
    assert batch.labels.shape == (4, 2) and batch.labels[0].tolist() == [1.5, 10.0]
    jsonl = tmp_path / "xy.jsonl"
    jsonl.write_text("".join(orjson.dumps({"ts": i, "device_id": "d", "a": i, "label": [i, -i]}).decode() + "\n"
                             for i in range(3)))
    assert read_log(jsonl).labels_as_numbers().read_all().labels.tolist() == [[0, 0], [1, -1], [2, -2]]


@pytest.mark.parametrize(("label", "reason"), [
    ("1.5;x", "bad number '1.5;x' in column 'label'"),
    ("1.5;", "bad number '1.5;' in column 'label'"),
    ("nan;2", "non-finite value 'nan;2' in column 'label'"),
    ("1;2;3", "label '1;2;3' holds 3 numbers, the column's first label 2"),
])
def test_a_bad_target_names_its_file_and_line(tmp_path: Path, label: str, reason: str) -> None:
    log = tmp_path / "bad.csv"
    log.write_text(f"ts,device_id,a,label\n0,d,1,1;2\n1,d,2,{label}\n2,d,3,3;4\n")
    with pytest.raises(LogError) as err:
        read_log(log).labels_as_numbers().read_all()
    assert str(err.value).startswith(f"{log}:3: {reason}")
    skipped = read_log(log, on_error="skip").labels_as_numbers()
    assert skipped.read_all().labels.tolist() == [[1, 2], [3, 4]] and skipped.stats.rows_skipped == 1


def test_absent_readings_count_as_the_stated_value_in_features_and_normalization() -> None:
    from edge_agent.preprocess import PreprocessParams, extract_features, fit_normalization

    params = PreprocessParams(sample_rate_hz=1.0, window_s=1.0, hop_s=1.0, channels=("WAP001", "WAP002"),
                              features="mean-v1", absent_value=100.0, absent_as=-110.0)
    raw = np.array([[-60.0, 100.0], [-70.0, -90.0], [100.0, -100.0]], np.float32)
    mean, std = fit_normalization(raw, params)
    assert mean == pytest.approx((np.mean([-60, -70, -110]), np.mean([-110, -90, -100])))
    fitted = params.with_normalization(mean, std)
    got = extract_features(raw.reshape(3, 1, 2), fitted)
    want = (np.array([[-60, -110], [-70, -90], [-110, -100]]) - np.array(mean)) / np.array(std)
    assert got == pytest.approx(want.astype(np.float32), abs=1e-5)
    # An older agent reads manifests without the new keys: they are left out when unused
    plain = PreprocessParams(sample_rate_hz=1.0, window_s=2.0, hop_s=1.0, channels=("a",))
    assert "absent_value" not in plain.to_dict() and PreprocessParams.from_dict(fitted.to_dict()) == fitted
    with pytest.raises(ValueError, match="absent_value and absent_as go together"):
        PreprocessParams(sample_rate_hz=1.0, window_s=1.0, hop_s=1.0, channels=("a",), features="mean-v1",
                         absent_value=100.0)
    with pytest.raises(ValueError, match="fewer than 2 samples"):  # one reading has no spread
        PreprocessParams(sample_rate_hz=1.0, window_s=1.0, hop_s=1.0, channels=("a",), features="stats-v1")


# ------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = tmp_path_factory.mktemp("positioning") / "scans.csv"
    positioning.write_positioning_log(log, phones=[f"phone-{i}" for i in range(1, 6)], seconds=420, seed=5,
                                      start_ts=1_700_000_000.0)
    return log


def test_training_on_scans_gives_a_two_output_regressor_that_beats_the_mean(tmp_path: Path, scans: Path) -> None:
    from cloud_hub.data import db
    from cloud_hub.models import datasets, lifecycle
    from cloud_hub.models.training import TrainConfig

    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    out = lifecycle.train_from_logs(engine, [str(scans)], holdout=["phone-5"],
                                    config=TrainConfig(hidden=(64, 64), alpha=1e-3, max_iter=60))
    obj = out.to_obj()
    engine.dispose()
    params = datasets.default_params(str(scans))
    assert (params.features, params.window_size, params.hop_size, params.absent_value) == ("mean-v1", 3, 1, 100.0)
    assert obj["int8"]["task"] == "regression" and obj["int8"]["outputs"] == 2
    for key in ("mae", "mean_error", "median_error", "p90_error"):
        assert obj["int8"][key] > 0
    base = obj["baselines"]
    assert set(base) == {"mean", "knn3"}
    assert base["mean"]["median_error"] > 4 and base["knn3"]["median_error"] < base["mean"]["median_error"]
    assert obj["int8"]["median_error"] < 0.5 * base["mean"]["median_error"]
    assert obj["int8"]["median_error"] < 1.1 * obj["fp32"]["median_error"]
    # training windows: three copies of every window of the four training phones (offset augmentation)
    assert obj["train_windows"] == 3 * 4 * (420 - 2)


def test_train_cli_names_a_bad_absent_and_preprocessing_that_does_not_fit_the_scans(tmp_path: Path,
                                                                                      scans: Path) -> None:
    from typer.testing import CliRunner

    from cloud_hub.cli.app import app

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    res = CliRunner().invoke(app, ["train", str(scans), "--db", url, "--absent", "100"])
    assert res.exit_code == 2 and res.stderr.strip() == "cloud-hub: error: --absent: expected VALUE=AS (e.g. 100=-110), got '100'"
    res = CliRunner().invoke(app, ["train", str(scans), "--db", url, "--window", "1", "--features", "stats-v1"])
    assert res.exit_code != 0 and len(res.stderr.strip().splitlines()) == 1
    assert "fewer than 2 samples per window" in res.stderr and str(scans) in res.stderr


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_phones_through_a_real_broker_and_hub_get_positions_and_error_figures(procs, broker, prefix, tmp_path,
                                                                               scans) -> None:
    """A two-output regressor on phones' scans: every window is stored once with the model's x, y and
    the mean position as truth; `stats` reports the error figures from them."""
    import sqlalchemy as sa

    from cloud_hub.data import db, tables
    from cloud_hub.data.store import Store
    from cloud_hub.data.summaries import result_errors
    from cloud_hub.models import lifecycle
    from cloud_hub.models.training import TrainConfig
    from edge_agent import contract as c
    from tests.helpers import run_agent
    from tests.test_hub_cli import ServeProcess, invoke

    engine = db.make_engine(f"sqlite:///{tmp_path / 'train.sqlite'}")
    lifecycle.train_from_logs(engine, [str(scans)], holdout=["phone-5"], config=TrainConfig(hidden=(32,), max_iter=20))
    with engine.connect() as conn:
        bundle = Store(engine).get_model(conn, "default").bundle
    engine.dispose()
    model = tmp_path / "pos.emlb"
    model.write_bytes(bundle)
    assert c.decode_bundle(bundle).manifest.task == "regression"

    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    res = run_agent("replay", str(scans), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                    "--state-dir", str(tmp_path / "state"), "--json")
    assert res.returncode == 0, res.stderr
    report = orjson.loads(res.stdout)
    assert hub.signal(signal.SIGTERM) == 0
    hub_db = db.make_engine(url)
    with hub_db.connect() as conn:
        rows = conn.execute(sa.select(tables.results.c.device_id, tables.results.c.value, tables.results.c.truth)).all()
    hub_db.dispose()
    assert report["published"] == report["windows"] == len(rows) == 5 * (420 - 2)
    truths = [[float(x) for x in t.split(";")] for _, _, t in rows]
    assert all(len(orjson.loads(v)) == 2 for _, v, _ in rows) and all(len(t) == 2 for t in truths)
    assert len({tuple(t) for t in truths}) > 0.5 * len(rows)  # window means, not a few repeated labels
    errors = result_errors([v for _, v, _ in rows], [t for _, _, t in rows])
    code, out, err = invoke("stats", "--db", url, "--json", "--bucket", "minute")
    assert code == 0, err
    stats = orjson.loads(out)
    assert stats["error"]["n"] == len(rows) and stats["error"]["median"] == pytest.approx(float(np.median(errors)))
    assert stats["accuracy"] is None and stats["labelled"] == 0  # a regressor's results are not "wrong classes"
    mine = [e for (d, _, _), e in zip(rows, errors, strict=True) if d == "phone-5"]
    assert stats["devices"]["phone-5"]["error"]["p90"] == pytest.approx(float(np.percentile(mine, 90)))
    assert sum(b["error"]["n"] for b in stats["buckets"]) == len(rows)
    held = stats["model_versions"]["1"]["held_out"]["error"]
    assert held["n"] == len(rows)  # the hub never saw this model trained: no device counts as trained on
    code, out, _ = invoke("stats", "--db", url)
    assert code == 0 and "error mean/median/p90" in out


def test_a_truth_of_many_outputs_is_fitted_to_what_the_contract_carries() -> None:
    """Targets written in full ("x;y") unless that is over 256 characters: then to 6 digits, else unknown. A
    longer truth was refused by the hub with the whole batch (and by the encoder now), which kept it for good."""
    import numpy as np

    from edge_agent import contract as c
    from edge_agent.device.pipeline import _truths

    few, many, too_many = np.array([[1.5, 2.25]]), np.full((1, 16), 1 / 3), np.full((1, 40), 1 / 3)
    assert _truths(few) == ["1.5;2.25"]
    [fitted] = _truths(many)
    assert fitted is not None and len(fitted) <= c.MAX_LABEL_CHARS and fitted.split(";") == ["0.333333"] * 16
    assert _truths(too_many) == [None]
    for truth in (*_truths(few), fitted):
        c.ResultBatch("d", (c.Result(1, 0.0, 1.0, 1, 0.5, value=(1.0,), truth=truth),)).encode()
