"""The package's imports run one way: no module imports itself through a chain of others (read from the source
with ``ast``: every import statement, at module level or inside functions, except ``if TYPE_CHECKING:`` blocks),
and the layers stack CLI above experiments above evaluation above training (never the other way)."""
import ast
import glob
import importlib
import os

import pytest

import fastjac

PACKAGE_DIR = os.path.dirname(fastjac.__file__)
ROOT = os.path.dirname(PACKAGE_DIR)
LAYERS = ["fastjac.training", "fastjac.evaluation", "fastjac.experiments", "fastjac.cli"]  # lowest first


def _modules() -> dict[str, str]:
    out = {}
    for path in glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _defined_names(module: str) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in ast.parse(open(MODULES[module]).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def imports(module: str) -> set[str]:
    """The fastjac modules ``module`` imports (``from pkg import name`` is ``pkg.name`` when that is a module)."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in MODULES:
                out.add(sub)
            elif target in MODULES and alias.name in _defined_names(target):
                out.add(target)  # a name the package defines; otherwise a compiled extension (``_C``), not Python
    return {m for m in out if m in MODULES and m != module}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest import chain from ``start`` back to itself, or None."""
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for dep in sorted(graph[path[-1]]):
                if dep == start:
                    return path + [start]
                if dep not in seen:
                    seen.add(dep)
                    nxt.append(path + [dep])
        paths = nxt
    return None


def _layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_and_is_in_no_import_cycle(module):
    if module.startswith("fastjac.triton") and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not module.endswith("__main__"):  # importing it runs the CLI
        importlib.import_module(module)
    cycle = _cycle_from(module, GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downwards():
    upward = [(m, dep) for m, deps in GRAPH.items() for dep in deps
              if _layer(m) is not None and _layer(dep) is not None and _layer(dep) > _layer(m)]
    assert not upward, f"imports from a lower layer into a higher one ({' < '.join(LAYERS)}): {upward}"


def test_the_checker_sees_a_cycle():
    assert _cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle_from("a", {"a": {"b"}, "b": set()}) is None
