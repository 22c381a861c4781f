"""Hostile input (issue 29): every finding of the fuzzing run as a regression test with its input, and
the property each decoder keeps: for any bytes, a valid object or the contract's own error, never
another exception (the hub turns ContractError into a dead letter, the agent into a refusal or exit 5)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import queue
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.data import tables
from cloud_hub.models.signing import keygen, load_private_key, sign_bundle, sign_round
from cloud_hub.settings import HubSettings
from edge_agent import contract as c
from edge_agent import exits
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.device.bundle import (
    BundleRejected,
    check_bundle,
    check_round,
    key_id,
    load_public_key,
    verify_bundle,
)
from edge_agent.mqtt import Message, MqttLink
from edge_agent.preprocess import PreprocessParams
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.broker import BrokerURL
from edge_agent.settings.loader import SettingsError, load_settings
from edge_agent.sources import LogError, read_log
from fuzz.targets import equivalent
from tests.helpers import (
    LIVE_AGENT_ENV,
    StatusWatch,
    live_agent_cmd,
    make_bundle,
    make_log,
    publish_retained,
    wait_for,
)

# --------------------------------------------------------------------------- payload builders


def _header_of(payload: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    magic, n = struct.unpack_from(">4sI", payload)
    return magic, orjson.loads(payload[8:8 + n]), payload[8 + n:]


def _with_head(magic: bytes, head: bytes, body: bytes) -> bytes:
    return magic + struct.pack(">I", len(head)) + head + body


def _with_field(payload: bytes, key: str, raw_value: bytes) -> bytes:
    """``payload`` (a bundle, an announcement or an update) with one header field's JSON replaced as is."""
    magic, header, body = _header_of(payload)
    header.pop(key, None)
    head = orjson.dumps(header)[:-1] + b',"' + key.encode() + b'":' + raw_value + b"}"
    return _with_head(magic, head, body)


def _signed(payload: bytes, private_pem: Path, what: str = "round") -> bytes:
    """``payload`` with its header signed as it stands (whatever it holds) by the key at ``private_pem``."""
    magic, header, body = _header_of(payload)
    priv = load_private_key(private_pem)
    header["key_id"] = key_id(priv.public_key())
    signed = c.signed_part(header, what)
    header["signature"] = base64.b64encode(priv.sign(signed.data)).decode()
    return _with_head(magic, orjson.dumps(header), body)


def _announcement(**over: Any) -> cr.Announcement:
    rng = np.random.default_rng(0)
    weights = {"coef_0": rng.normal(0, 0.5, (4, 3)).astype(np.float32), "intercept_0": np.zeros(3, np.float32)}
    fields: dict[str, Any] = dict(round_id=1, model="default", base_version=1, base_sha256="a" * 64,
                                  task="classification", participants=("dev-1",), deadline=2e9,
                                  trainable=("coef_0", "intercept_0"))
    fields.update(over)
    return cr.announcement(cr.RoundPlan(**fields), weights)


def _update(**over: Any) -> cu.Update:
    specs, arrays = cu.encode_update_delta({"coef_0": np.full((4, 3), 0.01, np.float32)}, "int8")
    fields: dict[str, Any] = dict(round_id=1, device_id="dev-1", model="default", base_version=1, n_examples=50,
                                  loss_before=1.0, loss_after=0.5, metric_before=0.5, metric_after=0.7, norm=0.1,
                                  epochs=1, seconds=0.1, ranges=((0.0, 1.0, -1.0, 1.0),), encoding="int8",
                                  tensors=specs, delta=arrays, sent=1.0)
    fields.update(over)
    return cu.Update(**fields)


def _manifest(**over: Any) -> c.Manifest:
    fields: dict[str, Any] = dict(name="default", version=3, sha256=hashlib.sha256(b"onnx").hexdigest(),
                                  task="classification", labels=("A", "B"), n_features=12, input_name="X",
                                  preprocess={"window_s": 2.0}, created=1.5, metrics={"accuracy": 0.9})
    fields.update(over)
    return c.Manifest(**fields)


