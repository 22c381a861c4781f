"""Model bundles on the device: verify (signature, sha256, compatibility), persist, load.

The device only verifies: signing lives on the hub (:mod:`cloud_hub.models.signing`), so no private-key
code ships to devices.

A bundle is accepted only when every check passes; otherwise :class:`BundleRejected` says why and
the running model keeps serving. The active bundle is persisted with write-to-temp + fsync +
rename, so a reboot in the middle of an update leaves either the old or the new bundle, never a
torn file.
"""

from __future__ import annotations

import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import exits
from edge_agent.contract import Bundle, ContractError, Signed, manifest_from_obj, signed_part, split_bundle
from edge_agent.contract import key_id as contract_key_id
from edge_agent.runner import ModelError, ModelRunner

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge_agent.contract.rounds import Announcement
    from edge_agent.contract.secure_rounds import Step

# cryptography (OpenSSL) costs ~8 MB of RSS on import: it is loaded only where a key is used, so an
# agent that runs without signature checks (development) does not carry it.


class BundleRejected(exits.Failure, ValueError):
    """A model bundle that failed verification; the message is the reason shown in the status."""

    exit_code = exits.MODEL


def key_id(public_key: Ed25519PublicKey) -> str:
    return contract_key_id(public_key.public_bytes_raw())


# An Ed25519 public key in X.509 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING { 0 unused bits, the 32 key bytes } }. Every Ed25519 SPKI is these 12 bytes and then the key.
# Read here rather than by cryptography's `serialization` (which loads its SSH, RSA, DSA, EC and DH modules:
# 1 MB of anonymous memory in every agent that has a trusted key, #27 §4).
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file (``cloud-hub keygen``'s ``.pub.pem``); anything else (no
    PEM public key, an RSA or EC key, a private key) is refused with :class:`BundleRejected`, naming the file."""
    try:
        text = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise BundleRejected(f"cannot read trusted key {path}: {exc.strerror or exc}") from exc
    start = text.find(_PEM_BEGIN)
    end = text.find(_PEM_END, start + 1)
    if start < 0 or end < 0:
        if b"PUBLIC KEY-----" in text:  # e.g. BEGIN RSA PUBLIC KEY (PKCS #1)
            raise BundleRejected(f"trusted key {path} is not an Ed25519 public key")
        what = "a private key, not the public one" if b"PRIVATE KEY-----" in text else "no PEM public key"
        raise BundleRejected(f"cannot read trusted key {path}: it holds {what} (expected {_PEM_BEGIN.decode()} "
                             "... of the .pub.pem of `cloud-hub keygen`)")
    try:
        der = binascii.a2b_base64(b"".join(text[start + len(_PEM_BEGIN):end].split()), strict_mode=True)
    except binascii.Error as exc:
        raise BundleRejected(f"cannot read trusted key {path}: its PEM block is not base64 ({exc})") from exc
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        raise BundleRejected(f"trusted key {path} is not an Ed25519 public key")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI):])


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
    """Check a bundle's signature, then decode it and check its digest (no model is loaded). Raises
    :class:`BundleRejected`. The signature is checked on the manifest's bytes as they came, before any
    field is interpreted: a trusted key then keeps out whatever a decoder might choke on."""
    try:
        header, model = split_bundle(payload)
        signed = signed_part(header, "manifest")
    except ContractError as exc:
        raise BundleRejected(f"malformed bundle: {exc.reason}") from exc
    what = _named("model v", header.get("version"), "model bundle")
    _check_signature(what, signed, trusted_key, allow_unsigned)
    try:
        bundle = Bundle(manifest_from_obj(header), model)
    except ContractError as exc:
        raise BundleRejected(f"malformed bundle: {exc.reason}") from exc
    m = bundle.manifest
    digest = hashlib.sha256(bundle.model).hexdigest()
    if digest != m.sha256:
        raise BundleRejected(f"model v{m.version}: sha256 {digest[:12]}… does not match the manifest's {m.sha256[:12]}…")
    return bundle


def check_round(payload: bytes, *, trusted_key: Ed25519PublicKey | None, allow_unsigned: bool) -> Announcement:
    """Check a round announcement's signature, then decode it and check its weights' digest, as for a bundle."""
    # Loaded by an agent that joins rounds only: 0.5 MB of anonymous memory (#27 §4).
    from edge_agent.contract.rounds import announcement_header, decode_announcement

    try:
        header = announcement_header(payload)
        signed = signed_part(header, "round")
    except ContractError as exc:
        raise BundleRejected(f"malformed round announcement: {exc.reason}") from exc
    _check_signature(_named("round ", header.get("round"), "round announcement"), signed, trusted_key, allow_unsigned)
    try:
        return decode_announcement(payload)
    except ContractError as exc:
        raise BundleRejected(f"malformed round announcement: {exc.reason}") from exc


def check_step(payload: bytes, device_id: str, *, trusted_key: Ed25519PublicKey | None,
               allow_unsigned: bool) -> Step:
    """Check a secure round step's signature (the hub signs it like the announcement), then decode it."""
    from edge_agent.contract.secure_rounds import decode_step, step_header

    try:
        header = step_header(payload)
        signed = signed_part(header, "step")
    except ContractError as exc:
        raise BundleRejected(f"malformed secure round step: {exc.reason}") from exc
    _check_signature(_named("round ", header.get("round"), "secure round") + " step", signed, trusted_key,
                     allow_unsigned)
    try:
        return decode_step(payload, device_id)
    except ContractError as exc:
        raise BundleRejected(f"malformed secure round step: {exc.reason}") from exc


def _named(prefix: str, number: object, otherwise: str) -> str:
    """How a message names what it refuses before its header is interpreted: ``model v3``, ``round 7``."""
    return f"{prefix}{number}" if type(number) is int else otherwise


def _check_signature(what: str, signed: Signed, trusted_key: Ed25519PublicKey | None, allow_unsigned: bool) -> None:
    signature, signed_by, data = signed.signature, signed.key_id, signed.data
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
