"""The layering rules of docs/architecture.md, read from the imports of every module (top-level and
function-local): each package imports only the packages below it, and no module imports itself back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dmd_dar"

# The rooms of the house and what each may import (besides itself). "shared" is the language every room speaks:
# errors, configs, checkpoints, the time convention, data and image files, run plumbing.
SHARED = {"errors", "config", "checkpoint", "diffusion", "data", "image_io", "grid", "training"}
ALLOWED = {
    "shared": set(),
    "routing": set(),  # DAR itself: pure torch, no diffusion knowledge, no other room
    "models": {"routing"},
    "spectral": set(),
    "metrics": {"routing", "models", "spectral"},
    "teacher": {"routing", "models", "metrics"},  # REPA may align to the offline FID Inception
    "t2i": {"routing", "models"},
    "dmd": {"routing", "models", "spectral", "metrics", "t2i"},
    "sampling": {"routing", "models", "t2i", "dmd"},
}
ROUTING_MAY_IMPORT = {"errors"}  # of the shared room


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return "shared" if part in SHARED else part


def imports_of(module: str) -> set[str]:
    """The dmd_dar modules `module` imports, resolved to modules (a `from pkg import submodule` names the submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "dmd_dar"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dmd_dar":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return {m for m in out if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_room_is_known():
    unknown = {room(m) for m in MODULES if m != "dmd_dar"} - set(ALLOWED)
    assert not unknown, f"new package(s) {unknown}: give them a floor in ALLOWED and docs/architecture.md"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "dmd_dar"))
def test_imports_follow_the_layering_rules(module):
    mine = room(module)
    for target in GRAPH[module]:
        theirs = room(target)
        if target == "dmd_dar" or theirs == mine:
            continue
        if theirs == "shared":
            assert mine != "routing" or target.split(".")[1] in ROUTING_MAY_IMPORT, f"{module} -> {target}"
            continue
        assert theirs in ALLOWED[mine], f"{module} ({mine}) may not import {target} ({theirs})"


def test_shared_modules_import_no_room_above_them():
    for module in (m for m in MODULES if room(m) == "shared"):
        above = {t for t in GRAPH[module] if room(t) != "shared"}
        assert not above, f"{module} imports {above}"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                circle = path[path.index(n):] + [n] if n in path else [m, n]
                pytest.fail("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_library_never_imports_scripts_or_eval():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("scripts", "eval") for n in names), module


def test_the_checker_sees_a_broken_rule_and_a_circle():
    """The rules above can fail: a routing -> dmd arrow and a two-module circle are both caught."""
    assert "dmd" not in ALLOWED["routing"] and "routing" in ALLOWED["models"]
    saved = dict(GRAPH)
    try:
        GRAPH["dmd_dar.checkpoint"] = GRAPH["dmd_dar.checkpoint"] | {"dmd_dar.config"}
        GRAPH["dmd_dar.config"] = GRAPH["dmd_dar.config"] | {"dmd_dar.checkpoint"}
        with pytest.raises(pytest.fail.Exception, match="import circle"):
            test_no_import_circle()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
