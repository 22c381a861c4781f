"""Secure aggregation of a round's updates: the hub recovers the sum of the devices' vectors, never one.

The protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning") over a complete graph, for the cohorts of a federated round (tens of devices). Per round each
selected device makes two X25519 key pairs (``c`` to encrypt what it sends its peers through the hub,
``s`` to agree on masks) and a self-mask seed ``b``:

1. it advertises its two public keys (:class:`Advert`); the hub relays every advert to every device;
2. it splits its ``s`` private key and its ``b`` seed into Shamir shares, one per peer, threshold ``t``,
   and sends each peer its share encrypted (:func:`seal_shares`, AES-256-GCM under a key only the two
   devices can derive), through the hub;
3. it adds to its integer vector ``x_u``, in the ring of integers modulo ``2**bits``, the expansion of
   ``b_u`` and, for every peer ``v`` that advertised, ``+PRG(s_uv)`` if ``u < v`` else ``-PRG(s_uv)``
   (``s_uv`` from X25519 of ``s_u`` and ``s_v``: both ends derive it) (:func:`mask`);
4. told which devices' masked vectors reached the hub (the survivors ``S``) and which advertised but sent
   none (the dropped ``D``), it reveals its shares of ``b_u`` for ``u`` in ``S`` and of ``s_u`` for ``u``
   in ``D``, never both for one device (:func:`reveal`).

From ``t`` answers in step 4 the hub rebuilds the self masks of ``S`` and the mask keys of ``D``; the
pairwise masks between survivors cancel in the sum, and those with dropped devices it removes
(:func:`unmask`). What it learns: the sum over ``S``, and the ``s`` keys of devices whose vectors it never
received. Fewer than ``t`` answers, and the round's sum stays hidden (the round fails). ``t > n/2``, so
two disjoint sets of answers cannot exist: the hub cannot get ``b_u`` from some devices and ``s_u`` from
others. A device's vector that arrives after the hub declared it dropped stays masked by its ``b_u``.

The arithmetic is integer end to end: the unmasked sum equals the plain sum of the ``x_u`` exactly, as long
as it fits in the ring (:func:`ring_bits`). The primitives are ``cryptography``'s (X25519, HKDF-SHA256,
AES-256-GCM, AES-256-CTR as the PRG); Shamir's scheme is polynomial arithmetic over the prime field
``GF(2**521 - 1)``, one secret of 32 bytes per polynomial.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_agent.contract.wire import ContractError

PRIME: Final = (1 << 521) - 1  # a Mersenne prime above any 32-byte secret
SHARE_BYTES: Final = 66  # a share's y, big-endian (x is the holder's position, 1-based)
KEY_BYTES: Final = 32
MAX_BITS: Final = 32


class SecAggError(ContractError):
    """A step of secure aggregation that cannot go on: too few shares, a share that does not decrypt, a
    request that would reveal both secrets of one device."""


def ring_bits(n_devices: int, peak: int, limit: int | None = None) -> int:
    """The ring width in which the sum of ``n_devices`` integers in ``[-peak, peak]`` is exact: room for
    ``n * peak`` (or ``limit``, e.g. with noise added) either side of zero (two's complement)."""
    if n_devices < 1 or peak < 1:
        raise ValueError("ring_bits needs at least one device and a positive peak")
    bits = math.ceil(math.log2(max(n_devices * peak, limit or 0) + 1)) + 1
    if bits > MAX_BITS:
        raise ValueError(f"{n_devices} devices x {peak} need a {bits}-bit ring; at most {MAX_BITS}")
    return bits


def threshold(n_devices: int) -> int:
    """The default share threshold: a strict majority (the hub cannot ask two disjoint sets), which lets
    up to ``n - t`` devices (just under half) drop after they masked."""
    return n_devices // 2 + 1


@dataclass(frozen=True, slots=True)
class Session:
    """One round's secure-aggregation parameters, the same on every device and the hub."""

    context: bytes  # binds keys and masks to one round of one model (e.g. b"model/round 7")
    participants: tuple[str, ...]  # sorted: a device's position (1-based) is its Shamir x
    threshold: int
    bits: int

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.participants))) != self.participants:
            raise ValueError("participants must be sorted and distinct")
        if not 1 <= self.threshold <= len(self.participants):
            raise ValueError(f"threshold {self.threshold} for {len(self.participants)} participants")
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"ring of {self.bits} bits")

    def x(self, device: str) -> int:
        return self.participants.index(device) + 1

    @property
    def modulus_mask(self) -> np.uint32:
        return np.uint32((1 << self.bits) - 1)


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class Advert:
    """A device's two public keys for one round (raw X25519, 32 bytes each)."""

    device_id: str
    c_public: bytes  # to encrypt what peers send it
    s_public: bytes  # to agree on pairwise masks


