"""The house's layering: data flows down (CLI -> converters, trainer, eval, hub -> format), no module
imports a floor above it, and no two modules import each other, even from inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "matq_format": 1,
    "matq_converters": 2,
    "matq_torch": 2,
    "matq_train": 2,
    "matq_eval": 2,
    "matq_hub": 2,
    "matq_cli": 3,
}
HEAVY = ("onnx", "onnxruntime", "onnxruntime_genai", "torch", "transformers", "gguf", "jax", "optax")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in FLOORS for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The matq modules ``name`` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _parents(name: str) -> set[str]:
    """A module's enclosing packages: importing it runs their ``__init__``, which is not a cycle."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_module_imports_a_floor_above_it():
    upward = [
        f"{m} (floor {FLOORS[m.split('.')[0]]}) imports {t} (floor {FLOORS[t.split('.')[0]]})"
        for m, targets in _graph().items()
        for t in targets
        if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]]
    ]
    assert not upward, "\n".join(upward)


def test_importers_and_exporters_do_not_reach_into_each_other():
    graph = _graph()
    crossing = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t in targets
        if (m.startswith("matq_converters.importers") and t.startswith("matq_converters.exporters"))
        or (m.startswith("matq_converters.exporters") and t.startswith("matq_converters.importers"))
    ]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    graph = {m: {t for t in ts if t not in _parents(m)} for m, ts in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "command", [["--help"], ["inspect", "--help"], ["convert", "--help"], ["train", "--help"]]
)
def test_the_cli_imports_nothing_heavy(command):
    """``matq --help`` (and the flags every exporter declares) load none of the optional packages."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from matq_cli.main import cli\n"
        f"r = CliRunner().invoke(cli, {command!r})\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"matq {' '.join(command)} imported {out.stdout.strip()}"
