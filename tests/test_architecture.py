"""The package's shape: an acyclic import graph (imports inside functions count too), every
module importable on its own, and ARCHITECTURE.md naming every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "somelvlm"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.with_suffix("").relative_to(SRC).parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level or in functions)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_is_acyclic():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _import_alone(module: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    return module, r.returncode, r.stderr[-2000:]


@pytest.mark.slow
def test_each_module_imports_alone():
    optional = ("somelvlm.serve", "somelvlm.engines")  # need their extras
    # `__main__` modules run a command when imported (that is their job)
    names = [m for m in modules() if not m.startswith(optional) and not m.endswith("__main__")]
    with ThreadPoolExecutor(2) as pool:
        failed = [r for r in pool.map(_import_alone, names) if r[1] != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, _, err in failed)


def test_architecture_md_names_every_module():
    text = (SRC.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [p.relative_to(PACKAGE).as_posix() for p in modules().values()
               if p.name != "__init__.py" and p.name != "__main__.py"
               and p.relative_to(PACKAGE).as_posix() not in text and p.name not in text]
    assert not missing, f"ARCHITECTURE.md does not mention {missing}"
