"""The package's structure: its imports form layers with no cycle, modules import each other at the
top (a function-local import of the package is allowed only where it spares an optional heavy
dependency), and no module or function grows past the size a reader can hold."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokenformer"
# function-local imports of the package that are there on purpose: lm-eval is the `eval` extra,
# transformers (tokenformer.hf, for `convert --format hf`) the `hf` extra
LOCAL_IMPORTS_ALLOWED = {"tokenformer.evaluation.lm_eval", "tokenformer.hf"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(node: ast.AST, importer: str) -> list[str]:
    """The package modules an import statement names (`from tokenformer.data import images` names
    `tokenformer.data.images`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: `from .. import x` in tokenformer.cli.train is tokenformer.x
        base = ".".join(importer.split(".")[:-node.level] + ([node.module] if node.module else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return found or ([base] if base in MODULES else [])


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the package modules it imports anywhere; and the function-local ones."""
    graph, local = {}, []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {m for node in ast.walk(tree) for m in imported_modules(node, name) if m != name}
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    local += [(name, function.name, m) for m in imported_modules(node, name)]
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_from_package_imports_are_resolved():
    tree = ast.parse("from tokenformer.data import images\nfrom .. import errors\nimport tokenformer.files")
    names = [m for node in tree.body for m in imported_modules(node, "tokenformer.cli.train")]
    assert names == ["tokenformer.data.images", "tokenformer.errors", "tokenformer.files"]


def test_the_package_imports_form_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 30 and "tokenformer.training.loop" in graph["tokenformer.cli.train"]
    assert find_cycle(graph) is None


def test_no_function_local_import_of_the_package_but_optional_extras():
    _, local = import_graph()
    assert [entry for entry in local if entry[2] not in LOCAL_IMPORTS_ALLOWED] == []


def test_modules_and_functions_stay_small():
    long_modules = {name: n for name, path in MODULES.items()
                    if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = [(name, node.name, node.end_lineno - node.lineno + 1)
                      for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_modules == {} and long_functions == []
