"""The layer order of DESIGN.md ("Layers") holds for every import in the package, lazy ones included: a module
imports only from its own package or from lower layers. The walk is over the source's AST, so an import inside a
function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import powerinfer

# Top to bottom. Packages on one line are one layer (they may import each other's modules only if they sit on
# the same line; `core`, `errors`, `settings`, `options`, `options_llama` and `textdata` are plain shared data and
# helpers).
LAYERS = [
    {"__init__", "__main__", "cli", "commands", "server"},
    {"api"},
    {"prepare"},
    {"measure"},
    {"runtime"},
    {"sparse"},
    {"model"},
    {"kernels", "_C"},
    {"formats"},
    {"settings", "options", "options_llama", "textdata", "core", "errors"},
]
RANK = {name: len(LAYERS) - i for i, layer in enumerate(LAYERS) for name in layer}


def _component(module: str) -> str:
    """'powerinfer.kernels.ops' -> 'kernels'; 'powerinfer' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, root: Path):
    """(line, imported powerinfer module) for every import statement in `path`."""
    package = list(path.relative_to(root.parent).parts[:-1])  # e.g. ['powerinfer', 'kernels']
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == root.name:
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            if target == root.name or not node.module:
                # `from .. import kernels` / `from powerinfer import _C`: the names are the modules
                for a in node.names:
                    yield node.lineno, f"{target}.{a.name}"
            else:
                yield node.lineno, target


def upward_imports(root: Path) -> list[str]:
    """Every import in the package at `root` that points up the layer list (or into an unknown package)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        here = _component(".".join(path.relative_to(root.parent).with_suffix("").parts))
        if here not in RANK:
            bad.append(f"{path.relative_to(root.parent)}: package {here!r} is not in the layer list")
            continue
        for line, target in _imports(path, root):
            there = _component(target)
            if there == here:
                continue
            if there not in RANK:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {target} (not in the layer list)")
            elif RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {target}: {here} sits below {there}")
    return bad


def test_imports_point_down_the_layer_list():
    root = Path(powerinfer.__file__).parent
    bad = upward_imports(root)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """A copy of two layers with one lazy upward import: the walk must report it (and nothing else)."""
    pkg = tmp_path / "powerinfer"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("from .kernels import ops\n")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "ops.py").write_text("def f():\n    from ..api import LLM\n    return LLM\n")
    bad = upward_imports(pkg)
    assert len(bad) == 1 and "kernels/ops.py:2 imports powerinfer.api: kernels sits below api" in bad[0]
