"""The package keeps its shape: no import cycle between its modules (module-level and
function-level imports alike), no module above the size limit, no import of another
module's private name. Read from the source with ``ast``; nothing is imported."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "retom_jax"
MAX_LINES = 800


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str, int]]:
    """``(module, imported name or "", line)`` for every import of a package module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != PACKAGE.name:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # "from . import module"
                    found.append((sub, "", node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name in modules]
    return found


def import_graph(modules: dict) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's ``__init__`` counts as the
    package; importing a submodule imports its package first, which is not an edge here:
    a package's ``__init__`` may gather its submodules)."""
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target in modules and target != name and target != PACKAGE.name:
                graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def private_imports(modules: dict) -> list[str]:
    bad = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, modules):
            if imported.startswith("_") and not imported.startswith("__") and target != name:
                bad.append(f"{name}:{line} imports {target}.{imported}")
    return bad


def test_no_import_cycles():
    modules = _modules()
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_above_the_size_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_no_import_of_private_names():
    bad = private_imports(_modules())
    assert not bad, "imports of private names (make them public): " + "; ".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The three checks see a planted cycle, a private import and a long module."""
    pkg = tmp_path / PACKAGE.name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n" + "x = 1\n" * 900)
    modules = _modules(pkg)
    assert find_cycles(import_graph(modules))
    assert private_imports(modules)
    assert len(modules[f"{PACKAGE.name}.b"].read_text().splitlines()) > MAX_LINES


def test_public_names_still_import():
    """What users import from the top level keeps working, and ``__all__`` lists it."""
    import retom_jax as rj

    for name in ("load_pipeline", "ReToM", "ToMe", "ToDo", "make_mesh", "load_unet",
                 "CheckpointError", "StableDiffusionPipeline", "save_pipeline", "METHODS"):
        assert name in rj.__all__ and getattr(rj, name) is not None
    missing = [n for n in rj.__all__ if not hasattr(rj, n)]
    assert not missing, missing


@pytest.mark.parametrize("name", ["demo"])
def test_demo_is_a_folder_alias(name):
    """"demo" is resolved where model folders are resolved (a UNet loads from it too)."""
    import retom_jax as rj

    unet = rj.load_unet(name)
    assert unet.config.sample_size == 16
