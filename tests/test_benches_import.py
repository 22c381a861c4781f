"""Every benchmark script imports: a module split once broke bench/positioning.py (a name moved to another module)
and bench/fleet.py's split broke bench/flood.py, and no test noticed (the benches are run by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bench_script_imports() -> None:
    names = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))
    assert len(names) >= 15, names
    paths = [str(ROOT / "bench"), str(ROOT)]
    code = f"import importlib, sys\nsys.path[:0] = {paths!r}\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
