"""The house's rules that a reader cannot check at a glance, checked on the source.

docs/architecture.md states them: the import graph of `worker` reads one way
(no module both above and below another, counting imports inside functions,
which hide a cycle rather than remove it); only `worker/backends/` asks which
database it is on; no `type: ignore` without the reason beside it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "worker"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The worker modules `name` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"  # `from worker import db`: worker.db
                found.add(target if target in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: _imports(name) for name in MODULES}
    # The package's face re-exports track_event; its submodules import each other, not it.
    graph["worker"] = set()
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_backend_seam_asks_which_database_it_is_on() -> None:
    asks = re.compile(r"dialect(\.name)?\s*(==|!=|\bin\b)|\.name\s*==\s*[\"'](sqlite|postgresql)")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if "backends" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if asks.search(line)
    ]
    assert offenders == []


def test_every_type_ignore_names_its_code_and_says_why() -> None:
    # The reason is a comment on the line itself or on the line above it.
    bare = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if "type: ignore" not in line:
                continue
            coded = re.search(r"type: ignore\[[\w-]+\](\s+#\s*\S)?", line)
            above = lines[number - 2].strip() if number > 1 else ""
            if not coded or not (coded.group(1) or above.startswith("#")):
                bare.append(f"{path.relative_to(REPO)}:{number}")
    assert bare == []
