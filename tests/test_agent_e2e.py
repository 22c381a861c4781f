"""The edge agent end to end through a real mosquitto: replay, broker outage, agent crash, bad logs.

No hub runs here, so these agents deliver with ``--until broker`` (a row leaves the outbox at the
broker's PUBACK): test_delivery_e2e.py covers the hub's receipts.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from edge_agent.device.jobs import replay
from edge_agent.preprocess import PreprocessParams
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import load_settings
from tests.helpers import (
    Collector,
    agent_cmd,
    expected_keys,
    make_bundle,
    make_log,
    outbox,
    run_agent,
    wait_for,
)


@pytest.fixture(scope="module")
def log_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PreprocessParams]:
    root = tmp_path_factory.mktemp("agent-e2e")
    log = make_log(root / "fleet.csv", seconds=40)
    bundle = make_bundle(log)
    model = root / "v1.emlb"
    model.write_bytes(bundle.encode())
    return log, model, PreprocessParams.from_dict(bundle.manifest.preprocess)


def test_a_large_batch_is_inferred_in_slices_with_the_same_predictions(log_and_model) -> None:
    """``predict`` runs onnxruntime on at most INFER_SLICE windows at a time (its arena grows with the
    batch); the predictions are those of the batch in one run, in order."""
    import numpy as np

    from edge_agent import runner as r
    _, model, params = log_and_model
    bundle = c.decode_bundle(model.read_bytes())
    x = np.random.default_rng(3).normal(size=(2 * r.INFER_SLICE + 17, params.n_features)).astype(np.float32)
    model_runner = r.ModelRunner(bundle)
    whole = model_runner.session.run(None, {bundle.manifest.input_name: x})
    probs = next(o for o, meta in zip(whole, model_runner.session.get_outputs(), strict=True) if "prob" in meta.name)
    pred = model_runner.predict(x)
    assert pred.labels is not None and pred.confidence is not None and len(pred.labels) == len(x)
    np.testing.assert_allclose(pred.confidence, probs.max(axis=1), rtol=1e-6)
    assert pred.labels == [bundle.manifest.labels[i] for i in probs.argmax(axis=1)]


def test_a_two_output_regressor_is_inferred_in_slices_window_by_window(tmp_path: Path) -> None:
    """A regressor's output is [windows * outputs, 1]: slices keep each window's outputs together."""
    import numpy as np

    from edge_agent import runner as r
    rng = np.random.default_rng(0)
    rows = ["ts,device_id,x,y,label"]
    for dev, amp in (("r1", 1.0), ("r2", 2.0), ("r3", 1.5)):
        for i in range(1500):
            t, a = i / 50, amp * (1 + (i // 250) % 3)
            rows.append(f"{t:.2f},{dev},{a * np.sin(6 * t):.4f},{rng.normal():.4f},{a:.2f};{3 - a:.2f}")
    (tmp_path / "xy.csv").write_text("\n".join(rows) + "\n")
    bundle = make_bundle(tmp_path / "xy.csv", holdout=("r3",))
    model_runner = r.ModelRunner(bundle)
    x = rng.normal(size=(2 * r.INFER_SLICE + 17, bundle.manifest.n_features)).astype(np.float32)
    whole = model_runner.session.run(None, {bundle.manifest.input_name: x})[0]
    pred = model_runner.predict(x)
    assert pred.values is not None and pred.values.shape == (len(x), 2)
    np.testing.assert_array_equal(pred.values, np.asarray(whole).reshape(len(x), 2))


def _settings(broker: LocalBroker, prefix: str, state: Path, **kw) -> AgentSettings:
    return load_settings(AgentSettings, env_prefix="EDGE_AGENT", environ={},
                         flags={"broker": broker.url, "prefix": prefix, "state_dir": str(state), "receipts": False,
                                **kw})


def test_replay_delivers_one_result_per_window_per_device(shared_broker, prefix, tmp_path, log_and_model) -> None:
    log, model, params = log_and_model
    expected = expected_keys(log, params)
    assert len({d for d, _ in expected}) == 3 and len(expected) > 90
    sub = Collector(shared_broker.url, c.Topics(prefix), f"{prefix}-sub")
    report = replay(_settings(shared_broker, prefix, tmp_path / "state"), [str(log)], model=str(model))
    got = sub.wait_for(expected)
    sub.stop()
    assert got == expected
    assert sorted(sub.keys) == sorted(expected), "no key twice on the wire in a fault-free run"
    assert (report.devices, report.windows, report.published) == (3, len(expected), len(expected))
    assert report.readings == 3 * 40 * 50
    some = next(iter(sub.results.values()))
    assert some.model_version == 1 and some.label in ("idle", "walk", "run", "lift") and some.truth is not None
    assert 0.0 <= some.confidence <= 1.0 and some.end > some.start


def test_replay_cli_json_and_rerun_gives_identical_keys(shared_broker, prefix, tmp_path, log_and_model) -> None:
    log, model, params = log_and_model
    sub = Collector(shared_broker.url, c.Topics(prefix), f"{prefix}-sub")
    args = ("replay", str(log), "--broker", shared_broker.url, "--model", str(model), "--prefix", prefix,
            "--state-dir", str(tmp_path / "s"), "--json", "--features", "all", "--until", "broker")
    first = run_agent(*args)
    assert first.returncode == 0, first.stderr
    summary = orjson.loads(first.stdout)
    assert {"devices", "readings", "windows", "published", "seconds"} <= summary.keys()
    again = run_agent(*args)
    assert again.returncode == 0, again.stderr
    expected = expected_keys(log, params)
    sub.wait_for(expected)
    sub.stop()
    assert sub.distinct() == expected
    assert len(sub.keys) == 2 * len(expected), "the re-run produced exactly the same keys again"
    assert all(r.features is not None and len(r.features) == params.n_features for r in sub.results.values())


def test_broker_stopped_mid_replay_loses_nothing(procs, broker, prefix, tmp_path, log_and_model) -> None:
    log, model, params = log_and_model
    expected = expected_keys(log, params)
    sub = Collector(broker.url, c.Topics(prefix), f"{prefix}-sub")
    state = tmp_path / "s"
    proc = procs.popen(
        agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                  "--state-dir", str(state), "--speed", "8", "--json", "--until", "broker"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.1"})
    sub.messages.get(timeout=60)  # results are flowing
    broker.stop()
    before = len(_pending(state))
    wait_for(lambda: len(_pending(state)) >= before + 10 or proc.poll() is not None,
             what="the agent to keep queueing into its outbox while the broker is away")
    broker.start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sub.wait_for(expected) == expected
    sub.stop()
    assert orjson.loads(out)["windows"] == len(expected)


def _pending(state: Path) -> set[tuple[str, int]]:
    return set(outbox(state))


def test_agent_killed_mid_replay_delivers_pending_after_restart(procs, broker, prefix, tmp_path,
                                                                log_and_model) -> None:
    """Results written while the broker is unreachable survive a SIGKILL and go out after the restart."""
    log, model, params = log_and_model
    expected = expected_keys(log, params)
    state = tmp_path / "s"
    args = agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                     "--state-dir", str(state), "--speed", "8", "--until", "broker")
    broker.stop()
    proc = procs.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: len(_pending(state)) >= 20 or proc.poll() is not None, timeout=60,
             what="the agent to queue while the broker is away")
    assert proc.poll() is None, "the agent queues while the broker is away"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pending = _pending(state)
    assert len(pending) >= 20 and pending < expected
    broker.start()
    sub = Collector(broker.url, c.Topics(prefix), f"{prefix}-sub")
    restarted = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr
    got = sub.wait_for(expected)
    sub.stop()
    assert pending <= got and got == expected
    assert _pending(state) == set()


def test_malformed_log_names_file_and_line(shared_broker, prefix, tmp_path, log_and_model) -> None:
    _, model, _ = log_and_model
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,device_id,ax,ay,az,wx,wy,wz,label\n0.00,d,1,2,3,4,5,6,A\n0.02,d,1,2,oops,4,5,6,A\n")
    res = run_agent("replay", str(bad), "--broker", shared_broker.url, "--model", str(model),
                    "--prefix", prefix, "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 5
    assert "bad.csv:3" in res.stderr and "oops" in res.stderr
    skipped = run_agent("replay", str(bad), "--broker", shared_broker.url, "--model", str(model),
                        "--prefix", prefix, "--state-dir", str(tmp_path / "s"), "--skip-bad-lines", "--json",
                        "--until", "broker")
    assert skipped.returncode == 0, skipped.stderr
    report = orjson.loads(skipped.stdout)
    assert report["skipped_lines"] == 1 and report["skipped_by_reason"] == {"bad number": 1}
    assert "bad.csv:3" in skipped.stderr
    assert "skipped 1 bad line in all (bad number: 1)" in skipped.stderr, skipped.stderr  # without --json too


def test_without_model_the_agent_waits_for_the_topic_then_says_why(shared_broker, prefix, tmp_path,
                                                                   log_and_model) -> None:
    log, _, _ = log_and_model
    res = run_agent("replay", str(log), "--broker", shared_broker.url, "--prefix", prefix,
                    "--state-dir", str(tmp_path / "s"), env={"EDGE_AGENT_MODEL_WAIT_S": "1"})
    assert res.returncode == 4
    assert f"no model on {prefix}/models/default within 1 s" in res.stderr and "nothing is published there" in res.stderr
    assert "cloud-hub publish" in res.stderr


def test_a_log_missing_a_channel_blames_the_data_not_the_model(shared_broker, prefix, tmp_path, log_and_model) -> None:
    log, model, _ = log_and_model
    lines = log.read_text().splitlines()
    cut = lines[0].split(",").index("wz")
    short = tmp_path / "no-wz.csv"
    short.write_text("\n".join(",".join(f for i, f in enumerate(line.split(",")) if i != cut) for line in lines))
    from tests.test_ingest import Publisher

    pub = Publisher(shared_broker, f"{prefix}-model-pub")
    pub.publish(c.Topics(prefix).model("default"), model.read_bytes(), c.MODEL_DELIVERY)
    pub.wait_acked()
    pub.stop()
    for how in (["--model", str(model)], []):  # a file the operator names, and the model topic
        res = run_agent("replay", str(short), "--broker", shared_broker.url, "--prefix", prefix,
                        "--state-dir", str(tmp_path / "s"), *how, env={"EDGE_AGENT_INSECURE_ALLOW_UNSIGNED": "true"})
        assert res.returncode == 4, res.stderr
        assert "needs channels ['wz'] that the source does not provide" in res.stderr, res.stderr
        assert "The data is at fault, not the model" in res.stderr and "Publish a good model" not in res.stderr


def test_invalid_device_id_in_a_log_is_an_input_error(shared_broker, prefix, tmp_path, log_and_model) -> None:
    _, model, _ = log_and_model
    bad = tmp_path / "ids.csv"
    bad.write_text("ts,device_id,ax,ay,az,wx,wy,wz\n" + "".join(
        f"{i / 50:.2f},dev a,1,2,3,4,5,6\n" for i in range(200)))
    state = tmp_path / "s"
    res = run_agent("replay", str(bad), "--broker", shared_broker.url, "--model", str(model),
                    "--prefix", prefix, "--state-dir", str(state))
    assert res.returncode == 5, res.stderr
    assert "ids.csv" in res.stderr and "invalid device id 'dev a'" in res.stderr
    assert _pending(state) == set(), "nothing unsendable reached the outbox"


def test_sigterm_while_waiting_for_a_dead_broker_exits_130_keeping_results(procs, tmp_path, log_and_model) -> None:
    log, model, params = log_and_model
    from cloud_hub.tools.local_broker import free_port

    state = tmp_path / "s"
    proc = procs.popen(agent_cmd("replay", str(log), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                                 "--model", str(model), "--state-dir", str(state)),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The replay is done producing and waits for receipts that cannot come.
    produced = len(expected_keys(log, params))
    wait_for(lambda: len(_pending(state)) == produced or proc.poll() is not None, timeout=60,
             what="every result in the outbox")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "kept in the outbox" in err
    assert len(_pending(state)) == produced


def test_readings_out_of_range_drop_their_windows_and_the_replay_delivers_the_rest(
        shared_broker, prefix, tmp_path, log_and_model) -> None:
    """A hostile sensor's finding: a dead register reading 4294967295 made the features inf/NaN; with --features all
    the agent stopped (exit 5: "result.features must hold only finite numbers") having delivered nothing, and again
    at every start; without, it published confident labels computed from nothing. Now the windows that cover such a
    reading are dropped and counted, said in one line naming the device, the channel and the reading, and every
    other window is delivered; no numpy warning reaches the operator."""
    import numpy as np

    log, model, params = log_and_model
    lines = log.read_text().splitlines()
    header = lines[0].split(",")
    ts_col, dev_col, ax = header.index("ts"), header.index("device_id"), header.index("ax")
    bursts = {"dev-a": (10.0, 10.5, "4294967295"), "dev-b": (26.0, 26.04, "1e30"), "dev-c": (30.0, 30.3, "3.4e38")}
    bad: dict[str, list[float]] = {d: [] for d in bursts}
    out = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        t, dev = float(cells[ts_col]), cells[dev_col]
        lo, hi, reading = bursts[dev]
        if lo <= t < hi:
            cells[ax] = reading
            bad[dev].append(t)
        out.append(",".join(cells))
    hostile = tmp_path / "register.csv"
    hostile.write_text("\n".join(out) + "\n")
    last = (params.window_size - 1) / params.sample_rate_hz  # a window's last reading, after its first
    dropped = {(d, s) for d, s in expected_keys(hostile, params)
               if any(s / 1000 - 1e-6 <= t <= s / 1000 + last + 1e-6 for t in bad[d])}
    assert len(dropped) >= 3 and all(bad.values())
    sub = Collector(shared_broker.url, c.Topics(prefix), f"{prefix}-sub")
    res = run_agent("replay", str(hostile), "--broker", shared_broker.url, "--model", str(model), "--prefix", prefix,
                    "--state-dir", str(tmp_path / "s"), "--json", "--features", "all", "--until", "broker")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = orjson.loads(res.stdout)
    wanted = expected_keys(hostile, params) - dropped
    got = sub.wait_for(wanted)
    sub.stop()
    assert got == wanted and sub.distinct() == wanted, "the other windows delivered, none of the dropped"
    assert all(np.isfinite(r.features).all() for r in sub.results.values())
    assert summary["dropped_windows"] == len(dropped) and summary["published"] == len(wanted)
    said = [ln for ln in res.stderr.splitlines() if "standard deviations" in ln]
    assert len(said) == 1 and "4.294967e+09 in ax" in said[0] and "dev-a" in said[0], res.stderr[-2000:]
    assert "RuntimeWarning" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