ANNOUNCEMENT = _announcement().encode()
UPDATE = _update().encode()
BUNDLE = c.Bundle(_manifest(), b"onnx").encode()
STATUS = c.Status("dev-1", c.ONLINE, 1.0, "default", 1, "ab" * 32, 3, None, 0.1, 0.9).encode()
RESULTS = c.ResultBatch("dev-1", (c.Result(1, 0.0, 1.0, 1, 0.5, "A", 0.9, None, "B", (1.0, 2.0)),)).encode()
RECEIPT = c.Receipt.of("dev-1", [1, 2, 3]).encode()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


# --------------------------------------------------------------------------- the findings, one by one


@pytest.mark.parametrize(("payload", "decode", "field"), [
    (ANNOUNCEMENT, cr.decode_announcement, "encoding"),
    (UPDATE, cu.decode_update, "encoding"),
    (ANNOUNCEMENT, cr.decode_announcement, "kind"),
    (UPDATE, cu.decode_update, "kind"),
    (ANNOUNCEMENT, cr.decode_announcement, "task"),
    (ANNOUNCEMENT, cr.decode_announcement, "base_sha256"),
    (ANNOUNCEMENT, cr.decode_announcement, "weights_sha256"),
    (BUNDLE, c.decode_bundle, "task"),
    (BUNDLE, c.decode_bundle, "sha256"),
])
@pytest.mark.parametrize("value", [b"[]", b"{}"])
def test_a_list_or_object_where_a_word_belongs_is_a_contract_error_naming_the_field(
        payload: bytes, decode: Callable[[bytes], object], field: str, value: bytes) -> None:
    """`"encoding":[]` raised TypeError (unhashable) in `not in ENCODINGS`: federate died on it, for good."""
    with pytest.raises(c.ContractError, match=rf"\.{field} must be"):
        decode(_with_field(payload, field, value))


@pytest.mark.parametrize("trainable", [b'[["coef_0"]]', b"[{}]", b'["coef_0", [1]]'])
def test_an_unhashable_trainable_is_a_contract_error(trainable: bytes) -> None:
    with pytest.raises(c.ContractError, match="round.trainable"):
        cr.decode_announcement(_with_field(ANNOUNCEMENT, "trainable", trainable))


def test_a_status_state_that_is_a_list_is_a_contract_error() -> None:
    with pytest.raises(c.ContractError, match="status.state"):
        c.decode_status(STATUS.replace(b'"state":"online"', b'"state":[[]]'))


DEEP = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize(("decode", "payload"), [
    (c.decode_status, STATUS.replace(b'"state":"online"', b'"state":' + DEEP)),
    (c.decode_status, STATUS.replace(b'"v":1', b'"v":' + DEEP)),
    (c.decode_results, RESULTS.replace(b'"v":1', b'"v":' + DEEP)),
    (c.decode_results, RESULTS.replace(b'"seq":1', b'"seq":' + DEEP)),
    (c.decode_results, RESULTS.replace(b'"label":"A"', b'"label":' + DEEP)),
    (c.decode_results, RESULTS.replace(b'"features":[1.0,2.0]', b'"features":[1.0,' + DEEP + b"]")),
    (c.decode_receipt, RECEIPT.replace(b'"device_id":"dev-1"', b'"device_id":' + DEEP)),
    (cu.decode_update, _with_field(UPDATE, "model", DEEP)),
    (cu.decode_update, _with_field(UPDATE, "n", DEEP)),
    (cr.decode_announcement, _with_field(ANNOUNCEMENT, "participants", b"[" + DEEP + b"]")),
    (cr.decode_announcement, _with_field(ANNOUNCEMENT, "tensors", b'[{"name":"coef_0","shape":' + DEEP + b"}]")),
    (c.decode_bundle, _with_field(BUNDLE, "metrics", _nested(300))),
    (c.decode_bundle, _with_field(BUNDLE, "training", _nested(1000))),
])
def test_json_nested_1000_deep_is_a_contract_error_for_every_decoder(decode: Callable[[bytes], object],
                                                                      payload: bytes) -> None:
    """Building the error message (``{value!r}``) raised RecursionError; a manifest past 254 levels raised
    TypeError in ``signing_bytes``, past ~1,000 RecursionError in ``asdict``."""
    with pytest.raises(c.ContractError):
        decode(payload)


