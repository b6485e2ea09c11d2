"""The package's structure: no import cycle between its modules, no module much above 500 lines
without its reason stated at its top, and the backend registry."""
import ast
import pathlib
import re

import pytest
import torch

import flatfused
from flatfused import backends

PACKAGE = pathlib.Path(flatfused.__file__).resolve().parent
LONG = 500  # lines; a longer module says why at its top ("Why this module is long")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["flatfused", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _inside_function(tree):
    """Nodes of ``tree`` that sit inside a function (imported only when it runs)."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.walk(node):
                if child is not node:
                    inner.add(id(child))
    return inner


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        inner = _inside_function(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if id(node) in inner:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & known.keys()
                deps |= subs
                if target in known and len(subs) < len(node.names):
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & known.keys()
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_long_modules_say_why():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > LONG and "Why this module is long" not in text[:3000]:
            long.append((name, len(text.splitlines())))
    assert long == []


def test_a_registered_backend_is_a_backend_like_any_other():
    calls = []

    class Ops:
        def zero_(self, grad):
            calls.append(grad.numel())
            grad.zero_()

    backends.register_backend("test-ops", Ops(), lambda device: None if device.type == "cpu"
                               else "CPU only")
    try:
        assert "test-ops" in backends.BACKENDS
        assert backends.resolve("test-ops", "cpu") == "test-ops"
        assert backends.unavailable_reason("test-ops", torch.device("meta")) == "CPU only"
        g = torch.ones(5)
        flatfused.ops.zero_(g, backend="test-ops")
        assert calls == [5] and not g.any()
        with pytest.raises(ValueError, match="registered already"):
            backends.register_backend("test-ops", Ops(), lambda device: None)
    finally:
        backends.unregister_backend("test-ops")
    assert "test-ops" not in backends.BACKENDS
    with pytest.raises(ValueError, match="built-in"):
        backends.unregister_backend("cpu")
    with pytest.raises(ValueError, match="auto"):
        backends.register_backend("auto", Ops(), lambda device: None)


def test_tests_are_grouped_by_layer_and_share_cases_through_one_module():
    """Every test file sits in its layer's folder (the root holds the few about the repository
    as a whole), and no test file imports another: shared cases live in tests/cases.py
    (tests/backends/test_cuda_emulated.py reruns whole test modules by design)."""
    tests = pathlib.Path(__file__).resolve().parent
    layers = {"ops", "backends", "optim", "tools", "integration"}
    assert layers <= {p.name for p in tests.iterdir() if p.is_dir()}
    stray = [p.name for p in tests.glob("test_*.py")
             if p.name not in ("test_package_layout.py", "test_packaging.py", "test_readme.py")]
    assert stray == []
    for path in tests.glob("*/test_*.py"):
        assert path.parent.name in layers, path
        if path.name == "test_cuda_emulated.py":
            continue
        imports = re.findall(r"^\s*(?:from|import) (test_\w+)", path.read_text(), re.M)
        assert imports == [], f"{path.relative_to(tests)} imports {imports}"
