"""The fine-tune's minibatch orders without ``numpy.random`` (#26 §5).

A round's fine-tune shuffles its windows every epoch. ``np.random.default_rng(seed).permutation`` loads
``numpy.random``'s nine extension modules: about 3.4 MB of an agent's RSS in a round (1.9 MB of their file
pages, 1.5 MB of heap), for a few thousand indices an epoch. :class:`Shuffler` gives the same orders, bit for
bit, from numpy's own algorithms written out: SeedSequence, PCG64 (two 32-bit draws to a 64-bit output) and
``Generator.permutation``'s Fisher-Yates shuffle with masked rejection. It is the same orders so that a round
trains as it did before, and every federated figure in docs/benchmarks.md stays reproducible; numpy does not
promise ``Generator``'s streams across releases, and ``tests/test_lean_rounds.py`` compares the two call after
call, so a numpy that changes them is noticed (the shuffle would stay a good one, only no longer numpy's).
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["Shuffler"]

_M32, _M64, _M128 = (1 << 32) - 1, (1 << 64) - 1, (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's multiplier


class Shuffler:
    """``np.random.default_rng(seed).permutation(n)``, call after call, the same orders bit for bit, without
    importing ``numpy.random`` (see the module doc). Orders of up to 2**32 rows."""

    def __init__(self, seed: int) -> None:
        seed = operator.index(seed)  # numpy's integers too
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")  # as numpy's SeedSequence says
        words, h = [], 0x43B0D7E5  # the seed as 32-bit words, least significant first
        while True:
            words.append(seed & _M32)
            seed >>= 32
            if not seed:
                break

        def hashmix(v: int) -> int:
            nonlocal h
            v ^= h
            h = h * 0x931E8875 & _M32
            v = v * h & _M32
            return v ^ v >> 16

        def mix(x: int, y: int) -> int:
            r = (0xCA01F9DD * x - 0x4973F715 * y) & _M32
            return r ^ r >> 16

        pool = [hashmix(words[i] if i < len(words) else 0) for i in range(4)]
        for s in range(4):
            for d in range(4):
                if s != d:
                    pool[d] = mix(pool[d], hashmix(pool[s]))
        for w in words[4:]:
            for d in range(4):
                pool[d] = mix(pool[d], hashmix(w))
        h, state = 0x8B51F9DD, []  # SeedSequence.generate_state(4, uint64)
        for i in range(8):
            v = pool[i % 4] ^ h
            h = h * 0x58F38DED & _M32
            v = v * h & _M32
            state.append(v ^ v >> 16)
        u = [state[i] | state[i + 1] << 32 for i in range(0, 8, 2)]  # PCG64: state u0:u1, stream u2:u3
        self.inc = ((u[2] << 64 | u[3]) << 1 | 1) & _M128
        self.state = ((self.inc + (u[0] << 64 | u[1])) * _PCG_MULT + self.inc) & _M128
        self.half: int | None = None  # the upper half of the last 64-bit output, numpy's next 32-bit draw

    def _next32(self) -> int:
        if self.half is not None:
            v, self.half = self.half, None
            return v
        self.state = s = (self.state * _PCG_MULT + self.inc) & _M128
        x, rot = ((s >> 64) ^ s) & _M64, s >> 122
        v = ((x >> rot) | (x << (64 - rot))) & _M64
        self.half = v >> 32
        return v & _M32

    def permutation(self, n: int) -> np.ndarray:
        if n > 1 << 32:
            raise ValueError(f"{n} rows: Shuffler orders up to 2**32")
        order = list(range(n))
        for i in range(n - 1, 0, -1):
            mask = (1 << i.bit_length()) - 1
            while (j := self._next32() & mask) > i:
                pass
            order[i], order[j] = order[j], order[i]
        return np.asarray(order, np.intp)