class DeviceSecrets:
    """A device's secrets for one round: never sent, except as Shamir shares to its peers."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.c = X25519PrivateKey.generate()
        self.s_raw = X25519PrivateKey.generate().private_bytes_raw()
        self.b = secrets.token_bytes(KEY_BYTES)  # the self-mask seed

    @property
    def s(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.s_raw)

    def advert(self) -> Advert:
        return Advert(self.device_id, self.c.public_key().public_bytes_raw(), self.s.public_key().public_bytes_raw())


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(secret)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point, a wrong length: a peer's advert that cannot be used
        raise SecAggError(f"a peer's public key is unusable: {exc}") from None


def usable_key(public: bytes) -> bool:
    """Whether a peer can agree on a secret with ``public``: 32 bytes and not a low-order point (those give
    the all-zero secret whatever the private key, which X25519 refuses). The hub checks each advert so, so
    that one device cannot make every honest peer refuse the round at its next step."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def pair_seed(session: Session, s_private: X25519PrivateKey, me: str, peer: str, peer_s_public: bytes) -> bytes:
    """The mask seed ``me`` and ``peer`` share (each derives it from its own ``s`` key and the other's public)."""
    lo, hi = sorted((me, peer))
    return _kdf(_exchange(s_private, peer_s_public), b"edgeml secagg mask\0" + session.context + b"\0"
                + lo.encode() + b"\0" + hi.encode())


def self_seed(session: Session, b: bytes) -> bytes:
    """The self mask's seed of one vector (a round may mask several with the same ``b``: one per context)."""
    return _kdf(b, b"edgeml secagg self\0" + session.context)


def prg(seed: bytes, n: int, session: Session) -> np.ndarray:
    """``n`` ring elements expanded from ``seed`` (AES-256-CTR's keystream, uint32, reduced to the ring)."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(bytes(4 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4") & session.modulus_mask


# --------------------------------------------------------------------------- Shamir's shares


def split(secret: bytes, n: int, t: int) -> list[int]:
    """Shares of ``secret`` at x = 1..n; any ``t`` of them rebuild it, fewer say nothing about it."""
    coeffs = [int.from_bytes(secret, "big"), *(secrets.randbelow(PRIME) for _ in range(t - 1))]
    out = []
    for x in range(1, n + 1):
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * x + a) % PRIME
        out.append(y)
    return out


def combine(shares: Mapping[int, int], t: int) -> bytes:
    """The secret from ``t`` or more shares {x: y} (Lagrange at 0); SecAggError with fewer."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares, the threshold is {t}")
    xs = sorted(shares)[:t]
    secret = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * -j % PRIME
                den = den * (i - j) % PRIME
        secret = (secret + shares[i] * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * KEY_BYTES):
        raise SecAggError("the shares do not rebuild a secret (some are corrupt)")
    return secret.to_bytes(KEY_BYTES, "big")


# --------------------------------------------------------------------------- sealed shares


def _share_key(mine: X25519PrivateKey, their_c_public: bytes, session: Session, sender: str, receiver: str) -> bytes:
    return _kdf(_exchange(mine, their_c_public), b"edgeml secagg shares\0" + session.context + b"\0"
                + sender.encode() + b"\0" + receiver.encode())


