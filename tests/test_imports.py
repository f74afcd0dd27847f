"""The package's import structure: every module imports on its own in a fresh interpreter, and the graph of
imports between opt_fast's modules has no cycle.

Modules are found on disk: opt_fast/**.py, plus triton_kernels/*.py, which installs as
opt_fast.triton_kernels (setup.py). ``__main__`` modules are entry points (importing one runs the CLI), so
they are checked for cycles but not imported.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as
SOURCES = {ROOT / "opt_fast": "opt_fast", ROOT / "triton_kernels": "opt_fast.triton_kernels"}


def module_files():
    """{module name: file} of every module of the installed package (a package is its __init__.py)."""
    mods = {}
    for folder, pkg in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = f
    return mods


MODULES = module_files()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def imports_of(name):
    """The opt_fast modules that module ``name`` imports: every import statement in the file, at module level
    or inside a function (a deferred import closes a cycle just the same, only later: the cycle between
    nn.layers and nn.stochastic was one). ``from pkg import x`` counts as an import of the submodule pkg.x
    when x is one, else of pkg."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.add(sub if sub in MODULES else base)
    return {t for t in targets if t in MODULES}


def import_graph():
    """{module: the opt_fast modules it imports}. An import of one's own ancestor package is left out: Python
    initialises every package before its submodules, so that edge is implied for every submodule (a package
    whose __init__ imports its submodules would otherwise always be a cycle); the child sees the parent's
    names defined before the parent imported it."""
    graph = {}
    for name in MODULES:
        graph[name] = {t for t in imports_of(name) if not name.startswith(t + ".")}
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_module_list_is_complete():
    for name in ("opt_fast", "opt_fast._register", "opt_fast.nn.layers", "opt_fast.nn.stochastic",
                 "opt_fast.reference.householder", "opt_fast.triton_kernels.lowdin", "opt_fast.train.__main__"):
        assert name in MODULES, name


def test_no_import_cycle():
    graph = import_graph()
    assert "opt_fast.nn.stochastic" in graph["opt_fast.nn.layers"]  # the graph sees relative imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    graph["opt_fast.nn.stochastic"] = graph["opt_fast.nn.stochastic"] | {"opt_fast.nn.layers"}  # the old cycle
    assert find_cycle(graph) is not None


# One interpreter imports torch (the slow part, ~1-2 s, the same for every module), then forks a child per
# module which imports just that module: no opt_fast module is loaded in the child before it, as in a fresh
# interpreter. A child prints "OK", "MISSING-OPTIONAL <package>" (an optional third-party package such as
# triton is not installed) or the traceback.
_DRIVER = """
import importlib, os, sys, traceback
import torch  # noqa: F401
for name in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            print(name, "OK")
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("opt_fast"):
                print(name, "MISSING-OPTIONAL", e.name)
            else:
                print(name, "FAILED", repr(e))
                traceback.print_exc()
        except BaseException as e:
            print(name, "FAILED", repr(e))
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_alone():
    names = [n for n in MODULES if not n.endswith(".__main__")]
    r = subprocess.run([sys.executable, "-c", _DRIVER, *names], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    status = {}
    for line in r.stdout.splitlines():
        name, _, rest = line.partition(" ")
        if name in MODULES:
            status[name] = rest
    assert set(status) == set(names), f"no result for {sorted(set(names) - set(status))}: {r.stderr}"
    failed = {n: s for n, s in status.items() if not (s == "OK" or s.startswith("MISSING-OPTIONAL"))}
    assert not failed, f"modules that do not import on their own: {failed}\n{r.stderr}"
    missing = {n: s.split()[-1] for n, s in status.items() if s.startswith("MISSING-OPTIONAL")}
    if missing:
        pytest.skip(f"all other modules import on their own; these need an optional package: {missing}")
