"""An in-house mutation fuzzer, without coverage: the test suite's fixed-seed pass and the fallback of
``bench/fuzz.py --engine random`` where atheris is not installed.

Inputs are the target's seed corpus and mutants of it (bytes flipped, inserted, erased, duplicated,
numbers and JSON tokens swapped in, two inputs spliced; a framed payload's header or body alone), drawn from ``random.Random(seed)``: the same
seed gives the same inputs. Each input gets ``per_input_s`` (a hang raises :class:`Hang` in it, by
SIGALRM) and the process's peak RSS must stay under ``rss_mb``."""

from __future__ import annotations

import random
import resource
import signal
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from fuzz.targets import TARGETS, Target

CORPUS = Path(__file__).parent / "corpus"
_TOKENS = (b"0", b"-1", b"1e308", b"-0.0", b"NaN", b"9223372036854775808", b"null", b"true", b"[]", b"{}",
           b'""', b'"x"', b",", b"\n", b"\r\n", b'"', b"\\", b"\xff", b"\0", b"[" * 40, b"}", b":", b"=", b"inf")


class Hang(Exception):
    """An input that took longer than it may."""


@dataclass
class Report:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    grew_mb: float = 0.0  # resident memory after the run minus before: what the inputs left behind
    failures: list[tuple[bytes, str]] = field(default_factory=list)

    def as_row(self) -> dict[str, object]:
        return {"target": self.target, "inputs": self.inputs, "per_s": round(self.inputs / max(self.seconds, 1e-9)),
                "edges": None, "rss_mb": round(self.peak_rss_mb), "crashes": len(self.failures)}


def corpus(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """``data`` changed by one to four edits."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(b))
        op = rng.randrange(6)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            top = 256 if rng.random() < 0.25 else 127  # mostly ASCII: one byte past it ends a JSON payload
            b[i:i] = bytes(rng.randrange(top) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del b[i:i + rng.randint(1, 16)]
        elif op == 3:
            b[i:i + rng.randint(0, 6)] = rng.choice(_TOKENS)
        elif op == 4 and b:
            j = rng.randint(0, len(b))
            b[i:i] = b[min(i, j):max(i, j)][:64]
        else:
            other = rng.choice(pool)
            b = b[:i] + other[rng.randint(0, len(other)):]
    return bytes(b)


_FRAMED = (b"EMLB", b"EMLR", b"EMLU")  # bundle, announcement, update: magic, header length, JSON header, body


def mutate_framed(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """A framed payload with its JSON header or its body mutated and the length fixed up, half the time:
    blind edits almost always break the length and never reach the header's fields or the arrays."""
    if data[:4] not in _FRAMED or len(data) < 8 or rng.random() < 0.5:
        return mutate(rng, data, pool)
    (n,) = struct.unpack_from(">I", data, 4)
    head, body = data[8:8 + n], data[8 + n:]
    if rng.random() < 0.7:
        head = mutate(rng, head, pool)
    else:
        body = mutate(rng, body, pool)
    return data[:4] + struct.pack(">I", len(head)) + head + body


def inputs(name: str, seed: int) -> Iterator[bytes]:
    """The corpus as it is, then mutants of it and of earlier mutants, forever."""
    pool = corpus(name)
    yield from pool
    rng = random.Random(seed)
    recent = list(pool)
    while True:
        data = mutate_framed(rng, rng.choice(pool if rng.random() < 0.5 else recent), pool)
        if len(recent) < 64:
            recent.append(data)
        else:
            recent[rng.randrange(len(recent))] = data
        yield data


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang("input took too long")


def fuzz_random(name: str, *, runs: int, seed: int = 0, seconds: float | None = None, per_input_s: float = 5.0,
                rss_mb: float = 1024, target: Target | None = None) -> Report:
    """Run ``runs`` inputs (or for ``seconds``) through target ``name`` (its corpus, its function unless
    ``target`` is given); every broken property, hang or escaped exception with its input."""
    target, report = target or TARGETS[name], Report(name)
    start, before = time.monotonic(), resident_mb()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for data in inputs(name, seed):
            if report.inputs >= runs or (seconds is not None and time.monotonic() - start > seconds):
                break
            signal.setitimer(signal.ITIMER_REAL, per_input_s)
            try:
                target(data)
            except Exception as exc:  # any escape is a finding: record it with its input
                report.failures.append((data, f"{type(exc).__name__}: {exc}"[:500]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            report.inputs += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    report.seconds, report.grew_mb = time.monotonic() - start, resident_mb() - before
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if report.peak_rss_mb > rss_mb:
        report.failures.append((b"", f"peak RSS {report.peak_rss_mb:.0f} MB over the {rss_mb} MB bound"))
    return report