def seal_shares(session: Session, me: DeviceSecrets, adverts: Mapping[str, Advert]
                ) -> tuple[dict[str, bytes], tuple[int, int]]:
    """For every peer that advertised: its shares of my ``s`` key and my ``b`` seed, encrypted so that only
    it can read them (the hub relays them); and my own (``s`` share, ``b`` share), which I keep."""
    n, t = len(session.participants), session.threshold
    s_shares, b_shares = split(me.s_raw, n, t), split(me.b, n, t)
    sealed = {}
    for peer, advert in sorted(adverts.items()):
        if peer == me.device_id:
            continue
        i = session.x(peer) - 1
        plain = s_shares[i].to_bytes(SHARE_BYTES, "big") + b_shares[i].to_bytes(SHARE_BYTES, "big")
        nonce = secrets.token_bytes(12)
        key = _share_key(me.c, advert.c_public, session, me.device_id, peer)
        sealed[peer] = nonce + AESGCM(key).encrypt(nonce, plain, session.context)
    mine = session.x(me.device_id) - 1
    return sealed, (s_shares[mine], b_shares[mine])


def open_shares(session: Session, me: DeviceSecrets, sender: Advert, sealed: bytes) -> tuple[int, int]:
    """(``s`` share, ``b`` share) that ``sender`` sealed for me; SecAggError when it does not decrypt."""
    key = _share_key(me.c, sender.c_public, session, sender.device_id, me.device_id)
    try:
        plain = AESGCM(key).decrypt(sealed[:12], sealed[12:], session.context)
    except (InvalidTag, ValueError):
        raise SecAggError(f"the shares from {sender.device_id} do not decrypt") from None
    if len(plain) != 2 * SHARE_BYTES:
        raise SecAggError(f"the shares from {sender.device_id} are {len(plain)} bytes")
    return int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big")


# --------------------------------------------------------------------------- masking


def to_ring(x: np.ndarray, session: Session) -> np.ndarray:
    """Signed integers as ring elements (two's complement modulo ``2**bits``)."""
    return np.asarray(x, np.int64).astype(np.uint32) & session.modulus_mask


def from_ring(r: np.ndarray, session: Session) -> np.ndarray:
    """Ring elements back to signed integers in ``[-2**(bits-1), 2**(bits-1))``."""
    v = np.asarray(r, np.int64) & int(session.modulus_mask)
    return np.where(v >= 1 << (session.bits - 1), v - (1 << session.bits), v)


def masks(n: int, session: Session, me: DeviceSecrets, adverts: Mapping[str, Advert]) -> np.ndarray:
    """What :func:`mask` adds to a vector of ``n`` values: my self mask, plus or minus the pairwise mask of every
    peer in ``adverts``. It does not depend on the vector: a device works it out while it still trains."""
    total = prg(self_seed(session, me.b), n, session)
    s = me.s
    for peer, advert in sorted(adverts.items()):
        if peer == me.device_id:
            continue
        m = prg(pair_seed(session, s, me.device_id, peer, advert.s_public), n, session)
        if me.device_id < peer:  # uint32 wraps modulo 2**32, a multiple of the ring's modulus
            np.add(total, m, out=total)
        else:
            np.subtract(total, m, out=total)
    return total & session.modulus_mask


def mask(x: np.ndarray, session: Session, me: DeviceSecrets, adverts: Mapping[str, Advert],
         added: np.ndarray | None = None) -> np.ndarray:
    """My vector ``x`` (signed integers) masked: plus my self mask, plus or minus the pairwise mask of every
    peer in ``adverts``: the devices whose shares reached me (all of them did send shares: the hub can
    rebuild the mask key of any that drops later). ``added``: those masks, when :func:`masks` made them already."""
    if added is None or len(added) != len(x):
        added = masks(len(x), session, me, adverts)
    return (to_ring(x, session) + added) & session.modulus_mask


