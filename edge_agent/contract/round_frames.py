"""The binary framing that federated rounds' messages share, and the header that signs itself.

Every round message (an announcement, an update, a secure round's steps and answers) is a 4-byte magic, a
4-byte big-endian header length, a JSON header, then a body: for the announcement and the update, the
tensors' bytes in the header's order (little-endian, C order), each described by a :class:`TensorSpec`.
A header that travels signed (a round's plan, a secure round's step) is a :class:`SignedHeader`.

Apart from :mod:`edge_agent.contract.rounds` (the announcement) and :mod:`edge_agent.contract.round_updates`
(the update) because all of them frame their bytes the same way: a change to the framing is made here once.
Decoding is strict, as in :mod:`edge_agent.contract`: magic, lengths, tensor shapes and sizes are checked here.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, Self

import numpy as np
import orjson

from edge_agent.contract.bundles import signature_bytes
from edge_agent.contract.wire import (
    MAX_HEADER_DEPTH,
    ContractError,
    check_id,
    check_keys,
    float_field,
    load_json,
    show,
)

MAX_TENSORS: Final = 64
_HEADER: Final = struct.Struct(">4sI")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    scale: float | None = None  # int8 deltas: value = int8 * scale

    def size(self) -> int:
        return math.prod(self.shape)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.scale is not None:
            obj["scale"] = self.scale
        return obj


def tensor_specs(value: Any, what: str, scaled: bool, least: int = 1) -> tuple[TensorSpec, ...]:
    """The specs of a header's ``tensors`` (``what``: the message, for the errors): ``least`` to
    :data:`MAX_TENSORS` distinct names, 1 to 4 positive dimensions, a non-negative scale when ``scaled``."""
    if type(value) is not list or not least <= len(value) <= MAX_TENSORS:
        raise ContractError(f"{what}.tensors must be a list of {least} to {MAX_TENSORS} tensors")
    out = []
    for i, t in enumerate(value):
        w = f"{what}.tensors[{i}]"
        if type(t) is not dict:
            raise ContractError(f"{w} must be an object")
        check_keys(t, frozenset({"name", "shape"} | ({"scale"} if scaled else set())),
                    frozenset({"name", "shape", "scale"}), w)
        check_id(t["name"], "tensor name")
        shape = t["shape"]
        if type(shape) is not list or not 1 <= len(shape) <= 4 or any(type(d) is not int or not 0 < d <= 1 << 20
                                                                       for d in shape):
            raise ContractError(f"{w}.shape must be 1 to 4 positive integers, got {show(shape)}")
        scale = float_field(t, "scale", w) if scaled else None
        if scale is not None and scale < 0:
            raise ContractError(f"{w}.scale must not be negative")
        out.append(TensorSpec(t["name"], tuple(shape), scale))
    if len({s.name for s in out}) != len(out):
        raise ContractError(f"{what}.tensors repeats a name")
    return tuple(out)


def frame(magic: bytes, header: dict[str, Any], body: bytes, limit: int) -> bytes:
    """magic, header length, JSON header, body: the framing of rounds' binary messages; ContractError past ``limit``."""
    head = orjson.dumps(header)
    payload = _HEADER.pack(magic, len(head)) + head + body
    if len(payload) > limit:
        raise ContractError(f"payload of {len(payload)} bytes is over the {limit}-byte limit")
    return payload


def unframe(payload: bytes, magic: bytes, limit: int, what: str) -> tuple[dict[str, Any], bytes]:
    obj, end = unframe_offset(payload, magic, limit, what)
    return obj, payload[end:]


def unframe_offset(payload: bytes, magic: bytes, limit: int, what: str) -> tuple[dict[str, Any], int]:
    """:func:`unframe`'s header and where the body starts (no copy of the body)."""
    if len(payload) > limit:
        raise ContractError(f"{what} of {len(payload)} bytes is over the {limit}-byte limit")
    if len(payload) < _HEADER.size or payload[:4] != magic:
        raise ContractError(f"not a {what} (bad magic)")
    _, head_len = _HEADER.unpack_from(payload)
    end = _HEADER.size + head_len
    if end > len(payload):
        raise ContractError(f"{what} header length points past the end of the payload")
    return load_json(payload[_HEADER.size:end], 1 << 20, what, MAX_HEADER_DEPTH), end


def tensor_arrays(specs: tuple[TensorSpec, ...], body: bytes | memoryview, dtype: np.dtype, what: str) -> dict[str, np.ndarray]:
    """The tensors of a body, by name: views of ``body`` (no copy), its size checked against the specs."""
    need = sum(s.size() for s in specs) * dtype.itemsize
    if len(body) != need:
        raise ContractError(f"{what} carries {len(body)} bytes of tensors, its header describes {need}")
    flat = np.frombuffer(body, dtype=dtype)
    out, at = {}, 0
    for s in specs:
        out[s.name] = flat[at:at + s.size()].reshape(s.shape)
        at += s.size()
    return out


def tensor_body(specs: tuple[TensorSpec, ...], arrays: dict[str, np.ndarray], dtype: np.dtype) -> bytes:
    """The body of ``arrays`` in the order of ``specs``, each as ``dtype`` in C order."""
    return b"".join(np.ascontiguousarray(arrays[s.name], dtype=dtype).tobytes() for s in specs)


class SignedHeader:
    """A header that carries its own Ed25519 signature (a round's plan, a secure round's step): signed over its
    canonical JSON without the signature (keys sorted, its key id included), as a manifest is."""

    __slots__ = ()
    signed_as: ClassVar[str]
    signature: str | None

    def header(self) -> dict[str, Any]:
        raise NotImplementedError

    def signing_bytes(self) -> bytes:
        obj = self.header()
        obj.pop("signature")
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    def with_signature(self, signature: bytes, key_id: str) -> Self:
        return replace(self, key_id=key_id, signature=base64.b64encode(signature).decode())  # type: ignore[type-var]

    def signature_bytes(self) -> bytes | None:
        return signature_bytes(self.signature, self.signed_as)
