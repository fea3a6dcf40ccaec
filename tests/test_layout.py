"""The package's layers import one way: utils < core < decoding < compat < the workbook, with no import cycle."""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
LAYERS = {"utils": 0, "core": 1, "decoding": 2, "compat": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """0 utils, 1 core, 2 decoding, 3 compat, 4 the workbook (and the package itself)."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 4) if len(parts) > 1 else 4


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The workbook modules ``path`` imports (relative imports resolved; ``from x import y`` counts x.y when y is a
    module), everywhere in the file or only at module level."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "multitoken"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "multitoken":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if (LIB / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (LIB / Path(*sub.split("."))).is_dir() else mod)
    return found - {name}


MODULES = {module_name(p): p for p in sorted((LIB / "multitoken").rglob("*.py"))}


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {m: imports(p, top_level_only) & set(MODULES) for m, p in MODULES.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` (None: none)."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_layers_exist():
    assert {layer(m) for m in MODULES} == {0, 1, 2, 3, 4}
    assert "multitoken.decoding.engine" in MODULES and "multitoken.core.models" in MODULES


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) < 4])
def test_a_layer_imports_only_the_layers_below_it(module):
    """Lazy imports inside functions included: the core never reaches up into the engine, the engine never into
    the other systems' interfaces or the workbook."""
    up = sorted(i for i in imports(MODULES[module]) if layer(i) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports {up}"


def test_no_import_cycle():
    """No cycle among the package's imports, lazy imports inside functions included."""
    assert cycle(graph(top_level_only=True)) is None
    assert cycle(graph(top_level_only=False)) is None
