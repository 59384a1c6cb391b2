"""No import circle inside hashexp/: every module's imports, read with ast, form a graph without cycles.

Every import statement counts, wherever it sits: at module level, under ``if TYPE_CHECKING:`` and
inside functions (a lazy import hides a circle from the interpreter, not from a reader). An
import names the module it loads (``from hashexp.merge import calibration`` is an edge to
``hashexp.merge.calibration``; ``from hashexp.merge.sites import model_sites`` one to
``hashexp.merge.sites``); the parent packages Python initialises on the way are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hashexp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The hashexp modules that ``name`` (at ``path``) imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import hashexp.x.y as z` of a module that is not ours: its owner
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d2"}, "d2": {"d"}}) == ["d", "d2", "d"]


def test_imports_are_read_from_every_kind_of_statement(tmp_path):
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hashexp.b import X\n"
           "def f():\n    import hashexp.c\n    from hashexp.pkg import d\nimport numpy\n")
    p = tmp_path / "a.py"
    p.write_text(src)
    assert imports_of("hashexp.a", p, {"hashexp.a", "hashexp.b", "hashexp.c", "hashexp.pkg", "hashexp.pkg.d"}) \
        == {"hashexp.b", "hashexp.c", "hashexp.pkg.d"}


def test_no_import_cycle_inside_hashexp():
    graph = import_graph()
    assert len(graph) > 50 and "hashexp.merge.rehasher" in graph  # the walk saw the package
    assert "hashexp.merge.sites" in graph["hashexp.merge.rehasher"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
