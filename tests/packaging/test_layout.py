"""The package's layout keeps its promises: imports flow one way, no cycles, modules a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"layerfold": ROOT / "engine", "layerfold.kernels": ROOT / "kernels"}

# Sub-packages in pipeline order: a module may import its own sub-package and those of lower rank.
RANK = {
    "kernels": 0,
    "core": 1,
    "calibration": 2, "inference": 2,
    "evaluation": 3, "surgery": 3, "interop": 3,
    "methods": 4, "healing": 4,
    "pipeline": 5, "serving": 5,
    "cli": 6, "__main__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            if pkg == "layerfold" and parts and parts[0] == "kernels":
                continue
            out[name] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """layerfold modules imported by ``name`` (absolute; relative resolved), module-level and inside functions."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                found.add(full if full in MODULES else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] == "layerfold" and m in MODULES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _subpackage(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) == 1:
        return None  # the package itself (its __init__ loads names lazily)
    return parts[1]


def test_no_engine_or_kernels_top_level_imports() -> None:
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for m in mods:
                assert m.split(".")[0] not in ("engine", "kernels"), f"{name} imports {m}: use layerfold.*"


def test_kernels_never_import_the_engine() -> None:
    for name, deps in GRAPH.items():
        if name.startswith("layerfold.kernels"):
            bad = [d for d in deps if not d.startswith("layerfold.kernels")]
            assert not bad, f"{name} imports {bad}"


def test_imports_flow_down_the_pipeline() -> None:
    bad = []
    for name, deps in GRAPH.items():
        src = _subpackage(name)
        if src is None:
            continue
        for d in deps:
            dst = _subpackage(d)
            if dst is None or dst == src:
                continue
            if RANK[dst] > RANK[src]:
                bad.append(f"{name} -> {d}")
    assert not bad, "imports against the pipeline order:\n" + "\n".join(sorted(bad))


def test_every_subpackage_has_a_rank() -> None:
    subs = {_subpackage(m) for m in MODULES} - {None}
    assert subs <= set(RANK), f"add {sorted(subs - set(RANK))} to RANK (and the layout docs)"


def test_no_import_cycles() -> None:
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name: str) -> None:
    n = len(MODULES[name].read_text().splitlines())
    assert n <= 420, f"{name} has {n} lines; split it by responsibility (STYLE.md: files under ~400 lines)"
