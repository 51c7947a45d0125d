"""The package's shape (issue 28): no function in reactor/ runs over 60 lines, so a reader gets
names for the parts. The allow-list names the functions other engineers are splitting right
now; it empties as their work merges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reactor"
MAX_LINES = 60

# Functions allowed past the limit, each with its reason; none today (issue 28 split them all).
ALLOWED: frozenset[str] = frozenset()


def long_functions(tree: ast.AST, path: str, limit: int = MAX_LINES) -> dict[str, int]:
    """Every function or method (nested ones too) longer than `limit` lines, from its `def`
    to its last line, as "path:Class.name" -> lines."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found[f"{path}:{name}"] = lines
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def package_long_functions() -> dict[str, int]:
    found: dict[str, int] = {}
    for source in sorted(PACKAGE.rglob("*.py")):
        path = source.relative_to(PACKAGE.parent).as_posix()
        found |= long_functions(ast.parse(source.read_text(encoding="utf-8")), path)
    return found


def test_no_function_in_the_package_is_over_60_lines() -> None:
    over = {name: n for name, n in package_long_functions().items() if name not in ALLOWED}
    assert over == {}, f"split these into named parts: {over}"


def test_the_allow_list_names_only_functions_still_over_60_lines() -> None:
    # A function split (or renamed) leaves the list: it must not keep a stale exemption.
    stale = ALLOWED - package_long_functions().keys()
    assert stale == set(), f"remove from ALLOWED: {sorted(stale)}"


def _source(body_lines: int, *, nested: bool = False, method: bool = False) -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(body_lines - 1))
    fn = f"def f():\n{body}"
    if nested:
        fn = "def outer():\n" + "".join("    " + line + "\n" for line in fn.splitlines())
    if method:
        fn = "class C:\n" + "".join("    " + line + "\n" for line in fn.splitlines())
    return fn


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (_source(60), {}),  # exactly the limit: `def` line and 59 more
        (_source(61), {"m.py:f": 61}),
        (_source(61, method=True), {"m.py:C.f": 61}),
        # The inner one is 61 lines, the outer 62: both are named.
        (_source(61, nested=True), {"m.py:outer": 62, "m.py:outer.f": 61}),
        ("async def g():\n" + "    pass\n" * 61, {"m.py:g": 62}),
    ],
)
def test_long_functions_counts_every_kind_of_function(
    source: str, expected: dict[str, int]
) -> None:
    assert long_functions(ast.parse(source), "m.py") == expected
