"""glibc malloc's knobs, for the processes that measure their memory (the agent, ``federate``): a setting
(``mallopt``) and handing the heap's free pages back (``malloc_trim``). Elsewhere (not glibc) they do nothing."""

from __future__ import annotations

import contextlib
import ctypes

__all__ = ["M_ARENA_MAX", "M_MMAP_THRESHOLD", "mallopt", "trim"]

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8


def mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where the C library has none or refuses it."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (AttributeError, OSError):
        return False


def trim() -> None:
    """glibc's ``malloc_trim(0)``: the heap's free pages back to the system."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