@pytest.mark.parametrize("depth", [300, 1000])
def test_a_deeply_nested_manifest_is_refused_before_its_signature_is_computed(depth: int) -> None:
    payload = _with_field(BUNDLE, "metrics", _nested(depth))
    with pytest.raises(BundleRejected, match="nested more than"):
        check_bundle(payload, trusted_key=None, allow_unsigned=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    priv, pub, _ = keygen(root / "hub.pem")
    other, _, _ = keygen(root / "intruder.pem")
    return priv, pub, other


def test_a_round_announcement_is_checked_against_its_signature_before_it_is_read(keys) -> None:
    """Decoded before the signature was checked, a trusted key did not protect a device from what it held."""
    priv, pub, other = keys
    trusted = load_public_key(pub)
    bad = _with_field(ANNOUNCEMENT, "encoding", b"[]")
    with pytest.raises(BundleRejected, match="not the trusted key"):
        check_round(_signed(bad, other), trusted_key=trusted, allow_unsigned=False)
    forged = _with_field(_signed(ANNOUNCEMENT, priv), "encoding", b"{}")  # signed, then altered
    with pytest.raises(BundleRejected, match="bad signature"):
        check_round(forged, trusted_key=trusted, allow_unsigned=False)
    with pytest.raises(BundleRejected, match="unsigned"):
        check_round(bad, trusted_key=trusted, allow_unsigned=False)
    # the hub's own key on a malformed plan: refused as malformed, without a TypeError
    with pytest.raises(BundleRejected, match=r"malformed round announcement: round.encoding must be"):
        check_round(_signed(bad, priv), trusted_key=trusted, allow_unsigned=False)
    good = _announcement()
    signed = cr.Announcement(sign_round(good.plan, load_private_key(priv)), good.weights).encode()
    assert check_round(signed, trusted_key=trusted, allow_unsigned=False).plan.round_id == 1


def test_a_bundle_is_checked_against_its_signature_before_its_manifest_is_read(keys) -> None:
    priv, pub, other = keys
    trusted = load_public_key(pub)
    bad = _with_field(BUNDLE, "task", b"{}")
    with pytest.raises(BundleRejected, match="not the trusted key"):
        check_bundle(_signed(bad, other, "manifest"), trusted_key=trusted, allow_unsigned=False)
    with pytest.raises(BundleRejected, match="bad signature"):
        check_bundle(_with_field(_signed(BUNDLE, priv, "manifest"), "labels", b'["C"]'), trusted_key=trusted,
                     allow_unsigned=False)
    with pytest.raises(BundleRejected, match="malformed bundle: manifest.task must be"):
        check_bundle(_signed(bad, priv, "manifest"), trusted_key=trusted, allow_unsigned=False)
    good = sign_bundle(c.decode_bundle(BUNDLE), load_private_key(priv))
    assert check_bundle(good.encode(), trusted_key=trusted, allow_unsigned=False) == good


# --------------------------------------------------------------------------- manifests within sane bounds


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> c.Bundle:
    log = make_log(tmp_path_factory.mktemp("hostile") / "train.csv", devices=("trn-1", "trn-2"), seconds=30)
    return make_bundle(log, holdout=("trn-2",))


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("sample_rate_hz", 1e308, "sample_rate_hz must be > 0 and at most"),  # OverflowError in round()
    ("hop_s", 1e308, "hop_s=1e+308"),
    ("window_s", 1e308, "window_s=1e+308"),
    ("window_s", 1e5, "window_s=100000.0"),  # 9.4 s and 1.2 GB naming its features
])
def test_preprocessing_parameters_past_sane_bounds_are_refused(v1, key: str, value: float, reason: str) -> None:
    manifest = dataclasses.replace(v1.manifest, preprocess={**v1.manifest.preprocess, key: value})
    with pytest.raises(ValueError, match=re.escape(reason)):
        PreprocessParams.from_dict(manifest.preprocess)
    with pytest.raises(BundleRejected, match=re.escape(reason)):
        verify_bundle(c.Bundle(manifest, v1.model).encode(), trusted_key=None, allow_unsigned=True)


