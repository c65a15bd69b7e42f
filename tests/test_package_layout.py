"""The package's shape: its import graph has no circle, local imports only defer optional dependencies, and no
module reaches into another's private attributes (issue #14)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "onnxcam"

# Imports that stay inside functions, and why: the CLI must start (and say what to install) without onnxruntime
# or the serve extra; the model layer runs onnxruntime only to probe shapes, and `onnxcam ops` reads the rule
# registry (which sits on the model layer) without onnxruntime installed.
DEFERRED = {
    "onnxcam": {"onnxcam.run.explainer"},
    "onnxcam.cli.main": {"onnxcam.run.explainer", "onnxcam.cam.export", "onnxcam.model.select", "onnxcam.ray",
                         "onnxcam.ray.serve",
                         "onnxcam.model.graph", "onnxcam.serve", "onnxcam.evaluate", "onnxcam.run.runtime",
                         "onnxcam.run.placement", "onnxcam.autodiff.rules"},
    "onnxcam.model.graph": {"onnxcam.run.runtime"},
    "onnxcam.model.select": {"onnxcam.run.runtime"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported onnxcam module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names]
            hits = [n for n in names if n in modules] or ([target] if target in modules else [])
        elif isinstance(node, ast.Import):
            hits = [a.name for a in node.names if a.name in modules]
        else:
            continue
        found.extend((h, id(node) in top or _in_type_checking(tree, node)) for h in hits)
    return found


def _in_type_checking(tree, node) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(node is n for n in ast.walk(stmt)):
                return True
    return False


def _graph(include_deferred: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, at_top in _imports(name, path, modules):
            if target != name and (at_top or include_deferred):
                edges.add(target)
        # Importing a.b.c runs the __init__ of a.b first.
        parent = name.rpartition(".")[0]
        if parent and parent in modules:
            edges.add(parent)
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circle_even_counting_deferred_imports():
    # Package __init__s are edges of their children; a child importing its own package back is not a circle.
    graph = {n: {m for m in e if not n.startswith(m + ".")} for n, e in _graph(include_deferred=True).items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_local_imports_only_defer_optional_dependencies():
    modules = _modules()
    deferred = {}
    for name, path in modules.items():
        for target, at_top in _imports(name, path, modules):
            if not at_top:
                deferred.setdefault(name, set()).add(target)
    extra = {n: t - DEFERRED.get(n, set()) for n, t in deferred.items() if t - DEFERRED.get(n, set())}
    assert not extra, f"function-local imports outside the list of deferred optional dependencies: {extra}"


def test_no_module_reads_another_objects_private_attributes():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in re.finditer(r"\b([a-z_][a-z0-9_]*)\.(_[a-z][a-z0-9_]*)\b", code):
                owner, attr = m.groups()
                if owner in ("self", "cls", "sys", "os", "np", "ort", "onnx", "helper", "field", "proto"):
                    continue
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {owner}.{attr}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("stage", ["onnxcam.model.select", "onnxcam.autodiff", "onnxcam.cam.build",
                                   "onnxcam.cam.targets", "onnxcam.run.explainer", "onnxcam.cli"])
def test_each_stage_imports_alone(stage):
    res = subprocess.run([sys.executable, "-c", f"import {stage}"], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr


def test_a_folder_named_onnxcam_next_to_a_script_does_not_hide_the_package(tmp_path):
    # A clone is a folder named "onnxcam" without an __init__.py; a script beside it must still import the
    # installed package, not that folder as an empty namespace package.
    (tmp_path / "onnxcam").mkdir()
    (tmp_path / "onnxcam" / "README.md").write_text("a clone")
    res = subprocess.run([sys.executable, "-c", "import onnxcam; print(onnxcam.__file__, onnxcam.Explainer.__name__)"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Explainer" in res.stdout and str(tmp_path) not in res.stdout