def reveal(session: Session, held: Mapping[str, tuple[int, int]], survivors: Iterable[str],
           dropped: Iterable[str]) -> dict[str, tuple[str, int]]:
    """What I tell the hub in the last step: for each device, ("b", my share of its self seed) if it survived,
    ("s", my share of its mask key) if it dropped. ``held``: sender -> (s share, b share), my own included.
    Refuses a request that names one device in both sets or fewer survivors than the threshold."""
    alive, gone = set(survivors), set(dropped)
    if alive & gone:
        raise SecAggError(f"asked to reveal both secrets of {sorted(alive & gone)}")
    if len(alive) < session.threshold:
        raise SecAggError(f"{len(alive)} survivors, fewer than the threshold {session.threshold}")
    unknown = (alive | gone) - set(session.participants)
    if unknown:
        raise SecAggError(f"asked about devices outside the round: {sorted(unknown)}")
    out = {}
    for device in sorted(alive | gone):
        if device in held:
            s_share, b_share = held[device]
            out[device] = ("b", b_share) if device in alive else ("s", s_share)
    return out


def unmask(total: np.ndarray, session: Session, adverts: Mapping[str, Advert], survivors: Sequence[str],
           answers: Mapping[str, Mapping[str, tuple[str, int]]]) -> np.ndarray:
    """The plain sum (signed integers) of the survivors' vectors, from ``total`` (the ring sum of their masked
    vectors), ``adverts`` (the devices that sent shares: those every survivor masked with) and ``answers``
    (device -> its :func:`reveal`), at least ``threshold`` of them."""
    if len(answers) < session.threshold:
        raise SecAggError(f"{len(answers)} devices revealed their shares, the threshold is {session.threshold}")
    alive = set(survivors)
    dropped = sorted(set(adverts) - alive)
    n = len(total)
    out = np.asarray(total, np.uint32) & session.modulus_mask
    for u in sorted(alive):
        shares = {session.x(v): share for v, given in answers.items() if (got := given.get(u)) and got[0] == "b"
                  for share in [got[1]]}
        out = out - prg(self_seed(session, combine(shares, session.threshold)), n, session)
    for u in dropped:
        shares = {session.x(v): share for v, given in answers.items() if (got := given.get(u)) and got[0] == "s"
                  for share in [got[1]]}
        s_u = X25519PrivateKey.from_private_bytes(combine(shares, session.threshold))
        if s_u.public_key().public_bytes_raw() != adverts[u].s_public:
            raise SecAggError(f"the shares of {u}'s mask key do not rebuild the key it advertised")
        for v in sorted(alive):
            m = prg(pair_seed(session, s_u, u, v, adverts[v].s_public), n, session)
            out = out - m if v < u else out + m  # v added +m when v < u: take it off; -m when v > u: add it back
    return from_ring(out & session.modulus_mask, session)


# --------------------------------------------------------------------------- packing


def pack(r: np.ndarray, bits: int) -> bytes:
    """Ring elements as ``bits`` bit planes (the lowest bit of every element, then the next...), each plane
    little-endian and padded to whole bytes: the wire form of a masked vector."""
    v = np.asarray(r, np.uint32)
    return b"".join(np.packbits(((v >> np.uint32(k)) & 1).astype(np.uint8), bitorder="little").tobytes()
                    for k in range(bits))


def unpack(data: bytes, n: int, bits: int) -> np.ndarray:
    """:func:`pack`'s inverse; ContractError when ``data`` is not ``n`` elements of ``bits`` bits."""
    if len(data) != packed_size(n, bits):
        raise ContractError(f"a masked vector of {n} x {bits} bits is {packed_size(n, bits)} bytes, not {len(data)}")
    per = (n + 7) // 8
    out = np.zeros(n, np.uint32)
    for k in range(bits):
        plane = np.unpackbits(np.frombuffer(data, np.uint8, per, k * per), count=n, bitorder="little")
        out |= plane.astype(np.uint32) << np.uint32(k)
    return out


def packed_size(n: int, bits: int) -> int:
    return bits * ((n + 7) // 8)
