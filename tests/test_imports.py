"""The import graph of scene3d/ and data_prep/: one-way dependencies between packages.

Every ``import`` of a project module is read with ``ast`` (module level and inside functions). Nodes are the
subpackages of scene3d (``scene3d.data``, ``scene3d.models``, ...), each top-level module of scene3d
(``scene3d.config``, ``scene3d.train``, ...; ``scene3d`` is its ``__init__``) and ``data_prep``.
Imports inside a module-level ``__getattr__`` are left out of the graph: they are the old names of moved code,
loaded only when an outside caller asks for one.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("scene3d", "data_prep")

#: scene3d modules that may import data_prep (it writes data; these run it), each with the reason.
RUNS_DATA_PREP = {
    "scene3d.cli": "the prep / synth commands are data_prep's entry points",
    "scene3d.train": "generates the synthetic benchmark before training (data_prep.synthetic.prepare_data)",
    "scene3d.evaluate": "generates the synthetic benchmark before a checkpoint eval",
    "scene3d.api": "reads a raw ScanNet scan with data_prep.scannet.build_scene",
    "scene3d.metrics": "reads referring rows with data_prep.refer.read_refer_jsonl",
    "scene3d.demo": "makes its synthetic ScanNet-format scenes with data_prep.synthetic",
}


class Import(NamedTuple):
    source: str  # importing module
    target: str  # imported module
    path: Path
    line: int
    in_function: bool
    in_getattr: bool  # inside a module-level __getattr__ (an old-name shim)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool, in_getattr: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                shim = not in_function and child.name == "__getattr__" and node is tree
                visit(child, True, in_getattr or shim)
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                targets = [_resolve(child, module, path.name == "__init__.py")]
            else:
                visit(child, in_function, in_getattr)
                continue
            for t in targets:
                if t.split(".")[0] in PACKAGES:
                    out.append(Import(module, t, path, child.lineno, in_function, in_getattr))

    visit(tree, False, False)
    return out


def all_imports() -> list[Import]:
    return [i for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for i in _imports(p)]


def node_of(module: str) -> str:
    """The graph node of a module: data_prep, a scene3d subpackage, or a top-level scene3d module."""
    parts = module.split(".")
    if parts[0] == "data_prep":
        return "data_prep"
    if len(parts) == 1:
        return "scene3d"
    if (ROOT / "scene3d" / parts[1]).is_dir():
        return f"scene3d.{parts[1]}"
    return f"scene3d.{parts[1]}"  # a top-level module (scene3d/<name>.py)


def package_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {}
    for i in imports:
        a, b = node_of(i.source), node_of(i.target)
        if a != b and not i.in_getattr:
            graph.setdefault(a, {}).setdefault(b, i)
    return graph


def find_cycle(graph: dict[str, dict]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return []


def _where(i: Import) -> str:
    return f"{i.path.relative_to(ROOT)}:{i.line} ({i.source} -> {i.target})"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": 0}, "b": {"c": 0}, "c": {"a": 0}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 0}, "b": {"c": 0}}) == []


def test_package_graph_has_no_cycle():
    graph = package_graph(all_imports())
    cycle = find_cycle(graph)
    edges = [_where(graph[a][b]) for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle " + " -> ".join(cycle) + ":\n  " + "\n  ".join(edges)


def test_scene3d_library_never_imports_data_prep():
    imports = [i for i in all_imports() if not i.in_getattr and i.source.startswith("scene3d")
               and node_of(i.target) == "data_prep"]
    bad = [_where(i) for i in imports if node_of(i.source) not in RUNS_DATA_PREP]
    assert not bad, "data_prep writes data; scene3d reads it and must not import it:\n  " + "\n  ".join(bad)
    unused = set(RUNS_DATA_PREP) - {node_of(i.source) for i in imports}
    assert not unused, f"RUNS_DATA_PREP lists modules that no longer import data_prep: {sorted(unused)}"


def test_engine_evaluate_is_model_agnostic():
    edges = [i for i in _imports(ROOT / "scene3d" / "engine" / "evaluate.py") if not i.in_getattr]
    bad = [_where(i) for i in edges if i.target in ("scene3d.config", "scene3d.train", "scene3d.evaluate")]
    assert not bad, bad


#: Files whose in-function imports are not checked, with the reason.
UNCHECKED_FILES: dict = {}


def _said_why(lines: list[str], line: int) -> bool:
    """A comment on the import's line, on another line of its block of imports, or just above that block."""
    i = line - 1
    if "#" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ", "#")):
        i -= 1
        if "#" in lines[i]:
            return True
    return False


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_in_function_import_says_why(pkg):
    """Any in-function import of a project module (same package too) carries a comment on its line or on its
    block of imports: it keeps a heavy or optional import off the start-up path, or breaks a cycle by design.
    Everything else belongs at the top of the module, where a reader sees the dependency."""
    bad = []
    for i in all_imports():
        rel = str(i.path.relative_to(ROOT))
        if not i.in_function or i.in_getattr or not i.source.startswith(pkg) or rel in UNCHECKED_FILES:
            continue
        if not _said_why(i.path.read_text(encoding="utf-8").splitlines(), i.line):
            bad.append(_where(i))
    assert not bad, "in-function imports without a comment saying why:\n  " + "\n  ".join(bad)
