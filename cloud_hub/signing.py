"""Ed25519 key pairs for signing model bundles (verification lives on the device: edge_agent.bundle)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import key_id


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
