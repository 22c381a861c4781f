"""The agent's trusted key (#27 §4): an Ed25519 public key read from its PEM without cryptography's
``serialization`` (its SSH, RSA, DSA, EC and DH modules cost 1 MB of anonymous memory); anything else
is refused with one line that names the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cloud_hub.models.signing import key_id as hub_key_id
from cloud_hub.models.signing import keygen, load_private_key
from edge_agent.device.bundle import BundleRejected, key_id, load_public_key
from tests.helpers import agent_cmd, make_bundle, make_log

_PUBLIC = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_keygen_public_key_verifies_what_its_private_key_signed(tmp_path: Path) -> None:
    priv, pub, kid = keygen(tmp_path / "hub.pem")
    key = load_public_key(pub)
    key.verify(load_private_key(priv).sign(b"manifest"), b"manifest")  # raises if the key were not the same
    assert key_id(key) == kid == hub_key_id(load_private_key(priv).public_key())


def test_text_around_the_pem_block_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    _, pub, kid = keygen(tmp_path / "hub.pem")
    path = tmp_path / "noted.pem"
    path.write_bytes(b"# the hub's key\r\n" + pub.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    assert key_id(load_public_key(path)) == kid


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: rsa.generate_private_key(65537, 2048).public_key().public_bytes(*_PUBLIC), "is not an Ed25519 public key"),
    (lambda: ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*_PUBLIC),
     "is not an Ed25519 public key"),
    (lambda: rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1), "is not an Ed25519 public key"),
    (lambda: ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "holds a private key, not the public one"),
    (lambda: b"not a key\n", "holds no PEM public key"),
    (lambda: b"", "holds no PEM public key"),
    (lambda: b"-----BEGIN PUBLIC KEY-----\nMCow!!!\n-----END PUBLIC KEY-----\n", "PEM block is not base64"),
    (lambda: b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",  # the prefix, no key
     "is not an Ed25519 public key"),
], ids=["rsa", "ec-p256", "rsa-pkcs1", "ed25519-private", "text", "empty", "bad-base64", "truncated"])
def test_anything_but_an_ed25519_public_key_is_refused_naming_the_file(tmp_path: Path, make, needle: str) -> None:
    path = _write(tmp_path / "trusted.pem", make())
    with pytest.raises(BundleRejected) as err:
        load_public_key(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message, message


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleRejected, match=r"cannot read trusted key .*nosuch\.pem: .*No such file"):
        load_public_key(tmp_path / "nosuch.pem")


def test_reading_the_key_does_not_load_cryptography_serialization(tmp_path: Path) -> None:
    """A fresh interpreter, as an agent starts: loading and using the key leaves ``serialization`` out."""
    priv, pub, _ = keygen(tmp_path / "hub.pem")
    probe = ("import json, sys\nfrom edge_agent.device.bundle import key_id, load_public_key\n"
             "k = load_public_key(sys.argv[1])\nk.verify(bytes.fromhex(sys.argv[2]), b'm')\n"
             "print(json.dumps([key_id(k), sorted(m for m in sys.modules if m.startswith('cryptography.hazmat.primitives.serialization'))]))")
    sig = load_private_key(priv).sign(b"m").hex()
    proc = subprocess.run([sys.executable, "-c", probe, str(pub), sig], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kid, loaded = json.loads(proc.stdout)
    assert kid == hub_key_id(load_private_key(priv).public_key()) and loaded == []


def test_edge_agent_replay_with_an_rsa_key_says_so_in_one_line(tmp_path: Path) -> None:
    log = make_log(tmp_path / "fleet.csv", seconds=10)
    model = _write(tmp_path / "v1.emlb", make_bundle(log).encode())
    key = _write(tmp_path / "rsa.pub.pem", rsa.generate_private_key(65537, 2048).public_key().public_bytes(*_PUBLIC))
    res = subprocess.run(agent_cmd("replay", str(log), "--model", str(model), "--trusted-key", str(key), "--state-dir",
                                   str(tmp_path / "s"), "--broker", "mqtt://127.0.0.1:1"),
                         capture_output=True, text=True, timeout=120)
    err = res.stderr.strip()
    assert res.returncode != 0 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"edge-agent: error: trusted key {key} is not an Ed25519 public key", err
