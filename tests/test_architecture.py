"""The layers of ARCHITECTURE.md, checked on the source: a lower layer never imports a higher one
(also not inside a function), and modules import each other in no circle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spineauto"

# Lowest first; a module may import its own layer and the layers before it.
LAYERS = [
    {"errors", "paths", "parallel", "schema", "devices", "plugins"},  # foundations, no domain knowledge
    {"io"},
    {"datasets"},
    {"planning"},
    {"preprocessing"},
    {"plan_and_preprocess"},  # the orchestrator above planning and preprocessing
    {"networks"},
    {"inference"},
    {"evaluation"},
    {"training"},
    {"pretraining"},  # stage 1: shards and the pretraining loop, on the training layer's DDP helpers and the ResNet encoder
    {"pipeline"},
    {"cli", "cli_views", "demo", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py (add it to ARCHITECTURE.md and LAYERS)")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path], top_level_only: bool = False) -> set[str]:
    """spineauto modules that ``module`` imports (the deepest existing module of each name)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("spineauto.") and name != module:  # the bare package (__version__, lazy API) is no layer
                found.add(name)
    return found


def test_no_layer_imports_a_higher_one():
    modules = _modules()
    bad = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
           for m, p in sorted(modules.items()) if m != "spineauto"
           for i in sorted(_imports(m, p, modules)) if _layer(i) > _layer(m)]
    assert not bad, "imports that run back up a layer:\n" + "\n".join(bad)


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own modules
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds an import inside a function (the kind that ran back up before)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from spineauto.training.trainer import train_fold\n")
    modules = {"spineauto.io.m": path, "spineauto.training.trainer": path}
    found = _imports("spineauto.io.m", path, modules)
    assert found == {"spineauto.training.trainer"} and _layer("spineauto.training.trainer") > _layer("spineauto.io.m")
