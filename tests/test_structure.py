"""The code's layout, checked by script (issue 22): the import graph, function sizes, where stage names
are compared, where files are renamed, and that docs/ARCHITECTURE.md names modules that exist.

The graph is read from the source (``ast``), every import counted -- also those inside functions, which
would otherwise hide a cycle.
"""

import ast
import collections
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = {"zephyr_fast": REPO / "zephyr_fast", "zephyr_kernels": REPO / "kernels"}
# zephyr_fast's parts, lowest first: a module imports only its own layer or those below it
LAYERS = [
    {"fileio", "redaction", "safe_yaml"},
    {"config", "outputs"},
    {"data"},
    {"model"},
    {"objectives"},
    {"training"},
    {"aif"},
    {"eval"},
    {"cli", "train", "demo", "__init__"},
]
STAGE_NAMES = {"sft", "dpo", "ref_logps"}
REGISTRY = "zephyr_fast/objectives/registry.py"
# comparisons against the same words that are not stage names: PackedBatch's layout
NOT_STAGES = {("zephyr_fast/data/batch.py", "self.layout")}
MAX_FUNCTION_LINES = 60
# os.replace: the atomic write, and the checkpoint publish (a whole folder renamed into place)
REPLACE_ALLOWED = {"zephyr_fast/fileio.py", "zephyr_fast/training/checkpoint.py"}


def _modules() -> dict:
    """``{dotted name: path}`` of every module of both packages."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node) -> list:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if not MODULES[module].name == "__init__.py":
            package = package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _graph() -> dict:
    """``{module: {imported module}}``; importing a package's own parent is not an edge (Python does it anyway)."""
    graph = collections.defaultdict(set)
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[mod] |= {t for t in _targets(mod, node) if t in MODULES and t != mod and not mod.startswith(t + ".")}
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in MODULES:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def _layer(mod: str) -> int:
    part = mod.split(".")[1] if "." in mod else "__init__"
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{mod}: its part {part!r} is in no layer of tests/test_structure.py")


def _rel(path) -> str:
    return os.path.relpath(path, REPO)


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    up = [f"{m} -> {t}" for m, ts in _graph().items() if m.startswith("zephyr_fast")
          for t in ts if t.startswith("zephyr_fast.") and _layer(t) > _layer(m)]
    assert up == []


def test_kernels_are_standalone():
    assert [f"{m} -> {t}" for m, ts in _graph().items() if m.startswith("zephyr_kernels")
            for t in ts if t.startswith("zephyr_fast")] == []


def test_config_loads_neither_torch_nor_the_trainer():
    code = ("import sys, zephyr_fast.config; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets', "
            "'zephyr_kernels') or m.startswith(('zephyr_fast.training', 'zephyr_fast.data', 'zephyr_fast.model'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_function_over_60_lines_outside_data():
    roots = [REPO / "zephyr_fast", REPO / "kernels", REPO / "benchmarks", REPO / "scripts"]
    long = []
    for path in (p for r in roots for p in r.rglob("*.py")):
        if _rel(path).startswith("zephyr_fast/data/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def _stage_comparisons(path) -> list:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        consts = [e for s in sides for e in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])
                  if isinstance(e, ast.Constant) and e.value in STAGE_NAMES]
        others = {ast.unparse(s) for s in sides if not isinstance(s, (ast.Constant, ast.Tuple, ast.List, ast.Set))}
        if consts and not {(_rel(path), o) for o in others} <= NOT_STAGES:
            found.append(f"{_rel(path)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_stage_names_are_compared_only_in_the_registry():
    found = [c for p in (REPO / "zephyr_fast").rglob("*.py") if _rel(p) != REGISTRY for c in _stage_comparisons(p)]
    assert found == []


def test_os_replace_only_in_the_atomic_write_and_the_checkpoint_publish():
    users = {_rel(p) for r in PACKAGES.values() for p in r.rglob("*.py") if "os.replace(" in p.read_text()}
    assert users <= REPLACE_ALLOWED, users - REPLACE_ALLOWED


def test_architecture_names_only_what_exists():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`((?:zephyr_fast|kernels|benchmarks|tests|recipes|scripts)/[\w./-]*)`", text))
    dotted = set(re.findall(r"`(zephyr_(?:fast|kernels)(?:\.\w+)+)", text))
    missing = sorted(p for p in paths if not (REPO / p).exists())
    missing += sorted(d for d in dotted if not _dotted_exists(d))
    assert paths and missing == []


def _dotted_exists(name: str) -> bool:
    """A module, or a name defined at the top of a module (``zephyr_fast.fileio.atomic_write``)."""
    if name in MODULES:
        return True
    mod, _, attr = name.rpartition(".")
    if mod not in MODULES:
        return False
    tree = ast.parse(MODULES[mod].read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return attr in defined


@pytest.mark.parametrize("graph, cycles", [({"a": {"b"}, "b": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])])
def test_the_cycle_finder_finds_cycles(graph, cycles, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MODULES", dict.fromkeys(graph))
    assert _cycles(collections.defaultdict(set, graph)) == cycles
