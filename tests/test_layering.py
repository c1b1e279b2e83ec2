"""The package's structure: imports point down only, no import cycles, no attention-op names compared
outside the op registry (read from the source with ast, so lazy imports inside functions count too)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fms"
# Each package may import only from the packages below it (and from itself). Lower rank = lower layer.
RANK = {"triton": 0, "cache": 0, "resources": 0, "distributed": 0, "modules": 1, "models": 2, "runtime": 3,
        "utils": 4, "serving": 5, "eval": 6, "bench": 6, "entrypoints": 7}
ALLOWED_SAME_RANK = {("cache", "triton"), ("eval", "bench")}  # the eval report times with bench.timing
# fms.utils holds layers of its own: checkpoint loading and tokenizers sit below the models (which
# register their checkpoint rules), generation above the runtime.
MODULE_RANK = {"fms.utils.serialization": 1.5, "fms.utils.tokenizers": 0}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from fms.utils import serialization` imports the submodule only
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in MODULE_NAMES else node.module


def _package(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[:3]) in MODULE_RANK:
        return ".".join(parts[:3])
    return parts[1] if len(parts) > 1 and parts[0] == "fms" and parts[1] in RANK else None


RANK.update(MODULE_RANK)


MODULES = dict(_modules())
MODULE_NAMES = set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    here = _package(name)
    if here is None:
        return
    upward = []
    for target in _imports(MODULES[name]):
        there = _package(target)
        if there is None or there == here:
            continue
        if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and (here, there) not in ALLOWED_SAME_RANK):
            upward.append(target)
    assert not upward, f"{name} ({here}) imports upward or sideways: {sorted(set(upward))}"


def test_no_import_cycles():
    graph = {name: {t for t in _imports(path) if t in MODULES and t != name} for name, path in MODULES.items()}
    # package __init__ files re-export their modules; a cycle through them is still a cycle of modules
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(m.count(".") == 1 and MODULES[m].name == "__init__.py" for m in cycle[:-1]):
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name)


def test_no_op_name_comparisons_outside_the_registry():
    names = {"sdpa", "flex", "paged"}
    found = []
    for name, path in MODULES.items():
        if name == "fms.modules.attention":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                if any(c.value in names for c in consts):
                    found.append(f"{name}:{node.lineno}")
    assert not found, f"attention-op names compared outside fms.modules.attention: {found}"