def test_a_classifier_labelled_regression_is_refused(v1) -> None:
    """It raised a bare ValueError (text labels as float32) from the warm-up."""
    manifest = dataclasses.replace(v1.manifest, task="regression")
    with pytest.raises(BundleRejected, match="regressor's output"):
        verify_bundle(c.Bundle(manifest, v1.model).encode(), trusted_key=None, allow_unsigned=True)


# --------------------------------------------------------------------------- labels, settings


def test_numeric_labels_have_one_shape_however_the_log_is_chunked(tmp_path) -> None:
    """`x;y` labels after a stretch of unlabelled rows: `read_all()` raised ValueError with chunk_rows=2."""
    log = tmp_path / "pos.csv"
    log.write_text("ts,device_id,x,label\n0,d,1,\n1,d,1,\n2,d,1,\n3,e,1,\n4,d,1,1;2\n5,d,1,\n6,d,1,3;4\n")
    expected = [[np.nan, np.nan]] * 4 + [[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]]
    for rows in (1, 2, 3, 4, 100):
        reader = read_log(log, chunk_rows=rows)
        assert reader.labels_are_numbers()
        whole = reader.labels_as_numbers().read_all()
        assert whole is not None and whole.labels is not None
        np.testing.assert_array_equal(whole.labels, np.array(expected), err_msg=f"chunk_rows={rows}")


def test_a_gz_log_whose_header_sets_a_reserved_flag_is_refused_naming_the_file(tmp_path) -> None:
    """Found by fuzzing the gunzip (fuzz/corpus/log_gz/390ccfa0...): gzip.open reads such a file, zlib refuses it
    as RFC 1952 asks. The reader keeps zlib's answer, as a LogError naming the file, never another error."""
    data = gzip.compress(b"ts,device_id,x\n0,d,1\n", mtime=0)
    path = tmp_path / "flags.csv.gz"
    path.write_bytes(data[:3] + bytes([data[3] | 0x40]) + data[4:])  # FLG bit 6: reserved
    with pytest.raises(LogError, match=r"flags\.csv\.gz: not a valid gzip file \(.*unknown header flags"):
        read_log(path).read_all()


@pytest.mark.parametrize(("cls", "flags", "field"), [
    (AgentSettings, {"broker": "mqtt://["}, "--broker"),
    (AgentSettings, {"broker": "mqtt://host:0"}, "--broker"),
    (AgentSettings, {"ca_file": "~nosuchuser/x"}, "--ca-file"),
    (AgentSettings, {"state_dir": "~nosuchuser/x"}, "--state-dir"),
    (AgentSettings, {"trusted_key": "~nosuchuser/x"}, "--trusted-key"),
    (AgentSettings, {"sim_rate_hz": "nan"}, "--sim-rate-hz"),
    (HubSettings, {"db": "9://:."}, "--db"),
    (HubSettings, {"db": "sqlite:///~nosuchuser/hub.sqlite"}, "--db"),
    # a new operator's finding: a driver error naming no source (CLOUD_HUB_DB)
    (HubSettings, {"db": "mysql://x@127.0.0.1/db"}, r"--db: db 'mysql://x@127.0.0.1/db': no driver"),
    (HubSettings, {"http": "h:²"}, "--http"),
    (HubSettings, {"broker": "mqtt://["}, "--broker"),
])
def test_every_settings_mistake_is_a_settings_error_naming_its_flag(cls: type, flags: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        load_settings(cls, env_prefix="X", flags=flags, environ={})


@pytest.mark.parametrize("config", ["bad.toml", "folder", "~nosuchuser/agent.toml"])
def test_a_config_file_that_cannot_be_read_is_a_settings_error(tmp_path, config: str) -> None:
    (tmp_path / "bad.toml").write_bytes(b'broker = "\xff\xfe"\n')  # not UTF-8
    (tmp_path / "folder").mkdir()
    path = config if config.startswith("~") else tmp_path / config
    with pytest.raises(SettingsError, match="config file"):
        load_settings(AgentSettings, env_prefix="X", config=path, environ={})


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "CLOUD_HUB_"))})


