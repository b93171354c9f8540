"""
No import cycle in the package.

Every ``import`` statement counts, wherever it is: at the top of a module,
inside a function, and under ``if TYPE_CHECKING:``.  An import made only
for typing is still a dependency: the two modules can no longer be read,
tested or moved apart, and the cycle this test was written against
(``app`` → ``api.scope`` → ``app``, through a type annotation) was exactly
of that kind.  An import inside a function is how a cycle gets hidden, not
removed.

An edge goes to the module an import names (``from oproxy.api import
chat`` names ``oproxy.api.chat``; ``from oproxy.api.scope import Scope``
names ``oproxy.api.scope``).  A package's ``__init__`` that a submodule's
import runs on the way is not counted: ours import nothing eagerly.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import oproxy

Graph = dict[str, set[str]]


def modules_under(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> Iterator[str]:
    """The dotted names each import statement of ``module`` may refer to."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from package import module`` names the module itself.
                yield f"{source}.{alias.name}"


def import_graph(root: Path, package: str) -> Graph:
    """Which of the package's modules each module imports."""
    modules = modules_under(root, package)
    graph: Graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """
    One cycle through each strongly connected group of modules (Tarjan's
    algorithm, without recursion), as the path ``a → b → ... → a``.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
    return [_one_cycle(graph, group) for group in groups]


def _one_cycle(graph: Mapping[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way around ``group`` from its first module back to it."""
    first = min(group)
    paths = {first: [first]}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == first:
                    return [*paths[node], first]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no way around {sorted(group)}")


def test_the_package_has_no_import_cycle() -> None:
    root = Path(oproxy.__file__).parent
    found = cycles(import_graph(root, "oproxy"))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_a_cycle_made_only_for_typing_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "web").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "web" / "__init__.py").write_text("")
    (package / "app.py").write_text("from pkg.web import scope\n")
    (package / "web" / "scope.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import App\n"
    )
    (package / "web" / "lazy.py").write_text("def f():\n    from pkg import app\n")
    (package / "leaf.py").write_text("import pkg.web.lazy\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg.web.lazy"] == {"pkg.app"}
    assert graph["pkg.leaf"] == {"pkg.web.lazy"}
    assert cycles(graph) == [["pkg.app", "pkg.web.scope", "pkg.app"]]


def test_no_cycle_is_found_where_there_is_none() -> None:
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert cycles(graph) == []
