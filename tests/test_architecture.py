"""The package's shape, checked from the source: no import circles, and the
downstream-classifier package independent of federation and evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harmonize"


def import_graph() -> dict[str, set[str]]:
    """module -> harmonize modules it imports (at any depth, lazy imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_under_harmonize():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_classify_imports_neither_federated_nor_evaluation():
    graph = import_graph()
    bad = {(m, t) for m, targets in graph.items() if m.startswith("harmonize.classify")
           for t in targets if t.startswith(("harmonize.federated", "harmonize.evaluation"))}
    assert bad == set()


def test_federated_tasks_take_their_loss_terms_from_the_translators():
    graph = import_graph()
    assert "harmonize.translators.cyclegan.losses" in graph["harmonize.federated.cyclegan_task"]
    assert "harmonize.translators.diffusion.losses" in graph["harmonize.federated.diffusion_task"]


def test_training_and_data_sit_below_the_translators():
    """`harmonize.training` (one training run) and `harmonize.data` serve every model
    kind, so they never import a translator: what both need (e.g. the polarity guard)
    lives in `harmonize.data`."""
    graph = import_graph()
    bad = {(m, t) for m, targets in graph.items()
           if m.startswith(("harmonize.training", "harmonize.data"))
           for t in targets if t.startswith("harmonize.translators")}
    assert bad == set()


def test_importing_the_package_changes_no_process_state():
    """A library import must not pick the user's matplotlib backend, set OpenMP's
    environment or install warning filters (a notebook user's settings stay theirs)."""
    import subprocess
    import sys

    modules = sorted(import_graph())
    # the dependencies set their own state when imported (torch, grpc, ...): import them
    # first, then compare what importing harmonize's modules adds
    third_party = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            third_party |= {n.split(".")[0] for n in names if n}
    third_party -= {"harmonize", "__future__", *sys.stdlib_module_names}
    code = f"""
import os, sys, warnings
import matplotlib
for name in {sorted(third_party)!r}:
    __import__(name)
before = (matplotlib.rcParams["backend"], dict(os.environ), list(warnings.filters))
import importlib
for name in {modules!r}:
    importlib.import_module(name)
after = (matplotlib.rcParams["backend"], dict(os.environ), list(warnings.filters))
changed = [k for k in set(before[1]) | set(after[1]) if before[1].get(k) != after[1].get(k)]
print("backend", before[0] == after[0], "env", changed, "filters", len(after[2]) - len(before[2]))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=PACKAGE.parent, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "backend True env [] filters 0", run.stdout


def test_federated_tasks_share_one_interface_and_nothing_probes_them():
    import re

    from harmonize.federated import (
        classifier_task,
        cut_task,
        cyclegan_task,
        diffusion_task,
        histogram_task,
        local_prior_task,
    )
    from harmonize.federated.task_interface import FederatedTask

    tasks = [classifier_task.ClassifierTask, cyclegan_task.CycleGANTask, cut_task.CUTTask,
             diffusion_task.DiffusionTask, histogram_task.HistogramTask,
             local_prior_task.LocalPriorTask]
    assert all(issubclass(t, FederatedTask) and not t.__abstractmethods__ for t in tasks)
    probe = re.compile(r"hasattr\(\s*(self\.)?(task|build_task)\b[^)]*\)")
    probes = [f"{p.name}: {m.group(0)}" for p in (PACKAGE / "federated").glob("*.py")
              for m in probe.finditer(p.read_text())]
    assert not probes, probes