def _one_line(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == code and "Traceback" not in err, (res.returncode, err)
    assert len(err.splitlines()) == 1 and needle in err, err


def test_settings_mistakes_exit_2_with_one_line(tmp_path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_bytes(b'broker = "\xff"\n')
    _one_line(_run("edge_agent", "run", "--config", str(bad)), exits.USAGE, "agent.toml")
    _one_line(_run("edge_agent", "run", "--broker", "mqtt://["), exits.USAGE, "mqtt://[")
    _one_line(_run("cloud_hub", "serve", "--db", "9://:."), exits.USAGE, "9://:.")
    _one_line(_run("cloud_hub", "serve", "--db", "sqlite:///h.sqlite", "--http", "h:²"), exits.USAGE, "h:²")


# --------------------------------------------------------------------------- the property, for every decoder

DECODERS: dict[str, tuple[Callable[[bytes], Any], bytes]] = {
    "results": (c.decode_results, RESULTS),
    "status": (c.decode_status, STATUS),
    "receipt": (c.decode_receipt, RECEIPT),
    "bundle": (c.decode_bundle, BUNDLE),
    "announcement": (cr.decode_announcement, ANNOUNCEMENT),
    "update": (cu.decode_update, UPDATE),
}


def _reencoded(decoded: Any) -> bytes:
    return decoded.encode()


def _holds(name: str, payload: bytes) -> None:
    """The property: a valid object that re-encodes to an equivalent one, or ContractError."""
    decode = DECODERS[name][0]
    try:
        got = decode(payload)
    except c.ContractError:
        return
    assert equivalent(decode(_reencoded(got)), got)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
deep_json = st.integers(0, 1100).map(lambda n: b"[" * n + b"]" * n) | st.integers(0, 1100).map(_nested)
raw_json = json_values.map(lambda v: json.dumps(v).encode()) | deep_json  # stdlib: integers past 64 bits too


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=300))
def test_any_bytes_decode_to_a_valid_object_or_a_contract_error(name: str, payload: bytes) -> None:
    _holds(name, payload)
    _holds(name, DECODERS[name][1][:8] + payload)  # past the magic of the binary formats


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(DECODERS)), st.data(), raw_json)
def test_any_json_in_any_field_decodes_to_a_valid_object_or_a_contract_error(name: str, data: st.DataObject,
                                                                             value: bytes) -> None:
    valid = DECODERS[name][1]
    if valid[:1] == b"{":  # a JSON payload: replace one of its fields, or the whole of it
        obj = orjson.loads(valid)
        key = data.draw(st.sampled_from([*obj, "extra", None]))
        if key is None:
            _holds(name, value)
            return
        obj.pop(key, None)
        _holds(name, orjson.dumps(obj)[:-1] + b',"' + key.encode() + b'":' + value + b"}")
    else:
        _, header, _ = _header_of(valid)
        field = data.draw(st.sampled_from([*header, "extra"]))
        _holds(name, _with_field(valid, field, value))
        if name in ("announcement", "bundle"):  # what a device reads before the signature: safe for any field
            read = cr.announcement_header if name == "announcement" else lambda p: c.split_bundle(p)[0]
            with contextlib.suppress(c.ContractError):
                assert c.signed_part(read(_with_field(valid, field, value)), name).data


@settings(max_examples=200)
@given(json_values)
def test_any_json_as_a_manifest_is_a_manifest_or_a_contract_error(value: Any) -> None:
    try:
        m = c.manifest_from_obj(value)
    except c.ContractError:
        return
    assert c.manifest_from_obj(m.to_obj()) == m


# --------------------------------------------------------------------------- no crash loop, end to end


