"""The code's structure: no import cycles, deliberate deferred imports, short loop code."""

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("configs", "storage", "models", "parallel", "kernels", "data", "losses", "training",
            "evaluation", "inference", "sweeps", "checkpoints")
ENTRY_POINTS = ("train.py", "eval.py", "sweep.py", "convert.py")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(("jaxlm",) + parts)] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(imported module, node) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` depends on the submodule; `from pkg import name`
            # on the package.
            subs = [f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
            out += [(name, node) for name in subs or [node.module]]
    return out


def _graph(key) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {key(t) for t, _ in _imports(path) if t in MODULES}
        graph.setdefault(key(name), set()).update(t for t in targets if t != key(name))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    """Guards the tests below: a cycle must be reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_import_without_cycles():
    """Every import counts, also inside functions: a deferred import does not hide a cycle."""
    assert len(MODULES) > 40
    assert _cycle(_graph(lambda m: m)) is None


def test_packages_form_layers():
    """The packages themselves never import each other in a circle."""
    assert _cycle(_graph(lambda m: m.split(".")[1])) is None


def _function_level_imports(path: Path) -> list[tuple[int, int, str]]:
    """(line of the enclosing def, line of the import, its text) for imports in functions."""
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.append((fn.lineno, node.lineno, ast.unparse(node)))
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_deferred_imports_say_why(name):
    """Imports inside functions are deliberate: a `# Deferred:` comment in the function,
    above the import, says why (a heavy or optional module that only some paths need)."""
    lines = MODULES[name].read_text().splitlines()
    for def_line, lineno, text in _function_level_imports(MODULES[name]):
        above = "\n".join(lines[def_line - 1:lineno - 1])
        assert "# Deferred:" in above, f"{name}:{lineno}: `{text}` without a '# Deferred:' reason"


def test_training_functions_are_short():
    for path in sorted((ROOT / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.name} has {length} lines"


def test_only_the_entry_points_see_config_dicts():
    """Below the entry, the library takes typed sections: no ConfigDict in library code
    except where a config is resolved (Config.from_dict) or a sweep edits one."""
    allowed = {"jaxlm.configs.base", "jaxlm.configs.sections", "jaxlm.configs.keys",
               "jaxlm.sweeps.spec"}
    for name, path in MODULES.items():
        if name in allowed or name.startswith("jaxlm.configs."):
            continue
        assert "ml_collections" not in path.read_text(), name
