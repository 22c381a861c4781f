"""Deferred imports: a module registered here is imported at its first attribute access, not at import.

For a library that imports more than the agent uses: paho imports ``urllib.request`` (and with it
``http.client`` and ``email``: 1.3-1.8 MB of a small device's anonymous memory) only to look up a SOCKS proxy
when it connects, which it does only when PySocks is installed. :func:`defer` puts a stand-in module in its place whose
module ``__getattr__`` (PEP 562) imports the real one and answers from it, so whoever does use it gets the
real module's attributes (what is set on the stand-in, e.g. by ``mock.patch`` before that first use, does not
reach the real module). (The standard library's ``importlib.util.LazyLoader`` does not serve here: on
Python 3.11, ``import urllib.request`` reads the module's ``__spec__``, which loads it.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["defer"]


def defer(name: str) -> None:
    """Stand in for ``name`` (a dotted module name) until something reads from it; nothing when it is
    imported already or cannot be found."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    stub = types.ModuleType(name, f"stands for {name} until its first use (edge_agent/lazy.py)")
    lock = threading.Lock()  # two threads' first uses at once: one imports, the other waits for it

    def load(attr: str) -> Any:
        with lock:
            if sys.modules.get(name) is stub:
                del sys.modules[name]
            module = importlib.import_module(name)  # the import sets the parent's attribute too
        return getattr(module, attr)

    stub.__getattr__ = load  # type: ignore[method-assign]
    sys.modules[name] = stub
    parent, _, child = name.rpartition(".")
    if parent:  # what the import system does for a submodule: the parent package's attribute
        setattr(sys.modules[parent], child, stub)