@pytest.mark.slow
def test_an_agent_given_a_malformed_retained_bundle_and_announcement_keeps_its_model(
        procs, shared_broker, prefix, tmp_path, keys, v1) -> None:
    """Each used to escape the model handler and the learner: the agent died, and died again at every start
    (the message is retained). Now both are refused with one line and v1 keeps serving."""
    priv, pub, _ = keys
    topics = c.Topics(prefix)
    model_file = tmp_path / "v1.emlb"
    model_file.write_bytes(sign_bundle(v1, load_private_key(priv)).encode())
    watch = StatusWatch(shared_broker.url, prefix, f"{prefix}-watch")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = procs.popen(live_agent_cmd(shared_broker.url, prefix, tmp_path / "state", pub, "--model", str(model_file)),
                            stdout=subprocess.DEVNULL, stderr=out, env={**os.environ, **LIVE_AGENT_ENV})
    status_where = watch.where

    wait_for(status_where(lambda s: s.state == c.ONLINE and s.model_version == 1), 60, "the agent on v1")
    deep = _with_field(v1.encode(), "training", _nested(1000))
    publish_retained(shared_broker.url, topics.model("default"), deep)
    wait_for(status_where(lambda s: s.last_error is not None and "nested more than" in s.last_error), 60,
             "the deep bundle refused")
    bad_round = _signed(_with_field(_announcement(base_sha256=v1.manifest.sha256, participants=("live-1",)).encode(),
                                    "encoding", b"[]"), priv)
    publish_retained(shared_broker.url, topics.rounds("default"), bad_round)
    wait_for(lambda: b"round announcement refused" in log.read_bytes(), 60, "the announcement refused")
    watch.clear()
    wait_for(status_where(lambda s: s.state == c.ONLINE and s.model_version == 1), 30, "v1 still serving")
    assert agent.poll() is None, log.read_text()
    agent.terminate()
    assert agent.wait(30) == 0, log.read_text()
    watch.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert sum("round announcement refused" in line for line in text.splitlines()) == 1, text
    publish_retained(shared_broker.url, topics.model("default"), b"")
    publish_retained(shared_broker.url, topics.rounds("default"), b"")


@pytest.mark.slow
def test_federate_given_a_malformed_update_refuses_and_acknowledges_it(procs, broker, prefix, tmp_path) -> None:
    """`"encoding":[]` in an update raised TypeError and stopped federate; never acknowledged, the update came
    back on its persistent session at every restart. Now it is refused, dead-lettered and acknowledged."""
    from tests.test_federated import _fake_fleet, _query, _updates
    from tests.test_federated import _update as crafted

    priv, _, _ = keygen(tmp_path / "keys" / "hub.pem")
    url, train_log, X, hub, fakes = _fake_fleet(procs, broker, prefix, tmp_path, ("fk-1", "fk-2"))
    client = f"{prefix}-fed"
    with open(tmp_path / "federate.log", "wb") as out:
        fed = procs.popen([sys.executable, "-m", "cloud_hub", "federate", "--broker", broker.url, "--db", url,
                           "--prefix", prefix, "--client-id", client, "--signing-key", str(priv), "--rounds", "1",
                           "--min-available", "2", "--min-updates", "2", "--deadline", "120",
                           "--holdout-log", str(train_log), "--tolerance", "1"], stdout=out, stderr=out)
    ann = fakes.next_round(1)
    p1, p2 = ann.plan.participants
    poison = _with_field(crafted(ann, p1, X), "encoding", b"[]")
    fakes.send(p1, poison)
    fakes.send(p1, crafted(ann, p1, X))
    fakes.send(p2, crafted(ann, p2, X, seed=2))
    assert fed.wait(180) == 0, (tmp_path / "federate.log").read_text()
    refused = [(d, reason) for _, d, s, reason, _ in _updates(url) if s == "refused"]
    assert refused == [(p1, "malformed: update.encoding must be one of int8, float32, got []")], refused
    assert any("update" in r for (r,) in _query(url, sa.select(tables.dead_letters.c.reason)))
    # federate's session holds nothing unacknowledged: resumed, it gets the next update, not the poison again
    marker = crafted(ann, p2, X, seed=3)
    fakes.send(p2, marker)
    got: queue.Queue[Message] = queue.Queue()
    session = MqttLink(BrokerURL.parse(broker.url), f"{client}-federate", clean_start=False, session_expiry_s=3600,
                       manual_ack=True, on_message=got.put, subscriptions=[(c.Topics(prefix).all_updates, 1)])
    session.start()
    try:
        first = got.get(timeout=60)
        assert first.payload == marker
    finally:
        session.stop()
        fakes.link.stop()
    hub.signal(signal.SIGTERM)
