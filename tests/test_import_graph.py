"""The project's modules import each other without circles.

Every import counts: at module level, under `if TYPE_CHECKING:`, or inside a function (an
import moved into a function to break a circle still makes one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("importer", "uploader")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        if not is_package:
            base.pop()
        base = base[: len(base) - (node.level - 1)]
        package = ".".join([*base, *([node.module] if node.module else [])])
    else:
        package = node.module or ""
    # `from package import name` names a submodule or something defined in the package.
    return [f"{package}.{alias.name}" for alias in node.names] + [package]


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports, wherever the import statement is."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = _imported_names(module, path.name == "__init__.py", node)
            if isinstance(node, ast.ImportFrom):
                # The names themselves when they are modules, else the package they come from.
                submodules = [name for name in names[:-1] if name in modules]
                names = submodules or names[-1:]
            for name in names:
                target = _owning_module(name, modules)
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_graph_sees_the_modules_and_their_imports() -> None:
    graph = import_graph(project_modules())
    assert "importer.lanethreads" in graph["importer.pipeline"]
    assert "importer.lane" in graph["importer.lanethreads"]


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles() -> None:
    found = circles(import_graph(project_modules()))
    assert not found, "modules that import each other in a circle: " + "; ".join(
        " <-> ".join(component) for component in found
    )


# Layers that must not reach into each other: (importer, what it must not import).
FORBIDDEN = (
    ("importer", "uploader"),  # the pipeline runs without the server (dvcr-importer)
    ("uploader.client", "uploader.server"),  # the client talks to a server over HTTP only
    ("uploader.server", "uploader.client"),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def crossings(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports that go against FORBIDDEN."""
    return [
        (module, target)
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        for upper, lower in FORBIDDEN
        if _within(module, upper) and _within(target, lower)
    ]


def test_layers_import_only_downwards() -> None:
    found = crossings(import_graph(project_modules()))
    assert not found, "; ".join(f"{module} imports {target}" for module, target in found)


def test_a_crossing_would_be_found() -> None:
    graph = {"uploader.client.x": {"uploader.server.y"}, "uploader.cli": {"uploader.server.y"}}
    assert crossings(graph) == [("uploader.client.x", "uploader.server.y")]
