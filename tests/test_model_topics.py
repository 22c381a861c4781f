"""What a device takes from its model topics, with a real agent and mosquitto: the model topic and the device's
canary topic carry this model only, and a canary bundle the device refuses does not hold back the fleet's."""

from __future__ import annotations

import os
import subprocess

import pytest

from cloud_hub.models.signing import keygen, load_private_key, sign_bundle
from edge_agent import contract as c
from edge_agent import exits
from tests.helpers import (
    LIVE_AGENT_ENV,
    StatusWatch,
    live_agent_cmd,
    make_bundle,
    make_log,
    publish_retained,
    wait_for,
)


@pytest.mark.slow
def test_a_model_topic_carries_its_own_model_and_a_refused_canary_falls_back_to_the_fleets(
        procs, shared_broker, prefix, tmp_path) -> None:
    """A hostile peer's finding: a bundle of another model (signed by the same hub) retained on this model's topic
    was installed, saved as this model and served after restarts. And a canary bundle the device refused kept
    the device from every later fleet model ("model refused ... still serving v1" at each update)."""
    priv, pub, _ = keygen(tmp_path / "hub.pem")
    key = load_private_key(priv)
    log = make_log(tmp_path / "train.csv", devices=("trn-1", "trn-2"), seconds=30)
    v1 = sign_bundle(make_bundle(log, holdout=("trn-2",)), key)
    v2 = sign_bundle(make_bundle(make_log(tmp_path / "more.csv", devices=("trn-1", "trn-2"), seconds=40), version=2,
                                 holdout=("trn-2",)), key)
    other = sign_bundle(make_bundle(make_log(tmp_path / "other.csv", devices=("trn-1", "trn-2"), seconds=35), version=7,
                                    name="other", holdout=("trn-2",)), key)  # its own ONNX: not v1's copy
    assert other.manifest.sha256 != v1.manifest.sha256
    topics = c.Topics(prefix)
    model_file = tmp_path / "v1.emlb"
    model_file.write_bytes(v1.encode())
    watch = StatusWatch(shared_broker.url, prefix, f"{prefix}-watch")
    status_where = watch.where

    agent_log = tmp_path / "agent.log"
    try:
        with open(agent_log, "wb") as out:
            agent = procs.popen(live_agent_cmd(shared_broker.url, prefix, tmp_path / "state", pub, "--model", str(model_file)),
                                stdout=subprocess.DEVNULL, stderr=out, env={**os.environ, **LIVE_AGENT_ENV})
        wait_for(status_where(lambda s: s.state == c.ONLINE and s.model_version == 1), 60, "the agent on v1")
        publish_retained(shared_broker.url, topics.model("default"), other.encode())
        wait_for(status_where(lambda s: s.last_error is not None and "the bundle is model 'other' v7" in s.last_error),
                 60, "the other model refused")
        watch.clear()
        wait_for(status_where(lambda s: s.model_version == 1 and s.model_name == "default"), 30, "v1 still serving")
        assert (tmp_path / "state" / "model-default.emlb").read_bytes() == v1.encode()  # not saved as this model

        publish_retained(shared_broker.url, topics.device_model("live-1"), b"garbage, not a bundle")
        wait_for(status_where(lambda s: s.last_error is not None and "bad magic" in s.last_error), 60,
                 "the canary bundle refused")
        publish_retained(shared_broker.url, topics.model("default"), v2.encode())
        wait_for(status_where(lambda s: s.model_version == 2), 60, "the fleet's v2 despite the refused canary")
        assert agent.poll() is None, agent_log.read_text()
        agent.terminate()
        assert agent.wait(30) == 0, agent_log.read_text()
        assert "Traceback" not in agent_log.read_text()

        # a state dir where an older build kept another model: not served at the next start
        (tmp_path / "state" / "model-default.emlb").write_bytes(other.encode())
        publish_retained(shared_broker.url, topics.device_model("live-1"), b"")
        publish_retained(shared_broker.url, topics.model("default"), b"")  # nothing to fall back to: it says why
        res = subprocess.run(live_agent_cmd(shared_broker.url, prefix, tmp_path / "state", pub), capture_output=True,
                             text=True, timeout=120, env={**os.environ, **LIVE_AGENT_ENV, "EDGE_AGENT_MODEL_WAIT_S": "0.1",
                                                          "EDGE_AGENT_CONNECT_TIMEOUT_S": "5"})
        assert res.returncode == exits.MODEL, res.stderr
        assert "persisted model" in res.stderr and "the bundle is model 'other' v7" in res.stderr, res.stderr
    finally:
        watch.stop()
        publish_retained(shared_broker.url, topics.model("default"), b"")
        publish_retained(shared_broker.url, topics.device_model("live-1"), b"")
