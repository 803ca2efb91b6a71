"""The package's shape holds: no import cycles, no private names across modules, a
docstring on every package, and aiosmtpd pinned to the versions relay's session code
re-creates."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import aiosmtpd
import pytest

from relay.receive import session

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relay"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every `import` / `from ... import` in the file, wherever it
    stands (TYPE_CHECKING blocks and function bodies included), relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                if path.name != "__init__.py":
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the relay modules it imports (`from relay.x import y` counts relay.x.y
    when that is a module). A module importing its own package's __init__ is left out."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for module, names in imports(path, name):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in known and target != name and not name.startswith(f"{target}."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_relay() -> None:
    """No two relay modules import each other, directly or around a circle, not even
    behind TYPE_CHECKING or inside a function."""
    assert [] == cycles(graph())


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check itself finds a circle when there is one."""
    assert [["a", "b", "c"]] == cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})


def test_no_module_imports_another_modules_private_names() -> None:
    """A private name (`_Writer`) imported across modules means a split in the wrong place."""
    crossing = [
        f"{name}: from {module} import {imported}"
        for name, path in modules().items()
        for module, names in imports(path, name)
        if module.startswith("relay")
        for imported in names
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert [] == crossing


@pytest.mark.parametrize("name", sorted(n for n, p in modules().items() if p.name == "__init__.py"))
def test_every_package_says_where_it_sits(name: str) -> None:
    """Each package's __init__ has a docstring (where it sits on the data path)."""
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{name} has no docstring"


def test_aiosmtpd_is_pinned_to_the_checked_versions() -> None:
    """pyproject allows exactly the aiosmtpd versions relay's session code was checked
    against, and those are what is installed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    spec = next(d for d in project["project"]["dependencies"] if d.startswith("aiosmtpd"))
    assert "aiosmtpd>=1.4.6,<1.4.7" == spec
    assert re.fullmatch(r"1\.4\.6", aiosmtpd.__version__)
    assert ("1.4.6",) == session.AIOSMTPD_CHECKED


def test_another_aiosmtpd_is_refused_with_the_supported_versions() -> None:
    """An aiosmtpd relay was not checked against stops the import with a message that
    names the installed version and the one to install."""
    with pytest.raises(ImportError) as refused:
        session.check_aiosmtpd("1.5.0")
    assert (
        "relay needs aiosmtpd 1.4.6 (its session code re-creates that version's internals),"
        " but aiosmtpd 1.5.0 is installed: pip install 'aiosmtpd==1.4.6'"
    ) == str(refused.value)
    session.check_aiosmtpd("1.4.6")
