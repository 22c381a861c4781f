"""``python -m fuzz TARGET [libFuzzer flags] [corpus dirs]``: one target under atheris, coverage-guided.

The decoders (``edge_agent``) are instrumented for coverage as they are imported; libFuzzer's flags do
the rest (``-runs=N``, ``-max_total_time=S``, ``-timeout=S`` per input: a hang, ``-rss_limit_mb``: memory
growth, ``-seed``). ``bench/fuzz.py`` runs every target this way and sums up what they found."""

from __future__ import annotations

import sys

import atheris
from atheris.import_hook import HookManager

# The decoders are instrumented, not the harness. The log reader's modules without comparison tracing:
# atheris 3.0 leaks the result of every traced `==` that is not a bool (~10 KB an input with numpy arrays:
# 480 MB after 40,000 log inputs, flat without it); they keep their edge coverage.
with HookManager({"edge_agent"}, set(), True, trace_dataflow=False):
    import edge_agent.preprocess
    import edge_agent.sources  # noqa: F401
with atheris.instrument_imports(include=["edge_agent"]):
    from fuzz.targets import TARGETS
if sys.argv[1:2] == ["http"]:  # the hub's door: its routes and the stdlib's request parsing too
    with atheris.instrument_imports(include=["cloud_hub", "wsgiref", "http.server"]):
        import fuzz.http_door  # noqa: F401


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz TARGET [libFuzzer flags] [corpus dirs]; targets: {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
