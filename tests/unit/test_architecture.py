"""The package layout is the architecture (docs/architecture.md): imports only run down the layers,
and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "cryptlayer"

# Lowest first. A module may import from its own package or a lower layer, never sideways
# (build, runtime and distribution do not know one another).
LAYERS: list[set[str]] = [
    {"errors", "fsutil", "paths", "secret", "progress", "config", "template", "oci"},
    {"tools"},  # above the ground floor (the map): fsutil or oci never run a program
    {"keys"},
    {"image"},
    {"build", "runtime", "distribution"},
    {"cli", "engine"},  # the two doors: the command line, and the OCI runtime engines call
    {"__main__"},
]
TOP_LEVEL_MODULES = 12  # at most, __init__ and __main__ included


def _group(module: str) -> str:
    """`cryptlayer.image.manifest` -> `image`; `cryptlayer.errors` -> `errors`."""
    return module.split(".")[1]


def _rank(group: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_only: bool) -> set[str]:
    """The cryptlayer modules `path` imports (all of them, or only those run at import time)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_only:  # `if TYPE_CHECKING:` imports run nothing
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; the project imports absolutely"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (SRC / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("cryptlayer.")}


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_name_is_in_a_layer() -> None:
    names = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    names -= {"__init__"}
    unplaced = sorted(n for n in names if not any(n in layer for layer in LAYERS))
    assert not unplaced, f"add to LAYERS and to docs/architecture.md's map: {unplaced}"
    assert len(list(PACKAGE.glob("*.py"))) <= TOP_LEVEL_MODULES


def test_imports_only_run_down() -> None:
    wrong = []
    for name, path in _modules().items():
        if name == "cryptlayer":
            continue
        for target in _imports(path, top_only=False):
            here, there = _group(name), _group(target)
            # Layer 0's modules are each their own group and may use one another (no cycle).
            sideways = _rank(there) == _rank(here) != 0
            if here != there and (_rank(there) > _rank(here) or sideways):
                wrong.append(f"{name} -> {target}")
    assert not wrong


def test_no_import_cycle() -> None:
    graph = {name: _imports(path, top_only=True) for name, path in _modules().items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(node) :], node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*trail, node])
        done.add(node)

    for name in graph:
        visit(name, [])
