"""Model bundles on the device: verify (signature, sha256, compatibility), persist, load.

The device only verifies: signing lives on the hub (:mod:`cloud_hub.signing`), so no private-key
code ships to devices.

A bundle is accepted only when every check passes; otherwise :class:`BundleRejected` says why and
the running model keeps serving. The active bundle is persisted with write-to-temp + fsync +
rename, so a reboot in the middle of an update leaves either the old or the new bundle, never a
torn file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.contract import Bundle, ContractError, decode_bundle
from edge_agent.contract import key_id as contract_key_id
from edge_agent.contract_rounds import Announcement, decode_announcement
from edge_agent.runner import ModelError, ModelRunner

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# cryptography (OpenSSL) costs ~8 MB of RSS on import: it is loaded only where a key is used, so an
# agent that runs without signature checks (development) does not carry it.


class BundleRejected(ValueError):
    """A model bundle that failed verification; the message is the reason shown in the status."""


def key_id(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return contract_key_id(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).expanduser().read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleRejected(f"cannot read trusted key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleRejected(f"trusted key {path} is not an Ed25519 public key")
    return key


def verify_bundle(
    payload: bytes, *, trusted_key: Ed25519PublicKey | None, allow_unsigned: bool,
    channels: tuple[str, ...] | None = None, intra_op_threads: int = 1,
) -> tuple[Bundle, ModelRunner]:
    """Decode and check a bundle, then build and warm up its runner. Raises :class:`BundleRejected`."""
    bundle = check_bundle(payload, trusted_key=trusted_key, allow_unsigned=allow_unsigned)
    m = bundle.manifest
    try:
        runner = ModelRunner(bundle, intra_op_threads=intra_op_threads)
    except ModelError as exc:
        raise BundleRejected(f"model v{m.version}: {exc}") from exc
    if channels is not None:
        missing = [c for c in runner.params.channels if c not in channels]
        if missing:
            raise BundleRejected(
                f"model v{m.version} needs channels {missing} that the source does not provide ({list(channels)})"
            )
    return bundle, runner


def check_bundle(payload: bytes, *, trusted_key: Ed25519PublicKey | None, allow_unsigned: bool) -> Bundle:
    """Decode a bundle and check its digest and signature (no model is loaded). Raises :class:`BundleRejected`."""
    try:
        bundle = decode_bundle(payload)
    except ContractError as exc:
        raise BundleRejected(f"malformed bundle: {exc.reason}") from exc
    m = bundle.manifest
    digest = hashlib.sha256(bundle.model).hexdigest()
    if digest != m.sha256:
        raise BundleRejected(f"model v{m.version}: sha256 {digest[:12]}… does not match the manifest's {m.sha256[:12]}…")
    try:
        signature = m.signature_bytes() if m.signature else None
    except ContractError as exc:
        raise BundleRejected(f"model v{m.version}: {exc.reason}") from exc
    _check_signature(f"model v{m.version}", signature, m.key_id, m.signing_bytes(), trusted_key, allow_unsigned)
    return bundle


def check_round(payload: bytes, *, trusted_key: Ed25519PublicKey | None, allow_unsigned: bool) -> Announcement:
    """Decode a round announcement and check its weights' digest and its signature, as for a bundle."""
    try:
        ann = decode_announcement(payload)
        signature = ann.plan.signature_bytes() if ann.plan.signature else None
    except ContractError as exc:
        raise BundleRejected(f"malformed round announcement: {exc.reason}") from exc
    plan = ann.plan
    _check_signature(f"round {plan.round_id}", signature, plan.key_id, plan.signing_bytes(), trusted_key,
                     allow_unsigned)
    return ann


def _check_signature(what: str, signature: bytes | None, signed_by: str | None, data: bytes,
                     trusted_key: Ed25519PublicKey | None, allow_unsigned: bool) -> None:
    if signature is None:
        if not allow_unsigned:
            raise BundleRejected(f"{what} is unsigned (allowed only with insecure_allow_unsigned)")
    elif trusted_key is None:
        if not allow_unsigned:
            raise BundleRejected(f"{what} is signed but no trusted key is configured")
    else:
        from cryptography.exceptions import InvalidSignature

        if signed_by != key_id(trusted_key):
            raise BundleRejected(f"{what} was signed by key {signed_by}, not the trusted key {key_id(trusted_key)}")
        try:
            trusted_key.verify(signature, data)
        except InvalidSignature as exc:
            raise BundleRejected(f"{what}: bad signature") from exc


def persist_bundle(bundle: Bundle, path: str | Path) -> None:
    """Write atomically: temp file, fsync, rename, fsync the folder."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(bundle.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
