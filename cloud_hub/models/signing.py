"""Ed25519 keys and the signing of model bundles: the hub's side (devices only verify: edge_agent.device.bundle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.contract import Bundle
from edge_agent.contract import key_id as raw_key_id
from edge_agent.contract.round_frames import SignedHeader
from edge_agent.settings.loader import SettingsError


def key_id(public_key: Ed25519PublicKey) -> str:
    return raw_key_id(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


_KEY_MAX_BYTES = 1 << 16  # an Ed25519 PEM key is 119 bytes


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The hub's Ed25519 signing key; a :class:`SettingsError` naming ``signing_key`` (exit 2) when it cannot be one."""
    shown = repr(str(path))
    try:
        with open(Path(path).expanduser(), "rb") as f:  # a key is far smaller: a big file named by mistake is not read whole
            data = f.read(_KEY_MAX_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"signing_key {shown} cannot be read: {exc.strerror or exc}", field="signing_key") from exc
    if b"PUBLIC KEY" in data:  # a setting given the wrong file, like the agent's trusted_key given a private key
        raise SettingsError(f"signing_key {shown} is a public key: sign with the private key of `cloud-hub keygen` "
                            "(devices get the .pub.pem)", field="signing_key")
    try:
        if len(data) > _KEY_MAX_BYTES:
            raise ValueError(f"over {_KEY_MAX_BYTES // 1024} kB")
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"signing_key {shown} is not a PEM private key ({str(exc).splitlines()[0]}): "
                            "`cloud-hub keygen` makes one", field="signing_key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError(f"signing_key {shown} is not an Ed25519 private key", field="signing_key")
    return key


def sign_bundle(bundle: Bundle, private_key: Ed25519PrivateKey) -> Bundle:
    """The same bundle with an Ed25519 signature over its manifest (which holds the model's sha256)."""
    kid = key_id(private_key.public_key())
    unsigned = bundle.manifest.with_signature(b"", kid)
    signature = private_key.sign(unsigned.signing_bytes())
    return Bundle(unsigned.with_signature(signature, kid), bundle.model)


S = TypeVar("S", bound=SignedHeader)


def sign_round(plan: S, private_key: Ed25519PrivateKey) -> S:
    """A round's announcement header (it holds the weights' sha256), or a secure round's step, with an Ed25519
    signature over its canonical bytes (its key id included)."""
    kid = key_id(private_key.public_key())
    unsigned = plan.with_signature(b"", kid)
    return unsigned.with_signature(private_key.sign(unsigned.signing_bytes()), kid)


def keygen(private_path: str | Path, public_path: str | Path | None = None, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new key pair (private key mode 0600); returns the paths and the key id."""
    private_path = Path(private_path).expanduser()
    public_path = Path(public_path).expanduser() if public_path else private_path.with_suffix(".pub.pem")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists (use --force to overwrite)")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(key.public_key())
