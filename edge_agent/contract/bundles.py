"""Model bundles: the signed manifest and the ONNX bytes the hub publishes on the model topic."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

import orjson

from edge_agent.contract.wire import (
    MAX_BUNDLE_BYTES,
    MAX_HEADER_DEPTH,
    MAX_LABEL_CHARS,
    MAX_STATUS_BYTES,
    SCHEMA_VERSION,
    ContractError,
    check_choice,
    check_id,
    check_keys,
    fits_label,
    float_field,
    hex64,
    int_field,
    json_depth,
    load_json,
    opt_str,
    show,
)


def key_id(raw_public_key: bytes) -> str:
    """The id of an Ed25519 public key (its 32 raw bytes): the first 16 hex digits of their sha256."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


_BUNDLE_MAGIC: Final = b"EMLB"
_HEADER: Final = struct.Struct(">4sI")  # magic, manifest length
TASKS: Final = ("classification", "regression")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What travels with a model: identity, integrity, interface, preprocessing and metrics.

    ``signature`` is an Ed25519 signature (base64) over :meth:`signing_bytes`, i.e. the manifest
    without its signature; the manifest holds the sha256 of the ONNX bytes, so it covers those too.
    """

    name: str
    version: int
    sha256: str
    task: str
    labels: tuple[str, ...]
    n_features: int
    input_name: str
    preprocess: dict[str, Any]
    created: float
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    key_id: str | None = None
    signature: str | None = None

    def to_obj(self) -> dict[str, Any]:
        _check_labels(self.labels)  # a bundle every device would refuse is not made
        obj = {"v": SCHEMA_VERSION, **asdict(self)}
        obj["labels"] = list(self.labels)
        return obj

    def signing_bytes(self) -> bytes:
        obj = self.to_obj()
        obj.pop("signature")
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    def with_signature(self, signature: bytes, key_id: str) -> Manifest:
        unsigned = replace(self, key_id=key_id, signature=None)
        return replace(unsigned, signature=base64.b64encode(signature).decode())

    def signature_bytes(self) -> bytes | None:
        return signature_bytes(self.signature, "manifest")


def signature_bytes(signature: str | None, what: str) -> bytes | None:
    """The raw Ed25519 signature of a signed header (a manifest, a round announcement), or None if unsigned."""
    if signature is None:
        return None
    try:
        return base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise ContractError(f"{what}.signature is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class Signed:
    """What a signed header's signature covers, read from the header as it came, before any field is
    interpreted: its canonical bytes (sorted keys, without ``signature``), the signature and the key id."""

    data: bytes
    signature: bytes | None
    key_id: str | None


def signed_part(header: dict[str, Any], what: str) -> Signed:
    """The signed part of a decoded header (a manifest, a round announcement). The signer wrote the
    same canonical bytes from its object (``signing_bytes``), so they are equal for any header it made."""
    signature = opt_str(header, "signature", what, 256)
    key = opt_str(header, "key_id", what, 128)
    try:
        data = orjson.dumps({k: v for k, v in header.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # not reached for a header within MAX_HEADER_DEPTH: a guard
        raise ContractError(f"{what} cannot be written canonically: {exc}") from exc
    return Signed(data, signature_bytes(signature, what), key)


_MANIFEST_REQUIRED: Final = frozenset(
    {"v", "name", "version", "sha256", "task", "labels", "n_features", "input_name", "preprocess", "created"}
)
_MANIFEST_ALLOWED: Final = _MANIFEST_REQUIRED | {"metrics", "training", "key_id", "signature"}


def _check_labels(labels: Iterable[str]) -> None:
    """The labels a device's results would carry: the hub refuses every batch holding one it cannot store."""
    if bad := next((x for x in labels if not fits_label(x)), None):
        raise ContractError(f"manifest.labels: {show(bad)} is not a label a result can carry "
                            f"(at most {MAX_LABEL_CHARS} characters, no NUL)")


def manifest_from_obj(obj: dict[str, Any]) -> Manifest:
    """A manifest from its decoded JSON (a bundle's header, or one the hub stored); ContractError if
    anything in it is not what the contract says, nesting past MAX_HEADER_DEPTH included."""
    what = "manifest"
    if type(obj) is not dict:
        raise ContractError(f"manifest must be an object, got {type(obj).__name__}")
    check_keys(obj, _MANIFEST_REQUIRED, _MANIFEST_ALLOWED, what)
    if type(obj["v"]) is not int or obj["v"] != SCHEMA_VERSION:
        raise ContractError(f"manifest has unsupported schema version {show(obj['v'])}")
    sha = hex64(obj, "sha256", what)
    task = check_choice(obj, "task", TASKS, what)
    labels = obj["labels"]
    if type(labels) is not list or not all(type(x) is str for x in labels):
        raise ContractError("manifest.labels must be a list of strings")
    _check_labels(labels)
    for key in ("preprocess", "metrics", "training"):
        if key in obj and type(obj[key]) is not dict:
            raise ContractError(f"manifest.{key} must be an object")
        if key in obj and json_depth(obj[key], MAX_HEADER_DEPTH - 1) > MAX_HEADER_DEPTH - 1:
            raise ContractError(f"manifest.{key} is nested more than {MAX_HEADER_DEPTH - 1} levels deep")
    name = obj["name"]
    check_id(name, "model name")
    input_name = obj["input_name"]
    if type(input_name) is not str or not input_name:
        raise ContractError("manifest.input_name must be a non-empty string")
    return Manifest(
        name=name, version=int_field(obj, "version", what, 1), sha256=sha, task=task, labels=tuple(labels),
        n_features=int_field(obj, "n_features", what, 1, 1 << 20), input_name=input_name,
        preprocess=obj["preprocess"], created=float_field(obj, "created", what),
        metrics=obj.get("metrics") or {}, training=obj.get("training") or {},
        key_id=opt_str(obj, "key_id", what, 128), signature=opt_str(obj, "signature", what, 256),
    )


@dataclass(frozen=True, slots=True)
class Bundle:
    """A model bundle: manifest + INT8 ONNX bytes, the retained payload of the model topic."""

    manifest: Manifest
    model: bytes

    def encode(self) -> bytes:
        head = orjson.dumps(self.manifest.to_obj())
        payload = _HEADER.pack(_BUNDLE_MAGIC, len(head)) + head + self.model
        if len(payload) > MAX_BUNDLE_BYTES:
            raise ContractError(f"bundle of {len(payload)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")
        return payload


def split_bundle(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A bundle's manifest as decoded JSON (not yet interpreted: see :func:`signed_part`) and its model bytes."""
    if len(payload) > MAX_BUNDLE_BYTES:
        raise ContractError(f"bundle of {len(payload)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")
    if len(payload) < _HEADER.size or payload[:4] != _BUNDLE_MAGIC:
        raise ContractError("not a model bundle (bad magic)")
    _, head_len = _HEADER.unpack_from(payload)
    end = _HEADER.size + head_len
    if end > len(payload):
        raise ContractError("bundle manifest length points past the end of the payload")
    return load_json(payload[_HEADER.size:end], MAX_STATUS_BYTES * 64, "manifest", MAX_HEADER_DEPTH), payload[end:]


def decode_bundle(payload: bytes) -> Bundle:
    """Parse a bundle. Integrity (sha256) and signature are checked by the receiver, not here."""
    header, model = split_bundle(payload)
    return Bundle(manifest_from_obj(header), model)
