"""The package's structure: no import cycles, no private names across subpackages."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stemgpu"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(mods):
    """(importing module, imported module, imported name) for every stemgpu import, also
    those inside functions."""
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("stemgpu"):
                    for alias in node.names:
                        full = f"{target}.{alias.name}"
                        yield name, (full if full in mods else target), alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("stemgpu"):
                        yield name, alias.name, ""


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if (PACKAGE / parts[1]).is_dir() else "stemgpu" \
        if len(parts) > 1 else module


def test_no_private_name_is_imported_across_subpackages():
    mods = _modules()
    crossing = [f"{src} imports {dst}.{name}" for src, dst, name in _imports(mods)
                if name.startswith("_") and not name.startswith("__")
                and _subpackage(src) != _subpackage(dst)
                and not (_subpackage(src) == "stemgpu" == _subpackage(dst))]
    assert not crossing, crossing


def test_no_import_cycles():
    mods = _modules()
    edges = collections.defaultdict(set)
    for src, dst, _ in _imports(mods):
        # A package's __init__ importing its own children is a re-export, not a cycle.
        if dst in mods and not dst.startswith(src + ".") and not src.startswith(dst + "."):
            edges[src].add(dst)
    cycles = set()
    for start in mods:
        stack = [(start, (start,))]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert not cycles, sorted(cycles)
