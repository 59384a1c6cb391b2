"""Every public definition in hashexp/ has a docstring.

Public: a module-level function or class whose name does not start with ``_``, and a method of a
public class whose name does not start with ``_`` (dunders such as ``__init__`` are documented by
their class). Nested functions are implementation details and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hashexp"
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def undocumented(source: str, filename: str) -> list[str]:
    """``file:line qualified.name`` of each public definition in ``source`` without a docstring."""
    out: list[str] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, DEFS) or child.name.startswith("_"):
                continue
            if ast.get_docstring(child) is None:
                out.append(f"{filename}:{child.lineno} {prefix}{child.name}")
            if isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(source, filename=filename), "")
    return out


def test_walker_finds_what_it_must() -> None:
    src = '''
def documented():
    """yes"""
def bare():
    pass
def _private():
    pass
class Public:
    """yes"""
    def method(self):
        pass
    def __init__(self):
        pass
    @property
    def prop(self):
        """yes"""
class _Hidden:
    def method(self):
        pass
class Bare:
    def inner(self):
        def nested():
            pass
'''
    assert undocumented(src, "m.py") == ["m.py:4 bare", "m.py:10 Public.method", "m.py:20 Bare",
                                         "m.py:21 Bare.inner"]


def test_package_files_found() -> None:
    files = list(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"expected the hashexp package under {PACKAGE}"


@pytest.mark.parametrize("subpackage", sorted({p.relative_to(PACKAGE).parts[0] if len(p.relative_to(PACKAGE).parts) > 1
                                               else "." for p in PACKAGE.rglob("*.py")}))
def test_every_public_definition_has_a_docstring(subpackage: str) -> None:
    files = sorted(PACKAGE.glob("*.py")) if subpackage == "." else sorted((PACKAGE / subpackage).rglob("*.py"))
    missing = [m for f in files for m in undocumented(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
