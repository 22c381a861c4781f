"""A contract type for import-linter (``.importlinter``): no module imports another module's private names.

A name that starts with ``_`` is its module's business. When two modules need it, it has a public name
in the module that owns it (or in a shared one such as ``cloud_hub/cli/common.py``). Every ``from x
import _y`` between first-party modules breaks the contract, wherever it is (top level or in a function).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def private_imports(source: str, module: str, roots: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """``(line, imported module, name)`` of each private name ``source`` imports from a first-party module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module.split(".")[0] not in roots or node.module == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append((node.lineno, node.module, alias.name))
    return found


def source_file(module: str) -> Path | None:
    """The file of a first-party module, found without importing anything (importing a package runs its
    ``__init__``, which a broken tree may not survive)."""
    root, *parts = module.split(".")
    spec = importlib.util.find_spec(root)  # a top-level name: located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class NoPrivateNamesContract(Contract):
    type_name = "no_private_names"
    containers = fields.SetField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        containers = tuple(sorted(self.containers))  # type: ignore[call-overload]
        roots = tuple(sorted({c.split(".")[0] for c in containers}))
        broken = []
        for module in sorted(graph.modules):
            if not module.startswith(tuple(f"{c}." for c in containers) + containers):
                continue
            path = source_file(module)
            if path is None:
                continue
            with open(path, encoding="utf-8") as f:
                for line, imported, name in private_imports(f.read(), module, roots):
                    broken.append(f"{module} (l.{line}) imports {imported}.{name}")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for item in check.metadata["broken"]:
            output.print_error(f"- {item}")
        output.new_line()
        output.print("Give the name a public spelling in the module that owns it, or move it to a shared module.")
