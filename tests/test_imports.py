"""The package's import graph, read from the source with ast: no cycle among lorabench
modules, and reporting imports no model code (it reads the Parquet results only)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorabench

ROOT = Path(lorabench.__file__).parent
MODEL_CODE = ("lorabench.core.models", "lorabench.core.generation", "lorabench.core.construction",
              "lorabench.training")


def _module_name(path: Path) -> str:
    parts = ("lorabench",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """lorabench modules that ``path`` imports anywhere (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "lorabench.report.analysis" in graph["lorabench.report.figures"]
    assert "lorabench.core.theory" in graph["lorabench.runs.runner"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_no_import_cycle():
    assert _cycle(import_graph()) is None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_reporting_imports_no_model_code():
    """Not directly, nor through the modules it imports."""
    graph = import_graph()
    offending = {name: sorted(d for d in _reachable(graph, name) if d.startswith(MODEL_CODE))
                 for name in graph if name.startswith("lorabench.report")}
    assert not {name: deps for name, deps in offending.items() if deps}


LAYERS = ("core", "training", "methods", "runs", "report")  # each may import only those before it


def test_each_layer_imports_only_the_layers_below_it():
    def layer(module: str):
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None

    wrong = []
    for module, deps in import_graph().items():
        own = layer(module)
        if own is None:
            continue
        allowed = set(LAYERS[: LAYERS.index(own) + 1])
        wrong += [f"{module} -> {dep}" for dep in sorted(deps) if layer(dep) not in allowed | {None} or dep == "lorabench.cli"]
    assert not wrong, "imports against the layering cli -> report -> runs -> methods -> training -> core:\n" + "\n".join(wrong)


def test_job_steps_import_neither_pandas_nor_matplotlib():
    """A training, construction or models job is a fresh process: each import it does not
    need is paid once per job (pandas ~0.5 s of CPU, matplotlib ~1 s)."""
    import subprocess
    import sys

    code = ("import sys, lorabench.cli, lorabench.runs.pipeline, lorabench.runs.runner; "
            "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
